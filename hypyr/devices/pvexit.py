r"""hypyr's paravirtual exit-status port.

Guest interface
---------------
* I/O port **0xf4** (244), 8 bits wide.
* **Write** a byte ``v`` -> the VM stops and hypyr reports exit status ``v`` (0..255):
  the device calls ``stop(StopRequest(GuestEvent.EXIT_STATUS, status=v))``.  The status is
  exactly the byte written (unlike QEMU's isa-debug-exit, there is no ``(v << 1) | 1``
  encoding).  A 16- or 32-bit write at 0xf4 uses its low byte (the byte at 0xf4) — provided
  the VMM registered a range wide enough for the bus to deliver it (see below); writes that
  start at 0xf5..0xf7 are ignored.
* **Read** at 0xf4 -> ``0x48`` (ASCII ``'H'``), so a guest can tell the port is present (an
  unclaimed port reads 0xff).  Other offsets read 0.  Reading has no side effect.
* From a guest shell, report ``$rc``::

      printf "\\$(printf %03o "$rc")" | dd of=/dev/port bs=1 seek=244 count=1

  (``printf %03o`` turns the status into a three-digit octal escape, the outer ``printf``
  emits that single byte, and ``dd`` writes it at offset 244 of ``/dev/port``, i.e. an
  ``outb`` to port 0xf4.)  From C: ``outb(rc, 0xf4)`` after ``ioperm(0xf4, 1, 1)``.
* The VM stops asynchronously: instructions after the write may still run briefly, so a
  guest should halt or loop after writing.

VMM wiring: ``io_bus.register(0xf4, 1, PvExit(stop))`` (``LENGTH``); register 4 instead
(``WIDE_LENGTH``) to also honour ``outw``/``outl`` at 0xf4 — the bus only delivers accesses
that lie wholly inside a registered range.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from hypyr.devices.events import GuestEvent, StopCallback, StopRequest
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import QuiesceFree, StateReader

log = logging.getLogger("hypyr.dev.pvexit")

PORT = 0xF4
LENGTH = 1
WIDE_LENGTH = 4
MAGIC = 0x48  # 'H'


class PvExitState(NamedTuple):
    """The port is stateless; kept for a uniform save/restore interface."""

    def validate(self) -> None:
        pass


class PvExit(QuiesceFree):
    def __init__(self, stop: StopCallback):
        self._stop = stop
        self._rlog = RateLimitedLog(log)  # the guest may write the port again and again

    def state(self) -> PvExitState:
        return PvExitState()

    def restore(self, s: PvExitState) -> None:
        if not isinstance(s, PvExitState):
            raise TypeError(f"expected PvExitState, got {type(s).__name__}")

    STATE_KIND = "pvexit"
    STATE_VERSION = 1

    def save_state(self) -> dict:
        """Nothing but the format: the port holds no state."""
        return {"kind": self.STATE_KIND, "v": self.STATE_VERSION}

    def load_state(self, state: dict) -> None:
        StateReader(state, "pvexit", self.STATE_KIND, self.STATE_VERSION).done()

    def read(self, offset: int, size: int) -> bytes:
        try:
            size = max(int(size), 0)
            return bytes((MAGIC if offset + i == 0 else 0) for i in range(size))
        except Exception:
            self._rlog.exception("read-failed", "pvexit: read(%r, %r) failed", offset, size)
            return b"\xff" * max(size, 0) if isinstance(size, int) else b""

    def write(self, offset: int, data: bytes) -> None:
        try:
            data = bytes(data)
            if offset != 0 or not data:
                self._rlog.debug("ignored", "pvexit: write %r at offset %r ignored", data, offset)
                return
            status = data[0] & 0xFF
        except Exception:
            self._rlog.exception("write-failed", "pvexit: write(%r, %r) failed", offset, data)
            return
        self._rlog.info("status", "pvexit: guest reported exit status %d", status)
        try:
            self._stop(StopRequest(GuestEvent.EXIT_STATUS, status=status))
        except Exception:
            self._rlog.exception("stop-failed", "pvexit: stop callback failed")
