"""Moving a domain's state out of and into domain processes: ``xl save`` / ``restore`` /
``migrate`` / ``migrate-receive`` (docs/migration.md).  The VM's side is hypyr.vmm.snapshot and
hypyr.vmm.migration, run by the domain process; this is the toolstack's."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from hypyr.errors import HypyrError, InvalidInput
from hypyr.toolstack import api, client, nics, spawn
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.domrecord import DomainRecord
from hypyr.toolstack.errors import (
    InsufficientResources,
    MigrationFailed,
    SaveFileError,
    save_file_sentence,
)
from hypyr.toolstack.registry import Registry

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
    rec = client.find(name)
    path = os.path.abspath(os.fspath(file))
    if os.path.isdir(path):
        raise SaveFileError(f"{path} is a directory: give the save file's name")
    if not os.path.isdir(os.path.dirname(path)):
        raise SaveFileError(f"cannot write the save file {path}: its directory does not exist")
    r = client.call(rec, "save", timeout=SAVE_TIMEOUT, on_progress=progress, file=path, keep_running=keep_running)
    if not keep_running:
        spawn.reap(rec)
    return SaveResult(rec.name, rec.domid, path, keep_running, float(r.get("seconds", 0.0)),
                      int(r.get("bytes", 0)), int(r.get("pages_data", 0)), int(r.get("pages_zero", 0)))


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


def restore(file: str | os.PathLike, paused: bool = False) -> DomainRecord:
    """``xl restore [-p]``: a new domain (the saved name and, unless a live domain has it, the
    saved UUID) whose process restores ``file`` instead of booting; its vifs get taps on the same
    bridges with the same MACs.  Returns its record once its vCPUs run (or are paused).  A bad
    file is a SaveFileError and creates nothing."""
    path = os.path.abspath(os.fspath(file))
    _, cfg, uuid = read_save_file(path)
    api.check_files(cfg, disks_only=True, where=" here")
    free = api.host_free_memory_mib()
    if cfg.memory > free:
        raise InsufficientResources(f"domain {cfg.name} needs {cfg.memory} MiB but the host has only {free} MiB free")
    with Registry() as reg:
        cfg = api.prepare_vifs(cfg, reg)       # the saved MACs (refused if a live domain has one), bridges made
        rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()), uuid=uuid)
        try:
            spawn.start(reg, cfg, rec, {"HYPYR_RESTORE_FILE": path, "HYPYR_RESTORE_PAUSED": "1" if paused else "0"})
        except BaseException:
            spawn.forget(reg, rec)
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
    rec = client.find(name)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidInput(f"the port must be a number from 1 to 65535, not {port!r}")
    if not 1 <= max_iterations <= 10_000 or downtime_ms < 0:
        raise InvalidInput("the number of iterations must be 1-10000 and the downtime target not negative")
    r = client.call(rec, "migrate", timeout=MIGRATE_TIMEOUT, on_progress=progress, host=host, port=port,
                 downtime_ms=downtime_ms, max_iterations=max_iterations)
    spawn.reap(rec)
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
        api.check_files(cfg, disks_only=True, where=" here")
        with Registry() as reg:
            # the same MACs as on the source, which may be this host: no uniqueness check here
            cfg = dataclasses.replace(cfg, vifs=nics.assign(cfg.vifs, {}))
            rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()), uuid=uuid)
            watch_r, watch_w = os.pipe()
            try:
                spawn.start(reg, cfg, rec,
                            {"HYPYR_MIGRATE_FD": str(conn.fileno()), "HYPYR_MIGRATE_WATCH_FD": str(watch_r)},
                            (conn.fileno(), watch_r), timeout=MIGRATE_TIMEOUT)
            except BaseException:
                os.close(watch_w)
                spawn.forget(reg, rec)
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
            client.call(rec, "rename", name=final)
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


