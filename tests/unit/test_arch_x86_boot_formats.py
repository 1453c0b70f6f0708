"""Kernel format detection, the multiboot loader and information structure, PVH's
hvm_start_info, and the bzImage payload extractor; hostile images give one sentence."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from pathlib import Path

import bootkernels as K
import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_arch_x86_loader import make_bzimage, make_elf

from hypyr.arch.x86 import bootparams, elf, layout, loader, multiboot, pvh, vmlinux
from hypyr.arch.x86.boot import setup_linux_boot
from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

MiB = layout.MiB
MB_HDR_OFF = 0x200


def mb_header(flags=0x3, aout=(0, 0, 0, 0, 0)):
    hdr = struct.pack("<III", multiboot.HEADER_MAGIC, flags, -(multiboot.HEADER_MAGIC + flags) & 0xFFFFFFFF)
    return hdr + struct.pack("<5I", *aout) if flags & multiboot.HF_AOUT_KLUDGE else hdr


def elf32(segments, entry, *, flags=0x3, machine=3, header=True):
    """An ELF32 with ``segments`` [(paddr, vaddr, data, memsz)], data from file offset 0x1000, and a
    multiboot header at MB_HDR_OFF."""
    ehdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, 52, 0, 0, 52, 32, len(segments), 40, 0, 0)
    phdrs, blobs, off = b"", b"", 0x1000
    for paddr, vaddr, data, memsz in segments:
        phdrs += struct.pack("<8I", 1, off, vaddr, paddr, len(data), memsz, 7, 0x1000)
        blobs += data
        off += len(data)
    head = bytearray((ehdr + phdrs).ljust(0x1000, b"\0"))
    if header:
        h = mb_header(flags)
        head[MB_HDR_OFF:MB_HDR_OFF + len(h)] = h
    return bytes(head) + blobs


def aout(load=2 * MiB, hdr_off=0x40, body=0x1000, load_end=None, bss_end=None, entry=None, header_addr=None):
    """A raw a.out-kludge image: ``body`` bytes loaded at ``load``, its header at file offset ``hdr_off``."""
    img = bytearray(b"\x90" * body)
    fields = (load + hdr_off if header_addr is None else header_addr, load,
              load + body if load_end is None else load_end, load + 2 * body if bss_end is None else bss_end,
              load + 0x100 if entry is None else entry)
    h = mb_header(0x10003, fields)
    img[hdr_off:hdr_off + len(h)] = h
    return bytes(img)


def pvh_elf64(entry=16 * MiB + 0x40, desc_size=4):
    """An ELF64 vmlinux-like image at 16 MiB whose PVH note is only in a SHT_NOTE section (no PT_NOTE;
    bootkernels.pvh_elf has the PT_NOTE form)."""
    note = struct.pack("<III", 4, desc_size, pvh.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + \
        entry.to_bytes(desc_size, "little")
    base = make_elf([(16 * MiB, 0xFFFFFFFF81000000, b"\x90" * 256, 0x3000)], 0xFFFFFFFF81000000)
    data = bytearray(base.ljust(0x800, b"\0") + note)
    shoff = len(data)
    data += bytes(64) + struct.pack("<IIQQQQIIQQ", 0, elf.SHT_NOTE, 0, 0, 0x800, len(note), 0, 0, 4, 0)
    struct.pack_into("<Q", data, 40, shoff)
    struct.pack_into("<HHH", data, 58, 64, 2, 0)
    return bytes(data)


# -- detection --------------------------------------------------------------------------------------
def test_detect_format():
    assert loader.detect_format(make_bzimage()) == loader.KIND_BZIMAGE
    assert loader.detect_format(make_elf([(16 * MiB, 16 * MiB, b"x", 1)], 16 * MiB)) == loader.KIND_ELF
    assert loader.detect_format(K.pvh_elf()) == loader.KIND_PVH
    assert loader.detect_format(pvh_elf64()) == loader.KIND_PVH
    assert loader.detect_format(K.multiboot_elf()) == loader.KIND_MULTIBOOT
    assert loader.detect_format(K.multiboot_aout()) == loader.KIND_MULTIBOOT
    elf64_mb = bytearray(make_elf([(16 * MiB, 16 * MiB, b"x" * 0x400, 0x400)], 16 * MiB))
    elf64_mb[0x100:0x10C] = mb_header()
    assert loader.detect_format(bytes(elf64_mb)) == loader.KIND_MULTIBOOT  # ELF64 without a PVH note
    assert loader.detect_format(os.urandom(4096)) == loader.KIND_BZIMAGE      # left to the bzImage error
    # an ELF32 with a PVH note: PVH, unless it also has a multiboot header (Xen itself): then multiboot
    note = struct.pack("<III", 4, 4, pvh.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack("<I", 2 * MiB)
    for header, kind in ((False, loader.KIND_PVH), (True, loader.KIND_MULTIBOOT)):
        img = bytearray(elf32([(2 * MiB, 2 * MiB, b"\x90" * 16, 16)], 2 * MiB, header=header) + note)
        struct.pack_into("<8I", img, 52 + 32, elf.PT_NOTE, len(img) - len(note), 0, 0, len(note), len(note), 4, 4)
        struct.pack_into("<H", img, 44, 2)
        assert loader.detect_format(bytes(img)) == kind


def test_multiboot_header_search_rules():
    good = mb_header()
    assert multiboot.find_header(bytes(0x100) + good).offset == 0x100
    assert multiboot.find_header(bytes(0x101) + good) is None                 # not 4-byte aligned
    assert multiboot.find_header(bytes(8192) + good) is None                  # past the first 8 KiB
    bad = bytearray(good)
    bad[8] ^= 1
    assert multiboot.find_header(bytes(bad)) is None                          # checksum
    assert multiboot.find_header(bytes(0x104) + bytes(bad) + good).offset == 0x104 + 12


# -- the multiboot information structure -------------------------------------------------------------
def test_build_info_layout():
    e820 = [bootparams.E820Entry(0, 0x9FC00, 1), bootparams.E820Entry(0x100000, 63 * MiB, 1)]
    mods = [multiboot.Module(0x200000, 0x200005, "/m/a"), multiboot.Module(0x201000, 0x201000, "/m/b x y")]
    base = 0x10000
    info = multiboot.build_info(base, mem_lower=639, mem_upper=63 * 1024, cmdline_addr=0x20000, modules=mods,
                                e820=e820)

    def u32(addr):
        return struct.unpack_from("<I", info, addr - base)[0]

    def cstr(addr):
        off = addr - base
        return info[off:info.index(b"\0", off)].decode()

    assert u32(base) == 0x1 | 0x4 | 0x8 | 0x40 | 0x200
    assert (u32(base + 4), u32(base + 8), u32(base + 16)) == (639, 63 * 1024, 0x20000)
    assert u32(base + 20) == 2
    mods_addr, mmap_len, mmap_addr = u32(base + 24), u32(base + 44), u32(base + 48)
    assert mmap_len == 2 * 24 and mmap_addr == base + multiboot.INFO_SIZE
    assert struct.unpack_from("<IQQI", info, mmap_addr - base + 24) == (20, 0x100000, 63 * MiB, 1)
    assert mods_addr == mmap_addr + mmap_len
    m0 = struct.unpack_from("<IIII", info, mods_addr - base)
    m1 = struct.unpack_from("<IIII", info, mods_addr - base + 16)
    assert m0[:2] == (0x200000, 0x200005) and m0[3] == 0 and cstr(m0[2]) == "/m/a"
    assert m1[:2] == (0x201000, 0x201000) and cstr(m1[2]) == "/m/b x y"
    assert cstr(u32(base + 64)) == "hypyr"
    assert u32(base + 12) == 0 and info[28:44] == bytes(16)   # no boot device, no symbols


def test_multiboot_setup(write):
    m = GuestMemory.anonymous(layout.ram_layout(64 * MiB), hugepages=False)
    try:
        k = write(K.multiboot_elf(), "mb.elf")
        s = setup_linux_boot(m, k, b"initrd!", "a b", 2, modules=[(b"MOD2", "x=1")])
        cpu = s.cpu
        assert s.kernel.kind == "multiboot" and cpu.regs.rip == K.MB_ENTRY
        assert cpu.regs.rax == 0x2BADB002 and cpu.regs.rbx == layout.BOOT_INFO_ADDR
        assert cpu.regs.rflags == 0x2                                      # interrupts off
        sr = cpu.sregs
        assert sr.cr0 & 1 and not sr.cr0 & (1 << 31) and sr.cr4 == 0 and sr.efer == 0
        assert sr.cs.db and not sr.cs.l and sr.cs.limit == 0xFFFFFFFF and sr.cs.base == 0 and sr.cs.type == 0xB
        assert all(seg.db and seg.limit == 0xFFFFFFFF and seg.type == 3 for seg in (sr.ds, sr.es, sr.ss))
        assert sr.tr.type == 0xB and sr.tr.limit == 0x67 and not sr.tr.s
        assert m.read(K.BASE, len(K.MULTIBOOT_BODY))[32:] == K.MULTIBOOT_BODY[32:]
        info = layout.BOOT_INFO_ADDR
        assert m.read_u32(info + 4) == 639 and m.read_u32(info + 8) == 63 * 1024
        cmd = m.read_u32(info + 16)
        assert m.read(cmd, len(str(k)) + 5) == f"{k} a b".encode() + b"\0"
        assert m.read_u32(info + 20) == 2
        mods = m.read_u32(info + 24)
        start0, end0, str0 = m.read_u32(mods), m.read_u32(mods + 4), m.read_u32(mods + 8)
        start1, end1, str1 = m.read_u32(mods + 16), m.read_u32(mods + 20), m.read_u32(mods + 24)
        assert start0 % 4096 == 0 and start0 >= K.BSS_END and m.read(start0, end0 - start0) == b"initrd!"
        assert start1 % 4096 == 0 and start1 >= end0 and m.read(start1, end1 - start1) == b"MOD2"
        assert m.read(str0, 7) == b"module\0" and m.read(str1, 11) == b"module x=1\0"
        assert m.read_u32(info + 44) == 24 * len(s.e820)
        assert s.initrd == (start0, 7)
        assert m.read(layout.GDT_ADDR + 0x10, 8) == struct.pack("<Q", 0x00CF9B000000FFFF)  # 32-bit code
    finally:
        m.close()


def test_multiboot_memory_sizes_for_a_big_guest(write):
    big = GuestMemory.anonymous(layout.ram_layout(5 * layout.GiB), hugepages=False)
    try:
        assert multiboot.memory_sizes(big) == (639, (layout.MMIO_HOLE_START - MiB) // 1024)
        s = setup_linux_boot(big, write(K.multiboot_elf()), b"m", "", 1)
        n = big.read_u32(layout.BOOT_INFO_ADDR + 44) // 24
        mmap = big.read_u32(layout.BOOT_INFO_ADDR + 48)
        entries = [struct.unpack("<IQQI", big.read(mmap + 24 * i, 24)) for i in range(n)]
        assert (20, layout.FOUR_GIB, 5 * layout.GiB - layout.MMIO_HOLE_START, 1) in entries   # RAM above 4 GiB
        assert s.initrd[0] + 1 <= layout.MMIO_HOLE_START
    finally:
        big.close()


def test_modules_for_a_linux_kernel_are_refused(mem, write):
    with pytest.raises(HypyrError, match="not a multiboot one"):
        setup_linux_boot(mem, write(make_bzimage()), None, "", 1, modules=[(b"x", "")])


# -- hostile multiboot images ----------------------------------------------------------------------
HOSTILE = [
    (elf32([(2 * MiB, 2 * MiB, b"a" * 0x2000, 0x2000), (2 * MiB + 0x1000, 2 * MiB + 0x1000, b"b", 0x10)],
           2 * MiB), "overlapping"),
    (elf32([(0x8000, 0x8000, b"a", 1)], 0x8000), "below 1 MiB"),
    (elf32([(60 * MiB, 60 * MiB, b"a", 16 * MiB)], 60 * MiB), "too small"),
    (elf32([(2 * MiB, 2 * MiB, b"a", 0xFFFFFFFF)], 2 * MiB), "too small|beyond"),
    (elf32([(0xFFFFF000, 0xFFFFF000, b"a", 0x2000)], 0xFFFFF000), "beyond the 4 GiB"),
    (elf32([(2 * MiB, 2 * MiB, b"a", 1)], 3 * MiB), "entry point"),
    (elf32([], 2 * MiB), "no loadable segments"),
    (elf32([(2 * MiB, 2 * MiB, b"a", 1)], 2 * MiB, machine=40), "not an x86"),
    (elf32([(2 * MiB, 2 * MiB, b"a", 1)], 2 * MiB, flags=0x3 | 0x8), "requires multiboot features"),
    (elf32([(2 * MiB, 2 * MiB, b"abcd", 2)], 2 * MiB), "file size is larger"),
    (elf32([(2 * MiB, 2 * MiB, b"abcd", 4)], 2 * MiB)[:-2], "truncated"),
    (aout(header_addr=2 * MiB - 0x10), "below its load_addr"),
    (aout(hdr_off=0x40, header_addr=2 * MiB + 0x1000), "before the start of the file"),
    (aout(load_end=2 * MiB - 1), "load_end_addr"),
    (aout(load_end=2 * MiB + 0x100000), "truncated"),
    (aout(bss_end=2 * MiB + 0x10), "bss_end_addr"),
    (aout(bss_end=0xFFFFFFF0), "too small"),
    (aout(entry=2 * MiB + 0x5000), "entry_addr"),
    (aout(load=0x1000), "below 1 MiB"),
    (bytes(0x100) + mb_header(), "not an ELF file and does not give"),
    (bytes(4) + mb_header(0x10003)[:20], "cut short"),
]


@pytest.mark.parametrize("data,why", HOSTILE, ids=[w for _, w in HOSTILE])
def test_hostile_multiboot_images_are_one_sentence(mem, write, data, why):
    path = write(data, "hostile.mb")
    assert loader.detect_format(data) == loader.KIND_MULTIBOOT
    with pytest.raises(HypyrError, match=why) as e:
        setup_linux_boot(mem, path, None, "", 1)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_multiboot_module_limits(mem, write):
    k = write(K.multiboot_elf())
    with pytest.raises(HypyrError, match="does not fit in guest memory"):
        setup_linux_boot(mem, k, bytes(63 * MiB), "", 1)
    with pytest.raises(HypyrError, match="too many"):
        setup_linux_boot(mem, k, None, "", 1, modules=[(b"m", "")] * 300)
    with pytest.raises(HypyrError, match="room for"):
        setup_linux_boot(mem, k, None, "", 1, modules=[(b"m", "x" * 1000)] * 100)
    with pytest.raises(HypyrError, match="Cannot read module"):
        setup_linux_boot(mem, k, None, "", 1, modules=[("/nonexistent/mod", "")])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([K.multiboot_elf(), K.multiboot_aout(), K.pvh_elf()]),
       st.lists(st.tuples(st.integers(0, 0x1100), st.integers(0, 255)), max_size=8))
def test_mutated_boot_images_never_crash(tmp_path, image, flips):
    data = bytearray(image)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    p = tmp_path / "fuzzed"
    p.write_bytes(bytes(data))
    m = GuestMemory.anonymous(layout.ram_layout(16 * MiB), hugepages=False)
    try:
        setup_linux_boot(m, p, b"initrd", "", 1, modules=[])
    except HypyrError as e:
        assert "\n" not in str(e)
    finally:
        m.close()


# -- PVH --------------------------------------------------------------------------------------------
def test_start_info_layout():
    e820 = [bootparams.E820Entry(0, 0x9FC00, 1), bootparams.E820Entry(0x9FC00, 0x400, 2)]
    info = pvh.build_start_info(0x10000, cmdline_addr=0x20000, modules=[(0x3000000, 1234, 0)], e820=e820,
                                rsdp_addr=0xE0000)
    assert pvh.START_INFO_SIZE == 56 and pvh.MODLIST_ENTRY_SIZE == 32 and pvh.MEMMAP_ENTRY_SIZE == 24
    assert len(info) == 56 + 32 + 2 * 24
    magic, version, flags, nr, modlist, cmdline, rsdp, memmap, entries, rsvd = struct.unpack_from(
        "<IIIIQQQQII", info)
    assert (magic, version, flags, nr) == (0x336EC578, 1, 0, 1)
    assert (modlist, cmdline, rsdp, memmap, entries, rsvd) == (0x10038, 0x20000, 0xE0000, 0x10058, 2, 0)
    assert struct.unpack_from("<QQQQ", info, 56) == (0x3000000, 1234, 0, 0)
    assert struct.unpack_from("<QQII", info, 88 + 24) == (0x9FC00, 0x400, 2, 0)
    empty = pvh.build_start_info(0x10000, cmdline_addr=0x20000, modules=[], e820=e820, rsdp_addr=0)
    assert struct.unpack_from("<IIIIQ", empty)[3:] == (0, 0)


def test_pvh_note_forms():
    assert pvh.phys32_entry(elf.parse(K.pvh_elf(), "k")) == K.BASE
    assert pvh.phys32_entry(elf.parse(pvh_elf64(desc_size=8), "k")) == 16 * MiB + 0x40
    assert pvh.phys32_entry(elf.parse(make_elf([(16 * MiB, 16 * MiB, b"x", 1)], 16 * MiB), "k")) is None


def test_pvh_setup(write):
    m = GuestMemory.anonymous(layout.ram_layout(64 * MiB), hugepages=False)
    try:
        s = setup_linux_boot(m, write(K.pvh_elf()), b"the initrd", "console=ttyS0", 2)
        assert s.kernel.kind == "pvh" and s.cpu.regs.rip == K.BASE and s.cpu.regs.rbx == layout.BOOT_INFO_ADDR
        assert s.cpu.sregs.cr0 == 0x11 and s.cpu.sregs.cr4 == 0 and s.cpu.sregs.efer == 0
        assert s.cpu.sregs.cs.db and s.cpu.sregs.tr.limit == 0x67 and s.cpu.regs.rflags == 0x2
        si = layout.BOOT_INFO_ADDR
        assert m.read_u32(si) == 0x336EC578 and m.read_u32(si + 4) == 1 and m.read_u32(si + 12) == 1
        assert m.read(m.read_u64(si + 24), 14) == b"console=ttyS0\0"
        assert m.read_u64(si + 32) == 0xE0000
        modlist = m.read_u64(si + 16)
        addr, size = m.read_u64(modlist), m.read_u64(modlist + 8)
        assert (addr, size) == (s.initrd[0], 10) and m.read(addr, size) == b"the initrd"
        memmap, n = m.read_u64(si + 40), m.read_u32(si + 48)
        assert n == len(s.e820) and n >= 3
        got = [struct.unpack("<QQII", m.read(memmap + 24 * i, 24)) for i in range(n)]
        assert got == [(e.addr, e.size, e.type, 0) for e in s.e820]
        assert m.read(K.BASE, len(K.PVH_BODY)) == K.PVH_BODY
        assert m.read(K.BASE + len(K.PVH_BODY), 64) == bytes(64)    # bss zeroed
    finally:
        m.close()


def test_pvh_entry_outside_the_image_is_refused(mem, write):
    with pytest.raises(HypyrError, match="PVH entry point 0x5000000 outside"):
        setup_linux_boot(mem, write(K.pvh_elf(entry=0x5000000)), None, "", 1)


# -- vmlinux inside a bzImage -----------------------------------------------------------------------
VMLINUX = make_elf([(16 * MiB, 16 * MiB, b"\x90" * 100, 100)], 16 * MiB) + b"tail" * 1000


def bzimage_with(payload: bytes, offset=0x40) -> bytes:
    img = bytearray(make_bzimage(payload=bytes(offset) + payload + struct.pack("<I", len(VMLINUX))))
    struct.pack_into("<II", img, 0x248, offset, len(payload) + 4)
    return bytes(img)


def zstd_piped(data: bytes) -> bytes:
    """As the kernel's build compresses: through a pipe, so the frame does not say its size."""
    z = zstandard.ZstdCompressor().compressobj()
    return z.compress(data) + z.flush()


