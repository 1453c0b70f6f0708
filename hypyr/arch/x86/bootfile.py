"""A kernel or initrd file open for loading into guest memory, read where it is used.

Parsers slice it like bytes (each slice one ``pread``), and :meth:`BootFile.copy_to` puts a
range straight from the page cache into guest memory (``preadv``): a 50 MB vmlinux is copied
once and never held as a bytes object.  A file that shrinks meanwhile gives one sentence.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hypyr import preopened
from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory


def cannot_read(path: str | os.PathLike, what: str, e: OSError) -> HypyrError:
    return HypyrError(f"Cannot read {what} {os.fspath(path)}: {e.strerror or e}.")


class BootFile:
    """The file at ``path`` (a ``what``: "kernel", "initrd"), open until the ``with`` ends."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = path, what
        try:
            self.fd = preopened.open_file(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise cannot_read(path, what, e) from None
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError as e:
            os.close(self.fd)
            raise cannot_read(path, what, e) from None

    def __enter__(self) -> BootFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        """``file[a:b]``: those bytes, as a slice of bytes would give them (clipped to the size)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a BootFile is read by slices without a step")
        start, stop, _ = key.indices(self.size)
        if stop <= start:
            return b""
        try:
            data = os.pread(self.fd, stop - start, start)
        except OSError as e:
            raise cannot_read(self.path, self.what, e) from None
        if len(data) != stop - start:
            raise self._shrank()
        return data

    def copy_to(self, mem: GuestMemory, addr: int, offset: int, length: int) -> None:
        """Bytes ``[offset, offset+length)`` of the file into guest memory at ``addr`` (already
        checked to be RAM); HypyrError if the file is shorter now or cannot be read."""
        done = 0
        while done < length:
            try:
                n = mem.preadv(self.fd, [(addr + done, length - done)], offset + done)
            except OSError as e:
                raise cannot_read(self.path, self.what, e) from None
            if n <= 0:
                raise self._shrank()
            done += n

    def _shrank(self) -> HypyrError:
        return HypyrError(f"The {self.what} {os.fspath(self.path)} shrank while it was being loaded.")


KernelData = bytes | BootFile  # a whole kernel file's bytes, or the file itself


def copier(data: KernelData) -> Callable[[GuestMemory, int, int, int], None]:
    """``copy(mem, addr, offset, length)``: bytes ``[offset, offset+length)`` of ``data`` to guest ``addr``."""
    if isinstance(data, BootFile):
        return data.copy_to

    def copy(mem: GuestMemory, addr: int, offset: int, length: int) -> None:
        mem.write(addr, memoryview(data)[offset:offset + length])
    return copy
