"""`hypyr serve` against its own OpenAPI document, property-based (schemathesis + hypothesis).

The document the server serves (GET /openapi.json) drives everything:
schemathesis generates requests from it, valid and invalid, and checks every answer — no 5xx, a
documented status and content type, a body matching the documented schema, invalid input refused
with a 4xx, valid input not refused with 400 (where the schema can say what is valid), and 405 with
an Allow header for every method a path does not document.

The server runs the real toolstack on a temporary state directory and a fake cgroup tree.  Its
domains ("web" and "db") are registry rows owned by tiny fake domain processes that speak the
control protocol (no VM, no KVM); one that a request destroyed or shut down is started again
before the next request.  Creating a domain from generated xl.cfg text fails with a 400, which is
conformant.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests  # the [test] extra brings schemathesis and these: a missing one fails, never skips
import schemathesis
import urllib3

from hypyr.toolstack import paths, sched
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.domrecord import is_alive
from hypyr.toolstack.registry import Registry
from hypyr.toolstack.server import ApiClient, make_server, openapi_document

DOMAINS = ("web", "db")
FUZZ_EXAMPLES = 30          # generated requests per operation, besides the coverage phase's

# A domain process without a VM: answers the control protocol (one JSON object per line), has two
# "vCPU" threads, and exits on destroy or shutdown as a real one whose guest powers off does.
FAKE_DOMAIN = r"""
import json, os, socket, sys, threading, time
path = sys.argv[1]
stop = threading.Event()
tids = []
def vcpu():
    tids.append(threading.get_native_id())
    stop.wait()
for _ in range(2):
    threading.Thread(target=vcpu, daemon=True).start()
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(16)
state = "running"
def reply(req):
    global state
    op = req.get("op")
    if op == "info":
        return {"ok": True, "state": state, "vcpus": [{"vcpu": i, "tid": t} for i, t in enumerate(sorted(tids))]}
    if op in ("pause", "unpause"):
        state = "paused" if op == "pause" else "running"
        return {"ok": True}
    if op == "shutdown" and state == "paused":
        return {"ok": False, "error": "domain is paused: unpause it first", "type": "DomainStateError"}
    if op in ("shutdown", "reboot", "destroy"):
        return {"ok": True, "exit": op != "reboot"}
    if op == "trigger":  # as the VMM: vCPUs 0 and 1 exist
        if req.get("vcpu") not in (0, 1):
            return {"ok": False, "error": f"vCPU {req.get('vcpu')} does not exist", "type": "NotFound"}
        return {"ok": True, "trigger": req.get("what"), "vcpu": req.get("vcpu")}
    if op == "save":     # writes nothing: the file names are generated
        keep = bool(req.get("keep_running"))
        return {"ok": True, "file": req.get("file"), "seconds": 0.01, "bytes": 4096, "pages_data": 1,
                "pages_zero": 0, "keep_running": keep, "exit": not keep}
    if op == "migrate":  # as if the destination took it: the domain goes
        return {"ok": True, "to": f"{req.get('host')}:{req.get('port')}", "seconds": 0.5, "downtime_ms": 12.5,
                "downtime_clock": "monotonic", "iterations": 2, "pages_data": 10, "pages_zero": 90,
                "final_pages": 1, "bytes": 40960, "bandwidth": 1e8, "exit": True}
    return {"ok": False, "error": f"unknown operation {op!r}", "type": "InvalidInput"}
def serve(conn):
    with conn, conn.makefile("rb") as f:
        for line in f:
            r = reply(json.loads(line))
            conn.sendall(json.dumps(r).encode() + b"\n")
            if r.pop("exit", False):
                os._exit(0)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class FakeDomains:
    """The fake domains in the registry of the current state directory, started on demand."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.procs: list[subprocess.Popen] = []

    def ensure(self) -> None:
        for p in self.procs:
            p.poll()                                   # reap those that exited (no zombies)
        with Registry() as reg:
            alive = {r.name for r in reg.list() if is_alive(r)}
            for name in DOMAINS:
                if name not in alive:
                    self._start(reg, name)

    def _start(self, reg: Registry, name: str) -> None:
        for r in reg.list():
            if r.name == name:
                reg.remove(r.domid)                    # a kept (crashed/shutdown) row
        rec = reg.reserve(name, DomainConfig(name=name, kernel=self.kernel, vcpus=2, memory=64).to_dict())
        sock = paths.control_socket(rec.domid)
        p = subprocess.Popen([sys.executable, "-S", "-c", FAKE_DOMAIN, str(sock)], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
        assert p.stdout.readline() == b"ready\n"
        self.procs.append(p)
        reg.set_running(rec.domid, p.pid, sock, uuid=rec.uuid)
        sched.place(rec, p.pid)
        sched.set_params(rec, weight=256, cap=0)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()


class UnixAdapter(requests.adapters.HTTPAdapter):
    """requests over a unix socket: every URL goes to ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        path = self.path

        class Connection(urllib3.connection.HTTPConnection):
            def _new_conn(self):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(path)
                return s

        class Pool(urllib3.HTTPConnectionPool):
            ConnectionCls = Connection

        return Pool("localhost")


