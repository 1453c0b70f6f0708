"""An address bus: non-overlapping ranges mapped to devices (one for port I/O, one for MMIO).

Devices implement ``read(offset, size) -> bytes`` and ``write(offset, data)``; offsets are
relative to the range the device was registered at.  Accesses that hit no device read as all
ones and are otherwise ignored, as on a real PC.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from hypyr.devices.ratelog import RateLimitedLog

log = logging.getLogger("hypyr.bus")


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    pass


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []  # (start, length, device), sorted
        self._lock = threading.Lock()
        self._rlog = RateLimitedLog(log)

    def register(self, start: int, length: int, device: BusDevice) -> None:
        if length <= 0 or start < 0:
            raise BusError(f"{self.name}: bad range {start:#x}+{length:#x}")
        with self._lock:
            i = bisect.bisect_left(self._starts, start)
            if i > 0:
                ps, pl, _ = self._ranges[i - 1]
                if ps + pl > start:
                    raise BusError(f"{self.name}: {start:#x}+{length:#x} overlaps {ps:#x}+{pl:#x}")
            if i < len(self._ranges) and start + length > self._ranges[i][0]:
                ns, nl, _ = self._ranges[i]
                raise BusError(f"{self.name}: {start:#x}+{length:#x} overlaps {ns:#x}+{nl:#x}")
            self._starts.insert(i, start)
            self._ranges.insert(i, (start, length, device))

    def find(self, addr: int, size: int = 1) -> tuple[int, BusDevice] | None:
        """Return (offset, device) for an access that lies wholly inside one device's range."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start, length, dev = self._ranges[i]
        if addr + size <= start + length:
            return addr - start, dev
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self.find(addr, size)
        if hit is None:
            return b"\xff" * size
        off, dev = hit
        data = dev.read(off, size)
        if len(data) != size:  # a device bug must not leak into the guest as a short read
            self._rlog.error("short-read", "%s device at %#x returned %d bytes for a %d-byte read",
                             self.name, addr, len(data), size)
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        hit = self.find(addr, len(data))
        if hit is None:
            return
        off, dev = hit
        dev.write(off, bytes(data))


# An interrupt line as devices see it: call with True to assert, False to deassert.
IrqLine = Callable[[bool], None]
