import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypyr.arch.x86 import gdt, layout, paging, regs
from hypyr.memory import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 16 * layout.MiB)], hugepages=False)
    yield m
    m.close()


def test_page_tables_identity_map_4gib(mem):
    cr3 = paging.write_page_tables(mem)
    assert cr3 == layout.PML4_ADDR == 0x9000
    assert mem.read_u64(0x9000) == 0xA000 | 0x3
    assert mem.read_u64(0x9008) == 0
    for i in range(4):
        assert mem.read_u64(0xA000 + 8 * i) == (0xB000 + 0x1000 * i) | 0x3
    assert mem.read_u64(0xA000 + 8 * 4) == 0
    assert mem.read_u64(0xB000) == 0x83
    assert mem.read_u64(0xB008) == 0x200000 | 0x83
    assert mem.read_u64(0xE000 + 511 * 8) == (4 * layout.GiB - 2 * layout.MiB) | 0x83


@given(st.integers(min_value=0, max_value=4 * layout.GiB - 1))
def test_page_table_walk_is_identity(addr):
    tables = paging.page_table_entries()

    def entry(table, idx):
        return struct.unpack_from("<Q", tables[table], idx * 8)[0]

    pml4e = entry(layout.PML4_ADDR, (addr >> 39) & 511)
    assert pml4e & 1
    pdpte = entry(pml4e & ~0xFFF, (addr >> 30) & 511)
    assert pdpte & 1 and not pdpte & 0x80
    pde = entry(pdpte & ~0xFFF, (addr >> 21) & 511)
    assert pde & 0x81 == 0x81
    assert (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (addr & 0x1FFFFF) == addr


@given(base=st.integers(0, 0xFFFFFFFF), limit=st.integers(0, 0xFFFFF),
       access=st.integers(0, 0xFF).filter(lambda a: a & 0x10), hi=st.integers(0, 0xF))
def test_descriptor_round_trip(base, limit, access, hi):
    flags = hi << 12 | access
    seg = gdt.decode_descriptor(gdt.encode_descriptor(base, limit, flags), 0x28)
    assert seg.base == base and seg.selector == 0x28
    assert seg.limit == ((limit << 12) | 0xFFF if hi & 8 else limit)
    assert seg.type == access & 0xF and seg.s
    assert seg.present == bool(access & 0x80) and seg.dpl == (access >> 5) & 3
    assert (seg.avl, seg.l, seg.db, seg.g) == tuple(bool(hi & b) for b in (1, 2, 4, 8))


@given(base=st.integers(0, (1 << 64) - 1), limit=st.integers(0, 0xFFFFF))
def test_system_descriptor_round_trip(base, limit):
    raw = gdt.encode_system_descriptor(base, limit, gdt.TSS_FLAGS)
    assert len(raw) == 16
    seg = gdt.decode_descriptor(raw)
    assert (seg.base, seg.limit, seg.type, seg.s, seg.present) == (base, limit, 0xB, False, True)


def test_known_encodings():
    assert gdt.encode_descriptor(0, 0xFFFFF, 0xA09B) == struct.pack("<Q", 0x00AF9B000000FFFF)
    assert gdt.encode_descriptor(0, 0xFFFFF, 0xC093) == struct.pack("<Q", 0x00CF93000000FFFF)
    assert gdt.CODE64_FLAGS == 0xA09B and gdt.DATA_FLAGS == 0xC093


def test_write_gdt(mem):
    table = gdt.write_gdt(mem)
    assert (table.base, table.limit) == (0x500, 47)
    raw = mem.read(0x500, 48)
    assert raw[:16] == bytes(16)
    cs = gdt.segment_for(raw, 0x10)
    ds = gdt.segment_for(raw, 0x18)
    assert cs.l and not cs.db and cs.type == 0xB and cs.limit == 0xFFFFFFFF and cs.present
    assert ds.db and ds.type == 0x3 and ds.limit == 0xFFFFFFFF and ds.base == 0
    tr = gdt.segment_for(raw, 0x20)
    assert tr.type == 0xB and not tr.s and tr.limit == 0x67
    assert mem.read(layout.IDT_ADDR, 16) == bytes(16)


def test_boot_cpu_state():
    st_ = regs.boot_cpu_state(0x1000200)
    s, r = st_.sregs, st_.regs
    assert s.cr0 == 0x80010033  # PE MP ET NE WP PG
    assert s.cr3 == 0x9000
    assert s.cr4 & (1 << 5)
    assert s.efer == 0x500
    assert s.cs.selector == 0x10 and s.cs.l
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert seg.selector == 0x18 and seg.type == 3
    assert s.ds is not s.es  # independent objects the VMM may mutate
    assert s.tr.selector == 0x20 and s.tr.type == 0xB
    assert (s.gdt.base, s.gdt.limit) == (0x500, 47)
    assert s.idt.base == layout.IDT_ADDR
    assert r.rip == 0x1000200 and type(r.rip) is int
    assert r.rsi == 0x7000 and r.rflags == 2 and r.rsp == 0x8FF0
