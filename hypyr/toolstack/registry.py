"""The domain registry: which domains exist, which process owns each, and in what state.

A SQLite database (``paths.registry_path()``, WAL) that every ``hypyr`` command reads and writes
directly, as there is no daemon; every write is one ``BEGIN IMMEDIATE`` transaction.  A row is
owned by a process (pid and start time, against pid reuse) and named by (domid, uuid): domids are
reused, UUIDs never.  A row is a :class:`~hypyr.toolstack.domrecord.DomainRecord`; one whose owner is
gone is reaped (``reap()``, which ``list()`` runs first) with its ``on_crash``/``on_poweroff``
action, by the rules of :mod:`hypyr.toolstack.domrecord`; this module is their SQLite storage.
Design notes (ownership, states, reaping, removal, schema): docs/toolstack.md, "The registry".
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.toolstack import paths
from hypyr.toolstack.domrecord import (
    PRESERVED_STATES,
    STATES,
    DomainRecord,
    DomainState,
    effective,
    fate,
    is_alive,
    proc_start_time,
    reapable,
)
from hypyr.toolstack.errors import (
    DomainExists,
    DomainNotFound,
    InsufficientResources,
    InvalidConfig,
    RegistryBusy,
    StaleDomainError,
)
from hypyr.toolstack.names import DOMAIN0_NAME, name_problem

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT = 10.0  # seconds
MAX_DOMID = 0x7FEF  # Xen's DOMID_FIRST_RESERVED - 1
_ID_RE = re.compile(r"[0-9]+")

_SCHEMA = f"""
CREATE TABLE domains (  -- schema 1; _migrate adds the rest
    domid       INTEGER PRIMARY KEY CHECK (domid >= 1),
    name        TEXT UNIQUE NOT NULL,
    config      TEXT,
    pid         INTEGER,
    pid_start   TEXT,
    socket      TEXT,
    state       TEXT NOT NULL CHECK (state IN ({", ".join(repr(s.value) for s in DomainState)})),
    created     REAL NOT NULL,
    started     REAL,
    restarts    INTEGER NOT NULL DEFAULT 0,
    exit_reason TEXT
)
"""


def _new_uuid(given: object = None) -> str:
    """``given`` in canonical form if it is a UUID, else a random UUID (the uuid module is
    imported here: it costs each domain process's start, which never makes one)."""
    import uuid
    if given is not None:
        try:
            return str(uuid.UUID(str(given)))
        except ValueError:
            pass
    return str(uuid.uuid4())


_COLUMNS = "domid, name, config, pid, pid_start, socket, state, created, started, restarts, exit_reason, uuid"


def _locked(e: sqlite3.OperationalError) -> bool:
    """Is this SQLITE_BUSY or SQLITE_LOCKED (another connection holds the lock)?"""
    return getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _record(row: tuple) -> DomainRecord:
    return DomainRecord(*row)


def _domid(domid) -> int:
    """A domid for SQL: values past MAX_DOMID (SQLite cannot even hold some) match no row."""
    domid = int(domid)
    return domid if 0 <= domid <= MAX_DOMID else -1


# -- the registry ---------------------------------------------------------------------------------
class Registry:
    """The SQLite domain registry at ``path`` (default ``paths.registry_path()``).

    Domain directories and kept logs live next to the database (``path``'s directory).
    One instance may be shared by the threads of a process; it reopens its connection
    after a fork.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = BUSY_TIMEOUT):
        if path is None:
            self.base = paths.state_dir()
            self.path = paths.registry_path(self.base)
        else:
            self.path = Path(path)
            self.base = paths.private_dir(self.path.parent)
        self.timeout = timeout
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        self._conn()

    # -- connection ---------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        self._db = None  # inherited over fork: never touch the parent's connection
        try:
            paths.create_private(self.path)  # SQLite gives its -wal and -shm files the same mode
        except OSError as e:
            raise HypyrError(f"cannot create the domain registry {self.path}: {e.strerror or e}") from None
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as e:
            raise HypyrError(f"cannot open the domain registry {self.path}: {e}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._retry_locked(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone())
            db.execute("PRAGMA synchronous = NORMAL")
            self._migrate(db)
        except sqlite3.DatabaseError as e:
            db.close()
            raise HypyrError(f"cannot use the domain registry {self.path}: {e}") from None
        except BaseException:
            db.close()
            raise
        self._db, self._pid = db, os.getpid()
        return db

    def _retry_locked(self, fn):
        # Switching to WAL needs an exclusive lock and does not always wait on the busy handler.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _locked(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HypyrError(f"the domain registry {self.path} was written by a newer hypyr "
                                 f"(schema {version}, this one knows {SCHEMA_VERSION})")
            if version == 0:
                db.execute(_SCHEMA)
            if version < 2:   # every domain gets a UUID
                db.execute("ALTER TABLE domains ADD COLUMN uuid TEXT")
                for (domid,) in db.execute("SELECT domid FROM domains").fetchall():
                    db.execute("UPDATE domains SET uuid = ? WHERE domid = ?", (_new_uuid(), domid))
                db.execute("CREATE UNIQUE INDEX domains_uuid ON domains (uuid)")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn()
            except sqlite3.OperationalError as e:
                raise self._busy(e) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed on success, rolled back on any exception."""
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise self._busy(e) from None
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError):
                    raise self._busy(e) from None
                raise

    def _busy(self, e: sqlite3.OperationalError) -> Exception:
        if _locked(e):
            return RegistryBusy(f"the domain registry {self.path} stayed locked for {self.timeout:.0f} s; "
                              "try again")
        return e

    @staticmethod
    def _row(db: sqlite3.Connection, domid: int) -> DomainRecord | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM domains WHERE domid = ?", (domid,)).fetchone()
        return _record(row) if row else None

    # -- files ----------------------------------------------------------------------------------
    def domain_dir(self, domid: int) -> Path:
        return paths.domain_dir(domid, self.base)

    @staticmethod
    def _drop_process_leftovers(rec: DomainRecord) -> None:
        """The control socket and the scheduler cgroup of a row whose process has ended."""
        from hypyr.toolstack import sched
        if rec.socket:
            sock = Path(rec.socket)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(sock.lstat().st_mode):
                    sock.unlink()
        try:
            sched.remove(rec)
        except HypyrError as e:
            log.warning("domain %s (id %d): %s", rec.name, rec.domid, e)

    def _discard(self, db: sqlite3.Connection, rec: DomainRecord) -> None:
        """Remove a row and its leftovers (inside the caller's write transaction)."""
        try:
            self._drop_process_leftovers(rec)
            d = self.domain_dir(rec.domid)
            if d.is_dir():
                for kind in ("console", "vmm"):
                    src, kept = d / f"{kind}.log", paths.kept_log(rec.name, kind, self.base)
                    for a, b in ((paths.rotated_log(src), paths.rotated_log(kept)), (src, kept)):
                        if a.is_file():
                            os.replace(a, b)
                        elif a is not src:
                            b.unlink(missing_ok=True)  # an older domain's part must not pass for this one's
                shutil.rmtree(d, ignore_errors=True)
        except OSError as e:
            log.warning("could not clean up after domain %s (id %d): %s", rec.name, rec.domid, e)
        db.execute("DELETE FROM domains WHERE domid = ?", (rec.domid,))

    # -- API ------------------------------------------------------------------------------------
    def reserve(self, name: str, config_json: str | dict | None, *, pid: int | None = None,
                uuid: str | None = None) -> DomainRecord:
        """Allocate the smallest free domid and insert a ``creating`` row for ``name``.

        ``uuid``: the UUID to give it (``hypyr restore`` keeps the saved domain's, as xl does),
        unless a row that is not reapable has it, in which case the row gets a new one.

        The row is owned by ``pid`` (default: this process) until ``set_running``; if that
        process dies first the row is reaped.  A gone (reapable) row with the same name is
        reaped first; a duplicate name that remains is a DomainExists.
        """
        problem = name_problem(name)
        if problem:
            raise InvalidConfig(problem)
        if config_json is not None and not isinstance(config_json, str):
            config_json = json.dumps(config_json)
        elif config_json is not None:
            json.loads(config_json)  # must be JSON
        owner = os.getpid() if pid is None else int(pid)
        owner_start = proc_start_time(owner)
        with self._write() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM domains WHERE name = ?", (name,)).fetchone()
            if row is not None:
                old = _record(row)
                if not reapable(old) or self._reap_row(db, old) is None:
                    raise DomainExists(f"a domain named {name} already exists (id {old.domid})")
            domid = 1
            for (used,) in db.execute("SELECT domid FROM domains ORDER BY domid"):
                if used != domid:
                    break
                domid += 1
            if domid > MAX_DOMID:
                raise InsufficientResources(f"no free domain ids: {MAX_DOMID} domains exist")
            new_uuid = _new_uuid(uuid)
            if uuid is not None:
                row = db.execute(f"SELECT {_COLUMNS} FROM domains WHERE uuid = ?", (new_uuid,)).fetchone()
                if row is not None:
                    old = _record(row)
                    if not reapable(old) or self._reap_row(db, old) is None:
                        new_uuid = _new_uuid()   # a domain that is still there has it
            rec = DomainRecord(domid, name, config_json, owner, owner_start, None, DomainState.CREATING,
                               time.time(), None, 0, None, new_uuid)
            db.execute(f"INSERT INTO domains ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       dataclasses.astuple(rec))
            d = self.domain_dir(domid)
            if d.exists():  # leftovers of a registry that lost track of them
                shutil.rmtree(d)
            d.mkdir(mode=0o700, parents=True)
        return rec

    def _own_row(self, db: sqlite3.Connection, domid: int, uuid: str) -> DomainRecord:
        """The row (domid, uuid), or StaleDomainError (inside a write transaction)."""
        rec = self._row(db, _domid(domid))
        if rec is None:
            raise StaleDomainError(f"no domain with id {domid} (its row was removed)")
        if rec.uuid != uuid:
            raise StaleDomainError(f"domain id {domid} now belongs to another domain ({rec.name}, uuid {rec.uuid}), "
                                   f"not to uuid {uuid}")
        return rec

    def _update(self, domid: int, uuid: str, sql: str, args: tuple) -> None:
        with self._write() as db:
            self._own_row(db, domid, uuid)
            db.execute(f"UPDATE domains SET {sql} WHERE domid = ?", (*args, int(domid)))

    def set_running(self, domid: int, pid: int, socket: str | os.PathLike | None, *, uuid: str) -> None:
        """Hand the row (domid, uuid) to the domain process ``pid`` (serving ``socket``), mark it running."""
        self._update(domid, uuid, "pid = ?, pid_start = ?, socket = ?, state = 'running', started = ?, "
                                  "exit_reason = NULL",
                     (int(pid), proc_start_time(pid), None if socket is None else os.fspath(socket),
                      time.time()))

    def update_state(self, domid: int, state: DomainState | str, exit_reason: str | None = None, *,
                     uuid: str) -> None:
        """Set the row's state and exit reason (None clears it)."""
        if state not in STATES:
            raise ValueError(f"unknown domain state {state!r}")
        self._update(domid, uuid, "state = ?, exit_reason = ?", (DomainState(state).value, exit_reason))

    def release(self, domid: int, state: DomainState | str, exit_reason: str | None, *, uuid: str) -> None:
        """Keep the row as ``crashed`` or ``shutdown`` with no owning process (on_*='preserve'):
        it stays listed until ``remove``."""
        if state not in PRESERVED_STATES:
            raise ValueError(f"a kept domain is crashed or shutdown, not {state!r}")
        self._update(domid, uuid, "state = ?, exit_reason = ?, pid = NULL, pid_start = NULL, socket = NULL",
                     (DomainState(state).value, exit_reason))

    def rename(self, domid: int, name: str, *, uuid: str) -> None:
        """Give the row (domid, uuid) the name ``name`` (a domain received by a migration takes its
        own name once the source has gone).  A gone (reapable) row of that name is reaped first;
        one that remains is a DomainExists."""
        problem = name_problem(name)
        if problem:
            raise InvalidConfig(problem)
        with self._write() as db:
            mine = self._own_row(db, domid, uuid)
            row = db.execute(f"SELECT {_COLUMNS} FROM domains WHERE name = ?", (name,)).fetchone()
            if row is not None and _record(row).domid != mine.domid:
                old = _record(row)
                if not reapable(old) or self._reap_row(db, old) is None:
                    raise DomainExists(f"a domain named {name} already exists (id {old.domid})")
            config = mine.config
            try:
                d = json.loads(config) if config else None
                if isinstance(d, dict) and "name" in d:
                    config = json.dumps({**d, "name": name})
            except ValueError:
                pass
            db.execute("UPDATE domains SET name = ?, config = ? WHERE domid = ?", (name, config, mine.domid))

    def bump_restarts(self, domid: int, *, uuid: str) -> int:
        """Count a restart (on_reboot/on_crash 'restart'): restarts += 1, started = now."""
        with self._write() as db:
            rec = self._own_row(db, domid, uuid)
            db.execute("UPDATE domains SET restarts = restarts + 1, started = ? WHERE domid = ?",
                       (time.time(), int(domid)))
            return rec.restarts + 1

    def get(self, name_or_id: str | int) -> DomainRecord:
        """The record of a domain given its name or its id (an int or a string of digits)."""
        key = str(name_or_id).strip()
        with self._read() as db:
            if isinstance(name_or_id, int) or _ID_RE.fullmatch(key):
                digits = key.lstrip("0") or "0"      # thousands of digits would not even convert
                domid = int(digits) if len(digits) <= len(str(MAX_DOMID)) else None
                if domid == 0:
                    raise DomainNotFound(f"domain 0 is the host ({DOMAIN0_NAME}), not a hypyr domain")
                rec = self._row(db, domid) if domid is not None and domid <= MAX_DOMID else None
                if rec is None:
                    raise DomainNotFound(f"no domain with id {digits}")
            else:
                if key == DOMAIN0_NAME:
                    raise DomainNotFound(f"{DOMAIN0_NAME} is the host, not a hypyr domain")
                row = db.execute(f"SELECT {_COLUMNS} FROM domains WHERE name = ?", (key,)).fetchone()
                if row is None:
                    raise DomainNotFound(f"no domain named {key}")
                rec = _record(row)
        return effective(rec)

    def list(self) -> list[DomainRecord]:
        """All stored domains ordered by domid, after reaping gone ones (Domain-0 not included)."""
        self.reap()
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM domains ORDER BY domid").fetchall()
        return [effective(_record(r)) for r in rows]  # an owner may die between reap and read

    def remove(self, domid: int, *, uuid: str | None = None) -> bool:
        """Delete a row and its leftovers (keeping its logs); False if there was no such row.
        With ``uuid`` (a domain process removing its own row) another domain's row is a
        StaleDomainError."""
        with self._write() as db:
            rec = self._own_row(db, domid, uuid) if uuid is not None else self._row(db, _domid(domid))
            if rec is None:
                return False
            self._discard(db, rec)
        return True

    def _reap_row(self, db: sqlite3.Connection, rec: DomainRecord) -> DomainRecord | None:
        """Apply a reapable row's fate (inside a write transaction): the removed record, in state
        ``dead``, or None when its on_* action keeps it."""
        kept = fate(rec)
        if kept is None:
            self._discard(db, rec)
            reason = rec.exit_reason or "its process exited"
            log.info("domain %s (id %d) is gone: %s", rec.name, rec.domid, reason)
            return dataclasses.replace(rec, state=DomainState.DEAD, exit_reason=reason)
        reason = ("its process exited while it was shutting down" if rec.state is DomainState.SHUTDOWN
                  else "its process exited unexpectedly")
        self._drop_process_leftovers(rec)
        db.execute("UPDATE domains SET state = ?, exit_reason = ?, pid = NULL, pid_start = NULL, socket = NULL "
                   "WHERE domid = ?", (kept.value, reason, rec.domid))
        log.info("domain %s (id %d) is kept as %s (preserve): %s", rec.name, rec.domid, kept, reason)
        return None

    def reap(self) -> builtins.list[DomainRecord]:   # (``list`` here is the method above)
        """Apply the on_poweroff/on_crash action of every gone domain (see the module docstring);
        return the removed ones, in state ``dead``."""
        with self._read() as db:
            rows = [_record(r) for r in db.execute(f"SELECT {_COLUMNS} FROM domains")]
        if not any(reapable(r) for r in rows):
            return []  # the common case needs no write lock
        reaped = []
        with self._write() as db:
            for row in db.execute(f"SELECT {_COLUMNS} FROM domains ORDER BY domid").fetchall():
                rec = _record(row)
                if reapable(rec) and (gone := self._reap_row(db, rec)) is not None:
                    reaped.append(gone)
        return reaped

    is_alive = staticmethod(is_alive)
