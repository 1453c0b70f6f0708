"""hypyr.devices.bus.Bus: registration rules, dispatch with offsets, unmapped and buggy-device accesses."""

from __future__ import annotations

import logging
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.devices.bus import Bus, BusError


class Dev:
    """Reads return ``size`` copies of ``fill``; every access is recorded."""

    def __init__(self, fill: int = 0x00, reply: bytes | None = None):
        self.fill = fill
        self.reply = reply
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.reply if self.reply is not None else bytes([self.fill]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


# -- registration ---------------------------------------------------------------------------------
def test_adjacent_ranges_are_fine_in_any_order():
    bus = Bus("pio")
    bus.register(0x10, 0x10, Dev())
    bus.register(0x30, 0x10, Dev())
    bus.register(0x20, 0x10, Dev())  # exactly fills the gap
    bus.register(0x0, 0x10, Dev())
    bus.register(0x40, 1, Dev())


@pytest.mark.parametrize("start,length", [
    (0x10, 0x10),   # identical
    (0x18, 1),      # inside
    (0x08, 0x10),   # overlaps the start
    (0x1F, 0x10),   # overlaps the end
    (0x00, 0x100),  # contains
    (0x10, 1),      # same start, shorter
    (0x1F, 1),      # last byte
])
def test_overlaps_are_refused(start, length):
    bus = Bus("mmio")
    first = Dev()
    bus.register(0x10, 0x10, first)
    with pytest.raises(BusError, match="overlaps"):
        bus.register(start, length, Dev())
    assert bus.find(0x10) == (0, first)  # the refused device left no trace
    assert bus.find(start + length - 1) in (None, (start + length - 1 - 0x10, first))


def test_overlap_with_the_next_range_is_refused():
    bus = Bus("mmio")
    bus.register(0x100, 0x10, Dev())
    with pytest.raises(BusError):
        bus.register(0xF8, 0x9, Dev())
    bus.register(0xF8, 0x8, Dev())


@pytest.mark.parametrize("start,length", [(0x10, 0), (0x10, -1), (-1, 4)])
def test_bad_ranges_are_refused(start, length):
    with pytest.raises(BusError):
        Bus("pio").register(start, length, Dev())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(-1, 12)), max_size=12), st.data())
def test_registration_and_find_match_a_model(ranges, data):
    bus = Bus("model")
    owner: dict[int, tuple[int, object]] = {}  # address -> (range start, device)
    for start, length in ranges:
        dev = Dev()
        clash = length <= 0 or any(a in owner for a in range(start, start + length))
        if clash:
            with pytest.raises(BusError):
                bus.register(start, length, dev)
        else:
            bus.register(start, length, dev)
            for a in range(start, start + length):
                owner[a] = (start, dev)
    for _ in range(20):
        addr = data.draw(st.integers(0, 80))
        size = data.draw(st.integers(1, 8))
        hits = {owner.get(a, (None, None))[1] for a in range(addr, addr + size)}
        expected = None
        if len(hits) == 1 and None not in hits:
            start, dev = owner[addr]
            expected = (addr - start, dev)
        assert bus.find(addr, size) == expected


# -- dispatch -------------------------------------------------------------------------------------
def test_reads_and_writes_get_offsets_relative_to_the_range():
    bus = Bus("pio")
    a, b = Dev(0xAA), Dev(0xBB)
    bus.register(0x3F8, 8, a)
    bus.register(0x400, 4, b)
    assert bus.read(0x3F8, 1) == b"\xaa"
    assert bus.read(0x3FD, 2) == b"\xaa\xaa"
    assert bus.read(0x402, 2) == b"\xbb\xbb"
    bus.write(0x3FF, b"\x01")
    bus.write(0x400, memoryview(b"\x01\x02\x03\x04"))
    assert a.reads == [(0, 1), (5, 2)] and b.reads == [(2, 2)]
    assert a.writes == [(7, b"\x01")]
    assert b.writes == [(0, b"\x01\x02\x03\x04")] and type(b.writes[0][1]) is bytes


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unmapped_reads_are_all_ones_and_writes_vanish(size):
    bus = Bus("mmio")
    dev = Dev()
    bus.register(0x1000, 0x10, dev)
    for addr in (0, 0xFFF, 0x1010, 0xFFFF_FFFF):
        assert bus.read(addr, size) == b"\xff" * size
        bus.write(addr, b"\x00" * size)
    assert dev.reads == [] and dev.writes == []
    assert Bus("empty").read(0x1234, size) == b"\xff" * size


def test_access_sticking_out_of_a_range_is_unmapped():
    bus = Bus("mmio")
    dev = Dev(0x11)
    bus.register(0x1000, 8, dev)
    bus.register(0x1008, 8, Dev(0x22))
    assert bus.read(0x1006, 4) == b"\xff" * 4  # spans two devices: nobody gets it
    assert bus.read(0x1004, 4) == b"\x11" * 4
    bus.write(0x1007, b"\x00\x00")
    assert dev.writes == []


@pytest.mark.parametrize("reply", [b"", b"\x01", b"\x01\x02\x03", b"\x01\x02\x03\x04\x05\x06"])
def test_wrong_length_reads_from_a_buggy_device_are_fixed_up(reply, caplog):
    bus = Bus("mmio")
    bus.register(0x1000, 0x10, Dev(reply=reply))
    with caplog.at_level(logging.ERROR, logger="hypyr.bus"):
        data = bus.read(0x1000, 4)
    assert len(data) == 4
    assert data == (reply + b"\xff" * 4)[:4]  # short reads padded with all ones, long ones cut
    assert "returned" in caplog.text


def test_concurrent_registration_keeps_the_bus_consistent():
    bus = Bus("pio")
    errors: list[Exception] = []

    def worker(k):
        for i in range(200):
            try:
                bus.register(k * 0x1000 + i * 2, 2, Dev(k))
            except BusError as e:  # pragma: no cover - would be a bug
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for k in range(4):
        for i in range(200):
            off, dev = bus.find(k * 0x1000 + i * 2 + 1)
            assert off == 1 and dev.fill == k
    with pytest.raises(BusError):
        bus.register(0x1001, 1, Dev())
