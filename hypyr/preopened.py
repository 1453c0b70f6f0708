"""Files a jailed VMM cannot open by path: its supervisor opened them before the jail.

A domain's VMM runs as an unprivileged user in a mount namespace of its own
(docs/confinement.md): its disk images, kernel, initrd and save file are not there, or not its
own to open.  The supervisor opens them before the VMM drops its privileges and registers each
here; :func:`open_file` then hands out a new descriptor of the same open file for each use (every
boot of the domain), and :func:`os.open` for any other path.  A leaf module, as ``hypyr.libc``.
"""

from __future__ import annotations

import os
import stat

__all__ = ["register", "close_all", "open_file", "read_bytes", "is_file", "can_open"]

_files: dict[tuple[str, bool], int] = {}


def _key(path: str | os.PathLike, writable: bool) -> tuple[str, bool]:
    return os.path.abspath(os.fspath(path)), writable


def register(path: str | os.PathLike, writable: bool, fd: int) -> None:
    """``fd`` (opened read-write if ``writable``, else read-only) is what :func:`open_file` gives for ``path``."""
    _files[_key(path, writable)] = fd


def open_file(path: str | os.PathLike, flags: int) -> int:
    """``os.open(path, flags)``; for a registered file with the same access, a new descriptor of it
    (not inherited across exec, its file offset rewound to 0 and shared with every other one)."""
    fd = _files.get(_key(path, (flags & os.O_ACCMODE) != os.O_RDONLY))
    if fd is None:
        return os.open(path, flags)
    new = os.dup(fd)
    os.lseek(new, 0, os.SEEK_SET)
    return new


def read_bytes(path: str | os.PathLike, limit: int = -1) -> bytes:
    """The file's bytes (its first ``limit`` bytes if given) through :func:`open_file`; OSError if not."""
    with open(open_file(path, os.O_RDONLY | os.O_CLOEXEC), "rb") as f:
        return f.read(limit)


def is_file(path: str | os.PathLike) -> bool:
    """``os.path.isfile``, answered from the registered descriptor when there is one."""
    fd = _files.get(_key(path, False), _files.get(_key(path, True)))
    if fd is None:
        return os.path.isfile(path)
    return stat.S_ISREG(os.fstat(fd).st_mode)


def can_open(path: str | os.PathLike, writable: bool) -> bool:
    """``os.access`` for reading (and writing if ``writable``), or True for a file registered with
    that access (the one :func:`open_file` then gives)."""
    if _key(path, writable) in _files:
        return True
    return os.access(path, os.R_OK | (os.W_OK if writable else 0))


def close_all() -> None:
    """Close and forget every registered file (the supervisor, once its VMM has them)."""
    for fd in _files.values():
        os.close(fd)
    _files.clear()
