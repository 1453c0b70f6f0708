"""`hypyr serve`: the REST API on a unix socket, against a fake toolstack (no KVM, no domains).

The functions of `hypyr.toolstack.api` and `sched` are monkeypatched to a fake that keeps domains
in a dict; xl.cfg text goes through the real `hypyr.toolstack.xlcfg`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from hypyr.errors import Conflict, HypyrError, InvalidInput, NotFound, NotSupported, OperationTimeout, Unavailable
from hypyr.toolstack import api, sched, server
from hypyr.toolstack.api import DomainInfo
from hypyr.toolstack.errors import (
    DomainExists,
    DomainNotFound,
    DomainStateError,
    DomainTimeout,
    DomainUnreachable,
    InsufficientResources,
    InvalidConfig,
    RegistryBusy,
    SchedulerUnavailable,
    VcpuNotFound,
)
from hypyr.toolstack.server import ApiClient, ApiError, UnixHTTPConnection


# -- the fake toolstack -------------------------------------------------------------------------
@dataclass
class Record:              # the parts of domrecord.DomainRecord the server uses
    domid: int
    name: str
    state: str


WEB_UUID = "6f1c2a3e-0b1d-4c5e-8f90-123456789abc"
DB_UUID = "0d9e8f7a-6b5c-4d3e-9f21-abcdef012345"


class FakeToolstack:
    def __init__(self):
        self.lock = threading.Lock()
        self.domains = {"web": DomainInfo("web", 1, 256, 2, "-b----", 1.5, "running", WEB_UUID),
                        "db": DomainInfo("db", 2, 512, 1, "--p---", 0.25, "paused", DB_UUID)}
        self.next_id = 3
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}     # function name → exception to raise
        self.vcpu_barrier: threading.Barrier | None = None
        self.sched = {}

    def _check(self, fn: str, name: str | None = None) -> None:
        if fn in self.fail:
            raise self.fail[fn]
        if name is not None and name not in self.domains:
            raise DomainNotFound(f"no domain named {name}")

    def _record(self, *call) -> None:
        with self.lock:
            self.calls.append(call)

    # api
    def list_domains(self, names=None):
        self._check("list_domains")
        with self.lock:
            doms = sorted(self.domains.values(), key=lambda d: d.domid)
        return [DomainInfo(**vars(d)) for d in doms if not names or d.name in names]

    def domain_info(self, ident):
        self._check("domain_info")
        with self.lock:
            for d in self.domains.values():
                if ident in (d.name, str(d.domid)):
                    return DomainInfo(**vars(d))
        raise DomainNotFound(f"no domain named {ident}")

    def describe(self, rec):
        return self.domain_info(rec.name)

    def create(self, cfg):
        self._check("create")
        self._record("create", cfg.name)
        with self.lock:
            if cfg.name in self.domains:
                raise DomainExists(f"a domain named {cfg.name} already exists (id {self.domains[cfg.name].domid})")
            d = DomainInfo(cfg.name, self.next_id, int(cfg.memory), int(cfg.vcpus), "-b----", 0.0, "running")
            self.domains[cfg.name] = d
            self.next_id += 1
        return Record(d.domid, d.name, "running")

    def _op(self, op):
        def f(name):
            self._check(op, name)
            self._record(op, name)
            if op in ("pause", "unpause"):
                self.domains[name].status = "paused" if op == "pause" else "running"
        return f

    def shutdown(self, name, wait=False):
        self._check("shutdown", name)
        self._record("shutdown", name, wait)

    def destroy(self, name):
        self._check("destroy", name)
        self._record("destroy", name)
        with self.lock:
            del self.domains[name]

    def vcpu_list(self, name=None):
        self._check("vcpu_list", name)
        if self.vcpu_barrier:
            self.vcpu_barrier.wait()       # only passes when several requests are in flight at once
        d = self.domains[name]
        return [{"name": d.name, "domid": d.domid, "vcpu": i, "cpu": i, "tid": 1000 + i, "state": "b",
                 "time": 0.5, "affinity": [0, 1]} for i in range(d.vcpus)]

    def vcpu_pin(self, name, vcpu, cpus):
        self._check("vcpu_pin", name)
        self._record("vcpu_pin", name, vcpu, set(cpus))

    # sched
    def get_params(self, dom):
        self._check("get_params")
        return self.sched.get(dom.uuid, (256, 0))

    def set_params(self, dom, weight=None, cap=None):
        self._check("set_params")
        self._record("set_params", dom.domid, dom.name, dom.uuid, weight, cap)
        w, c = self.sched.get(dom.uuid, (256, 0))
        self.sched[dom.uuid] = (w if weight is None else weight, c if cap is None else cap)
        return self.sched[dom.uuid]

    def install(self, monkeypatch) -> None:
        """Replace the toolstack functions the server calls with this fake's."""
        for fn in ("list_domains", "domain_info", "describe", "create", "shutdown", "destroy", "vcpu_list",
                   "vcpu_pin"):
            monkeypatch.setattr(api, fn, getattr(self, fn))
        for op in ("pause", "unpause", "reboot"):
            monkeypatch.setattr(api, op, self._op(op))
        monkeypatch.setattr(sched, "get_params", self.get_params)
        monkeypatch.setattr(sched, "set_params", self.set_params)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch) -> FakeToolstack:
    f = FakeToolstack()
    f.install(monkeypatch)
    return f


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="hypyr-srv-", dir="/tmp")   # short: AF_UNIX paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def srv(fake, sockdir):
    s = server.make_server(os.path.join(sockdir, "api.sock"))
    t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()
    s.remove_socket()
    t.join(5)


