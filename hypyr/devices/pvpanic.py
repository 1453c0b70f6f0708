"""pvpanic: the guest kernel tells the host it panicked (QEMU's ISA pvpanic, ACPI id QEMU0001).

Guest interface: I/O port 0x505, 8 bits.  A read returns the events this device supports
(bit 0 PANICKED, bit 1 CRASH_LOADED); writing bit 0 reports a panic, which stops the VM as
crashed (``on_crash`` for domains).  CRASH_LOADED (a kdump kernel takes over) is logged only.
Linux's pvpanic-mmio driver finds the port through the DSDT and writes on its panic notifier.
"""

from __future__ import annotations

import logging

from hypyr.devices.events import GuestEvent, StopCallback, StopRequest
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import QuiesceFree, StateReader

log = logging.getLogger("hypyr.dev.pvpanic")

PVPANIC_PORT = 0x505
PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1


class PvPanic(QuiesceFree):
    STATE_KIND = "pvpanic"
    STATE_VERSION = 1

    def __init__(self, stop: StopCallback):
        self._stop = stop
        self._rlog = RateLimitedLog(log)  # the guest may write the port again and again

    def save_state(self) -> dict:
        """Nothing but the format: the port holds no state (a panic stops the VM at once)."""
        return {"kind": self.STATE_KIND, "v": self.STATE_VERSION}

    def load_state(self, state: dict) -> None:
        StateReader(state, "pvpanic", self.STATE_KIND, self.STATE_VERSION).done()

    def read(self, offset: int, size: int) -> bytes:
        return bytes([PVPANIC_PANICKED | PVPANIC_CRASH_LOADED]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0] if data else 0
        if value & PVPANIC_PANICKED:
            self._stop(StopRequest(GuestEvent.PANIC, detail="pvpanic"))
        elif value & PVPANIC_CRASH_LOADED:
            self._rlog.warning("crash-loaded", "pvpanic: the guest kernel crashed and loaded its crash kernel")
        elif value:
            self._rlog.debug("unknown-bits", "pvpanic: ignoring unknown event bits %#x", value)
