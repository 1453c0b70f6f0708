"""The record stream of save files and live migration: one versioned, self-describing format
(a checked preamble, then typed, length-bounded, CRC-32-checked records: HEADER, CPUID, PAGES,
ZERO, STATE, END, and SYNC/SYNCED/READY/GO/RUNNING/FAILED on a migration's link).
docs/migration.md, "The format", has every record and its payload.  Anything wrong is a
:class:`~hypyr.errors.SnapshotError` in one sentence; I/O errors (:class:`OSError`) are left to
the caller, who knows whether a file or a link failed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, overload

from hypyr.errors import SnapshotError, SnapshotTruncated

MAGIC = b"HYPYRSNP"
VERSION = 2  # 2: CPUID is its own record, no longer in each kvm-vcpu state
PAGE = 4096
MAX_RUN = 256  # pages in one PAGES record (1 MiB)

PREAMBLE = struct.Struct("<8sHHI")
RECORD = struct.Struct("<II")
CRC = struct.Struct("<I")
RUN = struct.Struct("<QI")
END = struct.Struct("<QQI")


class Rec(enum.IntEnum):
    HEADER = 1
    PAGES = 2
    ZERO = 3
    STATE = 4
    END = 5
    CPUID = 6
    SYNC = 7        # migration only: answer SYNCED once everything before it is taken in
    READY = 16
    GO = 17
    RUNNING = 18
    FAILED = 19
    SYNCED = 20


# the most payload bytes each type may have: a length beyond it is refused before any allocation
MAX_PAYLOAD = {
    Rec.HEADER: 1 << 20,
    Rec.PAGES: RUN.size + MAX_RUN * PAGE,
    Rec.ZERO: RUN.size * 65536,
    Rec.STATE: 64 << 20,
    Rec.END: END.size,
    Rec.CPUID: 16 << 20,
    Rec.SYNC: 0,
    Rec.READY: 64 << 10,
    Rec.GO: 0,
    Rec.RUNNING: 64 << 10,
    Rec.FAILED: 64 << 10,
    Rec.SYNCED: 0,
}


def _name(rtype: int) -> str:
    try:
        return Rec(rtype).name
    except ValueError:
        return f"type-{rtype}"


class StreamWriter:
    """Writes the preamble and records to ``out`` (anything with ``write``), counting them."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self.bytes = 0
        self.records = 0
        self._chain = 0  # CRC-32 over the records' CRCs (and the preamble's)

    def preamble(self) -> None:
        head = PREAMBLE.pack(MAGIC, VERSION, 0, 0)[:12]
        crc = zlib.crc32(head)
        self._write(head + CRC.pack(crc))
        self._chain = zlib.crc32(CRC.pack(crc))

    def record(self, rtype: Rec, *parts) -> None:
        """One record whose payload is ``parts`` (bytes-like) joined."""
        length = sum(len(p) for p in parts)
        if length > MAX_PAYLOAD[rtype]:
            raise ValueError(f"a {rtype.name} record of {length} bytes is too long")
        head = RECORD.pack(rtype, length)
        crc = zlib.crc32(head)
        for p in parts:
            crc = zlib.crc32(p, crc)
        tail = CRC.pack(crc)
        self._write(head)
        for p in parts:
            self._write(p)
        self._write(tail)
        self.records += 1
        self._chain = zlib.crc32(tail, self._chain)

    def end(self) -> None:
        """The END record: what came before it, for the reader to check."""
        self.record(Rec.END, END.pack(self.records, self.bytes, self._chain))

    def flush(self) -> None:
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def _write(self, data) -> None:
        self._out.write(data)
        self.bytes += len(data)


