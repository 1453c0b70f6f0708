"""hypyr.memory: GuestAddress, and GuestMemory checked against a plain reference model.

The model is a dict ``{region start: bytearray}``; an access of ``length`` bytes at
``addr`` must succeed exactly when every byte lies in some region (adjacent regions count
as contiguous) and must otherwise raise GuestMemoryError without changing anything.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import threading
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hypyr.memory import GuestAddress, GuestMemory, GuestMemoryClosedError, GuestMemoryError, GuestRegion

PAGE = mmap.PAGESIZE
U64 = 1 << 64


# -- GuestAddress ---------------------------------------------------------------------------------
def test_guest_address_arithmetic_keeps_the_type():
    a = GuestAddress(0x1000)
    for v in (a + 0x10, 0x10 + a, a - 0x10, a + a):
        assert type(v) is GuestAddress
    assert a + 0x10 == 0x1010 and 0x10 + a == 0x1010 and a - 0x10 == 0xFF0
    assert repr(a) == "GuestAddress(0x1000)"
    assert isinstance(a, int) and a == 0x1000 and hash(a) == hash(0x1000)


@pytest.mark.parametrize("value", [-1, U64, U64 + 5, -(1 << 70)])
def test_guest_address_range(value):
    with pytest.raises(GuestMemoryError):
        GuestAddress(value)


def test_guest_address_arithmetic_cannot_leave_the_address_space():
    assert GuestAddress(U64 - 1) == U64 - 1
    with pytest.raises(GuestMemoryError):
        GuestAddress(U64 - 1) + 1
    with pytest.raises(GuestMemoryError):
        GuestAddress(0) - 1
    with pytest.raises(GuestMemoryError):
        GuestAddress(5) - GuestAddress(6)


@given(st.integers(0, U64 - 1), st.integers(-(1 << 65), 1 << 65))
def test_guest_address_add_matches_int(a, b):
    if 0 <= a + b < U64:
        assert GuestAddress(a) + b == a + b
        assert b + GuestAddress(a) == a + b
    else:
        with pytest.raises(GuestMemoryError):
            GuestAddress(a) + b


# -- construction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("start,size", [(0, 0), (0, 100), (1, PAGE), (0, -PAGE), (PAGE // 2, PAGE)])
def test_regions_must_be_page_aligned_and_non_empty(start, size):
    with pytest.raises(ValueError):
        GuestRegion(start, size)


def test_overlapping_regions_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        GuestMemory.anonymous([(0, 2 * PAGE), (PAGE, PAGE)], hugepages=False)


def test_regions_are_sorted_and_sized():
    m = GuestMemory.anonymous([(8 * PAGE, PAGE), (0, 2 * PAGE)], hugepages=False)
    try:
        assert [r.start for r in m.regions] == [0, 8 * PAGE]
        assert m.size == 3 * PAGE and m.end == 9 * PAGE
        assert type(m.regions[0].start) is GuestAddress
        assert m.regions[0].contains(PAGE, PAGE) and not m.regions[0].contains(PAGE, PAGE + 1)
    finally:
        m.close()


def test_empty_memory():
    m = GuestMemory([])
    assert m.size == 0 and m.end == 0
    assert not m.check_range(0, 1)
    with pytest.raises(GuestMemoryError):
        m.read(0, 1)


# -- the reference model --------------------------------------------------------------------------
class Model:
    def __init__(self, layout: list[tuple[int, int]]):
        self.regions = {start: bytearray(size) for start, size in layout}

    def inside(self, addr: int, length: int) -> bool:
        if addr < 0 or length < 0 or addr + length > U64:
            return False
        pos, end = addr, addr + length
        while pos < end:
            for start, buf in self.regions.items():
                if start <= pos < start + len(buf):
                    pos = start + len(buf)
                    break
            else:
                return False
        return True

    def _locate(self, addr: int) -> tuple[bytearray, int]:
        for start, buf in self.regions.items():
            if start <= addr < start + len(buf):
                return buf, addr - start
        raise AssertionError(addr)

    def read(self, addr: int, length: int) -> bytes:
        out = bytearray()
        for a in range(addr, addr + length):
            buf, off = self._locate(a)
            out.append(buf[off])
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            buf, off = self._locate(addr + i)
            buf[off] = b

    def snapshot(self) -> dict[int, bytes]:
        return {s: bytes(b) for s, b in self.regions.items()}


def snapshot(mem: GuestMemory) -> dict[int, bytes]:
    return {int(r.start): mem.read(r.start, r.size) for r in mem.regions}


@st.composite
def layouts(draw):
    """1-4 regions of 1-3 pages, separated by gaps of 0 (adjacent) to 3 pages."""
    pos = draw(st.sampled_from([0, PAGE, 0x100000, 0xD000_0000, U64 - 64 * PAGE]))
    layout = []
    for _ in range(draw(st.integers(1, 4))):
        pos += draw(st.integers(0, 3)) * PAGE
        size = draw(st.integers(1, 3)) * PAGE
        layout.append((pos, size))
        pos += size
    return layout


@st.composite
def accesses(draw, layout):
    """(addr, length) pairs concentrated around region boundaries, plus wild ones."""
    edges = [s for s, _ in layout] + [s + n for s, n in layout]
    kind = draw(st.integers(0, 9))
    if kind == 0:
        addr = draw(st.integers(-(1 << 65), 1 << 65))
        length = draw(st.integers(-(1 << 65), 1 << 65))
        return addr, length
    if kind == 1:
        return draw(st.sampled_from(edges)), draw(st.integers(-3, -1))
    addr = draw(st.sampled_from(edges)) + draw(st.integers(-2 * PAGE, 2 * PAGE))
    length = draw(st.one_of(st.integers(1, 16), st.integers(1, 3 * PAGE), st.sampled_from([U64, U64 - addr])))
    return addr, length


def payload_for(length: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(length))


MEM_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@MEM_SETTINGS
@given(st.data())
def test_accesses_succeed_exactly_inside_ram(data):
    layout = data.draw(layouts())
    mem = GuestMemory.anonymous(layout, hugepages=False)
    model = Model(layout)
    try:
        for _ in range(data.draw(st.integers(1, 12))):
            addr, length = data.draw(accesses(layout))
            ok = model.inside(addr, length)
            assert mem.check_range(addr, length) == ok
            if data.draw(st.booleans()):
                # write: only sensible lengths get a real payload; the range check comes first anyway
                if not 0 <= length <= 4 * PAGE:
                    with pytest.raises(GuestMemoryError):
                        mem.fill(addr, length, 0xAB)
                    continue
                chunk = payload_for(length)
                before = snapshot(mem)
                if ok:
                    mem.write(addr, chunk)
                    model.write(addr, chunk)
                else:
                    with pytest.raises(GuestMemoryError):
                        mem.write(addr, chunk)
                    assert snapshot(mem) == before, "a failed write changed memory"
            else:
                if ok and length <= 4 * PAGE:
                    assert mem.read(addr, length) == model.read(addr, length)
                elif not ok:
                    with pytest.raises(GuestMemoryError):
                        mem.read(addr, length)
            assert snapshot(mem) == model.snapshot()
    finally:
        mem.close()


@MEM_SETTINGS
@given(st.data())
def test_fill_is_all_or_nothing(data):
    layout = data.draw(layouts())
    mem = GuestMemory.anonymous(layout, hugepages=False)
    model = Model(layout)
    try:
        for _ in range(data.draw(st.integers(1, 6))):
            addr, length = data.draw(accesses(layout))
            assume(-4 * PAGE <= length <= 4 * PAGE)
            value = data.draw(st.integers(0, 255))
            if model.inside(addr, length):
                mem.fill(addr, length, value)
                model.write(addr, bytes([value]) * length)
            else:
                with pytest.raises(GuestMemoryError):
                    mem.fill(addr, length, value)
            assert snapshot(mem) == model.snapshot()
    finally:
        mem.close()


@given(st.integers(1, 2 * PAGE), st.integers(1, 2 * PAGE))
@settings(max_examples=60, deadline=None)
def test_straddling_two_adjacent_regions(before, after):
    """Two regions back to back behave like one range; a read or write across the seam works."""
    mem = GuestMemory.anonymous([(0, 2 * PAGE), (2 * PAGE, 2 * PAGE)], hugepages=False)
    try:
        seam = 2 * PAGE
        data = payload_for(before + after)
        mem.write(seam - before, data)
        assert mem.read(seam - before, before + after) == data
        assert mem.regions[0]._view[seam - before:seam].tobytes() == data[:before]
        assert mem.regions[1]._view[:after].tobytes() == data[before:]
    finally:
        mem.close()


def test_write_straddling_a_hole_changes_nothing():
    mem = GuestMemory.anonymous([(0, PAGE), (2 * PAGE, PAGE)], hugepages=False)
    try:
        mem.fill(0, PAGE, 0x11)
        mem.fill(2 * PAGE, PAGE, 0x22)
        for addr, n in ((PAGE - 4, 8), (2 * PAGE - 4, 8), (PAGE - 1, PAGE + 2), (0, 3 * PAGE), (3 * PAGE - 2, 4)):
            with pytest.raises(GuestMemoryError):
                mem.write(addr, b"\xee" * n)
        for addr in (PAGE - 4, 2 * PAGE - 4, 3 * PAGE - 2):
            with pytest.raises(GuestMemoryError):
                mem.write_u64(addr, 0xEEEEEEEEEEEEEEEE)
        assert mem.read(0, PAGE) == b"\x11" * PAGE
        assert mem.read(2 * PAGE, PAGE) == b"\x22" * PAGE
    finally:
        mem.close()


def test_integers_are_little_endian_and_bounds_checked():
    mem = GuestMemory.anonymous([(0, PAGE)], hugepages=False)
    try:
        mem.write_u64(8, 0x0102030405060708)
        assert mem.read(8, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
        assert (mem.read_u8(8), mem.read_u16(8), mem.read_u32(8)) == (0x08, 0x0708, 0x05060708)
        mem.write_u8(0, 0xFF)
        mem.write_u16(2, 0xBEEF)
        mem.write_u32(4, 0xDEADBEEF)
        assert mem.read(0, 8) == bytes.fromhex("ff00efbeefbeadde")
        for n, rd, wr in ((2, mem.read_u16, mem.write_u16), (4, mem.read_u32, mem.write_u32),
                          (8, mem.read_u64, mem.write_u64)):
            assert rd(PAGE - n) == 0
            with pytest.raises(GuestMemoryError):
                rd(PAGE - n + 1)
            with pytest.raises(GuestMemoryError):
                wr(PAGE - n + 1, 0)
        with pytest.raises(GuestMemoryError):
            mem.read_u8(PAGE)
        with pytest.raises(struct.error):
            mem.write_u8(0, 256)  # struct.error: values must fit
    finally:
        mem.close()


def test_objects_and_non_byte_buffers():
    class Pair(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("a", ctypes.c_uint16), ("b", ctypes.c_uint32)]

    mem = GuestMemory.anonymous([(0, PAGE)], hugepages=False)
    try:
        mem.write_obj(0x10, Pair(0x1234, 0x89ABCDEF))
        assert mem.read(0x10, 6) == bytes.fromhex("3412efcdab89")
        p = mem.read_obj(0x10, Pair)
        assert (p.a, p.b) == (0x1234, 0x89ABCDEF)
        mem.write_obj(0x20, (ctypes.c_uint32 * 2)(1, 2))
        assert mem.read_u32(0x24) == 2
        mem.write(0x30, array.array("I", [0x11223344]))  # any buffer, as bytes
        assert mem.read(0x30, 4) == bytes.fromhex("44332211")
        mem.write(0x40, memoryview(b"abcdef")[2:4])
        assert mem.read(0x40, 2) == b"cd"
        with pytest.raises(GuestMemoryError):
            mem.write_obj(PAGE - 4, Pair())
        with pytest.raises(GuestMemoryError):
            mem.read_obj(PAGE - 4, Pair)
    finally:
        mem.close()


def test_zero_length_access_inside_ram():
    mem = GuestMemory.anonymous([(0, PAGE)], hugepages=False)
    try:
        assert mem.read(0x10, 0) == b""
        mem.write(0x10, b"")
        assert mem.check_range(PAGE, 0)
    finally:
        mem.close()


@pytest.mark.parametrize("addr,length", [(-1, 1), (0, -1), (U64 - 1, 2), (U64, 1), (1 << 70, 1), (PAGE, -PAGE)])
def test_wild_ranges_raise_guest_memory_error(addr, length):
    mem = GuestMemory.anonymous([(0, PAGE)], hugepages=False)
    try:
        assert not mem.check_range(addr, length)
        with pytest.raises(GuestMemoryError):
            mem.read(addr, length)
        with pytest.raises(GuestMemoryError):
            mem.fill(addr, length)
    finally:
        mem.close()


def test_region_at_the_top_of_the_address_space():
    top = U64 - PAGE
    mem = GuestMemory.anonymous([(top, PAGE)], hugepages=False)
    try:
        mem.write_u64(U64 - 8, 0xA5A5A5A5A5A5A5A5)
        assert mem.read_u64(U64 - 8) == 0xA5A5A5A5A5A5A5A5
        with pytest.raises(GuestMemoryError):
            mem.read(U64 - 8, 9)
        assert mem.end == U64 and mem.check_range(top, PAGE)
    finally:
        mem.close()


# -- scatter/gather views -------------------------------------------------------------------------
def model_split(model: Model, addr: int, length: int) -> list[int]:
    """Lengths of the per-region pieces of an in-RAM range (where views must be split)."""
    out, pos, end = [], addr, addr + length
    while pos < end:
        start, buf = next((s, b) for s, b in model.regions.items() if s <= pos < s + len(b))
        n = min(end, start + len(buf)) - pos
        out.append(n)
        pos += n
    return out


@MEM_SETTINGS
@given(st.data())
def test_views_cover_exactly_the_ranges(data):
    """views() succeeds exactly when every range is RAM; the views are exactly those bytes (split
    at region boundaries), writable, and writes through them land where the model says."""
    layout = data.draw(layouts())
    mem = GuestMemory.anonymous(layout, hugepages=False)
    model = Model(layout)
    try:
        for _ in range(data.draw(st.integers(1, 8))):
            ranges = data.draw(st.lists(accesses(layout), max_size=5))
            ok = all(model.inside(a, n) for a, n in ranges)
            before = snapshot(mem)
            if not ok:
                with pytest.raises(GuestMemoryError):
                    mem.views(ranges)
                assert snapshot(mem) == before
                continue
            if sum(n for _, n in ranges) > 16 * PAGE:
                continue  # huge (e.g. 2**64-byte) ranges cannot be inside these small layouts
            views = mem.views(iter(ranges))  # any iterable
            expected = [n for a, n in ranges for n in model_split(model, a, n)]
            assert [len(v) for v in views] == expected
            assert all(not v.readonly and v.format == "B" for v in views)
            assert b"".join(v.tobytes() for v in views) == b"".join(model.read(a, n) for a, n in ranges)
            # write a distinct pattern through the views, in order (later ranges win on overlap)
            seed = data.draw(st.integers(0, 255))
            flat = b"".join(model_split_payload(n, seed + i) for i, (_, n) in enumerate(ranges))
            pos = 0
            for v in views:
                v[:] = flat[pos:pos + len(v)]
                pos += len(v)
            pos = 0
            for a, n in ranges:
                model.write(a, flat[pos:pos + n])
                pos += n
            assert snapshot(mem) == model.snapshot()
            del views
    finally:
        mem.close()


def model_split_payload(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


def test_views_single_and_multi_region():
    mem = GuestMemory.anonymous([(0, 2 * PAGE), (2 * PAGE, PAGE), (4 * PAGE, PAGE)], hugepages=False)
    try:
        mem.write(0, payload_for(3 * PAGE))
        vs = mem.views([(10, 20), (2 * PAGE - 5, 10), (4 * PAGE, 0), (3 * PAGE - 1, 0), (4 * PAGE + 1, 7)])
        assert [len(v) for v in vs] == [20, 5, 5, 7]
        assert vs[0].tobytes() == payload_for(3 * PAGE)[10:30]
        assert b"".join(v.tobytes() for v in vs[1:3]) == payload_for(3 * PAGE)[2 * PAGE - 5:2 * PAGE + 5]
        vs[3][:] = b"ABCDEFG"
        assert mem.read(4 * PAGE, 9) == b"\0ABCDEFG\0"
        assert mem.views([]) == []
        for bad in ((3 * PAGE - 1, 2), (3 * PAGE, 1), (5 * PAGE - 1, 2), (-1, 1), (0, -1), (U64 - 1, 2)):
            with pytest.raises(GuestMemoryError):
                mem.views([(0, 1), bad])
    finally:
        mem.close()


@pytest.mark.parametrize("addr,length", [(-1, 1), (0, -1), (U64 - 1, 2), (U64, 1), (1 << 70, 1), (PAGE, -PAGE),
                                         (PAGE, 1), (PAGE - 1, 2), (0, PAGE + 1)])
def test_views_wild_ranges_raise(addr, length):
    mem = GuestMemory.anonymous([(0, PAGE)], hugepages=False)
    try:
        with pytest.raises(GuestMemoryError):
            mem.views([(addr, length)])
        assert [len(v) for v in mem.views([(0, PAGE), (PAGE, 0)])] == [PAGE]
    finally:
        mem.close()


def test_views_work_with_preadv_and_keep_the_mapping_alive(tmp_path):
    import os
    f = tmp_path / "f"
    f.write_bytes(payload_for(3 * PAGE))
    mem = GuestMemory.anonymous([(0, 2 * PAGE), (2 * PAGE, 2 * PAGE)], hugepages=False)
    fd = os.open(f, os.O_RDONLY)
    try:
        vs = mem.views([(PAGE, 2 * PAGE), (3 * PAGE + 8, 100)])
        assert len(vs) == 3
        assert os.preadv(fd, vs, 0) == 2 * PAGE + 100
        assert mem.read(PAGE, 2 * PAGE) == payload_for(3 * PAGE)[:2 * PAGE]
        assert mem.read(3 * PAGE + 8, 100) == payload_for(3 * PAGE)[2 * PAGE:2 * PAGE + 100]
    finally:
        os.close(fd)
        mem.close()  # a view still exists: the mapping must stay usable, not be unmapped
    vs[0][:4] = b"live"
    assert vs[0][:4].tobytes() == b"live"


@MEM_SETTINGS
@given(st.data())
def test_first_outside_matches_check_range(data):
    layout = data.draw(layouts())
    mem = GuestMemory.anonymous(layout, hugepages=False)
    model = Model(layout)
    try:
        ranges = data.draw(st.lists(accesses(layout), max_size=6))
        bad = [r for r in ranges if not model.inside(*r)]
        assert mem.first_outside(ranges) == (bad[0] if bad else None)
        assert mem.first_outside(iter(ranges)) == (bad[0] if bad else None)
    finally:
        mem.close()


@MEM_SETTINGS
@given(st.data())
def test_descs_inside_matches_check_range(data):
    """descs_inside (all descriptors at once, as integer lanes) agrees with check_range on each
    buffer when RAM is one region, and says False for several."""
    layout = data.draw(layouts())
    mem = GuestMemory.anonymous(layout, hugepages=False)
    model = Model(layout)
    try:
        ranges = data.draw(st.lists(accesses(layout), min_size=1, max_size=8))
        # as descriptors: u64 address and u32 length, so wrap what does not fit (as a driver would)
        ranges = [(a % (1 << 64), n % (1 << 32)) for a, n in ranges]
        table = b"".join(struct.pack("<QIHH", a, n, data.draw(st.integers(0, 0xFFFF)),
                                     data.draw(st.integers(0, 0xFFFF))) for a, n in ranges)
        start, end = layout[0][0], layout[0][0] + layout[0][1]
        # an empty buffer passes only if its address is in [start, end] (False sends the caller
        # to the one-by-one check, which ignores empty buffers)
        inside = all(model.inside(a, n) and (n or start <= a <= end) for a, n in ranges)
        assert mem.descs_inside(table) is (inside and len(layout) == 1)
        assert mem.descs_inside(table[:-1]) is False  # not whole descriptors
    finally:
        mem.close()


def test_descs_inside_edges():
    mem = GuestMemory.anonymous([(0x10000, 4 * PAGE)], hugepages=False)
    end = 0x10000 + 4 * PAGE
    pack = lambda *ranges: b"".join(struct.pack("<QIHH", a, n, 1, 0) for a, n in ranges)  # noqa: E731
    try:
        assert mem.descs_inside(pack((0x10000, 4 * PAGE))) is True
        assert mem.descs_inside(pack((end - 1, 1), (0x10000, 0), (end, 0))) is True
        assert mem.descs_inside(pack((end - 1, 2))) is False
        assert mem.descs_inside(pack((0xFFFF, 1))) is False
        assert mem.descs_inside(pack((0x10000, 1), (U64 - 1, 0xFFFF_FFFF))) is False
        assert mem.descs_inside(pack(*[(0x10000 + i, PAGE) for i in range(1024)])) is True
        assert mem.descs_inside(b"") is False
    finally:
        mem.close()


def test_preadv_pwritev_scatter_gather(tmp_path):
    import os as _os

    from hypyr.memory import GuestMemory as _GM
    from hypyr.memory import GuestMemoryError as _GME
    mem = _GM.anonymous([(0, 1 << 16)], hugepages=False)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    fd = _os.open(path, _os.O_RDWR)
    try:
        ranges = [(0x1000, 100), (0x3000, 412), (0xFF00, 256)]
        assert mem.preadv(fd, ranges, 10) == 768
        data = (bytes(range(256)) * 64)[10:10 + 768]
        assert mem.read(0x1000, 100) + mem.read(0x3000, 412) + mem.read(0xFF00, 256) == data
        assert mem.read(0x1000 + 100, 1) == b"\0"  # nothing beyond the ranges
        mem.write(0x2000, b"x" * 300)
        assert mem.pwritev(fd, [(0x2000, 300)], 5000) == 300
        assert path.read_bytes()[5000:5300] == b"x" * 300
        assert mem.preadv(fd, [], 0) == 0
        for bad in ([(0xFF00, 257)], [(0x1000, 10), (-1, 5)], [(1 << 16, 1)], [(0x1000, -1)]):
            with pytest.raises(_GME):
                mem.preadv(fd, bad, 0)
            with pytest.raises(_GME):
                mem.pwritev(fd, bad, 0)
        assert mem.preadv(fd, [(0x1000, 100)], 1 << 20) == 0  # end of file
        with pytest.raises(OSError):
            mem.preadv(-1, [(0x1000, 100)], 0)
    finally:
        _os.close(fd)


def test_preadv_across_regions(tmp_path):
    import os as _os

    from hypyr.memory import GuestMemory as _GM
    from hypyr.memory import GuestMemoryError as _GME
    mem = _GM.anonymous([(0, 0x2000), (0x2000, 0x2000), (0x8000, 0x1000)], hugepages=False)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    fd = _os.open(path, _os.O_RDWR)
    try:
        assert mem.preadv(fd, [(0x1F00, 0x200), (0x8000, 16)], 0) == 0x210
        assert mem.read(0x1F00, 0x200) + mem.read(0x8000, 16) == (bytes(range(256)) * 64)[:0x210]
        with pytest.raises(_GME):
            mem.preadv(fd, [(0x3F00, 0x200)], 0)  # runs into the hole
    finally:
        _os.close(fd)


# -- I/O straight from virtqueue descriptor tables -----------------------------------------------
import os  # noqa: E402
import struct  # noqa: E402


def _descs(bufs):
    """An array('I') of 16-byte virtqueue descriptors for (addr, length) pairs (flags/next set,
    as a driver would: preadv_descs must ignore them)."""
    raw = b"".join(struct.pack("<QIHH", a, n, 3, i + 1) for i, (a, n) in enumerate(bufs))
    return array.array("I", raw)


def test_ram_host_address_is_guest_address_modulo_4_gib():
    for start in (0, 1 << 20, 5 << 30):
        r = GuestRegion(start, 1 << 20)
        try:
            assert (r.host_address() - start) % (1 << 32) == 0
            assert r.guarded
        finally:
            r.close()


def test_preadv_pwritev_descs(tmp_path):
    mem = GuestMemory.anonymous([(0, 1 << 20)], hugepages=False)
    path = tmp_path / "img"
    data = bytes(range(256)) * 64  # 16 KiB
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        bufs = [(0x1000, 16), (0x8000, 4096), (0x3000, 100), (0x20000, 4096 - 100), (0x5000, 1)]
        table = _descs(bufs)
        before = bytes(table)
        assert mem.preadv_descs(fd, table, 1, 3, 512) == 8192
        assert bytes(table) == before  # the caller's table is not changed
        got = mem.read(0x8000, 4096) + mem.read(0x3000, 100) + mem.read(0x20000, 3996)
        assert got == data[512:512 + 8192]
        assert mem.read(0x1000, 16) == bytes(16) and mem.read(0x5000, 1) == b"\0"  # not touched
        mem.write(0x8000, b"\xAA" * 4096)
        assert mem.pwritev_descs(fd, table, 1, 1, 0) == 4096
        assert path.read_bytes()[:4096] == b"\xAA" * 4096
    finally:
        os.close(fd)
        mem.close()


def test_descs_path_declines_what_it_cannot_do(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR)
    mem = GuestMemory.anonymous([(0, 1 << 20)], hugepages=False)
    high = GuestMemory.anonymous([(1 << 20, 1 << 20)], hugepages=False)  # RAM not at 0
    try:
        assert mem.preadv_descs(fd, _descs([(1 << 32, 16)]), 0, 1, 0) is None   # an address >= 4 GiB
        assert mem.preadv_descs(fd, _descs([(0, 16)] * 1025), 0, 1025, 0) is None  # > IOV_MAX
        assert mem.preadv_descs(fd, _descs([(0, 16)]), 0, 2, 0) is None          # past the table
        assert high.preadv_descs(fd, _descs([(1 << 20, 16)]), 0, 1, 0) is None
    finally:
        os.close(fd)
        mem.close()
        high.close()


def test_descs_outside_ram_fault_in_the_guard_and_touch_nothing(tmp_path):
    """Unchecked buffers beyond RAM (the caller's bug) land in the PROT_NONE guard: the kernel
    refuses them (EFAULT or a short count) and no byte outside guest RAM is read or written."""
    path = tmp_path / "img"
    path.write_bytes(b"\x55" * 8192)
    fd = os.open(path, os.O_RDWR)
    size = 1 << 20
    mem = GuestMemory.anonymous([(0, size)], hugepages=False)
    try:
        for bufs in ([(size, 4096)], [(size - 100, 4096)], [(0xFFFFF000, 4096)], [(size + (1 << 30), 8)]):
            try:
                r = mem.preadv_descs(fd, _descs(bufs), 0, 1, 0)
            except OSError as e:
                assert e.errno == 14  # EFAULT
            else:
                assert r is not None and r < sum(n for _, n in bufs)
            try:
                w = mem.pwritev_descs(fd, _descs(bufs), 0, 1, 0)
            except OSError as e:
                assert e.errno == 14
            else:
                assert w is not None and w < sum(n for _, n in bufs)
        assert os.path.getsize(path) == 8192
    finally:
        os.close(fd)
        mem.close()


# -- close(): guest RAM goes at once, whoever still holds views ------------------------------------
ODD = 3 * PAGE * 37  # a mapping size nothing else in this process has


def odd_mappings() -> int:
    """How many mappings of exactly ODD bytes this process has."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            n += hi - lo == ODD
    return n


class Holder:
    """A device keeping a ring view, in a reference cycle (as a virtqueue and its transport)."""

    def __init__(self, view):
        self.view, self.me = view, self


def test_close_unmaps_while_lent_views_are_held_and_gc_is_off():
    import gc
    gc.disable()
    try:
        holders = []
        for _ in range(5):
            mem = GuestMemory.anonymous([(0, ODD)], hugepages=False)
            mem.write(PAGE, b"ring")
            holders.append(Holder(mem.view(PAGE, 64)))
            assert odd_mappings() == 1
            mem.close()
            assert odd_mappings() == 0
        for h in holders:  # a late access through a released view is an exception, not a crash
            with pytest.raises(ValueError):
                h.view[:4].tobytes()
    finally:
        gc.enable()


def test_closed_memory_refuses_every_access(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    mem = GuestMemory.anonymous([(0, 2 * PAGE)], hugepages=False)
    mem.close()
    try:
        for access in (lambda: mem.read(0, 4), lambda: mem.write(0, b"x"), lambda: mem.fill(0, 4),
                       lambda: mem.read_u64(8), lambda: mem.write_u32(0, 1), lambda: mem.view(0, 4),
                       lambda: mem.views([(0, 4)]), lambda: mem.preadv(fd, [(0, 4)], 0),
                       lambda: mem.pwritev(fd, [(0, 4)], 0)):
            with pytest.raises(GuestMemoryClosedError):
                access()
        assert not mem.check_range(0, 4) and mem.first_outside([(0, 4)]) == (0, 4)
        assert not mem.descs_inside(bytes(_descs([(0, 4)])))
        assert mem.preadv_descs(fd, _descs([(0, 4)]), 0, 1, 0) is None
        mem.close()  # idempotent
    finally:
        os.close(fd)


def test_dropped_lent_views_are_forgotten():
    mem = GuestMemory.anonymous([(0, 2 * PAGE)], hugepages=False)
    try:
        kept = [mem.view(0, 16) for _ in range(3)]
        for i in range(1000):  # a driver resetting and re-activating its queues again and again
            v = mem.view(PAGE, 16)
            if i % 2:
                v.release()
        del v
        assert len(mem.regions[0]._lent) <= 5  # the three kept, the last two lent (not 1000)
        assert all(any(k is v for v, _, _ in mem.regions[0]._lent) for k in kept)
    finally:
        mem.close()
    with pytest.raises(ValueError):
        kept[0].tobytes()


def wait_in_readv(t: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while True:  # /proc/.../syscall starts with the number of the call it is blocked in (x86-64 readv: 19)
        with open(f"/proc/self/task/{t.native_id}/syscall") as f:
            if f.read().split()[0] == "19":
                return
        assert time.monotonic() < deadline, "the reader never blocked in readv()"
        time.sleep(0.01)


def test_a_view_in_use_keeps_the_mapping_until_it_goes():
    """A view exported to a system call in progress cannot be released: close() gives the RAM
    back at once, and the address range goes when the call returns and the view is dropped."""
    r, w = os.pipe()
    mem = GuestMemory.anonymous([(0, ODD)], hugepages=False)
    mem.write(0, b"old data")
    done = []

    def reader():
        view = mem.view(0, 8)
        done.append(os.readv(r, [view]))
        done.append(view.tobytes())

    t = threading.Thread(target=reader)
    try:
        t.start()
        wait_in_readv(t)
        mem.close()
        assert odd_mappings() == 1
        os.write(w, b"late")
        t.join(10)
        assert done == [4, b"late\0\0\0\0"]  # it landed in given-back (zeroed) RAM
        assert odd_mappings() == 0
    finally:
        os.close(r)
        os.close(w)
