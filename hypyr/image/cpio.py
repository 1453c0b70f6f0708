"""A small, deterministic writer for "newc" cpio archives (the initramfs format).

Everything is owned by uid/gid 0 with mtime 0 and entries are written in sorted order, so the
same inputs always give the same bytes. Character-device nodes can be added without being root
because the archive is written directly rather than copied from the file system.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path

from hypyr.errors import HypyrError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; `name` has no leading slash."""

    name: str
    mode: int  # full st_mode, file type bits included
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _norm(path: str) -> str:
    name = "/".join(p for p in str(path).split("/") if p not in ("", "."))
    if not name or ".." in name.split("/"):
        raise HypyrError(f"The archive path {path!r} is not a valid member name.")
    return name


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Collects members and renders them as a newc archive.

    Parent directories are created implicitly (mode 0755) unless added explicitly. Adding the
    same path twice replaces the earlier member.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, entry: Entry) -> None:
        parts = entry.name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = Entry(parent, stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise HypyrError(f"The archive path {parent!r} is used both as a file and a directory.")
        self._entries[entry.name] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(Entry(_norm(path), stat.S_IFDIR | (mode & 0o7777)))

    def add_file(self, path: str, data: bytes | None = None, *, host_path: str | Path | None = None,
                 mode: int = 0o644) -> None:
        if (data is None) == (host_path is None):
            raise ValueError("add_file needs exactly one of data or host_path")
        if host_path is not None:
            data = Path(host_path).read_bytes()
        assert data is not None
        self._put(Entry(_norm(path), stat.S_IFREG | (mode & 0o7777), bytes(data)))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(Entry(_norm(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(Entry(_norm(path), stat.S_IFCHR | (mode & 0o7777), b"", major, minor))

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def to_bytes(self) -> bytes:
        out = bytearray()
        ino = 0
        for entry in self.entries() + [Entry(TRAILER, 0)]:
            if entry.name != TRAILER:
                ino += 1
            name = entry.name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            fields = (
                ino if entry.name != TRAILER else 0, entry.mode, 0, 0,
                nlink if entry.name != TRAILER else 1, 0, len(entry.data),
                0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
            )
            header = MAGIC + b"".join(b"%08X" % f for f in fields)
            out += header + name + _pad4(len(header) + len(name))
            out += entry.data + _pad4(len(entry.data))
        out += b"\0" * (-len(out) % 512)  # block-align like cpio(1) does
        return bytes(out)

    def to_gzip(self) -> bytes:
        return gzip_bytes(self.to_bytes())

    def write(self, path: str | Path, compress: bool = True) -> None:
        """Write the archive (gzip-compressed by default) atomically to `path`."""
        path = Path(path)
        data = self.to_gzip() if compress else self.to_bytes()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def gzip_bytes(data: bytes, level: int = 9) -> bytes:
    """gzip `data` with mtime 0 and no file name, so equal inputs give equal output."""
    return gzip.compress(data, compresslevel=level, mtime=0)
