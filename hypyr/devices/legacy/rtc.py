"""MC146818 CMOS real-time clock and 128-byte CMOS RAM, at ports 0x70-0x71.

The time registers are computed from the host clock in UTC plus the guest's offset (writes move
the offset); the clock is injectable (``Rtc(clock=...)``).  The registers, the SET bit and what
save/restore keeps: docs/devices.md, "CMOS RTC".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hypyr.devices.legacy._bytedev import ByteRegisterDevice, bcd, from_bcd, is_bcd
from hypyr.devices.state import QuiesceFree, StateError, StateReader

log = logging.getLogger("hypyr.dev.rtc")

PORT = 0x70
LENGTH = 2
IRQ = 8

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26
REG_B_SET = 0x80
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H
REG_D_VRT = 0x80

_TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR,
              REG_CENTURY)

def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's
    algorithm; plain integers, so the RTC needs no datetime import)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _valid_date(year: int, month: int, day: int) -> bool:
    return 1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)


_MIN_EPOCH = _days_from_civil(1, 1, 1) * 86400
_MAX_EPOCH = _days_from_civil(9999, 12, 31) * 86400 + 86399


def _default_ram() -> bytes:
    ram = bytearray(128)
    ram[REG_A] = REG_A_DEFAULT
    ram[REG_B] = REG_B_DEFAULT
    ram[REG_D] = REG_D_VRT
    return bytes(ram)


Fields = tuple[int, int, int, int, int, int]  # year, month, day, hour, minute, second


class Rtc(QuiesceFree, ByteRegisterDevice):
    """CMOS RTC.  ``clock`` returns host time as seconds since the epoch (UTC)."""

    LENGTH = LENGTH

    def __init__(self, clock: Callable[[], float] = time.time):
        super().__init__(log)
        self._clock = clock
        self._index = 0                # the selected register
        self._nmi_disabled = False
        self._ram = bytearray(_default_ram())   # the time registers' bytes here are unused (computed)
        self._offset = 0               # guest time minus host time, seconds
        self._frozen: Fields | None = None   # the clock fields while register B's SET bit is set

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    STATE_KIND = "rtc-mc146818"
    STATE_VERSION = 1

    def save_state(self) -> dict:
        """Index, NMI bit, CMOS RAM, the guest clock's offset from UTC and the fields frozen by SET."""
        with self._lock:
            return {"kind": self.STATE_KIND, "v": self.STATE_VERSION, "index": self._index,
                    "nmi_disabled": self._nmi_disabled, "ram": bytes(self._ram), "offset": self._offset,
                    "frozen": None if self._frozen is None else list(self._frozen)}

    def load_state(self, state: dict) -> None:
        r = StateReader(state, "rtc", self.STATE_KIND, self.STATE_VERSION)
        span = _MAX_EPOCH - _MIN_EPOCH
        frozen = r.raw("frozen")
        if frozen is not None:
            if (not isinstance(frozen, (list, tuple)) or len(frozen) != 6
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in frozen)
                    or not 1 <= frozen[0] <= 9999 or not all(0 <= v <= 99 for v in frozen[1:])):
                raise StateError("rtc.frozen must be None or six integers (year, month, day, hour, minute, second)")
            frozen = tuple(int(v) for v in frozen)
        index, nmi_disabled = r.integer("index", 0, 0x7F), r.flag("nmi_disabled")
        ram, offset = r.blob("ram", 128, 128), r.integer("offset", -span, span)
        r.done()
        if bool(ram[REG_B] & REG_B_SET) != (frozen is not None):
            raise StateError("rtc: frozen must be set exactly when register B's SET bit is")
        with self._lock:
            self._index, self._nmi_disabled, self._ram = index, nmi_disabled, bytearray(ram)
            self._offset, self._frozen = offset, frozen

    # ------------------------------------------------------------------ host side
    @property
    def nmi_disabled(self) -> bool:
        with self._lock:
            return self._nmi_disabled

    def set_cmos(self, index: int, value: int) -> None:
        """Preload a CMOS RAM byte (VMM use, e.g. BIOS memory-size bytes)."""
        if not 0 <= index <= 0x7F or not 0 <= value <= 0xFF:
            raise ValueError(f"CMOS[{index:#x}] = {value:#x} out of range")
        if index in _TIME_REGS or index in (REG_C, REG_D):
            raise ValueError(f"CMOS index {index:#x} is a clock register")
        with self._lock:
            self._ram[index] = value

    def get_cmos(self, index: int) -> int:
        with self._lock:
            return self._read_index(index & 0x7F)

    # ------------------------------------------------------------------ time
    def _host_epoch(self) -> int:
        try:
            return int(self._clock())
        except Exception:
            self._rlog.exception("clock", "rtc: clock failed")
            return 0

    def _guest_epoch(self) -> int:
        return min(max(self._host_epoch() + self._offset, _MIN_EPOCH), _MAX_EPOCH)

    def _fields(self) -> Fields:
        if self._frozen is not None:
            return self._frozen
        t = time.gmtime(self._guest_epoch())
        return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, min(t.tm_sec, 59))

    def _encode(self, value: int) -> int:
        return value if self._ram[REG_B] & REG_B_DM_BINARY else bcd(value % 100)

    def _decode(self, value: int) -> int | None:
        if self._ram[REG_B] & REG_B_DM_BINARY:
            return value if value <= 99 else None
        return from_bcd(value) if is_bcd(value) else None

    def _time_reg(self, reg: int) -> int:
        year, month, day, hour, minute, sec = self._fields()
        if reg == REG_SECONDS:
            return self._encode(sec)
        if reg == REG_MINUTES:
            return self._encode(minute)
        if reg == REG_HOURS:
            if self._ram[REG_B] & REG_B_24H:
                return self._encode(hour)
            return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        if reg == REG_WEEKDAY:
            # Sunday = 1 (1970-01-01 was a Thursday); 1 for a half-set date while SET is on
            wday = (_days_from_civil(year, month, day) + 4) % 7 + 1 if _valid_date(year, month, day) else 1
            return self._encode(wday)
        if reg == REG_DAY:
            return self._encode(day)
        if reg == REG_MONTH:
            return self._encode(month)
        if reg == REG_YEAR:
            return self._encode(year % 100)
        return self._encode(year // 100)  # REG_CENTURY

    def _set_time_field(self, reg: int, value: int) -> None:
        """Apply a guest write to a time register: to the frozen fields while SET is on
        (checked when SET is cleared), otherwise by moving the guest clock at once."""
        year, month, day, hour, minute, sec = self._fields()
        twelve_hour = not self._ram[REG_B] & REG_B_24H
        if reg == REG_WEEKDAY:
            return  # derived from the date; the guest's value is not kept
        v = self._decode(value & 0x7F if reg == REG_HOURS and twelve_hour else value)
        if v is None:
            self._rlog.debug("bad-value", "rtc: bad value %#04x for register %#x ignored", value, reg)
            return
        if reg == REG_SECONDS:
            sec = v
        elif reg == REG_MINUTES:
            minute = v
        elif reg == REG_HOURS:
            if twelve_hour:
                if not 1 <= v <= 12:
                    self._rlog.debug("bad-12h", "rtc: bad 12-hour value %#04x ignored", value)
                    return
                v = v % 12 + (12 if value & 0x80 else 0)
            hour = v
        elif reg == REG_DAY:
            day = v
        elif reg == REG_MONTH:
            month = v
        elif reg == REG_YEAR:
            year = year // 100 * 100 + v
        elif reg == REG_CENTURY:
            year = v * 100 + year % 100
        year = max(year, 1)
        if self._frozen is not None:
            self._frozen = (year, month, day, hour, minute, sec)
            return
        if 1 <= month <= 12:  # e.g. 29 Feb 2024 -> year 2030 keeps the 28th
            day = min(day, _days_in_month(year, month))
        new = self._to_epoch((year, month, day, hour, minute, sec))
        if new is None:
            self._rlog.debug("invalid-time", "rtc: write %#04x to register %#x gives an invalid time; ignored",
                             value, reg)
            return
        self._offset = new - self._host_epoch()

    @staticmethod
    def _to_epoch(f: Fields) -> int | None:
        year, month, day, hour, minute, sec = f
        if not (_valid_date(year, month, day) and 0 <= hour < 24 and 0 <= minute < 60 and 0 <= sec < 60):
            return None
        return _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + sec

    # ------------------------------------------------------------------ registers
    def _read_index(self, index: int) -> int:
        if index in _TIME_REGS:
            return self._time_reg(index)
        if index == REG_A:
            return self._ram[REG_A] & ~REG_A_UIP & 0xFF
        if index == REG_C:
            return 0
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _read_reg(self, offset: int) -> int:
        if offset == 0:
            return 0xFF
        return self._read_index(self._index)

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == 0:
            self._index = value & 0x7F
            self._nmi_disabled = bool(value & 0x80)
            return
        index = self._index
        if index in _TIME_REGS:
            self._set_time_field(index, value)
        elif index == REG_A:
            self._ram[REG_A] = value & 0x7F
        elif index == REG_B:
            frozen = self._frozen
            if value & REG_B_SET and frozen is None:
                self._frozen = self._fields()
            elif not value & REG_B_SET and frozen is not None:
                new = self._to_epoch(frozen)
                if new is None:
                    self._rlog.warning("invalid-set", "rtc: guest set an invalid time %r; clock unchanged",
                                       self._frozen)
                else:
                    self._offset = new - self._host_epoch()
                self._frozen = None
            self._ram[REG_B] = value
        elif index in (REG_C, REG_D):
            self._rlog.debug("read-only", "rtc: write %#04x to read-only register %#x ignored", value, index)
        else:
            self._ram[index] = value
