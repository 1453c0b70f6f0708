"""`hypyr save/restore/migrate/migrate-receive` in the toolstack and CLI (issue #11), without VMs:
fake domain processes that speak the control protocol, hand-made save files and streams.

Real guests are tested in the lab (tests/lab/test_migrate.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from hypyr import cli
from hypyr.arch.x86 import layout
from hypyr.cli import domains
from hypyr.cli.common import EXIT_ERROR
from hypyr.errors import InvalidInput
from hypyr.toolstack import paths, sched, transfer
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.domrecord import is_alive
from hypyr.toolstack.errors import DomainExists, MigrationFailed, SaveFileError
from hypyr.toolstack.registry import Registry
from hypyr.toolstack.xldisk import DiskSpec
from hypyr.vmm import stream
from hypyr.vmm.config import VmConfig, config_to_dict
from hypyr.vmm.stream import Rec, StreamWriter

MiB = 1 << 20


@pytest.fixture
def state(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("HYPYR_STATE_DIR", str(d))
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu\n")
    (root / "cgroup.subtree_control").write_text("\n")
    monkeypatch.setenv(sched.ENV_ROOT, str(root))
    return d


def _rows() -> list:
    with Registry() as reg:
        return reg.list()


def _leftovers(state) -> list[str]:
    d = state / "domains"
    return sorted(os.listdir(d)) if d.exists() else []


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hypyr: error: ") and "Traceback" not in err[0], err
    return err[0]


# -- hand-made streams ------------------------------------------------------------------------------------
def _header(kind: str = "save", extra: dict | None = None, **changes) -> bytes:
    cfg = DomainConfig(name="rs", kernel="/nonexistent/vmlinuz", memory=64, vcpus=1)
    d = {"format": stream.VERSION, "kind": kind, "created": 1.5,
         "config": config_to_dict(VmConfig(kernel="/nonexistent/vmlinuz", memory=64 * MiB, vcpus=1)),
         "memory": [list(m) for m in layout.ram_layout(64 * MiB)], "devices": ["serial0"],
         "cpu": {"vendor": "GenuineIntel", "family": 6, "model": 85, "stepping": 4, "features": {}},
         "extra": {"name": "rs", "uuid": "0b5e0a4e-1111-4222-8333-944455556666", "config": cfg.to_dict()}
         if extra is None else extra}
    d.update(changes)
    return stream.encode_json(d)


def _stream(header: bytes, *, version: int | None = None) -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out)
    w.preamble()
    w.record(Rec.HEADER, header)
    w.flush()
    data = out.getvalue()
    if version is not None:     # another version, its checksum made right
        import struct
        import zlib
        pre = bytearray(data[:16])
        struct.pack_into("<H", pre, 8, version)
        struct.pack_into("<I", pre, 12, zlib.crc32(bytes(pre[:12])))
        data = bytes(pre) + data[16:]
    return data


# -- argument parsing -----------------------------------------------------------------------------------------
def test_parsing():
    p = cli.build_parser()
    a = p.parse_args(["save", "web", "web.save", "-c"])
    assert (a.func, a.name, a.file, a.keep_running) == (domains.cmd_save, "web", "web.save", True)
    assert p.parse_args(["save", "web", "f"]).keep_running is False
    a = p.parse_args(["restore", "-p", "f"])
    assert (a.func, a.file, a.paused) == (domains.cmd_restore, "f", True)
    a = p.parse_args(["migrate", "web", "otherhost:9000", "--downtime-ms", "50", "--max-iterations", "5"])
    assert (a.func, a.name, a.host, a.downtime_ms, a.max_iterations) == (domains.cmd_migrate, "web", "otherhost:9000",
                                                                        50.0, 5)
    a = p.parse_args(["migrate", "web", "h"])
    assert (a.downtime_ms, a.max_iterations) == (300.0, 30)
    a = p.parse_args(["migrate-receive"])
    assert (a.func, a.listen, a.once) == (domains.cmd_migrate_receive, "127.0.0.1:8002", False)
    assert p.parse_args(["migrate-receive", "--listen", "0.0.0.0:9", "--once"]).once


@pytest.mark.parametrize("text, expected", [
    ("host", ("host", 8002)), ("host:9000", ("host", 9000)), ("10.0.0.1:1", ("10.0.0.1", 1)),
    ("[::1]:8003", ("::1", 8003)), ("[fe80::1]", ("fe80::1", 8002)), ("::1", ("::1", 8002)),
])
def test_parse_address(text, expected):
    assert transfer.parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:0", "host:65536", "host:x", "host:", "[::1", "[::1]x",
                                  "a b:1", "a/b"])
def test_parse_address_refuses(text):
    if text == "host:":
        assert transfer.parse_address(text) == ("host", 8002)
        return
    with pytest.raises(InvalidInput):
        transfer.parse_address(text)


def test_listen_address_may_omit_the_host():
    assert transfer.parse_address(":9000", default_host="127.0.0.1") == ("127.0.0.1", 9000)


@pytest.mark.parametrize("args", [["migrate", "web", "h:0"], ["migrate", "web", "h:99999"],
                                  ["migrate-receive", "--listen", "127.0.0.1:http"]])
def test_bad_addresses_are_one_sentence(state, capsys, args):
    assert cli.main(args) == EXIT_ERROR
    assert "port" in _one_error_line(capsys)


def test_reading_a_save_file_header_loads_no_device_model(tmp_path):
    """`hypyr restore` looks at the file in the CLI process, which must stay light (every module
    costs start-up time, many times over in the lab): no builder, devices, KVM or boot code."""
    f = tmp_path / "ok.save"
    f.write_bytes(_stream(_header()))
    code = ("import sys; from hypyr.toolstack import transfer; h, cfg, _ = transfer.read_save_file(sys.argv[1]); "
            "print(cfg.name, sorted(m for m in sys.modules if m.startswith(('hypyr.vmm.builder', 'hypyr.devices.',"
            " 'hypyr.kvm', 'hypyr.memory', 'hypyr.arch.x86.acpi', 'hypyr.arch.x86.boot', 'hypyr.vmm.snapshot',"
            " 'hypyr.vmm.machine')) "
            "and m != 'hypyr.devices.state'))")
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, check=True)
    assert out.stdout.split(" ", 1) == ["rs", "[]\n"]


# -- restore: bad files are one sentence and leave nothing --------------------------------------------------
BAD_FILES = {
    "missing": None,
    "empty": b"",
    "garbage": b"#!/bin/sh\necho hello\n" * 4,
    "truncated preamble": _stream(_header())[:10],
    "truncated header": _stream(_header())[:40],
    "another version": _stream(_header(), version=stream.VERSION + 1),
    "a migration stream": _stream(_header(kind="migration")),
    "no domain in it": _stream(_header(extra={})),
    "a domain that does not fit": _stream(_header(extra={"name": "rs", "config": DomainConfig(
        name="rs", kernel="/k", memory=128).to_dict()})),
    "a broken domain": _stream(_header(extra={"name": "rs", "config": {"name": "rs", "memory": "lots"}})),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_restore_of_a_bad_file_is_one_sentence_and_creates_nothing(state, tmp_path, capsys, case):
    f = tmp_path / "bad.save"
    if BAD_FILES[case] is not None:
        f.write_bytes(BAD_FILES[case])
    assert cli.main(["restore", str(f)]) == EXIT_ERROR
    line = _one_error_line(capsys)
    assert str(f) in line
    assert _rows() == [] and _leftovers(state) == []
    with pytest.raises(SaveFileError):
        transfer.restore(f)


def test_restore_that_fails_in_the_domain_process_leaves_nothing(state, tmp_path, capsys):
    """The header is good (so a row is reserved and a domain process started), the rest is
    missing: that process fails, and its row, directory and process go."""
    f = tmp_path / "header-only.save"
    f.write_bytes(_stream(_header()))
    assert cli.main(["restore", str(f)]) == EXIT_ERROR
    _one_error_line(capsys)
    assert _rows() == [] and _leftovers(state) == []


def test_restore_without_the_disk_image_is_one_sentence_and_creates_nothing(state, tmp_path, capsys):
    """Disks are shared storage: a restore (or migration) on a host without the image refuses at once.
    The kernel is not looked for: the saved RAM holds the running one."""
    cfg = DomainConfig(name="rs", kernel="/nonexistent/vmlinuz", memory=64, vcpus=1,
                       disks=(DiskSpec(str(tmp_path / "gone.img"), "raw", "xvda", 0),))
    f = tmp_path / "rs.save"
    f.write_bytes(_stream(_header(extra={"name": "rs", "config": cfg.to_dict()})))
    assert cli.main(["restore", str(f)]) == EXIT_ERROR
    assert _one_error_line(capsys).endswith(f"disk file {tmp_path / 'gone.img'} of domain rs does not exist here")
    assert _rows() == [] and _leftovers(state) == []


def test_restore_clashing_with_a_live_domain_is_one_sentence(state, tmp_path, capsys):
    with FakeDomain("rs") as dom:
        f = tmp_path / "rs.save"
        f.write_bytes(_stream(_header()))
        assert cli.main(["restore", str(f)]) == EXIT_ERROR
        assert "a domain named rs already exists" in _one_error_line(capsys)
        assert [r.name for r in _rows()] == ["rs"] and dom.alive()


# -- the registry: UUIDs kept, names changed ---------------------------------------------------------------------
def test_reserve_keeps_a_free_uuid_and_renews_a_taken_one(state):
    u = "0b5e0a4e-1111-4222-8333-944455556666"
    with Registry() as reg:
        a = reg.reserve("a", {"name": "a"}, uuid=u)
        assert a.uuid == u
        b = reg.reserve("b", {"name": "b"}, uuid=u)       # a is there (its owner, this process, lives)
        assert b.uuid != u
        reg.remove(a.domid)
        c = reg.reserve("c", {"name": "c"}, uuid=u)
        assert c.uuid == u
        assert reg.reserve("d", {"name": "d"}, uuid="not-a-uuid").uuid != "not-a-uuid"


def test_rename(state):
    with Registry() as reg:
        a = reg.reserve("web--incoming", {"name": "web--incoming"})
        b = reg.reserve("db", {"name": "db"})
        with pytest.raises(DomainExists):
            reg.rename(a.domid, "db", uuid=a.uuid)
        reg.rename(a.domid, "web", uuid=a.uuid)
        r = reg.get("web")
        assert r.domid == a.domid and r.config_dict()["name"] == "web"
        assert reg.get("db").domid == b.domid


# -- fake domain processes -----------------------------------------------------------------------------------------
FAKE = r"""
import json, os, socket, sys, threading
path, log, mode = sys.argv[1], sys.argv[2], sys.argv[3]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(4)
print("ready", flush=True)
def answer(req):
    op = req.get("op")
    if op == "info":
        return {"ok": True, "state": "running", "vcpus": []}
    if op == "destroy":
        return {"ok": True, "exit": True}
    if op == "save":
        keep = req.get("keep_running", False)
        return {"ok": True, "file": req["file"], "seconds": 0.25, "bytes": 3 << 20, "pages_data": 500,
                "pages_zero": 268, "keep_running": keep, "progress": True, "exit": not keep}
    if op == "migrate":
        if mode == "refuse":
            return {"ok": False, "type": "MigrationFailed",
                    "error": f"cannot connect to {req['host']}:{req['port']} (Connection refused); "
                             "domain web runs on here"}
        return {"ok": True, "to": f"{req['host']}:{req['port']}", "seconds": 1.5, "downtime_ms": 42.5,
                "downtime_clock": "monotonic", "iterations": 3, "pages_data": 1000, "pages_zero": 3000,
                "final_pages": 12, "bytes": 5 << 20, "bandwidth": 1e9, "progress": True, "exit": True}
    return {"ok": False, "error": f"unknown operation {op!r}", "type": "InvalidInput"}
