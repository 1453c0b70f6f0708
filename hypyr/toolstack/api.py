"""The toolstack's Python API: what `hypyr create/list/pause/...` and `hypyr serve` call.

The toolstack never issues an ioctl: it talks to domain processes over their control sockets,
reads the registry, and uses ordinary OS interfaces (/proc, sched_setaffinity, cgroups).

``create`` opens each vif's tap and hands it to the domain process (docs/networking.md), with
the domain's UUID, by which that process updates only its own registry row (docs/toolstack.md).
A control operation that gets no answer within ``CONTROL_TIMEOUT`` seconds is a DomainTimeout.

Errors are typed (``hypyr.toolstack.errors``): DomainNotFound, DomainExists, DomainStateError (not
running, paused), InvalidConfig, DomainUnreachable, DomainTimeout, ...  A domain is named by its
name or its id wherever a ``name`` is taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from hypyr import procfs
from hypyr.errors import HypyrError, InvalidInput
from hypyr.messages import json_object
from hypyr.toolstack import nics, paths, spawn
from hypyr.toolstack.errors import (
    DomainNotFound,
    DomainStateError,
    DomainTimeout,
    DomainUnreachable,
    InsufficientResources,
    InvalidConfig,
    MigrationFailed,
    SaveFileError,
    VcpuNotFound,
    from_report,
    save_file_sentence,
)
from hypyr.toolstack.registry import (
    DOMAIN0_NAME,
    DOMAIN0_UUID,
    DomainRecord,
    DomainState,
    Registry,
    StaleDomainError,
    is_alive,
)
from hypyr.toolstack.xlcfg import DomainConfig, load

CREATE_TIMEOUT = 120.0
CONTROL_TIMEOUT = 30.0   # seconds a domain process may take to answer one control operation
DESTROY_TIMEOUT = 10.0   # seconds `destroy` gives a domain process to stop before SIGKILL
KILL_TIMEOUT = 5.0       # seconds `destroy` waits for a SIGKILLed domain process to be gone


class Control:
    """A connection to one domain process's control socket."""

    def __init__(self, rec: DomainRecord, timeout: float | None = None):
        self.rec = rec
        self.timeout = CONTROL_TIMEOUT if timeout is None else timeout
        if not rec.socket:
            raise DomainStateError(f"domain {rec.name} has no control socket (state {rec.state})")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(rec.socket)
        except OSError:
            self.sock.close()
            raise DomainUnreachable(f"domain {rec.name} is not answering on its control socket") from None
        self.file = self.sock.makefile("rb")

    def call(self, op: str, *, on_progress=None, **args) -> dict:
        """One operation; ``{"progress": {...}}`` lines before the answer (long operations: save,
        migrate) go to ``on_progress(dict)``, the timeout applying to each line."""
        name = self.rec.name
        try:
            self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while True:
                line = self.file.readline()
                if not line.startswith(b'{"progress"'):
                    break
                progress = (json_object(line) or {}).get("progress")
                if on_progress is not None and isinstance(progress, dict):
                    try:
                        on_progress(progress)
                    except (ValueError, KeyError, TypeError):   # fields of the wrong type or missing
                        pass
        except TimeoutError:
            raise DomainTimeout(f"domain {name} did not answer {op} within {self.timeout:g} s") from None
        except OSError as e:
            raise DomainUnreachable(f"lost the connection to domain {name} during {op} ({e.strerror or e})") from None
        if not line:
            raise DomainUnreachable(f"domain {name} closed its control socket")
        reply = json_object(line)
        if reply is None:
            raise DomainUnreachable(f"domain {name} answered {op} with something that is not a JSON object")
        if not reply.get("ok"):
            raise from_report(reply.get("type"), reply.get("error") or f"{op} failed")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _control(rec: DomainRecord, op: str, *, timeout: float | None = None, on_progress=None, **args) -> dict:
    """One control operation on the running domain ``rec``."""
    if not is_alive(rec):
        raise DomainStateError(f"domain {rec.name} is not running (state {rec.state})")
    c = Control(rec, timeout)
    try:
        return c.call(op, on_progress=on_progress, **args)
    finally:
        c.close()


def _record(name: str) -> DomainRecord:
    with Registry() as reg:
        return reg.get(name)


