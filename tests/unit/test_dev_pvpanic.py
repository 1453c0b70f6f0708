from hypyr.devices.events import GuestEvent
from hypyr.devices.pvpanic import PVPANIC_CRASH_LOADED, PVPANIC_PANICKED, PvPanic


def test_read_advertises_supported_events():
    assert PvPanic(lambda r: None).read(0, 1) == bytes([PVPANIC_PANICKED | PVPANIC_CRASH_LOADED])


def test_panicked_bit_requests_a_crash_stop():
    got = []
    PvPanic(got.append).write(0, bytes([PVPANIC_PANICKED]))
    assert [r.event for r in got] == [GuestEvent.PANIC]


def test_other_values_do_not_stop():
    got = []
    dev = PvPanic(got.append)
    for v in (0, PVPANIC_CRASH_LOADED, 0x80, 0xFE):
        dev.write(0, bytes([v]))
    dev.write(0, b"")
    assert got == []