@pytest.fixture
def client(srv) -> ApiClient:
    return ApiClient(srv.server_address, timeout=10)


def _kernel(tmp_path) -> str:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"\0" * 64)
    return str(k)


def _cfg_text(name: str, kernel: str) -> str:
    return f'name = "{name}"\nmemory = 128\nvcpus = 2\nkernel = "{kernel}"\n'


def _raw_exchange(path: str, data: bytes, timeout: float = 10) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


# -- reading ----------------------------------------------------------------------------------------
def test_list_domains(client):
    doms = client.get("/domains")
    assert [d["name"] for d in doms] == ["web", "db"]
    assert doms[0] == {"name": "web", "domid": 1, "memory": 256, "vcpus": 2, "state": "-b----",
                       "cpu_time": 1.5, "status": "running", "uuid": WEB_UUID, "seccomp": "kill",
                       "jail_uid": None}
    assert [d["name"] for d in client.get("/domains?name=db")] == ["db"]
    assert [d["name"] for d in client.get("/domains?name=db&name=1")] == ["db", "web"]
    assert [d["name"] for d in client.get("/domains?name=web,db")] == ["web", "db"]


def test_list_unknown_name_is_404(client):
    r = client.request("GET", "/domains?name=nope")
    assert r.status == 404 and r.data == {"error": "no domain named nope"}


def test_get_domain_by_name_or_id(client):
    assert client.get("/domains/db")["domid"] == 2
    assert client.get("/domains/2")["name"] == "db"
    assert client.get("/domains/web/")["name"] == "web"     # a trailing slash is fine


def test_unknown_domain_is_404(client, fake):
    for method, path in [("GET", "/domains/nope"), ("POST", "/domains/nope/pause"), ("DELETE", "/domains/nope"),
                         ("GET", "/domains/nope/vcpus"), ("GET", "/domains/nope/sched"),
                         ("POST", "/domains/nope/shutdown")]:
        r = client.request(method, path)
        assert r.status == 404, (method, path)
        assert r.data == {"error": "no domain named nope"}
        assert r.headers["content-type"] == "application/json"
    assert fake.calls == []


def test_unknown_path_is_404(client):
    for path in ("/", "/nope", "/domains/web/frobnicate", "/domains/web/vcpus/0"):
        r = client.request("GET", path)
        assert r.status == 404 and "there is no" in r.data["error"], path


def test_host(client):
    h = client.get("/host")
    import hypyr
    assert h["version"] == hypyr.__version__
    assert h["cpus"] == os.cpu_count()
    assert h["memory_total_mib"] > 0 and 0 <= h["memory_free_mib"] <= h["memory_total_mib"]
    assert h["kvm_backend"] in ("VT-x", "AMD-V", "PVM", "unknown")


def test_head_and_options(srv):
    conn = UnixHTTPConnection(srv.server_address, timeout=10)
    try:
        conn.request("HEAD", "/domains")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"" and int(r.getheader("Content-Length")) > 0
        conn.request("OPTIONS", "/domains/web")
        r = conn.getresponse()
        r.read()
        assert r.status == 204 and r.getheader("Allow") == "DELETE, GET, HEAD, OPTIONS"
    finally:
        conn.close()


