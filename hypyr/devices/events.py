"""How a device asks the VMM to stop the VM (poweroff, reboot, exit status)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple


class GuestEvent(enum.Enum):
    POWEROFF = "poweroff"      # ACPI S5 (or equivalent)
    REBOOT = "reboot"          # i8042 reset line, ACPI reset register
    EXIT_STATUS = "exit"       # hypyr's paravirtual exit-status port
    PANIC = "panic"            # the guest kernel panicked (pvpanic)


class StopRequest(NamedTuple):
    event: GuestEvent
    status: int | None = None  # for EXIT_STATUS: 0..255
    detail: str = ""


StopCallback = Callable[[StopRequest], None]