# -- create ---------------------------------------------------------------------------------
def host_free_memory_mib() -> int:
    return procfs.memory_mib()[1]


def host_max_vcpus() -> int | None:
    """The most vCPUs this host's KVM gives a VM, or None if /dev/kvm cannot be used here."""
    from hypyr.arch.x86.layout import MAX_VCPUS
    from hypyr.kvm import Kvm, KvmUnavailable
    try:
        kvm = Kvm()
    except (KvmUnavailable, OSError):
        return None
    try:
        return min(kvm.max_vcpus, MAX_VCPUS)
    finally:
        kvm.close()


def check_config(cfg: DomainConfig) -> None:
    for path, what in [(cfg.kernel, "kernel"), (cfg.ramdisk, "ramdisk")] + [(d.target, "disk") for d in cfg.disks]:
        if path and not os.path.isfile(path):
            problem = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise InvalidConfig(f"{what} file {path} of domain {cfg.name} {problem}")
    limit = host_max_vcpus()
    if limit is not None and cfg.vcpus > limit:
        raise InvalidConfig(f"vcpus = {cfg.vcpus} of domain {cfg.name} is more than this host's KVM allows ({limit})")
    free = host_free_memory_mib()
    if cfg.memory > free:
        raise InsufficientResources(f"domain {cfg.name} wants {cfg.memory} MiB but the host has only {free} MiB free")


def create(cfg_or_path: DomainConfig | str | os.PathLike) -> DomainRecord:
    """Start a domain in its own detached process; return its registry record once it runs."""
    cfg = cfg_or_path if isinstance(cfg_or_path, DomainConfig) else load(cfg_or_path)
    check_config(cfg)
    with Registry() as reg:
        cfg = _prepare_vifs(cfg, reg)
        rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()))
        try:
            _start(reg, cfg, rec)
        except BaseException:
            _forget(reg, rec)   # its row, directory and cgroup
            raise
        return reg.get(str(rec.domid))


def _start(reg: Registry, cfg: DomainConfig, rec: DomainRecord, extra_env: dict[str, str] | None = None,
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
        # The domain process logs onto vmm.log itself, rotating it (domain.VmmLogHandler); its
        # stdout/stderr start there for what is written before that, or by a crash.
        reg.close()    # SQLite's per-process state must not cross a fork; it reopens on next use
        with open(paths.vmm_log(rec.domid), "ab") as logf:
            proc = spawn.start_domain(rec.domid, w, logf.fileno(), (*taps, *extra_fds), env)
        for fd in taps:
            os.close(fd)
        taps = []
        os.close(w)
        w = -1
        _wait_ready(r, proc, cfg.name, CREATE_TIMEOUT if timeout is None else timeout)
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


def _forget(reg: Registry, rec: DomainRecord) -> None:
    """Remove the row of a domain that did not come up (only if it is still this domain's)."""
    try:
        reg.remove(rec.domid, uuid=rec.uuid)
    except StaleDomainError:
        pass


def _prepare_vifs(cfg: DomainConfig, reg: Registry) -> DomainConfig:
    """Give every vif a MAC (unique among live domains) and a bridge that exists."""
    if not cfg.vifs:
        return cfg
    used: dict[str, str] = {}
    for r in reg.list():
        if r.state is DomainState.CREATING or is_alive(r):
            for v in r.config_dict().get("vifs", ()):
                if v.get("mac"):
                    used[v["mac"]] = f"domain {r.name} (vif {v.get('devid')})"
    return dataclasses.replace(cfg, vifs=nics.assign(cfg.vifs, used))


def _open_taps(cfg: DomainConfig, domid: int) -> list[int]:
    """Open and attach one tap per vif; on failure close the ones opened and re-raise."""
    return nics.open_taps(cfg.vifs, [v.tap_name(domid) for v in cfg.vifs])


def _wait_ready(fd: int, proc: spawn.DomainProcess, name: str, timeout: float = CREATE_TIMEOUT) -> None:
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


# -- lifecycle ------------------------------------------------------------------------------------
def pause(name: str) -> None:
    _control(_record(name), "pause")


def unpause(name: str) -> None:
    _control(_record(name), "unpause")


def reboot(name: str) -> None:
    _control(_record(name), "reboot")


def trigger(name: str, what: str, vcpu: int = 0) -> None:
    """Send ``what`` (``nmi``) to one vCPU of the domain, as Xen's `xl trigger`."""
    _control(_record(name), "trigger", what=what, vcpu=vcpu)


def shutdown(name: str, wait: bool = False, timeout: float = 300.0) -> None:
    rec = _record(name)
    _control(rec, "shutdown")
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive(rec):
                return
            time.sleep(0.2)
        raise DomainTimeout(f"domain {rec.name} did not shut down within {timeout:.0f} s")


def _sigkill(rec: DomainRecord) -> None:
    """SIGKILL the domain's process (if the row still names one)."""
    if rec.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)