def lz4_legacy(data: bytes, block: int = 4096) -> bytes:
    """The kernel's legacy lz4 format (`lz4 -l`): the magic, then (u32 size, lz4 block) pairs."""
    out = bytearray(vmlinux.LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), block):
        b = lz4.block.compress(data[i:i + block], store_size=False)
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress, bz2.compress,
                                      lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE), zstd_piped, lz4_legacy],
                         ids=["gzip", "xz", "bzip2", "lzma", "zstd", "lz4"])
def test_vmlinux_extraction(compress):
    assert vmlinux.extract(bzimage_with(compress(VMLINUX))) == VMLINUX


@pytest.mark.parametrize("payload,why", [
    (b"\x28\xb5\x2f\xfd" + bytes(20), "corrupt zstd"),
    (zstd_piped(VMLINUX)[:-30], "corrupt zstd"),
    (b"\x02\x21\x4c\x18" + bytes(20), "corrupt lz4"),
    (lz4_legacy(VMLINUX)[:-30], "corrupt lz4"),
    (b"\x89LZO" + bytes(20), "lzo"),
    (b"NOPE" * 5, "unknown compression"),
    (gzip.compress(VMLINUX)[:-30], "corrupt gzip"),
    (gzip.compress(b"not an elf"), "not an ELF"),
], ids=["zstd", "zstd-truncated", "lz4", "lz4-truncated", "lzo", "unknown", "truncated", "not-elf"])
def test_vmlinux_extraction_errors(payload, why):
    with pytest.raises(HypyrError, match=why) as e:
        vmlinux.extract(bzimage_with(payload), "k.bz")
    assert "k.bz" in str(e.value)


