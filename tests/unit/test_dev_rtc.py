import calendar

import pytest

from hypyr.devices.legacy import rtc as R
from hypyr.devices.legacy.rtc import Rtc
from hypyr.errors import StateError

# 2024-02-29 (a Thursday) 13:45:07 UTC
T0 = calendar.timegm((2024, 2, 29, 13, 45, 7))


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def reg(dev, index, nmi=False):
    dev.write(0, bytes([index | (0x80 if nmi else 0)]))
    return dev.read(1, 1)[0]


def setreg(dev, index, value):
    dev.write(0, bytes([index]))
    dev.write(1, bytes([value]))


def test_bcd_time_from_clock():
    r = Rtc(clock=Clock(T0 + 0.9))
    assert reg(r, R.REG_SECONDS) == 0x07
    assert reg(r, R.REG_MINUTES) == 0x45
    assert reg(r, R.REG_HOURS) == 0x13
    assert reg(r, R.REG_WEEKDAY) == 0x05  # Thursday, Sunday = 1
    assert reg(r, R.REG_DAY) == 0x29
    assert reg(r, R.REG_MONTH) == 0x02
    assert reg(r, R.REG_YEAR) == 0x24
    assert reg(r, R.REG_CENTURY) == 0x20


def test_status_registers():
    r = Rtc(clock=Clock(T0))
    assert reg(r, R.REG_A) == 0x26
    assert reg(r, R.REG_B) == 0x02
    assert reg(r, R.REG_C) == 0x00
    assert reg(r, R.REG_D) == 0x80
    setreg(r, R.REG_A, 0xA6)
    assert reg(r, R.REG_A) == 0x26  # UIP never reads set


def test_binary_and_12_hour_modes():
    r = Rtc(clock=Clock(T0))
    setreg(r, R.REG_B, R.REG_B_DM_BINARY | R.REG_B_24H)
    assert reg(r, R.REG_HOURS) == 13
    assert reg(r, R.REG_DAY) == 29
    assert reg(r, R.REG_CENTURY) == 20
    setreg(r, R.REG_B, 0)  # BCD, 12 hour
    assert reg(r, R.REG_HOURS) == 0x80 | 0x01


def test_nmi_bit_masked_from_index():
    r = Rtc(clock=Clock(T0))
    assert reg(r, R.REG_MINUTES, nmi=True) == 0x45
    assert r.nmi_disabled
    assert reg(r, 0x40 | 0x80 >> 0 & 0x7F) == 0
    reg(r, R.REG_MINUTES)
    assert not r.nmi_disabled
    assert r.read(0, 1) == b"\xff"


def test_cmos_ram():
    r = Rtc(clock=Clock(T0))
    for i in list(range(0x0E, 0x80)):
        if i == R.REG_CENTURY:
            continue
        setreg(r, i, i ^ 0x5A)
    for i in range(0x0E, 0x80):
        if i == R.REG_CENTURY:
            continue
        assert reg(r, i) == i ^ 0x5A
    r.set_cmos(0x34, 0x12)
    assert reg(r, 0x34) == 0x12
    r.write(0, b"\xb4")  # NMI bit + 0x34
    assert r.read(1, 1) == b"\x12"
    with pytest.raises(ValueError):
        r.set_cmos(R.REG_SECONDS, 1)


def test_writing_time_moves_guest_clock():
    clock = Clock(T0)
    r = Rtc(clock=clock)
    setreg(r, R.REG_YEAR, 0x30)
    assert reg(r, R.REG_YEAR) == 0x30
    clock.t += 60
    assert reg(r, R.REG_MINUTES) == 0x46
    assert reg(r, R.REG_YEAR) == 0x30
    setreg(r, R.REG_MONTH, 0x13)  # invalid: ignored
    assert reg(r, R.REG_MONTH) == 0x02


def test_set_bit_freezes_then_applies():
    clock = Clock(T0)
    r = Rtc(clock=clock)
    setreg(r, R.REG_B, R.REG_B_SET | R.REG_B_24H)
    setreg(r, R.REG_HOURS, 0x01)
    setreg(r, R.REG_MINUTES, 0x02)
    setreg(r, R.REG_SECONDS, 0x03)
    clock.t += 100
    assert reg(r, R.REG_SECONDS) == 0x03  # frozen
    setreg(r, R.REG_B, R.REG_B_24H)
    clock.t += 5
    assert (reg(r, R.REG_HOURS), reg(r, R.REG_MINUTES), reg(r, R.REG_SECONDS)) == (0x01, 0x02, 0x08)


def test_state_round_trip():
    clock = Clock(T0)
    r = Rtc(clock=clock)
    setreg(r, 0x50, 0x99)
    setreg(r, R.REG_YEAR, 0x25)
    st = r.save_state()
    r2 = Rtc(clock=clock)
    r2.load_state(st)
    assert r2.save_state() == st
    assert reg(r2, 0x50) == 0x99 and reg(r2, R.REG_YEAR) == 0x25
    for bad in ({**st, "index": 0x80}, {**st, "frozen": [2026, 1, 1, 0, 0, 0]}):   # SET bit not set in RAM
        with pytest.raises(StateError):
            r2.load_state(bad)


def test_set_mode_allows_invalid_intermediate_dates():
    clock = Clock(calendar.timegm((2023, 1, 31, 0, 0, 0)))
    r = Rtc(clock=clock)
    setreg(r, R.REG_B, R.REG_B_SET | R.REG_B_24H)
    setreg(r, R.REG_MONTH, 0x02)  # 31 Feb for a moment
    assert reg(r, R.REG_MONTH) == 0x02
    setreg(r, R.REG_DAY, 0x28)
    setreg(r, R.REG_B, R.REG_B_24H)
    assert (reg(r, R.REG_DAY), reg(r, R.REG_MONTH), reg(r, R.REG_WEEKDAY)) == (0x28, 0x02, 0x03)  # Tuesday


def test_invalid_set_mode_time_leaves_clock():
    r = Rtc(clock=Clock(T0))
    setreg(r, R.REG_B, R.REG_B_SET | R.REG_B_24H)
    setreg(r, R.REG_MONTH, 0x02)
    setreg(r, R.REG_DAY, 0x31)
    setreg(r, R.REG_B, R.REG_B_24H)
    assert (reg(r, R.REG_DAY), reg(r, R.REG_MONTH)) == (0x29, 0x02)


def test_12_hour_write():
    r = Rtc(clock=Clock(T0))
    setreg(r, R.REG_B, 0)  # 12 h, BCD
    setreg(r, R.REG_HOURS, 0x80 | 0x12)  # 12 PM = noon
    setreg(r, R.REG_B, R.REG_B_24H)
    assert reg(r, R.REG_HOURS) == 0x12
    setreg(r, R.REG_B, 0)
    setreg(r, R.REG_HOURS, 0x12)  # 12 AM = midnight
    setreg(r, R.REG_B, R.REG_B_24H)
    assert reg(r, R.REG_HOURS) == 0x00
