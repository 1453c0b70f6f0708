"""The supervisor of a jailed VMM answers for its own registry row only, and survives garbage."""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest

from hypyr.toolstack import jail
from hypyr.toolstack.domrecord import DomainState
from hypyr.toolstack.errors import SaveFileError
from hypyr.toolstack.registry import StaleDomainError
from hypyr.toolstack.supervisor import Supervisor, SupervisorLink


class FakeRegistry:
    def __init__(self):
        self.calls: list[tuple] = []

    def update_state(self, domid, state, exit_reason=None, *, uuid):
        self.calls.append(("update_state", domid, state, exit_reason, uuid))

    def set_running(self, domid, pid, sock, *, uuid):
        self.calls.append(("set_running", domid, pid, sock, uuid))

    def bump_restarts(self, domid, *, uuid):
        return 3

    def rename(self, domid, name, *, uuid):
        raise StaleDomainError("domain id 7 belongs to another domain")


@pytest.fixture
def link():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reg = FakeRegistry()
    sup = Supervisor(a, reg, 7, "uuid-7", 4242, "/run/x/control.sock")
    t = threading.Thread(target=sup.serve, daemon=True)
    t.start()
    yield SupervisorLink(b), reg, b
    b.close()
    t.join(5)
    a.close()


def test_the_supervisor_answers_for_its_own_row_whatever_the_child_says(link):
    lk, reg, _ = link
    lk.update_state(99, DomainState.PAUSED, "x", uuid="someone-else")
    lk.set_running(99, 1, "/elsewhere", uuid="someone-else")
    assert reg.calls == [("update_state", 7, DomainState.PAUSED, "x", "uuid-7"),
                         ("set_running", 7, 4242, "/run/x/control.sock", "uuid-7")]
    assert lk.bump_restarts(99, uuid="x") == 3
    with pytest.raises(StaleDomainError, match="another domain"):
        lk.rename(7, "b", uuid="x")


def test_garbage_and_unknown_requests_get_an_error_and_the_supervisor_goes_on(link):
    lk, reg, sock = link
    for junk in (b"\xff\x00", b"[]", b'{"op": "chmod", "path": "/etc/shadow"}', b'{"op": "update_state"}',
                 b'{"op": "update_state", "state": "running", "reason": 5}', b'{"op": "release", "state": "running"}',
                 b"[" * 5000):
        os.write(sock.fileno(), junk)
        assert select.select([sock], [], [], 10)[0], f"no answer to {junk[:20]!r}: the supervisor died"
        assert b'"ok": false' in os.read(sock.fileno(), 65536)
    assert reg.calls == []
    lk.update_state(7, DomainState.RUNNING, uuid="uuid-7")     # still answering
    assert len(reg.calls) == 1


def test_save_files_come_from_the_supervisor_and_only_its_own_are_committed(link, tmp_path):
    lk, _, _ = link
    target = tmp_path / "dom.save"
    fd, tmp = lk.create(str(target))
    os.write(fd, b"saved")
    os.close(fd)
    with pytest.raises(Exception, match="malformed"):
        lk.commit("/etc/passwd")
    lk.commit(tmp)
    assert target.read_bytes() == b"saved" and not os.path.exists(tmp)
    with pytest.raises(SaveFileError, match="absolute"):
        lk.create("relative.save")


def test_outermost_keeps_only_the_outer_directories():
    assert jail._outermost(["/usr/lib/python3", "/usr", "/opt/a/b", "/opt/a", "/opt/ab"]) == \
        ("/usr", "/opt/a", "/opt/ab")
