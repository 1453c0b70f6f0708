"""Read files from an ext2/3/4 filesystem inside a disk image, read-only, without mounting it.

e2fsprogs' ``debugfs`` does the reading: opened without ``-w`` it opens the image read-only (and
``-c``, catastrophic mode, both skips the bitmaps and forces read-only), and its unix I/O manager
takes the filesystem's place in the image as ``IMAGE?offset=BYTES``.  No loop device, no mount,
nothing on the host sees the guest's files except the bytes asked for.

Paths are resolved here one symlink at a time (debugfs itself follows the symlinks of directory
components, with its own loop limit): an absolute link target is taken from the filesystem's
root, a relative one from the link's directory, and at most ``MAX_SYMLINKS`` are followed.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess

from hypyr.errors import InvalidInput, NotSupported

MAX_SYMLINKS = 8
MAX_TEXT = 1 << 20            # a config file larger than this is not one
MAX_FILE = 1 << 30            # a kernel or initrd larger than this is refused (it would fill /tmp)
TIMEOUT = 120.0               # seconds for one debugfs command (a kernel of tens of MiB)
_ENV = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "DEBUGFS_PAGER": "__none__", "PAGER": "__none__", "LANG": "C"}


class ExtFsError(InvalidInput):
    """A file that cannot be read from the image's filesystem; str() names the file and the image."""


class FileMissing(ExtFsError):
    """The file (or a directory on its way) is not in the filesystem."""


def _debugfs() -> str:
    exe = shutil.which("debugfs", path=_ENV["PATH"])
    if exe is None:
        raise NotSupported("reading a disk image's boot files needs e2fsprogs' debugfs, which is not installed "
                           "(apt-get install e2fsprogs)")
    return exe


class ExtFs:
    """The ext filesystem that starts ``offset`` bytes into ``image``."""

    def __init__(self, image: str, offset: int = 0, name: str | None = None):
        self.image = image
        self.offset = offset
        self.name = name or image          # how messages name it, e.g. "disk.img partition 2"
        if "?" in image or "\n" in image:
            raise InvalidInput(f"the disk image name {image!r} cannot be handed to debugfs")

    def _spec(self) -> str:
        path = os.path.abspath(self.image)   # never a "-..." word debugfs would take for an option
        return f"{path}?offset={self.offset}" if self.offset else path

    def _run(self, request: str, stdout=subprocess.PIPE) -> tuple[bytes, str]:
        try:
            p = subprocess.run([_debugfs(), "-c", "-R", request, self._spec()], stdin=subprocess.DEVNULL,
                               stdout=stdout, stderr=subprocess.PIPE, env=_ENV, timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise ExtFsError(f"reading {self.name} took more than {TIMEOUT:.0f} s") from None
        err = "\n".join(line for line in p.stderr.decode(errors="replace").splitlines()
                        if line and not line.startswith("debugfs ") and "catastrophic mode" not in line)
        if "Filesystem not open" in err or "while trying to open" in err:
            raise ExtFsError(f"{self.name} does not hold an ext2/3/4 filesystem debugfs can open")
        return (p.stdout or b""), err

    def _quote(self, path: str) -> str:
        if not path.startswith("/") or any(c in path for c in '"\\') or any(ord(c) < 32 for c in path):
            raise ExtFsError(f"the path {path!r} cannot be looked up in {self.name} (a quote, backslash or "
                             "control character)")
        return f'"{path}"'

    def _stat(self, path: str) -> tuple[str, str | None, int]:
        """("regular" | "directory" | "symlink" | ..., fast symlink target or None, size)."""
        out, err = self._run(f"stat {self._quote(path)}")
        text = out.decode(errors="replace")
        m = re.search(r"Type: (\S+)", text)
        if m is None:
            if "Too many symbolic links" in err:
                raise ExtFsError(f"{path} in {self.name} goes through a loop of symbolic links")
            raise FileMissing(f"{path} is not in {self.name}")
        target = re.search(r'Fast link dest: "(.*)"', text)
        size = re.search(r"\bSize: (\d+)", text)
        return m.group(1), (target.group(1) if target else None), int(size.group(1)) if size else 0

    def resolve(self, path: str) -> str:
        """``path`` with its symlinks followed (at most MAX_SYMLINKS); the file must be regular."""
        return self._resolve(path)[0]

    def _resolve(self, path: str) -> tuple[str, int]:
        path = orig = posixpath.normpath("/" + path.lstrip("/"))
        for _ in range(MAX_SYMLINKS + 1):
            kind, target, size = self._stat(path)
            if kind == "regular":
                return path, size
            if kind != "symlink":
                raise ExtFsError(f"{path} in {self.name} is a {kind}, not a file")
            if target is None:   # a slow symlink: the target is the link's data
                out, err = self._run(f"cat {self._quote(path)}")
                if err or not out:
                    raise ExtFsError(f"the symbolic link {path} in {self.name} cannot be read")
                target = out.decode(errors="surrogateescape")
            base = "/" if target.startswith("/") else posixpath.dirname(path)
            path = posixpath.normpath(posixpath.join(base, target))
            if path.startswith("//"):
                path = path[1:]
        raise ExtFsError(f"{orig} in {self.name} goes through more than {MAX_SYMLINKS} symbolic links")

    def exists(self, path: str) -> bool:
        try:
            self.resolve(path)
            return True
        except FileMissing:
            return False

    def read_text(self, path: str) -> str:
        real = self.resolve(path)
        out, err = self._run(f"cat {self._quote(real)}")
        if err:
            raise ExtFsError(f"{path} in {self.name} cannot be read ({err.splitlines()[0]})")
        if len(out) > MAX_TEXT:
            raise ExtFsError(f"{path} in {self.name} is too large to be a boot loader config")
        return out.decode("utf-8", errors="replace")

    def copy_to(self, path: str, fd: int) -> int:
        """Write the file's bytes to the open descriptor ``fd``; returns how many."""
        real, size = self._resolve(path)
        if size > MAX_FILE:
            raise ExtFsError(f"{path} in {self.name} is {size >> 20} MiB, more than the {MAX_FILE >> 20} MiB "
                             "a kernel or initrd may be")
        start = os.lseek(fd, 0, os.SEEK_CUR)
        _, err = self._run(f"cat {self._quote(real)}", stdout=fd)
        if err:
            raise ExtFsError(f"{path} in {self.name} cannot be read ({err.splitlines()[0]})")
        return os.lseek(fd, 0, os.SEEK_END) - start
