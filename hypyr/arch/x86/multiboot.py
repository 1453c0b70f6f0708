"""Multiboot (version 1) kernels, loaded as QEMU's ``-kernel`` and GRUB load them.

A multiboot kernel carries a header (magic 0x1BADB002, flags, checksum) 4-byte aligned in
its first 8 KiB.  It is an ELF file whose PT_LOAD segments are loaded at their physical
addresses, or, when header flag 16 is set (the "a.out kludge"), any image whose header
says where it goes: ``header_addr``, ``load_addr``, ``load_end_addr``, ``bss_end_addr``,
``entry_addr`` (flag 16 wins over ELF, as in GRUB and QEMU).

hypyr writes the multiboot information structure at :data:`layout.BOOT_INFO_ADDR` (memory
sizes, command line, modules, e820 memory map, boot loader name) and enters the kernel in
32-bit protected mode with paging off: EAX = 0x2BADB002, EBX = the structure's address.
As with QEMU and GRUB legacy, the command line starts with the kernel's path and each
module's string with the module's path.  See docs/boot.md.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

from hypyr import preopened
from hypyr.errors import HypyrError
from hypyr.memory import GuestAddress, GuestMemory

from . import elf, layout
from .bootfile import KernelData, cannot_read
from .bootparams import E820Entry

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192  # the header lies in the first 8 KiB
HEADER_ALIGN = 4

# header flags: bits 0-15 are requirements a loader must honour or refuse, 16-31 optional
HF_PAGE_ALIGN = 1 << 0  # modules 4 KiB aligned (hypyr always aligns them)
HF_MEMORY_INFO = 1 << 1  # mem_* and mmap_* must be provided (always are)
HF_VIDEO_MODE = 1 << 2  # a preferred video mode; hypyr has no framebuffer and gives none
HF_AOUT_KLUDGE = 1 << 16  # the address fields are valid
HF_KNOWN_REQUIRED = HF_PAGE_ALIGN | HF_MEMORY_INFO | HF_VIDEO_MODE

# multiboot_info.flags
MBI_MEMORY = 1 << 0
MBI_BOOTDEV = 1 << 1
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MEM_MAP = 1 << 6
MBI_BOOT_LOADER_NAME = 1 << 9

# offsets in struct multiboot_info
OFF_FLAGS = 0
OFF_MEM_LOWER = 4
OFF_MEM_UPPER = 8
OFF_CMDLINE = 16
OFF_MODS_COUNT = 20
OFF_MODS_ADDR = 24
OFF_MMAP_LENGTH = 44
OFF_MMAP_ADDR = 48
OFF_BOOT_LOADER_NAME = 64
INFO_SIZE = 120  # through the framebuffer fields (116 bytes), rounded up to 8
MODULE_SIZE = 16  # mod_start, mod_end, string, reserved
MMAP_ENTRY_SIZE = 24  # size (=20, not counting itself), base_addr, length, type

BOOT_LOADER_NAME = "hypyr"
MAX_MODULES = 256


class Header(NamedTuple):
    offset: int  # in the file
    flags: int
    # the a.out-kludge fields (valid when flags has HF_AOUT_KLUDGE)
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


class Module(NamedTuple):
    """A module as loaded: its guest range and its string."""
    start: int
    end: int  # first byte after it (mod_end)
    string: str


def find_header(data: KernelData) -> Header | None:
    """The first valid multiboot header (magic and checksum) in ``data``'s first 8 KiB."""
    head = data[:SEARCH_LIMIT + 32]   # a header starting in the window may end past it
    window = head[:SEARCH_LIMIT]
    pos = window.find(struct.pack("<I", HEADER_MAGIC))
    while pos >= 0:
        if pos % HEADER_ALIGN == 0 and pos + 12 <= len(window):
            magic, flags, checksum = struct.unpack_from("<III", window, pos)
            if (magic + flags + checksum) & 0xFFFFFFFF == 0:
                fields = (0, 0, 0, 0, 0)
                if flags & HF_AOUT_KLUDGE and pos + 32 <= len(head):
                    fields = struct.unpack_from("<5I", head, pos + 12)
                return Header(pos, flags, *fields)
        pos = window.find(struct.pack("<I", HEADER_MAGIC), pos + 1)
    return None


