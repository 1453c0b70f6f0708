"""A domain's process: started detached (its own session, its output on its vmm.log), waited for
until it reports that its VM runs, reaped once it was told to stop.

How it starts: a single-threaded caller (the `hypyr` CLI) forks: the child already has the modules the two
share and runs ``hypyr.toolstack.domain.main`` at once, which saves an interpreter start and
those imports (most of a `restore`'s time in the lab: bench/README.md, "migrate.py").  `hypyr serve`
has threads, so it must not fork: its fork server (hypyr.toolstack.forkserver) forks for it; without
one, a threaded caller starts ``python -m hypyr.toolstack.domain``."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn, Protocol

from hypyr.errors import HypyrError
from hypyr.messages import json_object
from hypyr.toolstack import nics, paths
from hypyr.toolstack.domrecord import DomainRecord, is_alive
from hypyr.toolstack.errors import DomainTimeout, from_report
from hypyr.toolstack.registry import Registry, StaleDomainError

if TYPE_CHECKING:
    from hypyr.toolstack.domconfig import DomainConfig
    from hypyr.toolstack.forkserver import ForkServer

log = logging.getLogger(__name__)

CREATE_TIMEOUT = 120.0
DESTROY_TIMEOUT = 10.0   # seconds `destroy` gives a domain process to stop before SIGKILL
KILL_TIMEOUT = 5.0       # seconds `destroy` waits for a SIGKILLed domain process to be gone

fork_server: ForkServer | None = None    # `hypyr serve`'s (hypyr.toolstack.forkserver), once started


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
    if fork_server is not None:
        from hypyr.toolstack.forkserver import ForkServerGone, ForkServerRefused
        try:
            return fork_server.start_domain(domid, ready_fd, log_fd, keep_fds, env)
        except ForkServerGone:
            use_fork_server(None)
        except ForkServerRefused as e:
            log.warning("the fork server cannot start domain %d (%s): it starts in a fresh interpreter", domid, e)
    if threading.active_count() > 1:
        return subprocess.Popen([sys.executable, "-m", "hypyr.toolstack.domain", str(domid), str(ready_fd)],
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                pass_fds=(ready_fd, *keep_fds), start_new_session=True, close_fds=True,
                                env=dict(os.environ, **env))
    from hypyr.toolstack import domain  # noqa: F401 - before the fork: imported once, in the parent
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    run_domain_child(domid, ready_fd, log_fd, keep_fds, env)


def use_fork_server(server: ForkServer | None) -> None:
    """Start domain processes through ``server`` (`hypyr serve`'s), or no longer (None)."""
    global fork_server
    fork_server = server


def run_domain_child(domid: int, ready_fd: int, log_fd: int, keep_fds: Sequence[int],
                     env: Mapping[str, str]) -> NoReturn:
    """In a freshly forked child: detach, then run the domain; never returns."""
    from hypyr.toolstack import domain
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
    close_inherited(keep)
    for fd in keep:
        os.set_inheritable(fd, True)   # as pass_fds leaves them
    sys.stdout = open(1, "w", buffering=1, closefd=False)   # noqa: SIM115 - fds 1 and 2, not a caller's
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    logging.root.handlers.clear()


def close_inherited(keep: Sequence[int]) -> None:
    """Close every descriptor above 2 but ``keep`` (in a freshly forked child)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass    # the descriptor that listed /proc/self/fd


def start(reg: Registry, cfg: DomainConfig, rec: DomainRecord, extra_env: dict[str, str] | None = None,
          extra_fds: tuple[int, ...] = (), timeout: float | None = None) -> None:
    """Start the domain process of the reserved row ``rec`` and wait until it reports that its VM
    runs; on any failure it is killed (the caller removes the row).  ``extra_env``: e.g. what
    makes it restore a save file instead of booting."""
    paths.domain_dir(rec.domid).mkdir(parents=True, exist_ok=True)
    paths.create_private(paths.vmm_log(rec.domid))   # the domain's output: 0600, as every state file
    taps = _open_taps(cfg, rec.domid)
    r, w = os.pipe()
    proc = None
    try:
        env = dict(HYPYR_TAP_FDS=",".join(str(fd) for fd in taps), HYPYR_DOMAIN_UUID=rec.uuid,
                   **(extra_env or {}))
        # The domain process logs onto vmm.log itself, rotating it (vmmlog.VmmLogHandler); its
        # stdout/stderr start there for what is written before that, or by a crash.
        reg.close()    # SQLite's per-process state must not cross a fork; it reopens on next use
        with open(paths.vmm_log(rec.domid), "ab") as logf:
            proc = start_domain(rec.domid, w, logf.fileno(), (*taps, *extra_fds), env)
        for fd in taps:
            os.close(fd)
        taps = []
        os.close(w)
        w = -1
        wait_ready(r, proc, cfg.name, CREATE_TIMEOUT if timeout is None else timeout)
    except BaseException:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        raise
    finally:
        for fd in taps:
            os.close(fd)
        os.close(r)
        if w >= 0:
            os.close(w)


def forget(reg: Registry, rec: DomainRecord) -> None:
    """Remove the row of a domain that did not come up (only if it is still this domain's)."""
    try:
        reg.remove(rec.domid, uuid=rec.uuid)
    except StaleDomainError:
        pass


def _open_taps(cfg: DomainConfig, domid: int) -> list[int]:
    """Open and attach one tap per vif; on failure close the ones opened and re-raise."""
    return nics.open_taps(cfg.vifs, [v.tap_name(domid) for v in cfg.vifs])


def wait_ready(fd: int, proc: DomainProcess, name: str, timeout: float = CREATE_TIMEOUT) -> None:
    """Wait for the domain process's report on ``fd``: one JSON line, {"ok": true} once the VM
    runs or {"ok": false, "error": SENTENCE, "type": ERROR TYPE}; raise the reported error."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        if time.monotonic() >= deadline:
            raise DomainTimeout(f"domain {name} did not start within {timeout:g} s "
                                f"(see {paths.kept_log(name, 'vmm')})")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None:
            break
    report = json_object(buf)
    if report is None:
        raise HypyrError(f"domain {name} failed to start (see {paths.kept_log(name, 'vmm')})")
    if not report.get("ok"):
        raise from_report(report.get("type"), str(report.get("error") or f"domain {name} failed to start"))


def kill(rec: DomainRecord) -> None:
    """SIGKILL the domain's process (if the row still names one)."""
    if rec.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)


def wait_gone(rec: DomainRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_alive(rec)


def reap(rec: DomainRecord, timeout: float = DESTROY_TIMEOUT) -> None:
    """After a domain process was told to stop (destroyed, saved, migrated away): wait ``timeout``
    s for it to go (then SIGKILL it) and remove its row, directory and cgroup if still its."""
    if not wait_gone(rec, timeout):
        kill(rec)
        if not wait_gone(rec, KILL_TIMEOUT):   # its cgroup can go only once it has
            raise DomainTimeout(f"domain {rec.name} (pid {rec.pid}) is still running after SIGKILL")
    with Registry() as reg:
        forget(reg, rec)
