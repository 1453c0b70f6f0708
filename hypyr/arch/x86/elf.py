"""A small, bounds-checked ELF reader for the multiboot and PVH loaders: the header, PT_LOAD
segments and notes, from untrusted bytes.

Every offset, count and size is checked against the file before it is used, so a hostile
image gives one :class:`~hypyr.errors.HypyrError` sentence (naming the file), never an
exception from deep inside a parser or a huge allocation.
"""

from __future__ import annotations

import itertools
import struct
from typing import NamedTuple

from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

from . import layout
from .bootfile import KernelData, copier

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
SHT_NOTE = 7
MAX_HEADERS = 4096  # program or section headers; real kernels have a handful
MAX_NOTES = 1 << 20  # bytes of one note segment or section; a kernel's are a few hundred


class Segment(NamedTuple):
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


class Note(NamedTuple):
    name: bytes  # without the NUL
    type: int
    desc: bytes


class ElfImage(NamedTuple):
    bits: int  # 32 or 64
    machine: int
    entry: int
    segments: tuple[Segment, ...]  # PT_LOAD with memsz > 0, as in the file
    notes: tuple[Note, ...]  # from PT_NOTE segments, else from SHT_NOTE sections


def fail(path: str, why: str) -> HypyrError:
    return HypyrError(f"Kernel {path} {why}.")


def is_elf(data: KernelData) -> bool:
    return data[:4] == ELF_MAGIC


def _table(data: KernelData, path: str, off: int, num: int, entsize: int, minsize: int, what: str) -> list[bytes]:
    """The table's entries, each ``entsize`` bytes, read at once."""
    if num == 0:
        return []
    if num > MAX_HEADERS or entsize < minsize or off + num * entsize > len(data):
        raise fail(path, f"has a corrupt ELF {what} table")
    table = data[off:off + num * entsize]
    return [table[i * entsize:(i + 1) * entsize] for i in range(num)]


def _notes(data: KernelData, path: str, off: int, size: int, align: int) -> list[Note]:
    if size > MAX_NOTES:
        raise fail(path, f"has an ELF note area of {size} bytes (at most {MAX_NOTES} are read)")
    return _parse_notes(data[off:off + size], align)


def _parse_notes(blob: bytes, align: int) -> list[Note]:
    notes, pos = [], 0
    align = 8 if align == 8 else 4
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        name_off = pos + 12
        desc_off = name_off + (namesz + align - 1) // align * align
        end = desc_off + (descsz + align - 1) // align * align
        if desc_off + descsz > len(blob):
            break  # a truncated note ends the list (as Linux's readers do)
        notes.append(Note(blob[name_off:name_off + namesz].rstrip(b"\0"), ntype, blob[desc_off:desc_off + descsz]))
        pos = end
    return notes


def parse(data: KernelData, path: str) -> ElfImage:
    """The header, loadable segments and notes of a little-endian ELF32/ELF64 ``data``."""
    head = data[:64]
    if len(head) < 52 or not is_elf(head):
        raise fail(path, "is not an ELF file")
    eclass, edata = head[4], head[5]
    if eclass not in (ELFCLASS32, ELFCLASS64) or edata != ELFDATA2LSB:
        raise fail(path, "is an ELF file but not a little-endian 32- or 64-bit one")
    if eclass == ELFCLASS64:
        if len(head) < 64:
            raise fail(path, "is truncated")
        machine, = struct.unpack_from("<H", head, 18)
        entry, phoff, shoff = struct.unpack_from("<QQQ", head, 24)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 54)
        ph_fmt, ph_min, sh_min = "<IIQQQQQQ", 56, 64
    else:
        machine, = struct.unpack_from("<H", head, 18)
        entry, phoff, shoff = struct.unpack_from("<III", head, 24)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 42)
        ph_fmt, ph_min, sh_min = "<IIIIIIII", 32, 40

    segments, notes = [], []
    for ph in _table(data, path, phoff, phnum, phentsize, ph_min, "program header"):
        if eclass == ELFCLASS64:
            p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(ph_fmt, ph)
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _flags, p_align = struct.unpack_from(ph_fmt, ph)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if p_offset + p_filesz > len(data):
            raise fail(path, "is truncated (a segment lies past the end of the file)")
        if p_type == PT_NOTE:
            notes += _notes(data, path, p_offset, p_filesz, p_align)
            continue
        if p_filesz > p_memsz:
            raise fail(path, "has a loadable segment whose file size is larger than its memory size")
        if p_memsz:
            segments.append(Segment(p_paddr, p_vaddr, p_offset, p_filesz, p_memsz))
    if not notes:
        for sh in _table(data, path, shoff, shnum, shentsize, sh_min, "section header"):
            fmt = "<IIQQQQIIQQ" if eclass == ELFCLASS64 else "<IIIIIIIIII"
            _name, sh_type, _f, _a, sh_offset, sh_size, _l, _i, sh_align, _e = struct.unpack_from(fmt, sh)
            if sh_type == SHT_NOTE and sh_offset + sh_size <= len(data):
                notes += _notes(data, path, sh_offset, sh_size, sh_align)
    return ElfImage(bits=64 if eclass == ELFCLASS64 else 32, machine=machine, entry=entry,
                    segments=tuple(segments), notes=tuple(notes))


def check_segments(mem: GuestMemory, path: str, segments: list[Segment] | tuple[Segment, ...],
                   limit: int = 1 << 64) -> None:
    """Refuse segments that overlap, lie below 1 MiB (hypyr's boot structures), end above
    ``limit`` or outside guest RAM; nothing is written."""
    if not segments:
        raise fail(path, "has no loadable segments")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for seg in ordered:
        if seg.paddr < layout.HIGH_MEMORY_START:
            raise fail(path, f"wants to be loaded at {seg.paddr:#x}, below 1 MiB where the boot structures live")
        if seg.end > limit:
            raise fail(path, f"has a segment at {seg.paddr:#x}-{seg.end:#x}, beyond the {limit >> 30} GiB "
                             "this boot protocol can address")
    for a, b in itertools.pairwise(ordered):
        if b.paddr < a.end:
            raise fail(path, f"has overlapping loadable segments ({a.paddr:#x}-{a.end:#x} and "
                             f"{b.paddr:#x}-{b.end:#x})")
    for seg in ordered:
        if not mem.check_range(seg.paddr, seg.memsz):
            raise HypyrError(
                f"Guest memory ({mem.size // layout.MiB} MiB) is too small for kernel {path}, "
                f"which needs RAM at {seg.paddr:#x}-{seg.end:#x}.")


def load_segments(mem: GuestMemory, data: KernelData, segments: list[Segment] | tuple[Segment, ...]) -> None:
    """Copy checked segments (:func:`check_segments`) into ``mem`` and zero their bss."""
    copy = copier(data)
    for seg in segments:
        copy(mem, seg.paddr, seg.offset, seg.filesz)
        if seg.memsz > seg.filesz:
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)


def physical_entry(path: str, entry: int, segments: list[Segment] | tuple[Segment, ...]) -> int:
    """``entry`` if it lies in a segment's physical range, else translated from a virtual one."""
    if any(s.paddr <= entry < s.end for s in segments):
        return entry
    for s in segments:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return entry - s.vaddr + s.paddr
    raise fail(path, f"has entry point {entry:#x} outside its loadable segments")