# -- create -------------------------------------------------------------------------------------------
def test_create_from_config_text(client, fake, tmp_path, srv):
    r = client.request("POST", "/domains", {"config": _cfg_text("mail", _kernel(tmp_path))})
    assert r.status == 201, r.data
    assert r.data["name"] == "mail" and r.data["domid"] == 3 and r.data["vcpus"] == 2 and r.data["memory"] == 128
    assert r.headers["location"] == "/domains/mail"
    assert fake.calls == [("create", "mail")]
    assert client.get("/domains/mail")["domid"] == 3


def test_create_invalid_config_is_400_with_the_line(client, fake, tmp_path):
    text = f'name = "bad"\nmemory = 128\nthis is not xl syntax\nkernel = "{_kernel(tmp_path)}"\n'
    r = client.request("POST", "/domains", {"config": text})
    assert r.status == 400
    assert re.search(r"\b3\b", r.data["error"]), r.data     # the parser's sentence names line 3
    assert fake.calls == []


def test_create_from_path(client, fake, tmp_path):
    cfg = tmp_path / "files.cfg"
    cfg.write_text(_cfg_text("files", _kernel(tmp_path)))
    assert client.post("/domains", {"path": str(cfg)})["name"] == "files"
    r = client.request("POST", "/domains", {"path": "relative.cfg"})
    assert r.status == 400 and "absolute" in r.data["error"]
    r = client.request("POST", "/domains", {"path": str(tmp_path / "missing.cfg")})
    assert r.status == 400 and "does not exist" in r.data["error"]
    assert fake.calls == [("create", "files")]


def test_create_existing_name_is_409(client, fake, tmp_path):
    r = client.request("POST", "/domains", {"config": _cfg_text("web", _kernel(tmp_path))})
    assert r.status == 409 and r.data == {"error": "a domain named web already exists (id 1)"}


@pytest.mark.parametrize("body,fragment", [
    ({}, "exactly one of"),
    ({"config": "x", "path": "/x.cfg"}, "exactly one of"),
    ({"config": 42}, "'config' must be a string"),
    ({"path": "/x.cfg", "extra": 1}, "unknown field 'extra'"),
])
def test_create_bad_body_is_400(client, fake, body, fragment):
    r = client.request("POST", "/domains", body)
    assert r.status == 400 and fragment in r.data["error"], r.data
    assert fake.calls == []


def test_create_without_a_body_is_400(client):
    r = client.request("POST", "/domains")
    assert r.status == 400 and "needs a JSON object" in r.data["error"]


# -- lifecycle -------------------------------------------------------------------------------------------
def test_lifecycle_actions(client, fake):
    assert client.post("/domains/web/pause") == {"name": "web", "domid": 1, "action": "pause"}
    assert client.get("/domains/web")["status"] == "paused"
    client.post("/domains/1/unpause")          # by id: the API resolves it to the name
    client.post("/domains/web/reboot", {})
    client.post("/domains/web/shutdown")
    client.post("/domains/web/shutdown", {"wait": True})
    assert fake.calls == [("pause", "web"), ("unpause", "web"), ("reboot", "web"),
                          ("shutdown", "web", False), ("shutdown", "web", True)]
    r = client.request("POST", "/domains/web/destroy")
    assert r.status == 204 and r.body == b""
    r = client.request("DELETE", "/domains/db")
    assert r.status == 204
    assert fake.calls[-2:] == [("destroy", "web"), ("destroy", "db")]
    assert client.get("/domains") == []


def test_action_bad_body_is_400(client, fake):
    r = client.request("POST", "/domains/web/shutdown", {"wait": "yes"})
    assert r.status == 400 and "'wait' must be true or false" in r.data["error"]
    r = client.request("POST", "/domains/web/pause", {"force": True})
    assert r.status == 400 and r.data["error"] == "unknown field 'force' (this request takes none)"
    assert fake.calls == []


def test_hypyr_error_is_400_with_its_sentence(client, fake):
    fake.fail["pause"] = HypyrError("the guest did something odd")
    r = client.request("POST", "/domains/web/pause")
    assert r.status == 400 and r.data == {"error": "the guest did something odd"}


