"""Starting a domain process, detached in its own session, with its output on its vmm.log.

A single-threaded caller (the `hypyr` CLI) forks: the child already has the modules the two
share and runs ``hypyr.toolstack.domain.main`` at once, which saves an interpreter start and
those imports (most of a `restore`'s time in the lab: bench/README.md, "migrate.py").  A caller
with other threads (`hypyr serve`) starts ``python -m hypyr.toolstack.domain`` instead: a fork
there could inherit a lock that another thread holds.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Protocol


class DomainProcess(Protocol):
    """What `create` needs of a started domain process (``subprocess.Popen`` has it)."""

    pid: int

    def poll(self) -> int | None: ...
    def kill(self) -> None: ...
    def wait(self) -> int: ...


class ForkedProcess:
    """A forked child, watched as ``subprocess.Popen`` watches one."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def start_domain(domid: int, ready_fd: int, log_fd: int, keep_fds: Sequence[int],
                 env: Mapping[str, str]) -> DomainProcess:
    """Start the domain process of ``domid``, reporting on ``ready_fd``; it inherits ``keep_fds``
    and ``env`` (added to ours), its stdin is /dev/null and stdout/stderr ``log_fd``."""
    if threading.active_count() > 1:
        return subprocess.Popen([sys.executable, "-m", "hypyr.toolstack.domain", str(domid), str(ready_fd)],
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                pass_fds=(ready_fd, *keep_fds), start_new_session=True, close_fds=True,
                                env=dict(os.environ, **env))
    from hypyr.toolstack import domain  # before the fork: imported once, in the parent
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    code = 1
    try:
        _become_detached(log_fd, (ready_fd, *keep_fds))
        os.environ.update(env)
        code = domain.main([str(domid), str(ready_fd)])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:   # noqa: BLE001 - the child must never return into its parent's code
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _become_detached(log_fd: int, keep: Sequence[int]) -> None:
    """In the forked child: a new session; stdin /dev/null, stdout/stderr ``log_fd``; every other
    inherited descriptor but ``keep`` closed; no inherited log handlers.  The parent's objects are
    frozen out of garbage collection first, so none of them closes a descriptor the domain opens."""
    gc.freeze()
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass    # the descriptor that listed /proc/self/fd
    for fd in keep:
        os.set_inheritable(fd, True)   # as pass_fds leaves them
    sys.stdout = open(1, "w", buffering=1, closefd=False)   # noqa: SIM115 - fds 1 and 2, not a caller's
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    logging.root.handlers.clear()
