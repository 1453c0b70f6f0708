import pytest

from hypyr.devices.bus import Bus
from hypyr.devices.events import GuestEvent, StopRequest
from hypyr.devices.legacy import acpi_pm as A
from hypyr.devices.legacy.acpi_pm import AcpiPm, AcpiReset
from hypyr.devices.pvexit import MAGIC, PvExit
from hypyr.errors import StateError


def test_acpi_s5_powers_off():
    stops = []
    pm = AcpiPm(stops.append)
    pm.write(A.SLEEP_CONTROL, bytes([A.SLP_EN | (5 << 2)]))
    assert stops == [StopRequest(GuestEvent.POWEROFF, detail="ACPI S5")]


@pytest.mark.parametrize("typ", [0, 1, 2, 3, 4, 6, 7])
def test_acpi_other_sleep_types_ignored_and_wake(typ):
    stops = []
    pm = AcpiPm(stops.append)
    assert pm.read(A.SLEEP_STATUS, 1) == b"\x00"
    pm.write(A.SLEEP_CONTROL, bytes([A.SLP_EN | (typ << 2)]))
    assert stops == []
    assert pm.read(A.SLEEP_STATUS, 1)[0] & A.WAK_STS
    pm.write(A.SLEEP_STATUS, bytes([A.WAK_STS]))  # write 1 to clear
    assert pm.read(A.SLEEP_STATUS, 1) == b"\x00"


def test_acpi_s5_without_slp_en_ignored():
    stops = []
    pm = AcpiPm(stops.append)
    pm.write(A.SLEEP_CONTROL, bytes([5 << 2]))
    assert stops == []
    assert pm.read(0, 2) == b"\x00\x00"


def test_acpi_via_bus_and_state():
    stops = []
    bus = Bus("pio")
    pm = AcpiPm(stops.append)
    bus.register(A.PORT, A.LENGTH, pm)
    bus.write(0x600, bytes([0x34]))
    assert [s.event for s in stops] == [GuestEvent.POWEROFF]
    state = {**pm.save_state(), "wake_status": True}
    pm.load_state(state)
    assert pm.save_state() == state
    assert bus.read(0x601, 1) == b"\x80"
    with pytest.raises(StateError):
        pm.load_state({**state, "wake_status": 1})


def test_acpi_reset_register():
    stops = []
    rr = AcpiReset(stops.append)
    rr.write(0, b"\x01")
    assert stops == []
    rr.write(0, bytes([A.RESET_VALUE]))
    assert stops == [StopRequest(GuestEvent.REBOOT, detail="ACPI reset")]


@pytest.mark.parametrize("value", [0, 1, 42, 127, 128, 255])
def test_pvexit_status(value):
    stops = []
    bus = Bus("pio")
    bus.register(0xF4, 1, PvExit(stops.append))
    bus.write(0xF4, bytes([value]))
    assert stops == [StopRequest(GuestEvent.EXIT_STATUS, status=value)]


def test_pvexit_wide_write_uses_low_byte_and_read_magic():
    stops = []
    dev = PvExit(stops.append)
    dev.write(0, (0x1234).to_bytes(2, "little"))
    dev.write(0, (0xDEADBE07).to_bytes(4, "little"))
    assert [s.status for s in stops] == [0x34, 0x07]
    assert dev.read(0, 1) == bytes([MAGIC]) == b"H"
    assert dev.read(0, 4) == b"H\x00\x00\x00"
    dev.write(1, b"\x05")  # not the port itself
    dev.write(0, b"")
    assert len(stops) == 2
