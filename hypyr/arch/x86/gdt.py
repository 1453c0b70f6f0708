"""The boot GDT of the Linux 64-bit boot protocol, and descriptor encoding/decoding.

Selectors (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol")::

    0x00  null
    0x08  null
    0x10  __BOOT_CS: 64-bit code, flat, execute/read
    0x18  __BOOT_DS: data, flat 4 GiB, read/write
    0x20  TSS (16-byte system descriptor: a long-mode guest needs a usable TR)

A descriptor is described here by ``(base, limit, flags)`` where ``flags`` is a 16-bit
value laid out like bits 40-55 of the descriptor: the access byte (type, S, DPL, P) in
bits 0-7 and AVL, L, D/B, G in bits 12-15; e.g. 0xa09b is a 64-bit code segment.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from hypyr.memory import GuestMemory

from . import layout

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

# flags
FLAG_G = 1 << 15
FLAG_DB = 1 << 14
FLAG_L = 1 << 13
FLAG_AVL = 1 << 12
FLAG_P = 1 << 7
FLAG_S = 1 << 4  # code/data (not system) descriptor

CODE32_FLAGS = FLAG_G | FLAG_DB | FLAG_P | FLAG_S | 0xB  # 0xc09b: 32-bit execute/read, accessed
CODE64_FLAGS = FLAG_G | FLAG_L | FLAG_P | FLAG_S | 0xB  # 0xa09b: execute/read, accessed
DATA_FLAGS = FLAG_G | FLAG_DB | FLAG_P | FLAG_S | 0x3  # 0xc093: read/write, accessed
TSS_FLAGS = FLAG_P | 0xB  # 0x008b: busy 64-bit TSS (what VM entry requires of TR)
TSS_LIMIT = 0x67  # a minimal 104-byte TSS

SYSTEM_TYPE_LDT = 0x2


class Segment(NamedTuple):
    """A segment register as KVM wants it (``limit`` is in bytes, already scaled by G)."""

    base: int
    limit: int
    selector: int
    type: int
    present: bool
    dpl: int
    db: bool
    s: bool
    l: bool
    g: bool
    avl: bool
    unusable: bool = False


class DescriptorTable(NamedTuple):
    base: int
    limit: int


def encode_descriptor(base: int, limit: int, flags: int) -> bytes:
    """An 8-byte segment descriptor (``limit`` is the raw 20-bit field)."""
    if not 0 <= limit <= 0xFFFFF:
        raise ValueError(f"descriptor limit {limit:#x} does not fit in 20 bits")
    if not 0 <= base <= 0xFFFFFFFF:
        raise ValueError(f"descriptor base {base:#x} does not fit in 32 bits")
    value = (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (flags & 0xFF) << 40
        | (limit >> 16) << 48
        | ((flags >> 12) & 0xF) << 52
        | (base >> 24) << 56
    )
    return struct.pack("<Q", value)


def encode_system_descriptor(base: int, limit: int, flags: int) -> bytes:
    """A 16-byte long-mode system descriptor (TSS/LDT) with a 64-bit base."""
    return encode_descriptor(base & 0xFFFFFFFF, limit, flags) + struct.pack("<Q", base >> 32)


def decode_descriptor(data: bytes, selector: int = 0) -> Segment:
    """Decode an 8- or 16-byte descriptor (16 for system descriptors) into a :class:`Segment`."""
    (value,) = struct.unpack_from("<Q", data)
    base = ((value >> 16) & 0xFFFFFF) | ((value >> 56) & 0xFF) << 24
    raw_limit = (value & 0xFFFF) | ((value >> 48) & 0xF) << 16
    access = (value >> 40) & 0xFF
    hi = (value >> 52) & 0xF
    s = bool(access & 0x10)
    if not s and len(data) >= 16:
        base |= struct.unpack_from("<Q", data, 8)[0] << 32
    g = bool(hi & 0x8)
    return Segment(
        base=base,
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        selector=selector,
        type=access & 0xF,
        present=bool(access & 0x80),
        dpl=(access >> 5) & 0x3,
        db=bool(hi & 0x4),
        s=s,
        l=bool(hi & 0x2),
        g=g,
        avl=bool(hi & 0x1),
    )


def boot_gdt() -> bytes:
    """The boot GDT's bytes (null, null, code, data, TSS)."""
    return b"".join([
        encode_descriptor(0, 0, 0),
        encode_descriptor(0, 0, 0),
        encode_descriptor(0, 0xFFFFF, CODE64_FLAGS),
        encode_descriptor(0, 0xFFFFF, DATA_FLAGS),
        encode_system_descriptor(0, TSS_LIMIT, TSS_FLAGS),
    ])


def boot_gdt32() -> bytes:
    """The GDT for a 32-bit protected-mode entry (multiboot, PVH): the same selectors as
    :func:`boot_gdt`, with a flat 32-bit code segment at BOOT_CS and a 32-bit busy TSS."""
    return b"".join([
        encode_descriptor(0, 0, 0),
        encode_descriptor(0, 0, 0),
        encode_descriptor(0, 0xFFFFF, CODE32_FLAGS),
        encode_descriptor(0, 0xFFFFF, DATA_FLAGS),
        encode_descriptor(0, TSS_LIMIT, TSS_FLAGS),
    ])


def write_gdt(mem: GuestMemory, table: bytes | None = None) -> DescriptorTable:
    """Write the boot GDT (or ``table``) and the empty IDT; return the GDTR value."""
    gdt = boot_gdt() if table is None else table
    assert len(gdt) <= layout.GDT_MAX_ENTRIES * 8
    mem.write(layout.GDT_ADDR, gdt)
    mem.fill(layout.IDT_ADDR, 16)
    return DescriptorTable(base=layout.GDT_ADDR, limit=len(gdt) - 1)


def segment_for(gdt: bytes, selector: int) -> Segment:
    """The segment register value for loading ``selector`` from ``gdt``."""
    index = selector & ~0x7
    return decode_descriptor(gdt[index:index + 16], selector)


def null_ldt() -> Segment:
    """LDTR as after reset: no LDT (selector 0, a present, empty LDT type)."""
    return Segment(base=0, limit=0xFFFF, selector=0, type=SYSTEM_TYPE_LDT, present=True, dpl=0,
                   db=False, s=False, l=False, g=False, avl=False)