def serve(conn):
    with conn, conn.makefile("rb") as f:
        for line in f:
            req = json.loads(line)
            with open(log, "a") as lf:
                lf.write(json.dumps(req) + "\n")
            r = answer(req)
            if r.pop("progress", False):
                for i in range(3):
                    p = {"phase": "iteration", "iteration": i + 1, "bytes": i << 20, "pages": i * 100,
                         "total_pages": 768, "dirty_pages": 10, "dirty_rate": 100.0}
                    conn.sendall(json.dumps({"progress": p}).encode() + b"\n")
            conn.sendall(json.dumps(r).encode() + b"\n")
            if r.pop("exit", False):
                os._exit(0)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class FakeDomain:
    """A registry row owned by a process that answers the control protocol (no VM)."""

    def __init__(self, name: str, mode: str = "ok"):
        self.name, self.mode = name, mode

    def __enter__(self) -> FakeDomain:
        with Registry() as reg:
            self.rec = reg.reserve(self.name, DomainConfig(name=self.name, kernel="/k", memory=64).to_dict())
            sock = paths.control_socket(self.rec.domid)
            self.log = os.path.join(os.path.dirname(os.environ["HYPYR_STATE_DIR"]), f"{self.name}.requests")
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", FAKE, str(sock), self.log, self.mode],
                                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert self.proc.stdout.readline() == b"ready\n"
            reg.set_running(self.rec.domid, self.proc.pid, sock, uuid=self.rec.uuid)
        return self

    def requests(self) -> list[dict]:
        try:
            with open(self.log) as f:
                return [json.loads(x) for x in f]
        except FileNotFoundError:
            return []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def test_save_sends_the_operation_and_destroys_the_domain(state, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FakeDomain("web") as dom:
        assert cli.main(["save", "web", "web.save"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"hypyr: domain web saved to {tmp_path / 'web.save'} in 0.25 s: 3.0 MiB written, "
                              "500 pages data, 268 zero; destroyed")
        assert dom.requests() == [{"op": "save", "file": str(tmp_path / "web.save"), "keep_running": False}]
        dom.proc.wait(10)
        assert _rows() == [] and _leftovers(state) == []


def test_save_c_keeps_the_domain(state, tmp_path, capsys):
    with FakeDomain("web") as dom:
        assert cli.main(["save", "web", str(tmp_path / "w.save"), "-c"]) == 0
        assert "saved" in capsys.readouterr().out
        assert dom.requests()[-1]["keep_running"] is True
        assert dom.alive() and [r.name for r in _rows()] == ["web"]


@pytest.mark.parametrize("where, words", [("nodir/x.save", "directory does not exist"), (".", "is a directory")])
def test_save_to_a_bad_place_is_one_sentence_and_sends_nothing(state, tmp_path, capsys, monkeypatch, where, words):
    monkeypatch.chdir(tmp_path)
    with FakeDomain("web") as dom:
        assert cli.main(["save", "web", where]) == EXIT_ERROR
        assert words in _one_error_line(capsys)
        assert dom.requests() == [] and dom.alive()


def test_save_of_an_unknown_domain(state, capsys, tmp_path):
    assert cli.main(["save", "ghost", str(tmp_path / "x")]) == EXIT_ERROR
    assert "ghost" in _one_error_line(capsys)


def test_migrate_refused_is_one_sentence_and_the_source_runs_on(state, capsys):
    with FakeDomain("web", mode="refuse") as dom:
        assert cli.main(["migrate", "web", "127.0.0.1:1"]) == EXIT_ERROR
        line = _one_error_line(capsys)
        assert "Connection refused" in line and "runs on here" in line
        assert dom.requests() == [{"op": "migrate", "host": "127.0.0.1", "port": 1, "downtime_ms": 300.0,
                                   "max_iterations": 30}]
        assert dom.alive() and [r.name for r in _rows()] == ["web"]
        with pytest.raises(MigrationFailed):
            transfer.migrate("web", "127.0.0.1", 1)


def test_migrate_success_prints_the_summary_and_destroys_the_source(state, capsys):
    with FakeDomain("web") as dom:
        seen = []
        r = transfer.migrate("web", "otherhost", 9000, downtime_ms=50, max_iterations=4, progress=seen.append)
        assert (r.to, r.iterations, r.downtime_ms) == ("otherhost:9000", 3, 42.5)
        assert [p["iteration"] for p in seen] == [1, 2, 3]
        assert dom.requests()[-1] == {"op": "migrate", "host": "otherhost", "port": 9000, "downtime_ms": 50,
                                      "max_iterations": 4}
        dom.proc.wait(10)
        assert _rows() == []
    with FakeDomain("db"):
        assert cli.main(["migrate", "db", "[::1]:9001"]) == 0
        out = capsys.readouterr().out
        assert out.strip() == ("hypyr: domain db migrated to ::1:9001 in 1.50 s: 3 iterations, 1000 pages data, "
                               "3000 zero, 5.0 MiB, downtime 42.5 ms")


# -- migrate-receive -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receive_in_thread(port: int):
    result: dict = {}

    def run():
        try:
            result["ok"] = transfer.migrate_receive("127.0.0.1", port, on_listening=lambda a: listening.set())
        except Exception as e:  # noqa: BLE001 - the test looks at it
            result["error"] = e
    listening = threading.Event()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert listening.wait(10)
    return t, result


@pytest.mark.parametrize("data, words", [
    (b"garbage, not a stream at all" * 3, "not a hypyr save file or migration stream"),
    (_stream(_header(kind="save")), "was not sent by hypyr migrate"),
    (b"", "closed the connection"),
])
def test_migrate_receive_of_a_bad_stream_is_one_sentence_and_leaves_nothing(state, data, words):
    port = _free_port()
    t, result = _receive_in_thread(port)
    with socket.create_connection(("127.0.0.1", port)) as s:
        with contextlib.suppress(OSError):  # the receiver may have refused the bytes and closed already
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        t.join(30)
    e = result.get("error")
    assert isinstance(e, MigrationFailed) and words in str(e) and "\n" not in str(e)
    assert _rows() == [] and _leftovers(state) == []


def test_migrate_receive_when_the_source_gives_up_after_the_header(state):
    """A domain process is started for NAME--incoming; the stream then ends: it fails, and its
    row, directory and process go."""
    port = _free_port()
    t, result = _receive_in_thread(port)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(_stream(_header(kind="migration")))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(r.name == "rs--incoming" for r in _rows()):
            time.sleep(0.02)
        s.shutdown(socket.SHUT_WR)
        t.join(60)
    e = result.get("error")
    assert e is not None and "\n" not in str(e), result
    assert all(not is_alive(r) for r in _rows())
    assert _rows() == [] and _leftovers(state) == []


def test_migrate_receive_cannot_listen(state, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli.main(["migrate-receive", "--listen", f"127.0.0.1:{port}"]) == EXIT_ERROR
        assert "cannot listen on" in _one_error_line(capsys)