@pytest.mark.parametrize("error,status", [
    (InvalidInput, 400), (InvalidConfig, 400), (NotFound, 404), (DomainNotFound, 404), (VcpuNotFound, 404),
    (Conflict, 409), (DomainStateError, 409), (DomainExists, 409), (NotSupported, 501),
    (SchedulerUnavailable, 501), (Unavailable, 503), (RegistryBusy, 503), (DomainUnreachable, 503),
    (InsufficientResources, 503), (OperationTimeout, 504), (DomainTimeout, 504)])
def test_the_type_of_an_error_picks_the_status(client, fake, error, status):
    # the same sentence for all of them: the status comes from the type alone
    fake.fail["pause"] = error("domain web could not be paused")
    r = client.request("POST", "/domains/web/pause")
    assert (r.status, r.data) == (status, {"error": "domain web could not be paused"})
    assert server.status_of(error("x")) == status


def test_every_status_an_operation_can_answer_is_documented():
    doc = server.openapi_document()
    for template, ops in doc["paths"].items():
        for method, o in ops.items():
            assert {"500"} <= set(o["responses"]), (method, template)
            if "requestBody" in o:
                assert {"400", "411", "413"} <= set(o["responses"]), (method, template)
            if "{domain}" in template:
                assert {"404", "503"} <= set(o["responses"]), (method, template)
    assert set(server.STATUS.values()) <= {400, 404, 409, 501, 503, 504}


def test_unexpected_exception_is_500_without_details(client, fake, caplog):
    fake.fail["reboot"] = RuntimeError("secret internal detail")
    with caplog.at_level("ERROR", logger="hypyr.toolstack.server"):
        r = client.request("POST", "/domains/web/reboot")
    assert r.status == 500
    assert r.data == {"error": server.INTERNAL_ERROR}
    assert b"secret" not in r.body and b"Traceback" not in r.body and b"RuntimeError" not in r.body
    assert any("secret internal detail" in (rec.exc_text or "") for rec in caplog.records)  # logged, though
    assert client.get("/domains/web")["name"] == "web"       # and the server carries on


def test_unserialisable_result_is_500(client, fake, monkeypatch):
    monkeypatch.setattr(api, "vcpu_list", lambda name=None: [object()])
    r = client.request("GET", "/domains/web/vcpus")
    assert r.status == 500 and r.data == {"error": server.INTERNAL_ERROR}


def test_method_not_allowed_is_405(client):
    for method, path, allow in [("PUT", "/domains", "GET, HEAD, POST"),
                                ("GET", "/domains/web/pause", "POST"),
                                ("PATCH", "/domains/web", "DELETE, GET, HEAD"),
                                ("POST", "/openapi.json", "GET, HEAD"),
                                ("GET", "/domains/web/vcpus/0/affinity", "PUT"),
                                ("TRACE", "/domains", "GET, HEAD, POST"),         # http.server would say 501
                                ("FROBNICATE", "/host", "GET, HEAD"),
                                ("get", "/host", "GET, HEAD")]:                   # methods are case-sensitive
        r = client.request(method, path)
        assert r.status == 405, (method, path)
        assert r.headers["allow"] == allow
        assert r.data["error"] == f"{method} is not allowed on {path} (allowed: {allow})"


# -- vCPUs and scheduling -------------------------------------------------------------------------------
def test_vcpus_and_affinity(client, fake):
    rows = client.get("/domains/web/vcpus")
    assert [r["vcpu"] for r in rows] == [0, 1] and rows[0]["affinity"] == [0, 1]
    assert client.put("/domains/web/vcpus/1/affinity", {"cpus": "0"}) == \
        {"name": "web", "domid": 1, "vcpu": 1, "cpus": [0]}
    client.put("/domains/web/vcpus/all/affinity", {"cpus": [0]})
    assert fake.calls == [("vcpu_pin", "web", "1", {0}), ("vcpu_pin", "web", "all", {0})]
    if (os.cpu_count() or 1) >= 2:
        client.put("/domains/web/vcpus/0/affinity", {"cpus": "0-1"})
        assert fake.calls[-1] == ("vcpu_pin", "web", "0", {0, 1})