def _wait_gone(rec: DomainRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_alive(rec)


def destroy(name: str) -> None:
    """Stop the domain (politely, then SIGKILL) and remove its row, directory and cgroup."""
    with Registry() as reg:
        rec = reg.get(name)
        if is_alive(rec):
            deadline = time.monotonic() + DESTROY_TIMEOUT
            try:
                _control(rec, "destroy", timeout=DESTROY_TIMEOUT)
            except HypyrError:
                pass
            if not _wait_gone(rec, max(0.0, deadline - time.monotonic())):
                _sigkill(rec)
                if not _wait_gone(rec, KILL_TIMEOUT):   # its cgroup can go only once it has
                    raise DomainTimeout(f"domain {rec.name} (pid {rec.pid}) is still running after SIGKILL")
        _forget(reg, rec)


# -- save and restore ---------------------------------------------------------------------------------
SAVE_TIMEOUT = 600.0     # seconds a saving domain process may go without a word (progress or answer)


@dataclass
class SaveResult:
    name: str
    domid: int
    file: str
    keep_running: bool
    seconds: float
    bytes: int
    pages_data: int
    pages_zero: int


def save(name: str, file: str | os.PathLike, keep_running: bool = False, progress=None) -> SaveResult:
    """``xl save [-c]``: the domain process writes its VM to ``file`` (extra: the domain's name,
    UUID and configuration, for `restore`); without ``keep_running`` the domain is then destroyed
    (its row removed) before this returns.  ``progress(dict)`` gets the domain's progress reports
    (phase, bytes, pages, total_pages)."""
    rec = _record(name)
    path = os.path.abspath(os.fspath(file))
    if os.path.isdir(path):
        raise SaveFileError(f"{path} is a directory: give the save file's name")
    if not os.path.isdir(os.path.dirname(path)):
        raise SaveFileError(f"cannot write the save file {path}: its directory does not exist")
    r = _control(rec, "save", timeout=SAVE_TIMEOUT, on_progress=progress, file=path, keep_running=keep_running)
    if not keep_running:
        _finish_destroy(rec)
    return SaveResult(rec.name, rec.domid, path, keep_running, float(r.get("seconds", 0.0)),
                      int(r.get("bytes", 0)), int(r.get("pages_data", 0)), int(r.get("pages_zero", 0)))


def _finish_destroy(rec: DomainRecord) -> None:
    """After a domain process was told to stop (saved, migrated away): wait for it to go (SIGKILL
    if it does not) and remove its row if it is still there."""
    if not _wait_gone(rec, DESTROY_TIMEOUT):
        _sigkill(rec)
        if not _wait_gone(rec, KILL_TIMEOUT):
            raise DomainTimeout(f"domain {rec.name} (pid {rec.pid}) is still running after SIGKILL")
    with Registry() as reg:
        _forget(reg, rec)


def read_save_file(file: str | os.PathLike):
    """The header of save file ``file`` and the domain configuration `hypyr save` kept in it:
    (SnapshotHeader, DomainConfig, uuid or None).  SaveFileError, one sentence, if it is not a
    save file this hypyr can restore.  The host CPU is checked by the domain process (here no
    ioctl is made)."""
    from hypyr.errors import SnapshotError
    from hypyr.vmm.header import read_header
    path = os.path.abspath(os.fspath(file))
    try:
        with open(path, "rb") as f:
            header = read_header(f)
    except OSError as e:
        raise SaveFileError(f"cannot read the save file {path}: {e.strerror or e}") from None
    except SnapshotError as e:
        raise SaveFileError(save_file_sentence(path, e)) from None
    cfg, uuid = _domain_of(header, f"the save file {path}", "save")
    return header, cfg, uuid


def _domain_of(header, what: str, kind: str) -> tuple[DomainConfig, str | None]:
    """The domain configuration (named as saved) and UUID that `hypyr save`/`migrate` kept in the
    header's extra; SaveFileError/MigrationFailed (``what``) if there is none that fits."""
    err = SaveFileError if kind == "save" else MigrationFailed
    extra = header.extra
    if header.kind != kind or not isinstance(extra, dict) or not isinstance(extra.get("config"), dict):
        made = "written by hypyr save" if kind == "save" else "sent by hypyr migrate"
        raise err(f"{what} was not {made} (it holds no domain configuration)")
    try:
        cfg = DomainConfig.from_dict(extra["config"])
        if isinstance(extra.get("name"), str):
            cfg = dataclasses.replace(cfg, name=extra["name"])
    except (HypyrError, TypeError, ValueError) as e:
        raise err(f"{what} holds a domain configuration this hypyr cannot use: {e}") from None
    if len(cfg.vifs) != len(header.config.nets) or cfg.vcpus != header.config.vcpus \
            or (cfg.memory << 20) != header.config.memory:
        raise err(f"{what} is corrupt (its domain configuration does not match the VM)")
    return cfg, extra.get("uuid") if isinstance(extra.get("uuid"), str) else None


def _check_disks(cfg: DomainConfig) -> None:
    for d in cfg.disks:
        if not os.path.isfile(d.target):
            problem = "is not a regular file" if os.path.exists(d.target) else "does not exist"
            raise InvalidConfig(f"disk file {d.target} of domain {cfg.name} {problem} here")


def restore(file: str | os.PathLike, paused: bool = False) -> DomainRecord:
    """``xl restore [-p]``: a new domain (the saved name and, unless a live domain has it, the
    saved UUID) whose process restores ``file`` instead of booting; its vifs get taps on the same
    bridges with the same MACs.  Returns its record once its vCPUs run (or are paused).  A bad
    file is a SaveFileError and creates nothing."""
    path = os.path.abspath(os.fspath(file))
    _, cfg, uuid = read_save_file(path)
    _check_disks(cfg)
    free = host_free_memory_mib()
    if cfg.memory > free:
        raise InsufficientResources(f"domain {cfg.name} needs {cfg.memory} MiB but the host has only {free} MiB free")
    with Registry() as reg:
        cfg = _prepare_vifs(cfg, reg)       # the saved MACs (refused if a live domain has one), bridges made
        rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()), uuid=uuid)
        try:
            _start(reg, cfg, rec, {"HYPYR_RESTORE_FILE": path, "HYPYR_RESTORE_PAUSED": "1" if paused else "0"})
        except BaseException:
            _forget(reg, rec)
            raise
        return reg.get(str(rec.domid))


