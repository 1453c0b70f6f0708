"""virtio-blk's guest interface (virtio 1.2 §5.2): feature bits, request types and status values,
the request header and config-space layouts, the limits this device advertises, and the GET_ID
serial.  Cold code and plain names, kept apart from the request handling in blk.py; tests and
fuzzers build their requests from these names.
"""

from __future__ import annotations

import struct

from hypyr.errors import HypyrError

SECTOR_SIZE = 512
QUEUE_SIZE = 256

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status values
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
STATUS_BYTE = {s: bytes((s,)) for s in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)}

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

HEADER_SIZE = 16
SEGMENT_SIZE = 16  # struct virtio_blk_discard_write_zeroes
ID_BYTES = 20

SEG_MAX = QUEUE_SIZE - 2                 # data segments per request (header and status use two)
MAX_DISCARD_SECTORS = 0x3FFFFF           # per segment: 2 GiB - 512
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8             # a hint: 4 KiB
MAX_WRITE_ZEROES_SECTORS = 0x3FFFFF
MAX_WRITE_ZEROES_SEG = 32

# struct virtio_blk_outhdr: type, reserved, sector
HEADER = struct.Struct("<IIQ")
# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes)
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


def encode_serial(serial: str | None) -> bytes:
    """The GET_ID answer: ``serial`` as ASCII, NUL-padded to 20 bytes (all NULs for None)."""
    if serial is None:
        return bytes(ID_BYTES)
    try:
        raw = serial.encode("ascii")
    except UnicodeEncodeError:
        raise HypyrError(f"disk serial {serial!r} is not ASCII") from None
    if len(raw) > ID_BYTES or b"\0" in raw:
        raise HypyrError(f"disk serial {serial!r} must be at most {ID_BYTES} ASCII characters without NULs")
    return raw.ljust(ID_BYTES, b"\0")


def offered_features(read_only: bool) -> int:
    """The feature bits offered: DISCARD and WRITE_ZEROES for a writable disk, RO otherwise."""
    features = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
    if read_only:
        features |= 1 << VIRTIO_BLK_F_RO
    else:
        features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    return features


def build_config(capacity: int, read_only: bool) -> bytes:
    """The config space of a disk of ``capacity`` sectors, with DISCARD and WRITE_ZEROES limits
    unless it is read-only."""
    rw = not read_only
    return CONFIG.pack(
        capacity,
        0,                      # size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
        SEG_MAX,
        0, 0, 0,                # geometry (not offered)
        SECTOR_SIZE,            # blk_size
        0, 0, 0, 0,             # topology (not offered)
        1,                      # writeback (meaningful only with CONFIG_WCE: our cache is write-back)
        0, 0,                   # unused0, num_queues (no MQ)
        MAX_DISCARD_SECTORS if rw else 0,
        MAX_DISCARD_SEG if rw else 0,
        DISCARD_SECTOR_ALIGNMENT if rw else 0,
        MAX_WRITE_ZEROES_SECTORS if rw else 0,
        MAX_WRITE_ZEROES_SEG if rw else 0,
        1 if rw else 0,         # write_zeroes_may_unmap
    )