@pytest.mark.parametrize("path,body", [
    ("/domains/web/vcpus/x/affinity", {"cpus": "0"}),
    ("/domains/web/vcpus/0/affinity", {"cpus": "zero"}),
    ("/domains/web/vcpus/0/affinity", {"cpus": []}),
    ("/domains/web/vcpus/0/affinity", {"cpus": [-1]}),
    ("/domains/web/vcpus/0/affinity", {}),
])
def test_bad_affinity_is_400(client, fake, path, body):
    r = client.request("PUT", path, body)
    assert r.status == 400, r.data
    assert fake.calls == []


def test_affinity_takes_exactly_what_the_document_says(client, fake):
    n = os.cpu_count() or 1
    cpus = server.openapi_document()["components"]["schemas"]["AffinityRequest"]["properties"]["cpus"]
    string, array = cpus["oneOf"]
    assert (array["minItems"], array["items"]["minimum"], array["items"]["maximum"]) == (1, 0, n - 1)
    assert client.put("/domains/web/vcpus/0/affinity", {"cpus": [n - 1]})["cpus"] == [n - 1]
    assert client.put("/domains/web/vcpus/0/affinity", {"cpus": " all , ^0"})["cpus"] == list(range(1, n))
    for bad in ([-1], [n], [], [True], ["0"], [0.0], "^all", "", "0-", "1,,2", "0\t", "node:0", 0, None):
        r = client.request("PUT", "/domains/web/vcpus/0/affinity", {"cpus": bad})
        assert r.status == 400, bad
        assert (isinstance(bad, str) and bool(re.search(string["pattern"], bad))) is False, bad
    # what the pattern cannot say, the toolstack refuses with a sentence
    for bad in ("3-1", "99999"):
        assert re.search(string["pattern"], bad)
        r = client.request("PUT", "/domains/web/vcpus/0/affinity", {"cpus": bad})
        assert r.status == 400 and r.data["error"], bad
    r = client.request("PUT", "/domains/web/vcpus/%D9%A1/affinity", {"cpus": [0]})   # a non-ASCII digit
    assert r.status == 400 and "vCPU number" in r.data["error"]
    assert client.put("/domains/web/vcpus/0001/affinity", {"cpus": [0]})["vcpu"] == 1
    fake.fail["vcpu_pin"] = VcpuNotFound("domain web has no vCPU 999...")
    r = client.request("PUT", "/domains/web/vcpus/" + "9" * 5000 + "/affinity", {"cpus": [0]})
    assert r.status == 404                    # not a 500: more digits than int() converts
    assert [c for c in fake.calls if c[0] == "vcpu_pin"] == [("vcpu_pin", "web", "0", {n - 1}),
                                                              ("vcpu_pin", "web", "0", set(range(1, n))),
                                                              ("vcpu_pin", "web", "1", {0})]


def test_options(client):
    r = client.request("OPTIONS", "/domains/web/sched")
    assert r.status == 204 and r.headers["allow"] == "GET, HEAD, OPTIONS, PUT" and r.body == b""
    assert client.request("OPTIONS", "/nope").status == 404


def test_sched(client, fake):
    assert client.get("/domains/web/sched") == {"name": "web", "domid": 1, "weight": 256, "cap": 0}
    assert client.put("/domains/web/sched", {"weight": 512, "cap": 25}) == \
        {"name": "web", "domid": 1, "weight": 512, "cap": 25}
    assert client.put("/domains/web/sched", {"cap": 50})["weight"] == 512
    assert fake.calls == [("set_params", 1, "web", WEB_UUID, 512, 25), ("set_params", 1, "web", WEB_UUID, None, 50)]
    for body in ({}, {"weight": "heavy"}, {"weight": True}, {"share": 3}, {"weight": 1.0},
                 {"cap": 100 * (os.cpu_count() or 1) + 1}):
        assert client.request("PUT", "/domains/web/sched", body).status == 400, body
    r = client.request("PUT", "/domains/web/sched", {"weight": 0})     # the document's limits
    assert r.status == 400 and r.data["error"] == "'weight' must be a whole number from 1 to 65535, not 0"
    assert len(fake.calls) == 2


def test_no_cgroups_is_501(client, fake):
    fake.fail["get_params"] = SchedulerUnavailable(sched.NO_CGROUPS)
    r = client.request("GET", "/domains/web/sched")
    assert r.status == 501 and r.data == {"error": sched.NO_CGROUPS}


