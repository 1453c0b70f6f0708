"""A hostile guest repeating what makes a device log must not fill the host's logs: each case
below triggers a log line 10 000 times and may produce only a handful of lines."""

from __future__ import annotations

import logging
import os
import time

import pytest

from hypyr.devices.bus import Bus
from hypyr.devices.legacy import rtc as R
from hypyr.devices.legacy import serial as S
from hypyr.devices.legacy.acpi_pm import RESET_VALUE, SLP_EN, AcpiPm, AcpiReset
from hypyr.devices.legacy.i8042 import I8042
from hypyr.devices.legacy.rtc import Rtc
from hypyr.devices.legacy.serial import RX_BUFFER_SIZE, Serial
from hypyr.devices.pvexit import PvExit
from hypyr.devices.pvpanic import PVPANIC_CRASH_LOADED, PvPanic
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.vmm.iothread import IoThread

TIMES = 10_000
HANDFUL = 10  # at most two kinds of line (keys) per case, five lines each


def ignore(*_):
    pass


def fail(*_):
    raise RuntimeError("callback failed")


def i8042_bus(**kw):
    ctl = I8042(kw.pop("stop", ignore), **kw)
    bus = Bus("pio")
    bus.register(0x60, 1, ctl.data_port)
    bus.register(0x64, 1, ctl.command_port)
    return bus


def rtc_invalid_date(dev):
    """Set the time with SET held, give it month 0x13, release SET: an invalid date."""
    def hostile():
        dev.write(0, bytes([R.REG_B]))
        dev.write(1, bytes([R.REG_B_DEFAULT | R.REG_B_SET]))
        dev.write(0, bytes([R.REG_MONTH]))
        dev.write(1, b"\x13")
        dev.write(0, bytes([R.REG_B]))
        dev.write(1, bytes([R.REG_B_DEFAULT]))
    return hostile


def at_register(dev, index, value):
    dev.write(0, bytes([index]))
    return lambda: dev.write(1, bytes([value]))


def serial_loopback_full():
    u = Serial(ignore, ignore)
    u.enqueue_input(b"x" * RX_BUFFER_SIZE)
    u.write(S.MCR, bytes([S.MCR_LOOP]))
    return lambda: u.write(S.THR, b"y")


def serial_full_input():
    u = Serial(ignore, ignore)
    u.enqueue_input(b"x" * RX_BUFFER_SIZE)
    return lambda: u.enqueue_input(b"more")


def serial_irq_failing():
    u = Serial(fail, ignore)
    u.write(S.MCR, bytes([S.MCR_OUT2]))

    def hostile():
        u.write(S.IER, bytes([S.IER_ETBEI]))  # THR empty: the line rises
        u.write(S.IER, b"\0")                 # and falls
    return hostile


def i8042_irq_failing():
    bus = i8042_bus(kbd_irq=fail)

    def hostile():
        bus.write(0x60, b"\xee")  # echo: a byte is queued, the line rises
        bus.read(0x60, 1)         # and falls
    return hostile


def bus_short_reads():
    class Short:
        def read(self, offset, size):
            return b""

        def write(self, offset, data):
            pass
    bus = Bus("pio")
    bus.register(0x100, 1, Short())
    return lambda: bus.read(0x100, 1)


