"""Shared plumbing for legacy devices made of 8-bit I/O registers.

An ISA device decodes byte accesses only; a wider guest access (``inw``/``outl``) to such a
device is split by the PC's bus bridge into byte accesses at consecutive ports, low byte first.
:class:`ByteRegisterDevice` does the same, so a device model only implements
``_read_reg(offset) -> int`` and ``_write_reg(offset, value)`` for single bytes.

It also enforces the rule that guest input never raises out of ``read``/``write``: any
exception is logged and the access reads as all ones / is dropped.  Every line a guest can
cause goes through ``self._rlog`` (:class:`~hypyr.devices.ratelog.RateLimitedLog`, fixed keys).

Callbacks that may block or re-enter the VMM (stop requests) must not run under the device
lock; ``_write_reg`` queues them with :meth:`_defer` and they run after the lock is released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hypyr.devices.ratelog import RateLimitedLog


def bcd(value: int) -> int:
    """Binary 0..99 -> packed BCD."""
    return ((value // 10) << 4) | (value % 10)


def from_bcd(value: int) -> int:
    """Packed BCD -> binary (no validation; see :func:`is_bcd`)."""
    return (value >> 4) * 10 + (value & 0x0F)


def is_bcd(value: int) -> bool:
    return (value & 0x0F) <= 9 and (value >> 4) <= 9


class ByteRegisterDevice:
    """Base class: ``length`` byte registers at offsets ``0..length-1``."""

    LENGTH = 1

    def __init__(self, log: logging.Logger):
        self._rlog = RateLimitedLog(log)
        self._lock = threading.Lock()
        self._deferred: list[Callable[[], None]] = []

    # -- to implement ------------------------------------------------------------------
    def _read_reg(self, offset: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write_reg(self, offset: int, value: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------
    def _defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the current access, outside the device lock."""
        self._deferred.append(fn)

    def _run_deferred(self) -> None:
        with self._lock:
            todo, self._deferred = self._deferred, []
        for fn in todo:
            try:
                fn()
            except Exception:
                self._rlog.exception("deferred", "deferred device callback failed")

    # -- BusDevice ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        try:
            size = int(size)
        except Exception:
            return b""
        if size <= 0:
            return b""
        try:
            out = bytearray()
            with self._lock:
                for i in range(size):
                    off = offset + i
                    if 0 <= off < self.LENGTH:
                        out.append(self._read_reg(off) & 0xFF)
                    else:
                        self._rlog.debug("read-beyond", "read beyond registers at offset %#x", off)
                        out.append(0xFF)
            result = bytes(out)
        except Exception:
            self._rlog.exception("read-failed", "read(%r, %r) failed; returning all ones", offset, size)
            result = b"\xff" * size
        self._run_deferred()
        return result

    def write(self, offset: int, data: bytes) -> None:
        try:
            with self._lock:
                for i, value in enumerate(bytes(data)):
                    off = offset + i
                    if 0 <= off < self.LENGTH:
                        self._write_reg(off, value)
                    else:
                        self._rlog.debug("write-beyond", "write %#04x beyond registers at offset %#x ignored",
                                         value, off)
        except Exception:
            self._rlog.exception("write-failed", "write(%r, %r) failed; ignored", offset, data)
        self._run_deferred()
