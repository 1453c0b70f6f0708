"""A tiny ACPI Machine Language (AML) encoder: just what hypyr's DSDT needs.

Encodings follow the ACPI 6.x spec, chapter 20 (AML) and 6.4 (resource descriptors).
"""

from __future__ import annotations

import struct

NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP = 0x08, 0x10, 0x11, 0x12, 0x14
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D
ZERO_OP, ONE_OP = 0x00, 0x01
EXT_OP_PREFIX, DEVICE_OP, OP_REGION_OP, FIELD_OP = 0x5B, 0x82, 0x80, 0x81
LOCAL0_OP, STORE_OP, AND_OP, NOTIFY_OP, IF_OP = 0x60, 0x70, 0x7B, 0x86, 0xA0
DUAL_NAME_PREFIX = 0x2E
REGION_SYSTEM_IO = 0x01
FIELD_BYTE_ACC = 0x01  # AccessType ByteAcc, NoLock, Preserve
LOCAL0 = bytes([LOCAL0_OP])


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of ``body_len`` bytes (the encoding counts its own bytes)."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with '_' (a leading '\\' makes it a root path)."""
    root = name.startswith("\\")
    seg = name.lstrip("\\")
    if not 1 <= len(seg) <= 4 or not seg.replace("_", "A").isalnum() or seg[0].isdigit():
        raise ValueError(f"bad AML name {name!r}")
    return (b"\\" if root else b"") + seg.ljust(4, "_").encode("ascii")


def name_path(path: str) -> bytes:
    """A NameString: one NameSeg, or a dotted path (``\\_SB.PWRB``) of two."""
    segs = path.lstrip("\\").split(".")
    root = b"\\" if path.startswith("\\") else b""
    if len(segs) == 1:
        return root + name_seg(segs[0])
    if len(segs) == 2:
        return root + bytes([DUAL_NAME_PREFIX]) + name_seg(segs[0]) + name_seg(segs[1])
    raise ValueError(f"AML name path {path!r} has more than two segments")


def integer(v: int) -> bytes:
    if v == 0:
        return bytes([ZERO_OP])
    if v == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32)):
        if 0 <= v < limit:
            return bytes([prefix]) + struct.pack(fmt, v)
    raise ValueError(f"AML integer {v} out of range")


def name(n: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_seg(n) + value


def package(*items: int) -> bytes:
    body = bytes([len(items)]) + b"".join(integer(i) for i in items)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(n: str, *children: bytes) -> bytes:
    body = name_seg(n) + b"".join(children)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(n: str, *children: bytes) -> bytes:
    body = name_seg(n) + b"".join(children)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(n: str, args: int, *body: bytes, serialized: bool = False) -> bytes:
    """Method(n, args, Serialized|NotSerialized) { body }."""
    if not 0 <= args <= 7:
        raise ValueError("an AML method takes 0 to 7 arguments")
    inner = name_seg(n) + bytes([args | (8 if serialized else 0)]) + b"".join(body)
    return bytes([METHOD_OP]) + pkg_length(len(inner)) + inner


def op_region_io(n: str, port: int, length: int) -> bytes:
    """OperationRegion(n, SystemIO, port, length)."""
    return (bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_seg(n) + bytes([REGION_SYSTEM_IO])
            + integer(port) + integer(length))


def field_bytes(region: str, *fields: str) -> bytes:
    """Field(region, ByteAcc, NoLock, Preserve) { f0, 8, f1, 8, ... }: one byte per name."""
    inner = name_seg(region) + bytes([FIELD_BYTE_ACC]) + b"".join(name_seg(f) + bytes([8]) for f in fields)
    return bytes([EXT_OP_PREFIX, FIELD_OP]) + pkg_length(len(inner)) + inner


def store(source: bytes, target: bytes) -> bytes:
    """Store(source, target): ``target = source``."""
    return bytes([STORE_OP]) + source + target


def and_(a: bytes, b: bytes) -> bytes:
    """And(a, b) with no target: the value, for a predicate."""
    return bytes([AND_OP]) + a + b + bytes([ZERO_OP])


def if_(predicate: bytes, *body: bytes) -> bytes:
    inner = predicate + b"".join(body)
    return bytes([IF_OP]) + pkg_length(len(inner)) + inner


def notify(path: str, value: int) -> bytes:
    """Notify(path, value)."""
    return bytes([NOTIFY_OP]) + name_path(path) + integer(value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0501") → a DWord integer (compressed vendor letters + product number)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    a, b, c = (ord(ch) - 0x40 for ch in text[:3])
    vendor = (a << 10) | (b << 5) | c
    product = int(text[3:], 16)
    raw = struct.pack(">HH", vendor, product)
    return bytes([DWORD_PREFIX]) + raw


# -- resource templates (small resource descriptors) -----------------------------------------
def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length)."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 0x01, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags(){irq}: edge-triggered, active-high, exclusive ISA interrupt."""
    return struct.pack("<BH", 0x22, 1 << irq)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite, base, length): a large resource descriptor."""
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, length)


def interrupt(gsi: int, *, edge: bool = False, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|Low, Exclusive|Shared){gsi}."""
    flags = 1 | (2 if edge else 0) | (4 if active_low else 0) | (8 if shared else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    body = b"".join(descriptors) + bytes([0x79, 0x00])  # End Tag (checksum 0 = none)
    return buffer(body)
