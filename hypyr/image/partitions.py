"""Partition tables of a raw disk image (MBR with logical partitions, GPT), read in Python.

Only reads: the image is opened read-only and every offset and size in the table is checked
against the image's length before it is used.  ``filesystems(path)`` is what the disk-boot path
wants: the places an ext2/3/4 filesystem starts, in the order worth trying.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass

from hypyr.errors import InvalidInput

SECTOR = 512
MAX_LOGICAL = 64              # logical partitions followed in an extended partition's chain
MAX_GPT_ENTRIES = 1024
EXT_MAGIC_OFFSET = 1024 + 56  # s_magic in the superblock
EXT_MAGIC = 0xEF53

GPT_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
GPT_SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
_MBR_EXTENDED = (0x05, 0x0F, 0x85)
_MBR_SKIP = (0x00, 0xEE, 0xEF, 0x82) + _MBR_EXTENDED   # empty, GPT, ESP, swap, containers


class PartitionError(InvalidInput):
    """A partition table that cannot be read (a bad offset, a truncated image)."""


@dataclass(frozen=True)
class Partition:
    number: int          # as Linux and GRUB count them: 1.. (MBR logical ones from 5)
    offset: int          # bytes from the start of the image
    size: int            # bytes
    bootable: bool = False
    type: str = ""       # MBR type byte as "0x83", or the GPT type GUID
    scheme: str = "raw"  # "raw" (the whole image is one filesystem), "msdos" or "gpt"


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _check(path: str, p: Partition, image_size: int) -> Partition:
    if p.size <= 0 or p.offset < 0 or p.offset + p.size > image_size:
        raise PartitionError(f"partition {p.number} of {path} lies outside the image "
                             f"(bytes {p.offset}..{p.offset + p.size}, the image has {image_size})")
    return p


def read_partitions(path: str) -> list[Partition]:
    """The image's partitions: GPT if it has a protective MBR and a GPT header, else MBR, else
    (no 0x55AA signature) one raw partition covering the whole image."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mbr = _read(f, 0, SECTOR)
        if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
            return [Partition(0, 0, size)]
        entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
        if any(t == 0xEE for _, t, _, _ in entries):
            for sector in (512, 4096):
                hdr = _read(f, sector, 92)
                if hdr[:8] == b"EFI PART":
                    return _gpt(path, f, hdr, sector, size)
        if _looks_like_ext(f, 0, size) and not any(t for _, t, _, _ in entries):
            return [Partition(0, 0, size)]
        return _mbr(path, f, entries, size)


def _mbr(path: str, f, entries, size: int) -> list[Partition]:
    parts: list[Partition] = []
    for i, (status, ptype, start, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype in _MBR_EXTENDED:
            parts.extend(_logical(path, f, start, size))
            continue
        parts.append(_check(path, Partition(i + 1, start * SECTOR, count * SECTOR, status == 0x80,
                                            f"0x{ptype:02x}", "msdos"), size))
    return parts


def _logical(path: str, f, ext_start: int, size: int) -> list[Partition]:
    """Follow an extended partition's chain of EBRs (bounded, no loops)."""
    parts: list[Partition] = []
    ebr_lba, seen = ext_start, set()
    for n in range(MAX_LOGICAL):
        if ebr_lba in seen or ebr_lba * SECTOR + SECTOR > size:
            break
        seen.add(ebr_lba)
        ebr = _read(f, ebr_lba * SECTOR, SECTOR)
        if ebr[510:512] != b"\x55\xaa":
            break
        _, ptype, start, count = struct.unpack_from("<B3xB3xII", ebr, 446)
        _, ntype, nstart, _ = struct.unpack_from("<B3xB3xII", ebr, 462)
        if ptype and count:
            parts.append(_check(path, Partition(5 + n, (ebr_lba + start) * SECTOR, count * SECTOR,
                                                False, f"0x{ptype:02x}", "msdos"), size))
        if not ntype or not nstart:
            break
        ebr_lba = ext_start + nstart
    return parts


def _gpt(path: str, f, hdr: bytes, sector: int, size: int) -> list[Partition]:
    entries_lba, count, entry_size = struct.unpack_from("<QII", hdr, 72)
    if not 128 <= entry_size <= 4096 or count > MAX_GPT_ENTRIES:
        raise PartitionError(f"the GPT of {path} has an implausible entry table "
                             f"({count} entries of {entry_size} bytes)")
    table_at = entries_lba * sector
    if table_at + count * entry_size > size:
        raise PartitionError(f"the GPT partition entries of {path} lie outside the image")
    table = _read(f, table_at, count * entry_size)
    parts = []
    for i in range(count):
        e = table[i * entry_size:(i + 1) * entry_size]
        type_guid = str(uuid.UUID(bytes_le=e[:16]))
        if e[:16] == bytes(16):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        if last < first:
            raise PartitionError(f"GPT partition {i + 1} of {path} ends before it starts")
        parts.append(_check(path, Partition(i + 1, first * sector, (last - first + 1) * sector,
                                            bool(attrs & 4), type_guid, "gpt"), size))
    return parts


def _looks_like_ext(f, offset: int, size: int) -> bool:
    if offset + EXT_MAGIC_OFFSET + 2 > size:
        return False
    return struct.unpack("<H", _read(f, offset + EXT_MAGIC_OFFSET, 2))[0] == EXT_MAGIC


def ext_uuid(path: str, p: Partition) -> str:
    """The filesystem UUID (s_uuid) of the ext filesystem in ``p``."""
    with open(path, "rb") as f:
        return str(uuid.UUID(bytes=_read(f, p.offset + 1024 + 104, 16)))


def ext_label(path: str, p: Partition) -> str:
    with open(path, "rb") as f:
        return _read(f, p.offset + 1024 + 120, 16).split(b"\0")[0].decode(errors="replace")


def filesystems(path: str) -> list[Partition]:
    """The partitions holding an ext2/3/4 filesystem, bootable (MBR) or Linux ones first; ESPs,
    BIOS-boot and swap partitions are left out."""
    parts = read_partitions(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        found = [p for p in parts
                 if p.type not in (GPT_ESP, GPT_BIOS_BOOT, GPT_SWAP)
                 and not (p.scheme == "msdos" and int(p.type, 16) in _MBR_SKIP)
                 and _looks_like_ext(f, p.offset, size)]
    return sorted(found, key=lambda p: (not p.bootable, p.number))