def _aout_segments(data: KernelData, h: Header, path: str) -> tuple[list[elf.Segment], int]:
    if h.offset + 32 > len(data):
        raise elf.fail(path, "has a multiboot header cut short before its address fields")
    if h.header_addr < h.load_addr:
        raise elf.fail(path, f"has a multiboot header_addr {h.header_addr:#x} below its load_addr {h.load_addr:#x}")
    file_off = h.offset - (h.header_addr - h.load_addr)
    if file_off < 0:
        raise elf.fail(path, "has a multiboot load_addr before the start of the file")
    load_end = h.load_end_addr or h.load_addr + (len(data) - file_off)
    if load_end < h.load_addr:
        raise elf.fail(path, f"has a multiboot load_end_addr {load_end:#x} below its load_addr {h.load_addr:#x}")
    filesz = load_end - h.load_addr
    if file_off + filesz > len(data):
        raise elf.fail(path, "is truncated (its multiboot header says it is longer than the file)")
    bss_end = h.bss_end_addr or load_end
    if bss_end < load_end:
        raise elf.fail(path, f"has a multiboot bss_end_addr {bss_end:#x} below its load_end_addr {load_end:#x}")
    if bss_end == h.load_addr:
        raise elf.fail(path, "has nothing to load (its multiboot load_addr equals its end)")
    seg = elf.Segment(h.load_addr, h.load_addr, file_off, filesz, bss_end - h.load_addr)
    if not seg.paddr <= h.entry_addr < seg.end:
        raise elf.fail(path, f"has multiboot entry_addr {h.entry_addr:#x} outside {seg.paddr:#x}-{seg.end:#x}")
    return [seg], h.entry_addr


def image_layout(data: KernelData, path: str) -> tuple[Header, list[elf.Segment], int]:
    """The header, the segments to load and the physical entry point of a multiboot kernel."""
    h = find_header(data)
    if h is None:
        raise elf.fail(path, "has no multiboot header in its first 8 KiB")
    unknown = h.flags & 0xFFFF & ~HF_KNOWN_REQUIRED
    if unknown:
        raise elf.fail(path, f"requires multiboot features hypyr does not provide (header flags {unknown:#x})")
    if h.flags & HF_AOUT_KLUDGE:
        segments, entry = _aout_segments(data, h, path)
    elif elf.is_elf(data):
        img = elf.parse(data, path)
        if img.machine not in (elf.EM_386, elf.EM_X86_64):
            raise elf.fail(path, "is a multiboot ELF file but not an x86 one")
        segments = list(img.segments)
        if not segments:
            raise elf.fail(path, "has no loadable segments")
        entry = elf.physical_entry(path, img.entry, segments)
    else:
        raise elf.fail(path, "has a multiboot header but is not an ELF file and does not give its load "
                             "addresses (header flag 16, the a.out kludge)")
    if entry >= layout.FOUR_GIB:
        raise elf.fail(path, f"has entry point {entry:#x} above 4 GiB")
    return h, segments, entry


def memory_sizes(mem: GuestMemory) -> tuple[int, int]:
    """(mem_lower, mem_upper) in KiB: RAM below the EBDA, and contiguous RAM from 1 MiB."""
    low = next((r for r in mem.regions if r.contains(layout.HIGH_MEMORY_START)), None)
    upper_end = min(int(low.end), layout.MMIO_HOLE_START) if low is not None else layout.HIGH_MEMORY_START
    return layout.EBDA_START // layout.KiB, (upper_end - layout.HIGH_MEMORY_START) // layout.KiB


