"""The fork server of `hypyr serve`: a helper process, forked while the server still has one
thread, that imports the domain's and the VMM's modules once and then forks each domain process
the server asks for.  A threaded server cannot fork a domain itself (a child could inherit a
lock another thread holds), and a fresh ``python -m hypyr.toolstack.domain`` pays an interpreter
start and every import: most of a restore's time in the lab (docs/toolstack.md, "The domain
process").

A request is one datagram on a SOCK_SEQPACKET pair: JSON (domain id, environment, the numbers the
passed descriptors had in the server) with the descriptors themselves; the answer is the new
process's pid.  The helper is the domain processes' parent and reaps them; the server watches one
through a pidfd.  If the helper is gone, :func:`spawn.start_domain` starts a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import NoReturn

from hypyr.toolstack import procmem, spawn

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10       # bytes of one request's JSON (a domain's environment)
MAX_FDS = 64                 # descriptors one request may pass
ANSWER_TIMEOUT = 120.0       # seconds the server waits for the helper's answer (it may still be importing)
# imported by the helper before its first fork: the domain process's code and what every domain
# start, restore or incoming migration would otherwise import in its own process
PRELOAD = ("hypyr.toolstack.domain", *procmem.LATE_MODULES)


class ForkServerGone(Exception):
    """The helper did not take a request (it died, or did not answer)."""


class ForkServerRefused(Exception):
    """The helper cannot take this one request (too many descriptors, or its fork failed)."""


class PidfdProcess:
    """A domain process the helper forked (not our child), watched through a pidfd; its exit
    status is the helper's to reap, so :attr:`returncode` is -1 once it is gone."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd, self.returncode = None, -1

    def _gone(self, timeout: float | None) -> bool:
        if self.returncode is None and self._fd is not None and select.select([self._fd], [], [], timeout)[0]:
            os.close(self._fd)
            self._fd, self.returncode = None, -1
        return self.returncode is not None

    def poll(self) -> int | None:
        self._gone(0)
        return self.returncode

    def kill(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    def wait(self) -> int:
        self._gone(None)
        return -1


class ForkServer:
    """The server's end of the helper: :meth:`start_domain` asks it for a domain process."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock, self.pid = sock, pid
        self._lock = threading.Lock()

    @classmethod
    def start(cls) -> ForkServer | None:
        """Fork the helper; None (and a log line) if this process already runs other threads."""
        if threading.active_count() > 1:
            log.warning("not starting the fork server: this process already runs other threads")
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _helper(theirs)
        theirs.close()
        ours.settimeout(ANSWER_TIMEOUT)
        log.debug("fork server: pid %d", pid)
        return cls(ours, pid)

    def start_domain(self, domid: int, ready_fd: int, log_fd: int, keep_fds: Sequence[int],
                     env: Mapping[str, str]) -> PidfdProcess:
        """As :func:`spawn.start_domain`, forked by the helper; ForkServerGone if it is not there."""
        fds = [ready_fd, log_fd, *keep_fds]
        request = json.dumps({"domid": domid, "env": dict(env), "fds": fds}).encode()
        if len(fds) > MAX_FDS or len(request) > MAX_REQUEST:
            raise ForkServerRefused(f"{len(fds)} descriptors and {len(request)} bytes are too many for one request")
        with self._lock:
            try:
                socket.send_fds(self.sock, [request], fds)
                answer = self.sock.recv(4096)
            except OSError as e:
                self._lost(f"{e.strerror or e}")
            if not answer:
                self._lost("it exited")
        reply = json.loads(answer)
        if "error" in reply:
            raise ForkServerRefused(str(reply["error"]))
        return PidfdProcess(int(reply["pid"]))

    def _lost(self, why: str) -> NoReturn:
        log.warning("the fork server (pid %d) is gone (%s): domains start in a fresh interpreter", self.pid, why)
        self.close()
        raise ForkServerGone(why)

    def close(self) -> None:
        """Let the helper go (it exits at the end of its socket; its domain processes run on)."""
        self.sock.close()


def _helper(sock: socket.socket) -> NoReturn:
    """The helper's life: import, then fork a domain process per request until the server goes."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a ^C to `hypyr serve` stops the server alone
        signal.signal(signal.SIGCHLD, _reap)
        logging.root.handlers.clear()
        gc.freeze()      # no object of the server's is collected here, closing a descriptor by number
        spawn.close_inherited((sock.fileno(),))    # the server's listening socket and anything else it holds
        for name in PRELOAD:
            importlib.import_module(name)
        while True:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
            if not msg:
                break
            try:
                pid = os.fork()
            except OSError as e:
                answer: dict = {"error": f"cannot fork a domain process: {e.strerror or e}"}
            else:
                if pid == 0:
                    sock.close()
                    _domain_child(json.loads(msg), fds)
                answer = {"pid": pid}
            for fd in fds:
                os.close(fd)
            try:
                sock.send(json.dumps(answer).encode())
            except OSError:   # the server gave up waiting and starts this domain itself: not twice
                if "pid" in answer:
                    os.kill(answer["pid"], signal.SIGKILL)
                raise
    except BaseException:   # noqa: BLE001 - the helper never returns into the server's code
        traceback.print_exc()
        code = 1
    os._exit(code)


def _reap(signum: int, frame: object) -> None:
    """SIGCHLD in the helper: reap every domain process that has exited."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _domain_child(request: dict, fds: list[int]) -> NoReturn:
    """In the helper's child: the passed descriptors at the numbers they had in the server (the
    environment names them), the helper's signal dispositions undone, then the domain."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    wanted = [int(n) for n in request["fds"]]
    above = max([*wanted, *fds]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
    for fd in fds:
        os.close(fd)
    for src, dst in zip(moved, wanted, strict=True):
        os.dup2(src, dst)
        os.close(src)
    ready_fd, log_fd, *keep = wanted
    spawn.run_domain_child(int(request["domid"]), ready_fd, log_fd, keep, request["env"])
