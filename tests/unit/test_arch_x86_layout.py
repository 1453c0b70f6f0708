import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.arch.x86 import bootparams as bp
from hypyr.arch.x86 import layout
from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

MiB, GiB = layout.MiB, layout.GiB


@pytest.fixture
def mem_of():
    made = []

    def make(size):
        m = GuestMemory.anonymous(layout.ram_layout(size), hugepages=False)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_ram_layout_small():
    assert layout.ram_layout(256 * MiB) == [(0, 256 * MiB)]
    assert layout.ram_layout(layout.MMIO_HOLE_START) == [(0, layout.MMIO_HOLE_START)]


def test_ram_layout_splits_around_hole():
    assert layout.ram_layout(5 * GiB) == [(0, 0xD000_0000), (4 * GiB, 5 * GiB - 0xD000_0000)]


@pytest.mark.parametrize("size", [0, 4096, 3 * MiB + 1])
def test_ram_layout_rejects_bad_sizes(size):
    with pytest.raises(HypyrError):
        layout.ram_layout(size)


@given(st.integers(min_value=512, max_value=(64 * GiB) // 4096))
def test_ram_layout_total_and_no_hole_overlap(pages):
    regions = layout.ram_layout(pages * 4096)
    assert sum(s for _, s in regions) == pages * 4096
    for start, size in regions:
        assert start + size <= layout.MMIO_HOLE_START or start >= layout.MMIO_HOLE_END


def test_layout_structures_do_not_overlap():
    spans = [
        (layout.GDT_ADDR, layout.GDT_ADDR + layout.GDT_MAX_ENTRIES * 8),
        (layout.IDT_ADDR, layout.IDT_ADDR + 16),
        (layout.BOOT_PARAMS_ADDR, layout.BOOT_PARAMS_ADDR + 4096),
        (layout.BOOT_STACK_POINTER - 0x1000 + 0x10, layout.BOOT_STACK_POINTER + 0x10),
        (layout.PML4_ADDR, layout.PAGE_TABLES_END),
        (layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + layout.CMDLINE_MAX_SIZE),
        (layout.ACPI_AREA_START, layout.ACPI_AREA_END),
    ]
    spans.sort()
    for (_a0, a1), (b0, _b1) in itertools.pairwise(spans):
        assert a1 <= b0, (hex(a1), hex(b0))
    assert spans[-1][1] <= layout.HIGH_MEMORY_START


def test_e820_256mib(mem_of):
    e = bp.e820_map(mem_of(256 * MiB))
    assert [(x.addr, x.size, x.type) for x in e] == [
        (0, 0x9FC00, bp.E820_RAM),
        (0x9FC00, 0x400, bp.E820_RESERVED),
        (0xE0000, 0x20000, bp.E820_RESERVED),
        (0x100000, 256 * MiB - 0x100000, bp.E820_RAM),
    ]


def test_e820_5gib(mem_of):
    e = bp.e820_map(mem_of(5 * GiB))
    assert [(x.addr, x.size, x.type) for x in e] == [
        (0, 0x9FC00, bp.E820_RAM),
        (0x9FC00, 0x400, bp.E820_RESERVED),
        (0xE0000, 0x20000, bp.E820_RESERVED),
        (0x100000, 0xD000_0000 - 0x100000, bp.E820_RAM),
        (4 * GiB, 5 * GiB - 0xD000_0000, bp.E820_RAM),
    ]


def _params(mem, **kw):
    args = dict(cmdline_addr=0x20000, initrd=(0x0FB3B000, 0x4C4B40), e820=bp.e820_map(mem), rsdp_addr=0xE0000)
    args.update(kw)
    return bp.build_boot_params(bp.default_setup_header(), **args)


def test_boot_params_fields(mem_of):
    mem = mem_of(5 * GiB)
    p = _params(mem)
    assert len(p) == 4096
    u8 = lambda o: p[o]  # noqa: E731
    u16 = lambda o: struct.unpack_from("<H", p, o)[0]  # noqa: E731
    u32 = lambda o: struct.unpack_from("<I", p, o)[0]  # noqa: E731
    u64 = lambda o: struct.unpack_from("<Q", p, o)[0]  # noqa: E731
    assert p[0x202:0x206] == b"HdrS"
    assert u16(0x1FE) == 0xAA55
    assert u16(0x206) == 0x020F
    assert u8(0x210) == 0xFF  # type_of_loader
    assert u8(0x211) & bp.CAN_USE_HEAP
    assert u16(0x224) == 0xDE00
    assert u32(0x228) == 0x20000 and u32(0x0C8) == 0
    assert u32(0x218) == 0x0FB3B000 and u32(0x21C) == 0x4C4B40
    assert u32(0x0C0) == 0 and u32(0x0C4) == 0
    assert u64(0x070) == 0xE0000
    assert u32(0x23C) == 0  # hardware_subarch
    assert u8(0x1E8) == 5
    entries = [struct.unpack_from("<QQI", p, 0x2D0 + 20 * i) for i in range(5)]
    assert entries[-1] == (4 * GiB, 5 * GiB - 0xD000_0000, 1)
    assert entries[0] == (0, 0x9FC00, 1)
    assert p[0x2D0 + 20 * 5:0x2D0 + 20 * 128] == bytes(20 * 123)


def test_boot_params_high_addresses_use_ext_fields(mem_of):
    p = _params(mem_of(16 * MiB), cmdline_addr=0x1_2345_6000, initrd=(0x2_0000_1000, 0x1_0000_0004))
    assert struct.unpack_from("<I", p, 0x228)[0] == 0x2345_6000
    assert struct.unpack_from("<I", p, 0x0C8)[0] == 1
    assert struct.unpack_from("<II", p, 0x218) == (0x1000, 4)
    assert struct.unpack_from("<II", p, 0x0C0) == (2, 1)


def test_boot_params_too_many_e820_entries():
    with pytest.raises(HypyrError):
        bp.build_boot_params(bp.default_setup_header(), cmdline_addr=0, initrd=None,
                             e820=[bp.E820Entry(i * 4096, 4096, 1) for i in range(129)], rsdp_addr=None)


def test_boot_params_keep_kernel_header_bytes():
    hdr = bytearray(bp.default_setup_header())
    hdr[0x260 - 0x1F1:0x264 - 0x1F1] = struct.pack("<I", 0x1234567)  # init_size
    hdr[0x211 - 0x1F1] = bp.LOADED_HIGH
    p = bp.build_boot_params(bytes(hdr), cmdline_addr=0x20000, initrd=None, e820=[], rsdp_addr=None)
    assert struct.unpack_from("<I", p, 0x260)[0] == 0x1234567
    assert p[0x211] == bp.LOADED_HIGH | bp.CAN_USE_HEAP
    assert p[0x1EF] == 0  # sentinel untouched


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=512, max_value=(8 * GiB) // 4096))
def test_e820_covers_exactly_ram(pages):
    regions = layout.ram_layout(pages * 4096)

    class FakeRegion:
        def __init__(self, s, n):
            self.start, self.end = s, s + n

    class FakeMem:
        pass

    m = FakeMem()
    m.regions = [FakeRegion(s, n) for s, n in regions]
    e = bp.e820_map(m)
    ram = sum(x.size for x in e if x.type == bp.E820_RAM)
    assert ram == pages * 4096 - (layout.HIGH_MEMORY_START - layout.EBDA_START)
    for a, b in itertools.pairwise(e):
        assert a.end <= b.addr