def build_info(base: int, *, mem_lower: int, mem_upper: int, cmdline_addr: int | None,
               modules: Sequence[Module], e820: Sequence[E820Entry],
               boot_loader_name: str = BOOT_LOADER_NAME) -> bytes:
    """The multiboot information structure at guest address ``base``, followed by the memory
    map, the module list and the strings it points to (modules' strings and the loader name)."""
    mmap_off = INFO_SIZE
    mods_off = mmap_off + MMAP_ENTRY_SIZE * len(e820)
    strings_off = mods_off + MODULE_SIZE * len(modules)
    strings = bytearray()

    def add_string(s: str) -> int:
        raw = s.encode()
        if b"\0" in raw:
            raise HypyrError(f"A multiboot string contains a NUL character: {s!r}.")
        addr = base + strings_off + len(strings)
        strings.extend(raw + b"\0")
        return addr

    info = bytearray(INFO_SIZE)
    flags = MBI_MEMORY | MBI_MEM_MAP | MBI_BOOT_LOADER_NAME | MBI_MODS
    struct.pack_into("<II", info, OFF_MEM_LOWER, mem_lower, mem_upper)
    if cmdline_addr is not None:
        flags |= MBI_CMDLINE
        struct.pack_into("<I", info, OFF_CMDLINE, cmdline_addr)
    struct.pack_into("<II", info, OFF_MODS_COUNT, len(modules), base + mods_off)
    struct.pack_into("<II", info, OFF_MMAP_LENGTH, MMAP_ENTRY_SIZE * len(e820), base + mmap_off)
    struct.pack_into("<I", info, OFF_BOOT_LOADER_NAME, add_string(boot_loader_name))
    struct.pack_into("<I", info, OFF_FLAGS, flags)
    mmap = b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, e.addr, e.size, e.type) for e in e820)
    mods = b"".join(struct.pack("<IIII", m.start, m.end, add_string(m.string), 0) for m in modules)
    return bytes(info) + mmap + mods + bytes(strings)


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return preopened.read_bytes(path)
    except OSError as e:
        raise cannot_read(path, what, e) from None


def load_modules(mem: GuestMemory, modules: Sequence[tuple[bytes | str | os.PathLike, str]],
                 after: int) -> list[Module]:
    """Load each ``(data or path, string)`` page-aligned, one after the other, from ``after``
    up; the string given is the module's whole string (the caller puts the path first)."""
    if len(modules) > MAX_MODULES:
        raise HypyrError(f"{len(modules)} multiboot modules are too many; hypyr loads at most {MAX_MODULES}.")
    low = next((r for r in mem.regions if r.contains(layout.HIGH_MEMORY_START)), None)
    ceiling = min(int(low.end) if low else 0, layout.MMIO_HOLE_START, layout.FOUR_GIB)
    addr = (after + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    loaded = []
    for src, string in modules:
        if isinstance(src, (bytes, bytearray, memoryview)):
            name, size = "module", len(src)
        else:
            name = f"module {os.fspath(src)}"
            try:
                size = os.stat(src).st_size  # refuse a huge file before reading it
            except OSError:
                size = 0  # _read says why
        if addr + size > ceiling:
            raise HypyrError(f"The {name} ({size / layout.MiB:.1f} MiB) does not fit in guest memory "
                             f"between {addr:#x} and {ceiling:#x}; give the guest more memory.")
        data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else _read(src, "module")
        if addr + len(data) > ceiling:  # it grew since
            raise HypyrError(f"The {name} does not fit in guest memory between {addr:#x} and {ceiling:#x}.")
        mem.write(addr, data)
        loaded.append(Module(addr, addr + len(data), string))
        addr = (addr + len(data) + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    return loaded


def write_info(mem: GuestMemory, info: bytes, addr: int = layout.BOOT_INFO_ADDR) -> GuestAddress:
    if len(info) > layout.BOOT_INFO_MAX_SIZE:
        raise HypyrError(f"The multiboot information (memory map, modules and their strings) takes "
                         f"{len(info)} bytes; hypyr has room for {layout.BOOT_INFO_MAX_SIZE}: use fewer modules "
                         "or shorter module strings.")
    mem.write(addr, info)
    return GuestAddress(addr)
