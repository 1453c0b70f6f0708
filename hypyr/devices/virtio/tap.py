"""What the VMM does with a TAP device it was handed: offloads and the vnet header size.

Opening a TAP and attaching it to a bridge is host plumbing and belongs to the toolstack
(:mod:`hypyr.toolstack.network`); the VMM only receives the open file descriptor.
"""

from __future__ import annotations

import fcntl
import struct

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETIFF = 0x800454D2
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

VNET_HDR_LEN = 12  # struct virtio_net_hdr_v1 (with num_buffers): VERSION_1 always uses it


class TapError(Exception):
    """The descriptor is not a TAP device as hypyr needs it."""


def check_tap(fd: int) -> str:
    """Check ``fd`` is a TAP with IFF_NO_PI|IFF_VNET_HDR and set the 12-byte vnet header;
    return the interface name."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as e:
        raise TapError(f"descriptor {fd} is not a TAP device ({e.strerror})") from None
    name = ifr[:16].split(b"\0", 1)[0].decode(errors="replace")
    flags = struct.unpack_from("H", ifr, 16)[0]
    want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    if flags & want != want:
        raise TapError(f"TAP {name} was not opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (flags {flags:#x})")
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    return name


def set_offload(fd: int, flags: int) -> None:
    """Tell the TAP which offloads the reader (the guest's receive side) handles."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
