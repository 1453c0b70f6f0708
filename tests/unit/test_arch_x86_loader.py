import glob
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.arch.x86 import bootparams as bp
from hypyr.arch.x86 import layout, loader
from hypyr.arch.x86.boot import setup_linux_boot
from hypyr.arch.x86.bootfile import BootFile
from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

MiB = layout.MiB


def make_bzimage(*, setup_sects=4, version=0x020F, pref=16 * MiB, init_size=4 * MiB, payload=b"\x90" * 4096,
                 xloadflags=bp.XLF_KERNEL_64, cmdline_size=2047, initrd_max=0x7FFFFFFF, magic=b"HdrS"):
    img = bytearray((max(setup_sects, 1) if setup_sects else 4) * 512 + 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<I", img, 0x1F4, (len(payload) + 15) // 16)
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x26C - 0x202
    img[0x202:0x206] = magic
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = bp.LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, initrd_max)
    struct.pack_into("<I", img, 0x230, 2 * MiB)
    img[0x234] = 1
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, cmdline_size)
    struct.pack_into("<Q", img, 0x258, pref)
    struct.pack_into("<I", img, 0x260, init_size)
    payload = payload.ljust((len(payload) + 15) // 16 * 16, b"\0")
    return bytes(img) + payload


def make_elf(segments, entry):
    """segments: list of (paddr, vaddr, data, memsz)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, len(segments), 64, 0, 0)
    phdrs, blobs, off = b"", b"", data_off
    for paddr, vaddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 0x1000)
        blobs += data
        off += len(data)
    return ehdr + phdrs + blobs


@pytest.mark.parametrize("setup_sects", [0, 4, 27])
def test_bzimage_loads_at_pref_address(mem, write, setup_sects):
    payload = bytes(range(256)) * 40
    k = loader.load_kernel(mem, write(make_bzimage(setup_sects=setup_sects, payload=payload)))
    assert k.kind == "bzImage"
    assert k.load_addr == 16 * MiB and k.entry == 16 * MiB + 0x200
    assert k.end == 20 * MiB
    assert mem.read(16 * MiB, len(payload)) == payload
    assert k.protocol_version == 0x020F and k.cmdline_size == 2047 and k.initrd_addr_max == 0x7FFFFFFF
    assert k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    assert len(k.setup_header) == 0x26C - 0x1F1


def test_bzimage_without_pref_address_loads_at_1mib(mem, write):
    k = loader.load_kernel(mem, write(make_bzimage(pref=0)))
    assert (k.load_addr, k.entry) == (0x100000, 0x100200)


@pytest.mark.parametrize("data,why", [
    (b"", "not a bzImage"),
    (b"\0" * 100, "not a bzImage"),
    (os.urandom(8192), "not a bzImage"),
    (make_bzimage(magic=b"HdrX"), "not a bzImage"),
    (make_bzimage(version=0x0204), "not a bzImage"),
    (make_bzimage(version=0x020A), "too old"),
    (make_bzimage(xloadflags=0), "64-bit"),
    (make_bzimage()[:0x220], "not a bzImage|too old"),
    (make_bzimage()[:3000], "truncated"),
    (make_bzimage(payload=b"x" * 10000)[:-100], "truncated"),
    (b"\x7fELF" + b"\0" * 60, "ELF"),
    (make_elf([], 0), "no loadable"),
])
def test_bad_kernels_name_the_file(mem, write, data, why):
    path = write(data, "bad-kernel.img")
    with pytest.raises(HypyrError, match=why) as e:
        loader.load_kernel(mem, path)
    assert str(path) in str(e.value)


def test_missing_kernel_file(mem, tmp_path):
    with pytest.raises(HypyrError, match="nope"):
        loader.load_kernel(mem, tmp_path / "nope")


def test_memory_too_small(write):
    small = GuestMemory.anonymous(layout.ram_layout(16 * MiB), hugepages=False)
    try:
        path = write(make_bzimage())
        with pytest.raises(HypyrError, match="too small") as e:
            loader.load_kernel(small, path)
        assert str(path) in str(e.value)
    finally:
        small.close()


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_give_hypyr_error(tmp_path_factory, data):
    m = GuestMemory.anonymous([(0, 2 * MiB)], hugepages=False)
    p = tmp_path_factory.mktemp("k") / "k"
    p.write_bytes(data)
    try:
        with pytest.raises(HypyrError):
            loader.load_kernel(m, p)
    finally:
        m.close()


def test_elf_kernel(mem, write):
    text = b"\xf4" * 300
    path = write(make_elf([(16 * MiB, 0xFFFFFFFF81000000, text, 0x2000),
                           (17 * MiB, 0xFFFFFFFF81100000, b"D" * 10, 10)], 16 * MiB + 0x40))
    mem.fill(16 * MiB, 0x2000, 0xAA)
    k = loader.load_kernel(mem, path)
    assert k.kind == "elf"
    assert k.entry == 16 * MiB + 0x40 and k.load_addr == 16 * MiB
    assert k.end == 17 * MiB + 0x1000
    assert mem.read(16 * MiB, 300) == text
    assert mem.read(16 * MiB + 300, 0x2000 - 300) == bytes(0x2000 - 300)  # bss zeroed
    assert mem.read(17 * MiB, 10) == b"D" * 10
    assert k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    assert k.protocol_version == 0x020F


def test_elf_virtual_entry_is_translated(mem, write):
    path = write(make_elf([(16 * MiB, 0xFFFFFFFF81000000, b"\x90" * 16, 16)], 0xFFFFFFFF81000008))
    assert loader.load_kernel(mem, path).entry == 16 * MiB + 8


def test_elf_wrong_machine(mem, write):
    data = bytearray(make_elf([(16 * MiB, 16 * MiB, b"x", 1)], 16 * MiB))
    struct.pack_into("<H", data, 18, 3)  # EM_386
    with pytest.raises(HypyrError, match="x86-64"):
        loader.load_kernel(mem, write(bytes(data)))


def test_elf_outside_ram(mem, write):
    with pytest.raises(HypyrError, match="too small"):
        loader.load_kernel(mem, write(make_elf([(128 * MiB, 128 * MiB, b"x", 1)], 128 * MiB)))


def test_initrd_placement(mem, write):
    k = loader.load_kernel(mem, write(make_bzimage()))
    data = b"initrd!" * 1000
    addr, size = loader.load_initrd(mem, data, k)
    assert size == len(data) and addr % 4096 == 0
    assert addr >= k.end and addr + size <= 64 * MiB
    assert 64 * MiB - (addr + size) < 4096  # as high as possible
    assert mem.read(addr, size) == data


def test_initrd_respects_initrd_addr_max(mem, write):
    k = loader.load_kernel(mem, write(make_bzimage(initrd_max=32 * MiB - 1)))
    addr, size = loader.load_initrd(mem, b"x" * 5000, k)
    assert addr + size <= 32 * MiB and addr == 32 * MiB - 8192


def test_initrd_from_path(mem, write):
    k = loader.load_kernel(mem, write(make_bzimage()))
    addr, size = loader.load_initrd(mem, write(b"abc", "initrd.img"), k)
    assert mem.read(addr, 3) == b"abc" and size == 3


def test_a_file_that_shrinks_while_it_loads_is_one_sentence(mem, write, monkeypatch):
    """Kernel code and initrd go from the file straight into guest memory: a file shorter than
    its size said when it was opened fails the boot in one sentence, not with a half-loaded guest."""
    big = make_bzimage(payload=b"\x90" * 8192)
    kernel = write(big)
    real_fstat = os.fstat

    class Grown:
        def __init__(self, st):
            self.st_size, self.st_mode = st.st_size + 4096, st.st_mode

    monkeypatch.setattr(loader.os, "fstat", lambda fd: Grown(real_fstat(fd)))
    with pytest.raises(HypyrError, match=r"kernel .* shrank while it was being loaded"):
        loader.load_kernel(mem, kernel)
    monkeypatch.undo()
    k = loader.load_kernel(mem, kernel)
    monkeypatch.setattr(loader.os, "fstat", lambda fd: Grown(real_fstat(fd)))
    with pytest.raises(HypyrError, match=r"initrd .*initrd.img shrank"):
        loader.load_initrd(mem, write(b"abc" * 1000, "initrd.img"), k)


def test_a_big_initrd_from_a_file_arrives_whole(mem, write):
    k = loader.load_kernel(mem, write(make_bzimage()))
    data = os.urandom(3 * MiB + 123)
    addr, size = loader.load_initrd(mem, write(data, "initrd.img"), k)
    assert size == len(data) and mem.read(addr, size) == data


def test_initrd_too_big(mem, write):
    k = loader.load_kernel(mem, write(make_bzimage()))
    with pytest.raises(HypyrError, match="does not fit"):
        loader.load_initrd(mem, b"x" * (45 * MiB), k)


def test_initrd_errors(mem, write, tmp_path):
    k = loader.load_kernel(mem, write(make_bzimage()))
    with pytest.raises(HypyrError, match="empty"):
        loader.load_initrd(mem, b"", k)
    with pytest.raises(HypyrError, match=r"missing.img"):
        loader.load_initrd(mem, tmp_path / "missing.img", k)


def test_initrd_stays_below_hole_for_big_guests(write):
    big = GuestMemory.anonymous(layout.ram_layout(5 * layout.GiB), hugepages=False)
    try:
        k = loader.load_kernel(big, write(make_bzimage(initrd_max=0xFFFFFFFF)))
        addr, size = loader.load_initrd(big, b"x" * 10000, k)
        assert addr + size <= layout.MMIO_HOLE_START and addr % 4096 == 0
    finally:
        big.close()


def test_cmdline(mem):
    addr = loader.write_cmdline(mem, "console=ttyS0 quiet", 2047)
    assert addr == 0x20000
    assert mem.read(0x20000, 20) == b"console=ttyS0 quiet\0"
    loader.write_cmdline(mem, "x" * 2047, 2047)
    assert mem.read_u8(0x20000 + 2047) == 0


def test_cmdline_too_long(mem):
    with pytest.raises(HypyrError, match=r"2048 bytes.*at most 2047"):
        loader.write_cmdline(mem, "x" * 2048, 2047)
    with pytest.raises(HypyrError, match="NUL"):
        loader.write_cmdline(mem, "a\0b", 2047)


def test_setup_linux_boot_synthetic(write):
    m = GuestMemory.anonymous(layout.ram_layout(64 * MiB), hugepages=False)
    try:
        s = setup_linux_boot(m, write(make_bzimage()), b"ramdisk", "console=ttyS0", 2)
        assert s.cpu.regs.rip == 16 * MiB + 0x200 and s.cpu.regs.rsi == 0x7000
        assert s.rsdp_addr == 0xE0000 and m.read(0xE0000, 8) == b"RSD PTR "
        assert m.read(0x7202, 4) == b"HdrS"
        assert m.read_u32(0x7228) == 0x20000
        assert m.read_u32(0x7218) == s.initrd[0] and m.read_u32(0x721C) == 7
        assert m.read_u64(0x7070) == 0xE0000
        assert m.read_u8(0x71E8) == len(s.e820) == 4
        assert m.read_u64(0x9000) == 0xA003
        assert m.read(0x500 + 0x10, 8) == struct.pack("<Q", 0x00AF9B000000FFFF)
    finally:
        m.close()


def _real_kernels():
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    if os.environ.get("HYPYR_TEST_KERNEL"):
        found.insert(0, os.environ["HYPYR_TEST_KERNEL"])
    return [p for p in found if os.access(p, os.R_OK)][:1]


@pytest.mark.skipif(not _real_kernels(), reason="no /boot/vmlinuz-* (or $HYPYR_TEST_KERNEL) on this machine")
def test_real_kernel():
    path = _real_kernels()[0]
    m = GuestMemory.anonymous(layout.ram_layout(512 * MiB), hugepages=False)
    try:
        s = setup_linux_boot(m, path, b"\0" * 4096, "console=ttyS0", 4)
        k = s.kernel
        assert k.kind == "bzImage" and k.protocol_version >= 0x020C
        assert k.entry == k.load_addr + 0x200 and k.load_addr % (2 * MiB) == 0
        assert k.end > k.load_addr and s.initrd[0] >= k.end
        assert m.read(0x7202, 4) == b"HdrS" and m.read_u8(0x7210) == 0xFF
    finally:
        m.close()


def test_kernel_below_1mib_rejected(mem, write):
    with pytest.raises(HypyrError, match="below 1 MiB"):
        loader.load_kernel(mem, write(make_elf([(0x7000, 0x7000, b"x", 1)], 0x7000)))
    with pytest.raises(HypyrError, match="below 1 MiB"):
        loader.load_kernel(mem, write(make_bzimage(pref=0x10000)))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600), start=st.integers(-700, 700), stop=st.integers(-700, 700) | st.none())
def test_boot_file_slices_as_bytes_do(tmp_path_factory, data, start, stop):
    p = tmp_path_factory.mktemp("f") / "k"
    p.write_bytes(data)
    with BootFile(p, "kernel") as f:
        assert len(f) == len(data)
        assert f[start:stop] == data[start:stop]


def test_boot_file_that_shrinks_is_one_sentence(tmp_path, mem):
    p = tmp_path / "k"
    p.write_bytes(b"x" * 8192)
    with BootFile(p, "kernel") as f:
        os.truncate(p, 100)
        with pytest.raises(HypyrError, match="shrank"):
            f[0:4096]
        with pytest.raises(HypyrError, match="shrank"):
            f.copy_to(mem, 16 * MiB, 0, 8192)


def test_elf_kernel_is_read_where_used_not_whole(mem, write, monkeypatch):
    """A vmlinux is parsed from small reads and its segment copied straight into guest RAM."""
    text = bytes(range(256)) * 4096  # 1 MiB
    path = write(make_elf([(16 * MiB, 0xFFFFFFFF81000000, text, len(text))], 16 * MiB))
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    k = loader.load_kernel(mem, path)
    assert k.kind == "elf" and mem.read(16 * MiB, len(text)) == text
    assert reads and max(reads) <= 4096, reads


def test_elf_note_area_is_bounded(mem, write):
    data = bytearray(make_elf([(16 * MiB, 16 * MiB, b"\xf4", 1)], 16 * MiB))
    phoff = struct.unpack_from("<Q", data, 32)[0]
    # turn the program header into a PT_NOTE that claims 2 MiB (the file is padded to hold it)
    struct.pack_into("<IIQQQQQQ", data, phoff, 4, 0, 0, 0, 0, 2 * MiB, 2 * MiB, 4)
    data += bytes(2 * MiB)
    from hypyr.arch.x86 import elf
    with pytest.raises(HypyrError, match="note area"):
        elf.parse(bytes(data), "k")
