"""A domain process's hold on its registry row and cgroup, and `destroy` (issue #13: 7 and 9).

No VM is built: the domain process fails (or is stopped) before it would need /dev/kvm.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from types import SimpleNamespace

import pytest

from hypyr.errors import HypyrError
from hypyr.toolstack import api, control, domain, domain_ops, paths, sched, spawn
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.errors import DomainStateError, InvalidConfig
from hypyr.toolstack.registry import Registry
from hypyr.vmm.stop import StopKind


@pytest.fixture
def fake_cgroups(tmp_path, monkeypatch):
    """A fake cgroup v2 root, so that nothing here touches the host's cgroups."""
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu\n")
    (root / "cgroup.subtree_control").write_text("\n")
    monkeypatch.setenv(sched.ENV_ROOT, str(root))
    return root


@pytest.fixture
def reg(state, fake_cgroups):
    r = Registry()
    yield r
    r.close()


def _cfg(name: str) -> dict:
    return DomainConfig(name=name, kernel="/nonexistent/vmlinuz").to_dict()


def _reused_domid(reg: Registry):
    """a's `create` died, so a's row was reaped; b then got the same domid."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    a = reg.reserve("a", _cfg("a"), pid=dead.pid)
    assert reg.list() == []
    b = reg.reserve("b", _cfg("b"))
    assert a.domid == b.domid
    return a, b


def test_domain_process_of_a_reused_domid_does_not_start(reg, state):
    a, b = _reused_domid(reg)
    r, w = os.pipe()
    env = dict(os.environ, HYPYR_DOMAIN_UUID=a.uuid)
    p = subprocess.run([sys.executable, "-m", "hypyr.toolstack.domain", str(a.domid), str(w)],
                       pass_fds=(w,), env=env, capture_output=True, timeout=60)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    assert p.returncode == 1
    assert json.loads(said) == {"ok": False, "type": "StaleDomainError",
                                "error": f"domain id {a.domid} belongs to another domain (b, uuid {b.uuid})"}
    assert reg.get("b") == b


class FakeMachine:
    def __init__(self):
        self.stops = []

    @property
    def stop_reason(self):
        return self.stops[0] if self.stops else None

    def stop(self, reason):
        self.stops.append(reason)


def test_orphaned_domain_process_stops_updating_and_leaves_the_new_domain_alone(reg, state):
    a = reg.reserve("a", _cfg("a"))
    dom = domain.Domain(a.domid, a.uuid, reg)
    dom.vm = SimpleNamespace(machine=FakeMachine())
    server, dom._sock_id = control.bind(dom.sock_path)
    try:
        reg.remove(a.domid)                           # reaped behind its back ...
        b = reg.reserve("b", _cfg("b"))               # ... and the domid reused
        theirs = socket.socket(socket.AF_UNIX)
        theirs.bind(str(paths.control_socket(b.domid)))   # b's own control socket, same path
        dom.set_state("paused")
        assert dom.orphaned
        assert [s.kind for s in dom.vm.machine.stops] == [StopKind.DESTROYED]
        assert dom._action_for(dom.vm.machine.stops[0]) == "destroy"
        dom.set_state("running")                     # nothing more is even tried
        dom._cleanup()
        assert len(dom.vm.machine.stops) == 1
        assert reg.get("b") == b
        assert paths.control_socket(b.domid).exists()
        theirs.close()
    finally:
        server.close()


def test_failed_boot_removes_the_cgroup(reg, state, monkeypatch):
    rec = reg.reserve("web", _cfg("web"))
    removed = []
    monkeypatch.setattr(sched, "remove", lambda dom, root=None, evacuate=False: removed.append((dom.uuid, evacuate)))

    def no_vm(*args, **kwargs):
        raise InvalidConfig("kernel file /nonexistent/vmlinuz does not exist")
    monkeypatch.setattr(domain, "build_linux_vm", no_vm)
    dom = domain.Domain(rec.domid, rec.uuid, reg)
    r, w = os.pipe()
    assert dom.run(w) == 1
    with os.fdopen(r, "rb") as f:
        assert json.loads(f.read()) == {"ok": False, "type": "InvalidConfig",
                                        "error": "kernel file /nonexistent/vmlinuz does not exist"}
    assert removed == [(rec.uuid, True)]


# -- destroy by SIGKILL, real cgroups -------------------------------------------------------------------
@pytest.fixture
def real_cgroup_top(monkeypatch):
    """A private group standing in for the cgroup root (HYPYR_CGROUP_ROOT), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.delenv(sched.ENV_ROOT, raising=False)
    try:
        info = sched.cgroup_root()
    except HypyrError as e:
        pytest.skip(str(e))
    if not os.access(info.root, os.W_OK):
        pytest.skip(f"{info.root} is not writable")
    if info.version == 2:
        sched._enable_cpu(info.root)
    top = info.root / f"hypyr-pytest-{uuid.uuid4().hex[:8]}"
    top.mkdir()
    monkeypatch.setenv(sched.ENV_ROOT, str(top))
    yield top
    for d in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
        if d.is_dir():
            d.rmdir()
    top.rmdir()


