"""The ACPI power button's event register (hypyr.devices.legacy.acpi_ged)."""

import pytest

from hypyr.arch.x86.acpi import GED_POWER_BUTTON
from hypyr.devices.legacy.acpi_ged import AcpiGed
from hypyr.devices.state import StateError


def test_press_pulses_the_line_and_read_clears_the_event():
    levels: list[bool] = []
    ged = AcpiGed(levels.append)
    assert ged.read(0, 1) == b"\0"            # nothing pending
    ged.press_power_button()
    assert levels == [True, False]            # one edge
    assert ged.read(0, 1) == bytes([GED_POWER_BUTTON])
    assert ged.read(0, 1) == b"\0"            # read to clear, as _EVT expects
    ged.write(0, b"\xff")                      # writes do nothing
    assert ged.read(0, 1) == b"\0" and levels == [True, False]


def test_state_round_trip_keeps_a_pending_press():
    ged = AcpiGed(lambda level: None)
    ged.press_power_button()
    state = ged.save_state()
    other = AcpiGed(lambda level: None)
    other.load_state(state)
    assert other.read(0, 1) == bytes([GED_POWER_BUTTON])


@pytest.mark.parametrize("bad", [{}, {"kind": "acpi-ged", "v": 1, "pending": 2},
                                 {"kind": "acpi-ged", "v": 1, "pending": "1"},
                                 {"kind": "acpi-ged", "v": 2, "pending": 0},
                                 {"kind": "acpi-ged", "v": 1, "pending": 0, "extra": 1}])
def test_bad_state_is_a_state_error(bad):
    with pytest.raises(StateError):
        AcpiGed(lambda level: None).load_state(bad)
