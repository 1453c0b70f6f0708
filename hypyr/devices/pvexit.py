"""hypyr's paravirtual exit-status port, I/O port 0xf4 (docs/guest-interface.md).

A byte written there stops the VM with that byte as its exit status (exactly the byte: no
``(v << 1) | 1`` as QEMU's isa-debug-exit); a read returns 0x48 ('H').  Register it with
``LENGTH`` (1, as the builder does), or ``WIDE_LENGTH`` (4) for the bus to deliver
``outw``/``outl`` too (their low byte).
"""

from __future__ import annotations

import logging

from hypyr.devices.events import GuestEvent, StopCallback, StopRequest
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import QuiesceFree, StateReader

log = logging.getLogger("hypyr.dev.pvexit")

PORT = 0xF4
LENGTH = 1
WIDE_LENGTH = 4
MAGIC = 0x48  # 'H'


class PvExit(QuiesceFree):
    def __init__(self, stop: StopCallback):
        self._stop = stop
        self._rlog = RateLimitedLog(log)  # the guest may write the port again and again

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
