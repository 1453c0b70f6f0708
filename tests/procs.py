"""Process tree helpers for tests, read from /proc (which process started which)."""

from __future__ import annotations

import os
from pathlib import Path


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def ancestors(pid: int) -> list[int]:
    """The parent, its parent, ... up to init (a jailed VMM's parent is its supervisor)."""
    out = []
    while pid > 1:
        pid = parent(pid)
        out.append(pid)
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if parent(int(name)) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass      # gone meanwhile
    return out