# -- live migration ---------------------------------------------------------------------------------------
MIGRATION_PORT = 8002            # as Xen's relocation server (xend-relocation-port)
MIGRATE_TIMEOUT = 3600.0         # seconds a migration may take, at most, on either side
SOURCE_GONE_TIMEOUT = 60.0       # seconds the destination waits for the source to go, after the switch-over
INCOMING_SUFFIX = "--incoming"


def parse_address(text: str, default_host: str | None = None, default_port: int = MIGRATION_PORT) -> tuple[str, int]:
    """``HOST[:PORT]``, ``[IPv6][:PORT]`` or (with ``default_host``) ``:PORT`` → (host, port)."""
    t = text.strip()
    host, port = t, None
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or (t[end + 1:] and not t[end + 1:].startswith(":")):
            raise InvalidInput(f"{text!r} is not HOST[:PORT]")
        host, rest = t[1:end], t[end + 1:]
        port = rest[1:] if rest else None
    elif t.count(":") == 1:
        host, port = t.split(":")
    if not host:
        if default_host is None:
            raise InvalidInput(f"{text!r} names no host (give HOST[:PORT])")
        host = default_host
    if any(c.isspace() or c in "/[]" for c in host):
        raise InvalidInput(f"{text!r} is not HOST[:PORT]")
    if port is None or port == "":
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput(f"the port in {text!r} must be a number from 1 to 65535")
    return host, int(port)


@dataclass
class MigrationResult:
    name: str
    domid: int
    to: str
    seconds: float
    downtime_ms: float | None
    downtime_clock: str
    iterations: int
    pages_data: int
    pages_zero: int
    final_pages: int
    bytes: int
    bandwidth: float


