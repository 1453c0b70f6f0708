"""Hardware-reduced ACPI sleep registers (and an optional ACPI reset register).

:class:`AcpiPm` — register at port 0x600 with length 2; the FADT points at it with
``SLEEP_CONTROL_REG`` = SystemIO 0x600 and ``SLEEP_STATUS_REG`` = SystemIO 0x601, both
8 bits wide; the DSDT's ``\\_S5`` package must carry sleep type 5.

* offset 0, SLEEP_CONTROL (write): SLP_TYP = bits 4:2, SLP_EN = bit 5.  SLP_EN with SLP_TYP 5
  calls ``stop(StopRequest(GuestEvent.POWEROFF, detail="ACPI S5"))`` (outside the device
  lock).  Any other sleep type is logged and not entered; the device then reports an
  immediate wake (WAK_STS) so that a guest spinning on WAK_STS after the request — as
  ACPICA's ``acpi_hw_extended_sleep`` does — carries on instead of hanging.  Reads as 0.
* offset 1, SLEEP_STATUS: bit 7 WAK_STS, write 1 to clear; other bits read 0.

:class:`AcpiReset` — an optional FADT ``RESET_REG`` (SystemIO, 8 bits; suggested port 0x604,
length 1, ``RESET_VALUE`` = :data:`RESET_VALUE`): writing the reset value calls
``stop(StopRequest(GuestEvent.REBOOT, detail="ACPI reset"))``.  Linux's default x86 reboot
path tries this first on ACPI systems.
"""

from __future__ import annotations

import logging

from hypyr.devices.events import GuestEvent, StopCallback, StopRequest
from hypyr.devices.legacy._bytedev import ByteRegisterDevice
from hypyr.devices.state import QuiesceFree, StateReader

log = logging.getLogger("hypyr.dev.acpi_pm")

PORT = 0x600
LENGTH = 2
SLEEP_CONTROL = 0
SLEEP_STATUS = 1

SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x07
SLP_EN = 0x20
WAK_STS = 0x80
S5_SLEEP_TYPE = 5

RESET_PORT = 0x604
RESET_VALUE = 0x0F


class AcpiPm(QuiesceFree, ByteRegisterDevice):
    LENGTH = LENGTH

    def __init__(self, stop: StopCallback):
        super().__init__(log)
        self._stop = stop
        self._wake_status = False

    STATE_KIND = "acpi-pm"
    STATE_VERSION = 1

    def save_state(self) -> dict:
        with self._lock:
            return {"kind": self.STATE_KIND, "v": self.STATE_VERSION, "wake_status": self._wake_status}

    def load_state(self, state: dict) -> None:
        r = StateReader(state, "acpi-pm", self.STATE_KIND, self.STATE_VERSION)
        wake_status = r.flag("wake_status")
        r.done()
        with self._lock:
            self._wake_status = wake_status

    def _read_reg(self, offset: int) -> int:
        if offset == SLEEP_STATUS:
            return WAK_STS if self._wake_status else 0
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == SLEEP_STATUS:
            if value & WAK_STS:
                self._wake_status = False
            return
        if not value & SLP_EN:
            self._rlog.debug("no-slp-en", "acpi_pm: sleep control write %#04x without SLP_EN ignored", value)
            return
        slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
        if slp_typ == S5_SLEEP_TYPE:
            self._rlog.info("s5", "acpi_pm: guest entered S5")
            self._defer(lambda: self._stop(StopRequest(GuestEvent.POWEROFF, detail="ACPI S5")))
        else:
            self._rlog.warning("sleep-type", "acpi_pm: sleep type %d not supported; reporting immediate wake",
                              slp_typ)
            self._wake_status = True


class AcpiReset(QuiesceFree, ByteRegisterDevice):
    """FADT RESET_REG: writing ``reset_value`` requests a reboot; reads as 0."""

    LENGTH = 1

    def __init__(self, stop: StopCallback, reset_value: int = RESET_VALUE):
        super().__init__(log)
        if not 0 <= reset_value <= 0xFF:
            raise ValueError(f"reset value {reset_value:#x} out of range")
        self._stop = stop
        self._reset_value = reset_value

    STATE_KIND = "acpi-reset"
    STATE_VERSION = 1

    def save_state(self) -> dict:
        """Nothing but the format: the register holds no state."""
        return {"kind": self.STATE_KIND, "v": self.STATE_VERSION}

    def load_state(self, state: dict) -> None:
        StateReader(state, "acpi-reset", self.STATE_KIND, self.STATE_VERSION).done()

    def _read_reg(self, offset: int) -> int:
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        if value == self._reset_value:
            self._rlog.info("reset", "acpi_pm: reset register written")
            self._defer(lambda: self._stop(StopRequest(GuestEvent.REBOOT, detail="ACPI reset")))
        else:
            self._rlog.debug("reset-ignored", "acpi_pm: reset register write %#04x ignored", value)
