"""Hostile-guest fuzzing: no access sequence may raise out of a device, and reads always
return exactly the requested number of bytes."""

import calendar
import contextlib
import itertools
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.devices.legacy.acpi_ged import AcpiGed
from hypyr.devices.legacy.acpi_pm import AcpiPm, AcpiReset
from hypyr.devices.legacy.i8042 import I8042
from hypyr.devices.legacy.rtc import Rtc
from hypyr.devices.legacy.serial import Serial
from hypyr.devices.pvexit import PvExit

T0 = calendar.timegm((2024, 2, 29, 13, 45, 7))


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def no_internal_errors():
    """Devices log (never raise) internal exceptions; for the fuzzer those are failures too."""
    h = _Errors()
    logger = logging.getLogger("hypyr.dev")
    logger.addHandler(h)
    try:
        yield
    finally:
        logger.removeHandler(h)
    assert not h.records, [r.getMessage() for r in h.records]


def _devices():
    sink = lambda *_: None  # noqa: E731
    lines: list[bool] = []
    serial = Serial(lines.append, sink)
    i8042 = I8042(sink, kbd_irq=lines.append, aux_irq=lines.append)
    return {
        "serial": (serial, 8),
        "i8042": (i8042, 5),
        "i8042.data": (i8042.data_port, 1),
        "i8042.cmd": (i8042.command_port, 1),
        "rtc": (Rtc(clock=lambda: T0), 2),
        "acpi_pm": (AcpiPm(sink), 2),
        "acpi_reset": (AcpiReset(sink), 1),
        "acpi_ged": (AcpiGed(lines.append), 1),
        "pvexit": (PvExit(sink), 1),
    }, serial, i8042


op = st.tuples(
    st.sampled_from(["r", "w", "in", "cad", "button", "state"]),
    st.integers(min_value=-2, max_value=10),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(min_value=0, max_value=2**64 - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["serial", "i8042", "i8042.data", "i8042.cmd", "rtc", "acpi_pm",
                        "acpi_reset", "acpi_ged", "pvexit"]),
       st.lists(op, max_size=80))
def test_arbitrary_accesses_never_raise(name, ops):
    devs, serial, i8042 = _devices()
    dev, _length = devs[name]
    owner = i8042 if name.startswith("i8042.") else dev
    with no_internal_errors():
        _run(dev, owner, serial, i8042, ops)


def _run(dev, owner, serial, i8042, ops):
    for kind, offset, size, value in ops:
        if kind == "r":
            assert len(dev.read(offset, size)) == size
        elif kind == "w":
            dev.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        elif kind == "in":
            serial.enqueue_input(value.to_bytes(8, "little")[:size])
        elif kind == "cad":
            i8042.inject_ctrl_alt_del()
        elif kind == "button":
            if isinstance(owner, AcpiGed):
                owner.press_power_button()
        else:
            saved = owner.save_state()
            owner.load_state(saved)
            assert owner.save_state() == saved


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255)), max_size=200))
def test_serial_irq_calls_alternate_and_state_round_trips(writes):
    calls: list[bool] = []
    u = Serial(calls.append, lambda b: None)
    for off, val in writes:
        u.write(off, bytes([val]))
        u.read(off, 1)
    for a, b in itertools.pairwise(calls):
        assert a != b
    if calls:
        assert calls[0] is True
    st_ = u.save_state()
    v = Serial(lambda _: None, lambda b: None)
    v.load_state(st_)
    assert v.save_state() == st_


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 4]), st.integers(0, 255)), max_size=200))
def test_i8042_state_round_trips(writes):
    k = I8042(lambda r: None)
    for off, val in writes:
        k.write(off, bytes([val]))
        k.read(off ^ 4, 1)
    s = k.save_state()
    k2 = I8042(lambda r: None)
    k2.load_state(s)
    assert k2.save_state() == s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 255)), max_size=200))
def test_rtc_state_round_trips(writes):
    r = Rtc(clock=lambda: T0)
    for off, val in writes:
        r.write(off, bytes([val]))
        r.read(1, 1)
    s = r.save_state()
    r2 = Rtc(clock=lambda: T0)
    r2.load_state(s)
    assert r2.save_state() == s
