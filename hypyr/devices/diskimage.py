"""A raw disk image file behind a block device: opened (through :mod:`hypyr.preopened`, so a
jailed VMM gets the file its supervisor opened), locked against a second writer, sized, flushed,
and zeroed or hole-punched.  Data moves between it and guest RAM through GuestMemory's
``preadv``/``pwritev`` family on :attr:`DiskImage.fd`; this module never sees guest memory."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable

from hypyr import preopened
from hypyr.errors import HypyrError
from hypyr.libc import optional_function

log = logging.getLogger("hypyr.dev.virtio-blk")

ZERO_CHUNK = 1 << 20          # bytes of zeroes per pwrite when fallocate cannot zero a range

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_fallocate: Callable[..., int] | None = optional_function(
    "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


class DiskImage:
    """A regular file or block device, open read-only or read-write; ``lock=False`` opens it
    without taking its lock (a live migration's destination takes it later, :meth:`lock`)."""

    def __init__(self, path: str, *, read_only: bool = False, lock: bool = True):
        self.path, self.read_only = str(path), bool(read_only)
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = preopened.open_file(self.path, flags)
        except OSError as e:
            raise HypyrError(f"cannot open disk image {self.path} "
                             f"{'read-only' if self.read_only else 'for reading and writing'}: "
                             f"{e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise HypyrError(f"disk image {self.path} is not a regular file or block device")
            self.fd = fd
            if lock:
                self.lock()
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except HypyrError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise HypyrError(f"cannot use disk image {self.path}: {e.strerror}") from None
        self._punch_supported = self._zero_range_supported = _fallocate is not None

    def lock(self) -> None:
        """Take the image's lock (shared when read-only); HypyrError if another process holds it.
        A file system without locks is used unlocked."""
        if self.fd < 0:
            return
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HypyrError(f"disk image {self.path} is in use by another process "
                                 f"(or another disk of this VM)") from None
            log.debug("virtio-blk: cannot lock %s (%s); continuing without a lock", self.path, e.strerror)

    def unlock(self) -> None:
        """Release the lock, keeping the image open (the hand-over to another VMM)."""
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def sync(self) -> None:
        """``fdatasync``; OSError if it fails."""
        os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, *, unmap: bool, check: Callable[[], None]) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes: a punched hole if ``unmap`` (and
        the file system can), else a zeroed range, else written zeroes, ``check()`` called before
        each chunk written (it raises to abandon the rest).  OSError on an I/O error."""
        if unmap:
            if self._try_fallocate("_punch_supported", _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                   offset, length):
                return
        elif self._try_fallocate("_zero_range_supported", _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE,
                                 offset, length):
            return
        zeros = bytes(min(ZERO_CHUNK, length))
        end = offset + length
        while offset < end:
            check()
            n = min(len(zeros), end - offset)
            self._pwrite_full(zeros[:n] if n < len(zeros) else zeros, offset)
            offset += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _pwrite_full(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            r = os.pwrite(self.fd, view, offset)
            if r <= 0:
                raise OSError(errno.EIO, "short write")
            view, offset = view[r:], offset + r

    def _try_fallocate(self, supported_attr: str, mode: int, offset: int, length: int) -> bool:
        """fallocate(mode); False (and remembered) if the file system does not support it."""
        if not getattr(self, supported_attr) or _fallocate is None:  # (the latter: never supported)
            return False
        if _fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            setattr(self, supported_attr, False)
            log.info("virtio-blk: %s: fallocate mode %#x not supported (%s); writing zeroes instead",
                     self.path, mode, os.strerror(err))
            return False
        raise OSError(err, os.strerror(err))