def test_destroy_by_sigkill_removes_the_cgroup(state, real_cgroup_top, monkeypatch):
    monkeypatch.setattr(spawn, "DESTROY_TIMEOUT", 0.2)   # it has no control socket: straight to SIGKILL
    reg = Registry()
    rec = reg.reserve("web", _cfg("web"))
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        reg.set_running(rec.domid, child.pid, None, uuid=rec.uuid)
        group = sched.place(rec, child.pid)
        api.destroy("web")
        assert child.wait(5) == -9
        assert not group.exists()
        assert reg.list() == []
    finally:
        child.kill()
        child.wait()
        reg.close()


def test_control_requests_malformed_and_failing_get_distinct_answers(caplog):
    """A request that is not a JSON object is "malformed"; a bug of ours inside an operation
    (here a ValueError) is reported as an internal error with its traceback in the log, not
    passed off as the caller's malformed request."""
    def operate(op, req, progress):
        if op == "boom":
            raise ValueError("a bug inside the operation")
        return {"ok": True, "op": op}, None
    dom = SimpleNamespace(name="d1", operate=operate)
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b'not json\n[1, 2]\n{"op": 7}\n' + b"[" * 5000 + b'\n{"op": "boom"}\n{"op": "info"}\n')
        theirs.shutdown(socket.SHUT_WR)
        control.ControlServer(dom, "off").serve(ours)
        replies = [json.loads(line) for line in theirs.makefile("rb")]
    finally:
        theirs.close()
    assert [r["ok"] for r in replies] == [False, False, False, False, False, True]
    assert all("malformed request" in r["error"] for r in replies[:4])
    assert replies[4]["error"].startswith("internal error in domain d1's VMM: ValueError: a bug inside")
    assert "malformed" not in replies[4]["error"]
    assert any(r.exc_info and "a bug inside the operation" in str(r.exc_info[1]) for r in caplog.records)


def test_an_operation_that_ends_the_domain_is_answered_before_it_stops():
    """A save (not kept running) or a migration ends the domain process: its reply goes out
    first, and the domain stops even when the reply cannot be sent (the client went away)."""
    events = []

    def operate(op, req, progress):
        events.append(("operate", op))
        return {"ok": True, "file": "/x"}, "saved to /x"
    dom = SimpleNamespace(name="d1", operate=operate, stop_after_answer=lambda why: events.append(("stop", why)))
    for client_waits in (True, False):
        events.clear()
        ours, theirs = socket.socketpair()
        try:
            theirs.sendall(b'{"op": "save"}\n')
            if client_waits:
                theirs.shutdown(socket.SHUT_WR)
            else:
                theirs.close()   # gone before the answer: sending it fails
            control.ControlServer(dom, "off").serve(ours)
            if client_waits:
                assert [json.loads(line) for line in theirs.makefile("rb")] == [{"ok": True, "file": "/x"}]
        finally:
            theirs.close()
        assert events == [("operate", "save"), ("stop", "saved to /x")]


def test_unpause_is_refused_while_a_save_or_migration_holds_the_domain():
    """A save or migration pauses the guest for its last pass; an unpause then would let the guest
    run while its state is read.  Outside them, unpause resumes."""
    resumed = []
    machine = SimpleNamespace(resume=lambda: resumed.append(True))
    dom = SimpleNamespace(name="d1", live=SimpleNamespace(machine=machine), busy=threading.Lock(),
                          pause_lock=threading.Lock(), set_state=lambda *a: None)
    with dom.busy, pytest.raises(DomainStateError, match=r"^domain d1 is being saved or migrated"):
        domain_ops.handle(dom, "unpause", {})
    assert resumed == []
    assert domain_ops.handle(dom, "unpause", {}) == {"ok": True}
    assert resumed == [True]
