"""A registry row as a record: :class:`DomainRecord`, its :class:`DomainState`, and what becomes
of a row whose owning process is gone.

The rules apart from their SQLite storage (:mod:`hypyr.toolstack.registry`): a row is owned by a
process (pid and start time, against pid reuse); a gone owner's row is reapable unless it is kept
(crashed, or shut down and released), and its ``on_poweroff``/``on_crash`` action says whether
reaping keeps it (``preserve``) or removes it.  Design notes: docs/toolstack.md, "The registry".
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any

from hypyr import procfs
from hypyr.toolstack.names import DOMAIN0_NAME


class DomainState(enum.StrEnum):
    """A registry row's state; a str, stored and shown as its value (``"running"``)."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"     # shutting down, or shut down and kept (on_poweroff='preserve')
    CRASHED = "crashed"
    DYING = "dying"
    DEAD = "dead"


STATES = tuple(DomainState)
PRESERVED_STATES = frozenset({DomainState.CRASHED, DomainState.SHUTDOWN})  # kept after their process ends
DOMAIN0_UUID = "00000000-0000-0000-0000-000000000000"  # as Xen's


@dataclass(frozen=True)
class DomainRecord:
    """One row of the registry (see the module docstring for the states)."""

    domid: int
    name: str
    config: str | None        # JSON text
    pid: int | None           # the owning process: `hypyr create` while creating, then the domain's
    pid_start: str | None     # the owner's start time, /proc/<pid>/stat field 22
    socket: str | None        # the control socket's path
    state: DomainState
    created: float            # unix time
    started: float | None     # unix time of the last (re)start
    restarts: int
    exit_reason: str | None
    uuid: str                 # the domain's UUID, unique for ever (domids are reused)

    def __post_init__(self):
        object.__setattr__(self, "state", DomainState(self.state))   # the column holds the value

    def config_dict(self) -> dict[str, Any]:
        return json.loads(self.config) if self.config else {}


def host_record() -> DomainRecord:
    """The synthetic Domain-0 row (the host) that `list` shows first; never stored."""
    boot = procfs.boot_time()
    return DomainRecord(0, DOMAIN0_NAME, None, None, None, None, DomainState.RUNNING,
                        boot or 0.0, boot, 0, None, DOMAIN0_UUID)


# -- processes ------------------------------------------------------------------------------------
def proc_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, as text), or None."""
    st = procfs.stat(pid)
    return st.start if st else None


def is_alive(rec: DomainRecord) -> bool:
    """Is the row's owning process still running (same pid, same start time, not a zombie)?"""
    if not rec.pid or rec.pid_start is None:
        return False
    st = procfs.stat(rec.pid)
    return procfs.alive(st) and st.start == rec.pid_start


def _gone(rec: DomainRecord) -> bool:
    return rec.state is DomainState.DEAD or not is_alive(rec)


def _kept(rec: DomainRecord) -> bool:
    """Kept until destroyed: crashed, or shut down and released by its process (preserve)."""
    return rec.state is DomainState.CRASHED or (rec.state is DomainState.SHUTDOWN and rec.pid is None)


def reapable(rec: DomainRecord) -> bool:
    """Is the row's owner gone, and the row not kept (so that reaping applies its fate)?"""
    return not _kept(rec) and _gone(rec)


def fate(rec: DomainRecord) -> DomainState | None:
    """The state a reapable row is kept in (its on_poweroff/on_crash is 'preserve'), or None
    when reaping removes it."""
    if rec.state not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTDOWN):
        return None
    key, kept = (("on_poweroff", DomainState.SHUTDOWN) if rec.state is DomainState.SHUTDOWN
                 else ("on_crash", DomainState.CRASHED))
    try:
        action = rec.config_dict().get(key)
    except (ValueError, AttributeError):
        action = None
    return kept if action == "preserve" else None


def effective(rec: DomainRecord) -> DomainRecord:
    """The row as it stands once reaped (what readers are shown before reaping gets to it)."""
    if rec.state is not DomainState.DEAD and reapable(rec):
        return dataclasses.replace(rec, state=fate(rec) or DomainState.DEAD)
    return rec
