"""Process tree helpers for tests, from hypyr.procfs (which process started which)."""

from __future__ import annotations

from hypyr import procfs


def ancestors(pid: int) -> list[int]:
    """The parent, its parent, ... up to init (a jailed VMM's parent is its supervisor)."""
    out = []
    while pid > 1:
        up = procfs.ppid(pid)
        if up is None:
            raise ProcessLookupError(pid)
        pid = up
        out.append(pid)
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return [p for p in procfs.pids() if procfs.ppid(p) == pid]