# -- bodies ------------------------------------------------------------------------------------------
def test_malformed_json_is_400(client, fake):
    r = client.request("POST", "/domains", raw=b'{"config": ')
    assert r.status == 400 and r.data["error"].startswith("the request body is not valid JSON")
    r = client.request("POST", "/domains/web/shutdown", raw=b"[true]")
    assert r.status == 400 and r.data["error"] == "the request body must be a JSON object"
    r = client.request("POST", "/domains/web/shutdown", raw=b"\xff\xfe")
    assert r.status == 400
    assert fake.calls == []


@pytest.mark.parametrize("path", ["/domains", "/domains/web/shutdown"])
def test_deeply_nested_json_is_400(client, fake, path):
    depth = 200_000
    r = client.request("POST", path, raw=b'{"config": ' + b"[" * depth + b"]" * depth + b"}")
    assert r.status == 400 and r.data == {"error": "the request body is JSON nested too deeply"}
    assert fake.calls == []


def test_domain_objects_carry_the_uuid(client):
    assert client.get("/domains/web")["uuid"] == WEB_UUID
    assert "uuid" in server.openapi_document()["components"]["schemas"]["Domain"]["properties"]


def test_oversized_body_is_413(client, fake):
    n = server.MAX_BODY + 1
    r = client.request("POST", "/domains", raw=b" " * n)
    assert r.status == 413
    assert r.data == {"error": f"the request body is {n} bytes; the limit is {server.MAX_BODY} bytes (1 MiB)"}
    r = client.request("POST", "/domains/web/pause", raw=b"{" + b" " * server.MAX_BODY + b"}")
    assert r.status == 413
    assert fake.calls == []


def test_huge_body_is_413_without_reading_it(srv, fake):
    n = 1 << 30
    head = (f"POST /domains HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n}\r\n\r\n").encode()
    reply = _raw_exchange(srv.server_address, head + b" " * 1000)   # the server must not wait for the rest
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), reply
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers
    assert json.loads(body)["error"].startswith(f"the request body is {n} bytes")
    assert fake.calls == []


def test_expect_100_continue_with_a_huge_body_is_413(srv):
    head = (b"PUT /domains/web/sched HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5000000\r\n\r\n")
    reply = _raw_exchange(srv.server_address, head)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in reply


def test_body_of_exactly_the_limit_is_read(client, fake):
    body = b"{}" + b" " * (server.MAX_BODY - 2)
    r = client.request("POST", "/domains/web/pause", raw=body)
    assert r.status == 200 and fake.calls == [("pause", "web")]


