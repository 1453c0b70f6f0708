"""The uncompressed ``vmlinux`` inside a bzImage.

A bzImage's protected-mode part (after the ``setup_sects`` + 1 sectors of setup code) holds
the decompressor and, at ``payload_offset`` (setup header 0x248, protocol 2.08+) for
``payload_length`` bytes (0x24c), the compressed vmlinux, an ELF file.  The format is known by
its magic bytes; kernels append the uncompressed size as a 32-bit little-endian word.  Python
decompresses gzip, xz, lzma and bzip2 itself; zstd (Debian's kernels since 6.12, Ubuntu's,
Fedora's) and lz4 (the kernel's legacy lz4 format) with the ``zstandard`` and ``lz4`` packages,
imported only then; LZO is not supported (each refusal is one sentence).
"""

from __future__ import annotations

import bz2
import lzma
import os
import struct
import zlib

from hypyr import preopened
from hypyr.errors import HypyrError

from . import bootparams as bp
from .bootfile import cannot_read

HDR_PAYLOAD_OFFSET = 0x248  # u32, relative to the protected-mode code
HDR_PAYLOAD_LENGTH = 0x24C  # u32
MIN_PROTOCOL = 0x0208
MAX_VMLINUX_SIZE = 1 << 30  # a decompression bomb stops here

MAGICS = (  # (magic, name)
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)


def _fail(path: str, why: str) -> HypyrError:
    return HypyrError(f"Kernel {path} {why}.")


def payload(data: bytes, path: str = "<kernel>") -> tuple[str, bytes]:
    """``(compression, compressed bytes)`` of a bzImage's payload."""
    if len(data) < bp.HDR_END or data[bp.HDR_HEADER:bp.HDR_HEADER + 4] != bp.HDRS_MAGIC:
        raise _fail(path, "is not a bzImage")
    if struct.unpack_from("<H", data, bp.HDR_VERSION)[0] < MIN_PROTOCOL:
        raise _fail(path, "uses a boot protocol older than 2.08, whose header does not locate the payload")
    pm_offset = ((data[bp.HDR_SETUP_SECTS] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", data, HDR_PAYLOAD_OFFSET)
    start = pm_offset + offset
    if length == 0 or start + length > len(data):
        raise _fail(path, "has a payload_offset/payload_length outside the file")
    blob = data[start:start + length]
    for magic, name in MAGICS:
        if blob.startswith(magic):
            return name, blob
    raise _fail(path, f"has a payload in an unknown compression format (it starts with {blob[:6].hex()})")


class _TooBig(Exception):
    """The payload decompresses to more than MAX_VMLINUX_SIZE."""


def _decompress(name: str, blob: bytes) -> tuple[bytes, bool]:
    """(output, whether the stream ended) — at most MAX_VMLINUX_SIZE + 1 bytes of output."""
    limit = MAX_VMLINUX_SIZE + 1
    if name in ("gzip", "xz", "lzma", "bzip2"):
        d: zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor
        if name == "gzip":
            d = zlib.decompressobj(wbits=31)
        elif name == "bzip2":
            d = bz2.BZ2Decompressor()
        else:
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE)
        out = d.decompress(blob, limit)
        return out, d.eof
    if name == "zstd":
        try:
            import zstandard
        except ImportError:
            raise HypyrError("needs the zstandard module to decompress zstd") from None
        frame = blob[:-4]   # (the size the kernel appends is not zstd's)
        try:   # the kernel's frame does not say its size: counted first, in chunks, against a bomb
            reader, total = zstandard.ZstdDecompressor().stream_reader(frame), 0
            while chunk := reader.read(16 << 20):
                total += len(chunk)
                if total >= limit:
                    raise _TooBig()
            z = zstandard.ZstdDecompressor().decompressobj()
            return z.decompress(frame), z.eof
        except zstandard.ZstdError as e:
            raise ValueError(str(e)) from None
    if name == "lz4":
        try:
            import lz4.block  # type: ignore[import-untyped]
        except ImportError:
            raise HypyrError("needs the lz4 module to decompress lz4") from None
        return _lz4_legacy(lz4.block, blob, limit)
    raise HypyrError(f"cannot decompress {name}")


LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20   # the most a block of the legacy format decompresses to


def _lz4_legacy(block, blob: bytes, limit: int) -> tuple[bytes, bool]:
    """The kernel's legacy lz4 stream (`lz4 -l`): the magic, then blocks, each a u32 LE
    compressed size and an lz4 block of at most 8 MiB (the magic may repeat between blocks), and
    the 4-byte size the kernel appends.  Complete when exactly that size is left after a block."""
    out = bytearray()
    pos = len(LZ4_LEGACY_MAGIC)
    while len(out) < limit:
        if blob[pos:pos + 4] == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if len(blob) - pos == 4:
            return bytes(out), True
        if len(blob) - pos < 4:
            break
        size = int.from_bytes(blob[pos:pos + 4], "little")
        if size == 0 or pos + 4 + size > len(blob):
            break
        try:
            out += block.decompress(blob[pos + 4:pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        except block.LZ4BlockError as e:
            raise ValueError(str(e)) from None
        pos += 4 + size
    return bytes(out), False


def extract(data: bytes, path: str = "<kernel>") -> bytes:
    """The vmlinux (an ELF file) compressed inside the bzImage ``data``."""
    name, blob = payload(data, path)
    try:
        out, complete = _decompress(name, blob)
    except HypyrError as e:
        raise _fail(path, f"is compressed with {name}, and hypyr {e}") from None
    except _TooBig:
        raise _fail(path, f"decompresses to more than {MAX_VMLINUX_SIZE >> 20} MiB") from None
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
        raise _fail(path, f"has a corrupt {name} payload ({e})") from None
    if len(out) > MAX_VMLINUX_SIZE:
        raise _fail(path, f"decompresses to more than {MAX_VMLINUX_SIZE >> 20} MiB")
    if not complete:
        raise _fail(path, f"has a corrupt {name} payload (it ends before its stream does)")
    if out[:4] != b"\x7fELF":
        raise _fail(path, f"has a {name} payload that is not an ELF vmlinux")
    return out


def extract_file(path: str | os.PathLike) -> bytes:
    try:
        data = preopened.read_bytes(path)
    except OSError as e:
        raise cannot_read(path, "kernel", e) from None
    return extract(data, os.fspath(path))