def migrate(name: str, host: str, port: int = MIGRATION_PORT, *, downtime_ms: float = 300,
            max_iterations: int = 30, progress=None) -> MigrationResult:
    """``xl migrate``: the domain process connects to a `migrate-receive` at HOST:PORT and migrates
    the domain live; once the destination confirmed that it runs there, the domain is destroyed
    here (its row removed) before this returns.  MigrationFailed otherwise (the domain runs on
    here, or, if the link dropped right at the switch-over, is left paused: the sentence says)."""
    rec = _record(name)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidInput(f"the port must be a number from 1 to 65535, not {port!r}")
    if not 1 <= max_iterations <= 10_000 or downtime_ms < 0:
        raise InvalidInput("the number of iterations must be 1-10000 and the downtime target not negative")
    r = _control(rec, "migrate", timeout=MIGRATE_TIMEOUT, on_progress=progress, host=host, port=port,
                 downtime_ms=downtime_ms, max_iterations=max_iterations)
    _finish_destroy(rec)
    fields = {f.name for f in dataclasses.fields(MigrationResult)} - {"name", "domid"}
    values: dict[str, Any] = {k: r.get(k) for k in fields}
    return MigrationResult(name=rec.name, domid=rec.domid, **values)


@dataclass
class ReceivedDomain:
    name: str
    domid: int
    source: str          # the peer's address
    seconds: float       # from the connection to the domain running here
    renamed: bool        # False: the name is still NAME--incoming (see note)
    note: str | None = None   # why it was not renamed


def _peek_header(conn: socket.socket, timeout: float):
    """The migration stream's HEADER, read without taking it off ``conn`` (MSG_PEEK): the
    domain process reads the whole stream.  MigrationFailed if it is not one."""
    import io

    from hypyr.errors import SnapshotError, SnapshotTruncated
    from hypyr.vmm.header import read_header_record
    from hypyr.vmm.stream import StreamReader
    deadline = time.monotonic() + timeout
    want = 4096
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MigrationFailed(f"the source sent no migration header within {timeout:g} s")
        conn.settimeout(left)
        try:
            data = conn.recv(want, socket.MSG_PEEK)
        except TimeoutError:
            continue
        except OSError as e:
            raise MigrationFailed(f"the connection from the source was lost ({e.strerror or e})") from None
        if not data:
            raise MigrationFailed("the source closed the connection before sending a migration stream")
        try:
            return read_header_record(StreamReader(io.BytesIO(data), "the migration stream"))
        except SnapshotTruncated:        # not all of it has arrived yet
            if len(data) == want and want < (4 << 20):
                want *= 2
            else:
                time.sleep(0.02)     # the rest has not arrived yet
        except SnapshotError as e:
            raise MigrationFailed(str(e)) from None


def migrate_receive(host: str = "127.0.0.1", port: int = MIGRATION_PORT, *, on_listening=None,
                    on_incoming=None) -> ReceivedDomain:
    """``xl migrate-receive``: accept one live migration on HOST:PORT.  The domain is created as
    ``NAME--incoming`` (taps on the same bridges, the same MACs), its process receives the stream;
    once the domain runs here and the source has gone (its end of the connection closed), it is
    renamed NAME.  MigrationFailed (nothing left here) if the migration does not happen.
    ``on_listening((host, port))`` once listening, ``on_incoming(peer, name)`` once a source
    connected and said which domain it sends."""
    try:
        srv = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise InvalidInput(f"cannot listen on {host}:{port} ({os.strerror(e.errno) if e.errno else e})") from None
    with srv:
        if on_listening is not None:
            on_listening(srv.getsockname()[:2])
        conn, peer = srv.accept()
    t0 = time.monotonic()
    source = f"{peer[0]}:{peer[1]}"
    with conn:
        header = _peek_header(conn, 60.0)
        cfg, uuid = _domain_of(header, f"the migration stream from {source}", "migration")
        final = cfg.name
        cfg = dataclasses.replace(cfg, name=final[:64 - len(INCOMING_SUFFIX)] + INCOMING_SUFFIX)
        if on_incoming is not None:
            on_incoming(source, final)
        _check_disks(cfg)
        with Registry() as reg:
            # the same MACs as on the source, which may be this host: no uniqueness check here
            cfg = dataclasses.replace(cfg, vifs=nics.assign(cfg.vifs, {}))
            rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()), uuid=uuid)
            watch_r, watch_w = os.pipe()
            try:
                _start(reg, cfg, rec, {"HYPYR_MIGRATE_FD": str(conn.fileno()), "HYPYR_MIGRATE_WATCH_FD": str(watch_r)},
                       (conn.fileno(), watch_r), timeout=MIGRATE_TIMEOUT)
            except BaseException:
                os.close(watch_w)
                _forget(reg, rec)
                raise
            finally:
                os.close(watch_r)
            rec = reg.get(str(rec.domid))
        seconds = time.monotonic() - t0
        try:
            gone = _wait_source_gone(conn, SOURCE_GONE_TIMEOUT)
        finally:
            os.close(watch_w)     # the domain runs: the watch has nothing more to do
    note = None if gone else f"the source did not close the connection within {SOURCE_GONE_TIMEOUT:g} s"
    if gone:
        try:
            _control(rec, "rename", name=final)
        except HypyrError as e:
            note = str(e)
    return ReceivedDomain(rec.name if note else final, rec.domid, source, seconds, note is None, note)


