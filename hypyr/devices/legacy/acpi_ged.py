"""The ACPI power button, the hardware-reduced way: a Generic Event Device (GED).

The DSDT (:data:`hypyr.arch.x86.acpi.GED_AML`) describes a GED (``ACPI0013``) with one
edge-triggered interrupt and an ``_EVT`` method that reads this device's one 8-bit register and,
if bit 0 is set, notifies the power button device (``PNP0C0C``) with 0x80. Linux's ``evged``
driver runs ``_EVT`` on the interrupt; its ``button`` driver turns the notification into a
KEY_POWER input event, which systemd-logind (or the default image's init) takes as "power off".
This is what QEMU's ``system_powerdown`` and Xen's ``xl shutdown`` of an HVM guest do.

Register (at :data:`hypyr.arch.x86.acpi.GED_PORT`; the interrupt is GSI
:data:`~hypyr.arch.x86.acpi.GED_GSI`): reading returns the pending events (bit 0: power button)
and clears them; writes are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hypyr.arch.x86.acpi import GED_POWER_BUTTON
from hypyr.devices.legacy._bytedev import ByteRegisterDevice
from hypyr.devices.state import QuiesceFree, StateReader

log = logging.getLogger("hypyr.dev.acpi_ged")


class AcpiGed(QuiesceFree, ByteRegisterDevice):
    """``irq``: the GSI's line (level in, as KVM_IRQ_LINE); a press pulses it (an edge)."""

    LENGTH = 1
    STATE_KIND = "acpi-ged"
    STATE_VERSION = 1

    def __init__(self, irq: Callable[[bool], None]):
        super().__init__(log)
        self._irq = irq
        self._pending = 0

    def press_power_button(self) -> None:
        """Mark the event and raise the interrupt (from any thread)."""
        with self._lock:
            self._pending |= GED_POWER_BUTTON
        self._irq(True)
        self._irq(False)

    def _read_reg(self, offset: int) -> int:
        events, self._pending = self._pending, 0
        return events

    def _write_reg(self, offset: int, value: int) -> None:
        self._rlog.debug("write", "acpi_ged: write %#04x ignored", value)

    def save_state(self) -> dict:
        with self._lock:
            return {"kind": self.STATE_KIND, "v": self.STATE_VERSION, "pending": self._pending}

    def load_state(self, state: dict) -> None:
        r = StateReader(state, "acpi-ged", self.STATE_KIND, self.STATE_VERSION)
        pending = r.integer("pending", 0, GED_POWER_BUTTON)
        r.done()
        with self._lock:
            self._pending = pending