def test_chunked_body_is_411(srv):
    reply = _raw_exchange(srv.server_address, b"POST /domains HTTP/1.1\r\nHost: x\r\n"
                                              b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411 ")


def test_garbage_request_line_gets_json(srv):
    reply = _raw_exchange(srv.server_address, b"NOT HTTP AT ALL\r\n\r\n")
    status, _, rest = reply.partition(b"\r\n")
    assert b" 400 " in status
    assert "error" in json.loads(rest.partition(b"\r\n\r\n")[2])


def test_keep_alive(srv):
    conn = UnixHTTPConnection(srv.server_address, timeout=10)
    try:
        for method, path, body, status in [("GET", "/domains", None, 200),
                                           ("POST", "/nope", b'{"x": 1}', 404),      # body drained
                                           ("PUT", "/domains", b"{}", 405),
                                           ("POST", "/domains", b"{nope", 400),
                                           ("GET", "/domains/web", None, 200)]:
            conn.request(method, path, body=body)
            r = conn.getresponse()
            data = json.loads(r.read())
            assert r.status == status, (method, path, data)
            assert not r.will_close
    finally:
        conn.close()


# -- concurrency ---------------------------------------------------------------------------------------
def test_requests_are_served_concurrently(client, fake):
    n = 5
    fake.vcpu_barrier = threading.Barrier(n, timeout=10)    # each request waits for the other four
    results, errors = [], []

    def worker():
        try:
            results.append(client.get("/domains/web/vcpus"))
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and len(results) == n


def test_many_threads(client, fake, tmp_path):
    kernel = _kernel(tmp_path)
    errors = []

    def worker(i):
        try:
            for _j in range(15):
                assert client.get("/domains/web")["domid"] == 1
                assert len(client.get("/domains")) >= 2
                r = client.request("GET", f"/domains/ghost{i}")
                assert r.status == 404
            d = client.post("/domains", {"config": _cfg_text(f"dom{i}", kernel)})
            assert client.get(f"/domains/{d['domid']}")["name"] == f"dom{i}"
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    doms = client.get("/domains")
    assert len(doms) == 10 and len({d["domid"] for d in doms}) == 10


# -- the OpenAPI document -------------------------------------------------------------------------------
def test_openapi_document_describes_every_route(client):
    doc = client.get("/openapi.json")
    assert doc == json.loads(json.dumps(server.openapi_document()))
    assert doc["openapi"].startswith("3.0.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert isinstance(doc["paths"], dict)

    handled = {(t, m.lower()) for t, methods in server.ROUTES.items() for m in methods}
    documented = {(t, m) for t, ops in doc["paths"].items() for m in ops
                  if m in ("get", "put", "post", "delete", "patch", "head", "options")}
    assert handled == documented

    schemas = doc["components"]["schemas"]
    op_ids = []
    for template, ops in doc["paths"].items():
        wanted = set(re.findall(r"\{(\w+)\}", template))
        for method, o in ops.items():
            op_ids.append(o["operationId"])
            declared = {p["name"] for p in o.get("parameters", []) if p["in"] == "path"}
            assert declared == wanted, (template, method)
            assert o["responses"] and all(re.fullmatch(r"[1-5]\d\d", code) for code in o["responses"])
            assert "500" in o["responses"]
    assert len(op_ids) == len(set(op_ids))

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)
    for r in refs(doc):
        assert r.startswith("#/components/schemas/") and r.rsplit("/", 1)[1] in schemas, r


def test_every_documented_route_answers(client, fake):
    # a request to each documented operation reaches a handler (no 404 for the path, no 405)
    doc = client.get("/openapi.json")
    for template, ops in doc["paths"].items():
        path = template.replace("{domain}", "web").replace("{vcpu}", "0")
        for method in ops:
            r = client.request(method.upper(), path, {"cpus": "0"} if path.endswith("affinity") else None)
            assert r.status not in (404, 405), (method, path, r.data)
            if "domain" in template and method != "get":
                fake.domains.setdefault("web", DomainInfo("web", 1, 256, 2, "-b----", 1.5, "running", WEB_UUID))


# -- the socket and the process ------------------------------------------------------------------------
def test_socket_is_0600(srv):
    st = os.stat(srv.server_address)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_stale_socket_is_replaced_and_a_live_one_refused(fake, sockdir):
    path = os.path.join(sockdir, "api.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                               # a socket file nobody listens on
    srv = server.make_server(path)
    try:
        with pytest.raises(HypyrError, match="already listening"):
            server.make_server(path)
    finally:
        srv.server_close()
        srv.remove_socket()
    assert not os.path.exists(path)


def test_not_a_socket_is_refused(sockdir):
    path = os.path.join(sockdir, "api.sock")
    open(path, "w").close()
    with pytest.raises(HypyrError, match="not a socket"):
        server.make_server(path)


def test_default_socket_path(monkeypatch, sockdir):
    monkeypatch.setenv("HYPYR_STATE_DIR", sockdir)
    assert server.default_socket_path() == os.path.join(sockdir, "api.sock")


def test_client_errors(client, sockdir):
    with pytest.raises(ApiError) as e:
        client.get("/domains/nope")
    assert e.value.status == 404 and str(e.value) == "no domain named nope"
    with pytest.raises(HypyrError, match="not running"):
        ApiClient(os.path.join(sockdir, "nothing.sock")).get("/host")


def test_serve_stops_cleanly_on_sigterm(sockdir):
    path = os.path.join(sockdir, "api.sock")
    env = dict(os.environ, HYPYR_STATE_DIR=sockdir)
    p = subprocess.Popen([sys.executable, "-m", "hypyr.toolstack.server", "--socket", path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the server did not create its socket"
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert ApiClient(path, timeout=10).get("/openapi.json")["openapi"].startswith("3.")
        p.send_signal(15)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert b"Traceback" not in err
    assert not os.path.exists(path)


def test_main_reports_a_busy_socket(srv, capsys):
    assert server.main(["--socket", srv.server_address]) == 1
    assert "already listening" in capsys.readouterr().err


def test_domain_gone_mid_request_is_404(client, fake):
    fake.fail["pause"] = DomainNotFound("no domain named web")   # the registry's, after our lookup
    r = client.request("POST", "/domains/web/pause")
    assert r.status == 404 and r.data == {"error": "no domain named web"}