def _wait_source_gone(conn: socket.socket, timeout: float) -> bool:
    """Whether the source closed its end of the migration connection within ``timeout`` s
    (it does when its domain process has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        conn.settimeout(left)
        try:
            if not conn.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True       # reset: the source is gone too


# -- information -----------------------------------------------------------------------------------
@dataclass
class DomainInfo:
    name: str
    domid: int
    memory: int   # MiB
    vcpus: int
    state: str    # xl letters, e.g. "-b----"
    cpu_time: float
    status: DomainState   # registry state (a str: "running", ...)
    uuid: str | None = None
    seccomp: str = "kill"   # the VMM's seccomp filter mode: kill, log or off (off for the host)
    jail_uid: int | None = None   # the uid of its jailed VMM (None: not jailed)


_XL_LETTER: dict[DomainState | str, str] = {DomainState.PAUSED: "p", DomainState.SHUTDOWN: "s",
                                            DomainState.CRASHED: "c", DomainState.DYING: "d",
                                            DomainState.CREATING: "b"}


def xl_state(status: DomainState | str, running: bool) -> str:
    """xl's state column, e.g. "-b----": one of the letters rbpscd set, the others dashes."""
    ch = ("r" if running else "b") if status == DomainState.RUNNING else _XL_LETTER.get(status, "-")
    return "".join(c if c == ch else "-" for c in "rbpscd")


def host_domain() -> DomainInfo:
    """The host as xl's Domain-0 row: its memory, CPUs and busy CPU time since boot."""
    ticks = procfs.host_cpu_ticks()
    busy = ticks[0] / procfs.CLK_TCK if ticks else 0.0
    return DomainInfo(DOMAIN0_NAME, 0, procfs.memory_mib()[0], os.cpu_count() or 1,
                      xl_state(DomainState.RUNNING, True), busy, DomainState.RUNNING, DOMAIN0_UUID, "off")


def describe(r: DomainRecord) -> DomainInfo:
    """The DomainInfo (as `hypyr list` shows it) of the registry record ``r``."""
    cfg = r.config_dict()
    pid = r.pid if is_alive(r) else None
    cpu = (procfs.cpu_seconds(pid) or 0.0) if pid else 0.0
    running = pid is not None and procfs.any_thread_running(pid)
    return DomainInfo(r.name, r.domid, int(cfg.get("memory", 0)), int(cfg.get("vcpus", 1)),
                      xl_state(r.state, running), cpu, r.state, r.uuid, str(cfg.get("seccomp", "kill")),
                      _jail_uid(pid) if pid else None)


def _jail_uid(pid: int) -> int | None:
    """The real uid of the VMM ``pid`` if it is not this toolstack's own (a jailed VMM's)."""
    try:
        uid = int(procfs.status(pid)["Uid"].split()[0])
    except (KeyError, IndexError, ValueError):
        return None
    return uid if uid != os.geteuid() else None


def vcpu_registers(name: str) -> list[str]:
    """Each vCPU's registers and pending events, read with the domain paused for the instant
    (`hypyr info DOMAIN --registers`, as Xen's xenctx)."""
    return [str(v) for v in _control(_record(name), "registers").get("vcpus", [])]