class StreamReader:
    """Reads and checks what a :class:`StreamWriter` wrote.  ``what`` names the source in
    messages ("the save file", "the migration stream")."""

    def __init__(self, src: BinaryIO, what: str = "the save file"):
        self._src = src
        self.what = what
        self.bytes = 0
        self.records = 0
        self._chain = 0
        self.ended = False

    def preamble(self) -> None:
        raw = self._read(PREAMBLE.size, "its preamble")
        magic, version, _, crc = PREAMBLE.unpack(raw)
        if magic != MAGIC:
            raise SnapshotError(f"{self.what} is not a hypyr save file or migration stream (no HYPYRSNP magic)")
        if zlib.crc32(raw[:12]) != crc:
            raise SnapshotError(f"{self.what} is corrupt (its preamble fails its checksum)")
        if version != VERSION:
            raise SnapshotError(f"{self.what} has format version {version}; this hypyr reads version {VERSION}")
        self._chain = zlib.crc32(CRC.pack(crc))

    def next(self, expect: tuple[Rec, ...] | None = None,
             pages_into: Callable[[int, int], memoryview] | None = None) -> tuple[Rec, bytes]:
        """The next record as (type, payload); END is checked here.  ``expect``: the types
        allowed now (anything else is an error).  ``pages_into(gpa, count)``: where a PAGES
        record's data goes (guest RAM, read into straight from the source, checked after; the
        payload returned is then only the run's head)."""
        head = self._read(RECORD.size, "a record header", eof_ok=True)
        if head is None:
            raise SnapshotTruncated(f"{self.what} is truncated (it ends before its END record)")
        rtype, length = RECORD.unpack(head)
        if rtype not in MAX_PAYLOAD:
            raise SnapshotError(f"{self.what} is corrupt (record {self.records + 1} has unknown type {rtype})")
        rtype = Rec(rtype)
        if length > MAX_PAYLOAD[rtype] or (rtype is Rec.END and length != END.size):
            raise SnapshotError(f"{self.what} is corrupt (a {rtype.name} record claims {length} bytes, more than "
                                f"such a record may have)")
        if expect is not None and rtype not in expect:
            wanted = " or ".join(r.name for r in expect)
            raise SnapshotError(f"{self.what} is corrupt (a {rtype.name} record where {wanted} belongs)")
        where = f"{'an' if rtype.name[0] in 'AEIOU' else 'a'} {rtype.name} record"
        if rtype is Rec.PAGES and pages_into is not None:
            payload = self._read(min(length, RUN.size), where)
            gpa, count = parse_pages_head(payload, length, self.what)
            data = pages_into(gpa, count)
            try:  # released however this ends: a view left in a traceback would keep the RAM mapped
                self._read_into(data, where)
                crc = zlib.crc32(data, zlib.crc32(payload, zlib.crc32(head)))
            finally:
                data.release()
        else:
            payload = self._read(length, where)
            crc = zlib.crc32(payload, zlib.crc32(head))
        tail = self._read(CRC.size, where)
        if CRC.unpack(tail)[0] != crc:
            raise SnapshotError(f"{self.what} is corrupt (record {self.records + 1}, {rtype.name}, fails its "
                                f"checksum)")
        if rtype is Rec.END:
            self._check_end(payload)
        self.records += 1
        self._chain = zlib.crc32(tail, self._chain)
        return rtype, payload

    def _check_end(self, payload: bytes) -> None:
        records, nbytes, chain = END.unpack(payload)
        if (records, nbytes, chain) != (self.records, self.bytes - RECORD.size - END.size - CRC.size, self._chain):
            raise SnapshotError(f"{self.what} is corrupt (its END record does not match what came before: "
                                f"records lost, repeated or reordered)")
        self.ended = True

    @overload
    def _read(self, n: int, where: str) -> bytes: ...
    @overload
    def _read(self, n: int, where: str, *, eof_ok: bool) -> bytes | None: ...

    def _read(self, n: int, where: str, *, eof_ok: bool = False) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            data = self._src.read(n - got)
            if not data:
                if eof_ok and got == 0:
                    return None
                raise SnapshotTruncated(f"{self.what} is truncated (it ends inside {where})")
            chunks.append(data)
            got += len(data)
        self.bytes += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_into(self, view: memoryview, where: str) -> None:
        got = 0
        while got < len(view):
            with view[got:] as rest:
                n = self._src.readinto(rest)  # type: ignore[attr-defined]  # (files and sockets have it)
            if not n:
                raise SnapshotTruncated(f"{self.what} is truncated (it ends inside {where})")
            got += n
        self.bytes += got


# -- payloads ---------------------------------------------------------------------------------------
def pages_head(gpa: int, count: int) -> bytes:
    return RUN.pack(gpa, count)


def parse_pages_head(run: bytes, length: int, what: str) -> tuple[int, int]:
    """(guest address, page count) of a PAGES record of ``length`` payload bytes that begins
    with ``run``, its sizes checked."""
    if len(run) < RUN.size:
        raise SnapshotError(f"{what} is corrupt (a PAGES record too short for its header)")
    gpa, count = RUN.unpack_from(run)
    if not 1 <= count <= MAX_RUN or length != RUN.size + count * PAGE or gpa % PAGE:
        raise SnapshotError(f"{what} is corrupt (a PAGES record of {count} pages at {gpa:#x} has "
                            f"{length - RUN.size} bytes of data)")
    return gpa, count


def zero_payload(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(RUN.pack(gpa, count) for gpa, count in runs)


def parse_zero(payload: bytes, what: str) -> list[tuple[int, int]]:
    if len(payload) % RUN.size:
        raise SnapshotError(f"{what} is corrupt (a ZERO record of {len(payload)} bytes)")
    runs = list(RUN.iter_unpack(payload))
    for gpa, count in runs:
        if count < 1 or gpa % PAGE:
            raise SnapshotError(f"{what} is corrupt (a zero run of {count} pages at {gpa:#x})")
    return runs


def encode_json(obj: Any) -> bytes:
    """JSON text of plain data; bytes become ``{"$b64": base64}``."""
    def default(o):
        if isinstance(o, (bytes, bytearray, memoryview)):
            return {"$b64": base64.b64encode(bytes(o)).decode("ascii")}
        raise TypeError(f"{type(o).__name__} is not plain data")
    return json.dumps(obj, default=default, separators=(",", ":"), allow_nan=False).encode()


def decode_json(payload: bytes, what: str, record: str) -> Any:
    """Inverse of :func:`encode_json`; anything malformed is a SnapshotError."""
    def hook(o: dict):
        if "$b64" in o:
            if len(o) != 1 or not isinstance(o["$b64"], str):
                raise ValueError("a malformed bytes value")
            return base64.b64decode(o["$b64"].encode("ascii"), validate=True)
        return o

    def no_constant(name: str):
        raise ValueError(f"{name} is not a number")
    try:
        return json.loads(payload.decode("utf-8"), object_hook=hook, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, binascii.Error, RecursionError) as e:
        raise SnapshotError(f"{what} is corrupt (its {record} record is not valid: {str(e)[:80]})") from None