@pytest.mark.parametrize("compress", [gzip.compress, zstd_piped, lz4_legacy], ids=["gzip", "zstd", "lz4"])
def test_vmlinux_decompression_is_bounded(compress, monkeypatch):
    monkeypatch.setattr(vmlinux, "MAX_VMLINUX_SIZE", len(VMLINUX) // 2)
    with pytest.raises(HypyrError, match="decompresses to more than"):
        vmlinux.extract(bzimage_with(compress(VMLINUX)))


def test_vmlinux_payload_outside_the_file():
    img = bytearray(bzimage_with(gzip.compress(VMLINUX)))
    struct.pack_into("<I", img, 0x24C, 1 << 30)
    with pytest.raises(HypyrError, match="outside the file"):
        vmlinux.extract(bytes(img))
    with pytest.raises(HypyrError, match="not a bzImage"):
        vmlinux.extract(os.urandom(1024))


LAB_KERNEL = Path(os.environ.get("HYPYR_LAB_DIR", Path.home() / ".cache/hypyr/lab")) / "vmlinuz"


@pytest.mark.skipif(not LAB_KERNEL.is_file(), reason=f"no lab kernel at {LAB_KERNEL}")
def test_debian_generic_vmlinux_has_a_pvh_note():
    """Debian's generic kernel (XZ) holds an x86-64 vmlinux with CONFIG_PVH's note."""
    name, _ = vmlinux.payload(LAB_KERNEL.read_bytes())
    data = vmlinux.extract_file(LAB_KERNEL)
    img = elf.parse(data, str(LAB_KERNEL))
    assert name == "xz" and img.bits == 64 and img.machine == elf.EM_X86_64
    entry = pvh.phys32_entry(img)
    assert entry is not None and any(s.paddr <= entry < s.end for s in img.segments)
    assert loader.detect_format(data) == loader.KIND_PVH


# -- hypyr run's options for a multiboot kernel -------------------------------------------------------
def _run_args(*argv):
    from hypyr.cli import build_parser
    return build_parser().parse_args(["run", *argv])


def test_cli_multiboot_modules(write):
    from hypyr.cli.run import _multiboot_modules
    mb, linux = str(write(K.multiboot_elf(), "mb.elf")), str(write(make_bzimage(), "bz"))
    args = _run_args("--kernel", mb, "--module", "/m/c,x=1,y", "--module", "/m/d")
    assert _multiboot_modules(args, mb, "/m/a,/m/b") == [("/m/a", ""), ("/m/b", ""), ("/m/c", "x=1,y"),
                                                          ("/m/d", "")]
    assert _multiboot_modules(_run_args("--kernel", linux), linux, "/i,/j") is None  # a Linux initrd path
    with pytest.raises(HypyrError, match="only for multiboot"):
        _multiboot_modules(_run_args("--kernel", linux, "--module", "/m"), linux, None)
    with pytest.raises(HypyrError, match="empty path"):
        _multiboot_modules(_run_args("--kernel", mb), mb, "/a,,/b")
    with pytest.raises(HypyrError, match="--rootfs needs"):
        _multiboot_modules(_run_args("--kernel", mb, "--rootfs", "/r.ext4"), mb, None)
    assert _multiboot_modules(_run_args("--kernel", "/nonexistent"), "/nonexistent", None) is None