def vmm_info(name: str) -> dict:
    """What the domain's VMM says of itself (its `info` operation): state, pid, vCPUs, seccomp
    mode, jail (uid, gid, what it sees, rlimits); and what the kernel says of its threads'
    seccomp filters ("seccomp_filtered": [filtered, threads], from /proc)."""
    info = _control(_record(name), "info")
    if isinstance(info.get("pid"), int):
        info["seccomp_filtered"] = list(procfs.seccomp_filtered(info["pid"]))
    return info


def list_domains(names: list[str] | None = None) -> list[DomainInfo]:
    """The domains (by id), or those named (names or ids; DomainNotFound for an unknown one)."""
    with Registry() as reg:
        recs = reg.list()
        if names:
            wanted = [reg.get(n).domid for n in names]
            recs = [r for r in recs if r.domid in wanted]
    return [describe(r) for r in recs]


def domain_info(name: str) -> DomainInfo:
    """One domain, by name or id (DomainNotFound if there is none, or its process is gone)."""
    with Registry() as reg:
        reg.reap()
        rec = reg.get(name)
    if rec.state is DomainState.DEAD:
        raise DomainNotFound(f"domain {rec.name} is gone ({rec.exit_reason or 'its process exited'})")
    return describe(rec)


def vcpu_list(name: str | None = None) -> list[dict]:
    with Registry() as reg:
        recs = [reg.get(name)] if name else reg.list()
    rows = []
    for r in recs:
        if r.pid is None or not is_alive(r):
            continue
        info = _control(r, "info")
        for v in info["vcpus"]:
            tid = v["tid"]
            st = procfs.stat(r.pid, tid) if tid else None
            try:
                affinity = sorted(os.sched_getaffinity(tid)) if st else []
            except OSError:
                affinity = []
            rows.append({"name": r.name, "domid": r.domid, "vcpu": v["vcpu"], "cpu": st.processor if st else None,
                         "tid": tid,
                         "state": "p" if info["state"] == DomainState.PAUSED else
                                  ("r" if st and st.state == "R" else "b"),
                         "time": st.cpu_seconds if st else 0.0,
                         "affinity": affinity})
    return rows


def vcpu_pin(name: str, vcpu: str, cpus: set[int]) -> None:
    """Set the host CPU affinity of one vCPU thread ('all' for every vCPU)."""
    rec = _record(name)
    rows = vcpu_list(str(rec.domid))
    if not rows:
        raise DomainStateError(f"domain {rec.name} is not running")
    targets = rows if vcpu == "all" else [r for r in rows if str(r["vcpu"]) == str(vcpu)]
    if not targets:
        raise VcpuNotFound(f"domain {rec.name} has no vCPU {vcpu}")
    ncpu = os.cpu_count() or 1
    bad = [c for c in cpus if c >= ncpu]
    if bad or not cpus:
        raise InvalidInput(f"CPUs {sorted(cpus)} are not all on this host (it has CPUs 0-{ncpu - 1})")
    for r in targets:
        try:
            os.sched_setaffinity(r["tid"], cpus)
        except ProcessLookupError:
            raise DomainStateError(f"vCPU {r['vcpu']} of domain {rec.name} is gone (is it running?)") from None
        except OSError as e:
            raise InvalidInput(f"cannot pin vCPU {r['vcpu']} of domain {rec.name} to CPUs {sorted(cpus)}: "
                               f"{e.strerror or e}") from None


def network_list(name: str) -> list[dict]:
    """A domain's NICs as ``xl network-list``: devid, MAC, bridge, tap, and the bytes the guest
    received (rx) and transmitted (tx); None when its tap does not exist (the domain is not running)."""
    from hypyr.toolstack import network
    rec = _record(name)
    cfg = DomainConfig.from_dict(rec.config_dict())
    alive = is_alive(rec)
    rows = []
    for v in cfg.vifs:
        tap = v.tap_name(rec.domid)
        rx, tx = (network.guest_traffic(tap) if alive else None) or (None, None)
        rows.append({"devid": v.devid, "mac": v.mac, "bridge": v.bridge, "tap": tap,
                     "rx_bytes": rx, "tx_bytes": tx})
    return rows