@pytest.fixture(scope="module")
def api_server():
    """`hypyr serve` on a private state directory, with the fake domains running."""
    base = tempfile.mkdtemp(prefix="hypyr-oa-", dir="/tmp")    # short: AF_UNIX paths are limited
    cg = os.path.join(base, "cg")
    os.makedirs(cg)
    with open(os.path.join(cg, "cgroup.controllers"), "w") as f:
        f.write("cpu\n")
    with open(os.path.join(cg, "cgroup.subtree_control"), "w") as f:
        f.write("\n")
    kernel = os.path.join(base, "vmlinuz")
    with open(kernel, "wb") as f:
        f.write(b"\0" * 64)
    mp = pytest.MonkeyPatch()
    mp.setenv("HYPYR_STATE_DIR", os.path.join(base, "state"))
    mp.setenv(sched.ENV_ROOT, cg)
    domains = FakeDomains(kernel)
    srv = make_server(os.path.join(base, "api.sock"))
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        domains.ensure()
        yield srv, domains
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
        domains.close()
        mp.undo()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def session(api_server):
    s = requests.Session()
    s.mount("http://hypyr/", UnixAdapter(api_server[0].server_address))
    yield s
    s.close()


def _narrowed(doc: dict) -> dict:
    """The served document with the domain and vCPU path parameters narrowed to values that exist
    (and one that does not), so that generated requests reach the domains; negative generation
    still sends everything else."""
    doc = copy.deepcopy(doc)
    for item in doc["paths"].values():
        for op in item.values():
            for p in op.get("parameters", []):
                if p["in"] == "path" and p["name"] == "domain":
                    p["schema"] = {**p["schema"], "enum": ["web", "db", "ghost"]}
                elif p["in"] == "path" and p["name"] == "vcpu":
                    p["schema"] = {**p["schema"], "enum": ["0", "1", "all", "7"]}
    return doc


# Valid requests may still be refused for what the schema cannot say: the state of things (404 a
# domain that went away, 409 a paused one, 501/503/504), and, for these, semantic rules on a
# string (xl.cfg text; a CPU list naming CPUs this host lacks or a backwards range; a file name
# that is a directory, in no directory, or not a save file): 400.
ACCEPTED = ["2XX", "404", "409", "501", "503", "504"]
SEMANTIC_400 = ("createDomain", "pinVcpu", "saveDomain", "restoreDomain")


CONFIG = schemathesis.Config.from_dict({
    "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none"},
    "checks": {
        "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        # the fake domains are started again after a destroy: "use after free" is intended here
        "use_after_free": {"enabled": False},
        "ensure_resource_availability": {"enabled": False},
    },
    "operations": [{"include-operation-id": op_id,
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED + ["400"]}}}
                   for op_id in SEMANTIC_400],
})
# The document the server serves (test_server checks that GET /openapi.json is exactly this).
schema = schemathesis.openapi.from_dict(_narrowed(openapi_document()), config=CONFIG)


@schema.parametrize()
def test_api_conforms_to_its_openapi_document(case, api_server, session):
    api_server[1].ensure()
    r = case.call_and_validate(session=session, base_url="http://hypyr")
    # pinVcpu may refuse a valid CPU list *string* with a 400 (SEMANTIC_400), but a list of CPU
    # numbers is judged by the schema alone: a valid one is never a 400
    if (case.operation.label.endswith("/affinity") and case.meta.generation.mode.is_positive
            and isinstance(case.body, dict) and isinstance(case.body.get("cpus"), list)):
        assert r.status_code != 400, (case.body, r.text)


def test_fake_domains_are_real_to_the_toolstack(api_server):
    srv, domains = api_server
    domains.ensure()
    c = ApiClient(srv.server_address, timeout=30)
    assert {d["name"] for d in c.get("/domains")} == set(DOMAINS)
    assert [v["vcpu"] for v in c.get("/domains/web/vcpus")] == [0, 1]
    assert c.put("/domains/web/sched", {"weight": 512})["weight"] == 512
    c.post("/domains/db/shutdown", {"wait": True})
    deadline = time.monotonic() + 10
    while "db" in {d["name"] for d in c.get("/domains")} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {d["name"] for d in c.get("/domains")} == {"web"}