CASES = {
    "i8042 output queue full": lambda: (lambda bus: lambda: bus.write(0x60, b"\xee"))(i8042_bus()),
    "i8042 unknown command": lambda: (lambda bus: lambda: bus.write(0x64, b"\x01"))(i8042_bus()),
    "i8042 reset command": lambda: (lambda bus: lambda: bus.write(0x64, b"\xfe"))(i8042_bus()),
    "i8042 interrupt line failing": i8042_irq_failing,
    "i8042 stop callback failing": lambda: (lambda bus: lambda: bus.write(0x64, b"\xfe"))(i8042_bus(stop=fail)),
    "acpi unsupported sleep type": lambda: (lambda d: lambda: d.write(0, bytes([SLP_EN | 1 << 2])))(AcpiPm(ignore)),
    "acpi write without SLP_EN": lambda: (lambda d: lambda: d.write(0, b"\x01"))(AcpiPm(ignore)),
    "acpi S5 again and again": lambda: (lambda d: lambda: d.write(0, bytes([SLP_EN | 5 << 2])))(AcpiPm(ignore)),
    "acpi reset register": lambda: (lambda d: lambda: d.write(0, bytes([RESET_VALUE])))(AcpiReset(ignore)),
    "acpi reset register, other value": lambda: (lambda d: lambda: d.write(0, b"\x01"))(AcpiReset(ignore)),
    "pvpanic crash loaded": lambda: (lambda d: lambda: d.write(0, bytes([PVPANIC_CRASH_LOADED])))(PvPanic(ignore)),
    "pvpanic unknown bits": lambda: (lambda d: lambda: d.write(0, b"\x80"))(PvPanic(ignore)),
    "pvexit status": lambda: (lambda d: lambda: d.write(0, b"\x07"))(PvExit(ignore)),
    "pvexit stop failing": lambda: (lambda d: lambda: d.write(0, b"\x07"))(PvExit(fail)),
    "pvexit bad offset": lambda: (lambda d: lambda: d.write(1, b"\x07"))(PvExit(ignore)),
    "rtc read-only register": lambda: at_register(Rtc(), R.REG_C, 0),
    "rtc bad BCD value": lambda: at_register(Rtc(), R.REG_SECONDS, 0xFF),
    "rtc invalid date": lambda: rtc_invalid_date(Rtc()),
    "rtc clock failing": lambda: (lambda d: lambda: d.read(1, 1))(Rtc(clock=fail)),
    "register beyond the device": lambda: (lambda d: lambda: (d.write(2, b"\0"), d.read(2, 1)))(Rtc()),
    "serial IER reserved bits": lambda: (lambda u: lambda: u.write(S.IER, b"\xf0"))(Serial(ignore, ignore)),
    "serial MCR reserved bits": lambda: (lambda u: lambda: u.write(S.MCR, b"\xe0"))(Serial(ignore, ignore)),
    "serial read-only register": lambda: (lambda u: lambda: u.write(S.LSR, b"\0"))(Serial(ignore, ignore)),
    "serial loopback buffer full": serial_loopback_full,
    "serial output failing": lambda: (lambda u: lambda: u.write(S.THR, b"x"))(Serial(ignore, fail)),
    "serial interrupt line failing": serial_irq_failing,
    "serial input the guest never reads": serial_full_input,
    "bus short reads": bus_short_reads,
}


@pytest.mark.parametrize("case", CASES)
def test_repeated_guest_triggered_lines_are_rate_limited(caplog, case):
    hostile = CASES[case]()
    with caplog.at_level(logging.DEBUG, logger="hypyr"):
        for _ in range(TIMES):
            hostile()
    lines = [r for r in caplog.records if r.name.startswith("hypyr")]
    assert 1 <= len(lines) <= HANDFUL, [r.getMessage() for r in lines[:20]]


def test_suppressed_lines_are_counted_in_the_next_one(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    dev = PvPanic(ignore)
    with caplog.at_level(logging.DEBUG, logger="hypyr"):
        for _ in range(TIMES):
            dev.write(0, b"\x80")
        now[0] += 60
        dev.write(0, b"\x80")
    assert len(caplog.records) == 6
    assert caplog.records[-1].getMessage().endswith(f"({TIMES - 5} similar lines suppressed)")


def test_io_thread_handler_failures_are_rate_limited(caplog):
    io = IoThread()
    calls = []

    def handler():
        calls.append(1)
        raise RuntimeError("device bug")
    fd = io.add_eventfd(handler)
    with caplog.at_level(logging.DEBUG, logger="hypyr"):
        io.start()
        try:
            for i in range(1, 201):
                os.eventfd_write(fd, 1)
                deadline = time.monotonic() + 10
                while len(calls) < i and time.monotonic() < deadline:
                    time.sleep(0.0005)
        finally:
            io.stop()
    assert len(calls) == 200
    assert 1 <= len([r for r in caplog.records if r.name.startswith("hypyr")]) <= 5


# -- RateLimitedLog itself ------------------------------------------------------------------------
def test_levels_and_exception_info(caplog):
    rlog = RateLimitedLog(logging.getLogger("hypyr.test"))
    with caplog.at_level(logging.DEBUG, logger="hypyr"):
        rlog.debug("a", "d %d", 1)
        rlog.info("b", "i %d", 2)
        rlog.warning("c", "w %d", 3)
        rlog.error("d", "e %d", 4)
        try:
            raise ValueError("boom")
        except ValueError:
            rlog.exception("e", "x %d", 5)
        rlog(logging.WARNING, "f", "called %s", "directly")
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [(logging.DEBUG, "d 1"), (logging.INFO, "i 2"), (logging.WARNING, "w 3"), (logging.ERROR, "e 4"),
                   (logging.ERROR, "x 5"), (logging.WARNING, "called directly")]
    assert caplog.records[4].exc_info[0] is ValueError and not caplog.records[3].exc_info
    assert {r.filename for r in caplog.records} == {"test_dev_ratelog.py"}  # where the line came from


def test_the_key_table_is_bounded(caplog):
    rlog = RateLimitedLog(logging.getLogger("hypyr.test"))
    with caplog.at_level(logging.DEBUG, logger="hypyr"):
        for i in range(TIMES):
            rlog.warning(f"key {i}", "line %d", i)
    assert len(rlog._windows) <= RateLimitedLog.MAX_KEYS + 1
    assert len(caplog.records) <= RateLimitedLog.MAX_KEYS + rlog.burst
