"""Micro-benchmark of virtio-net's userspace receive path, on the host (no guest, no KVM).

A child process plays the TAP's far side: it sends FRAME-byte frames (vnet header included)
over a SOCK_SEQPACKET socket pair (one read per frame, as a TAP) as fast as it can.  The parent
runs a VirtioNet (MRG_RXBUF, EVENT_IDX) whose receive ring is a fake guest's: QUEUE chains of
BUF bytes each, one writable descriptor per chain (as Linux's mergeable buffers), refilled after
every pass the way the driver does.  Reports MB/s of frame bytes delivered, over the time spent
in the device's receive path and over the wall clock.  A ring that holds little more than one
largest frame (``--queue 32 --buf 2560``) has most frames spill their tail (net_rx.py).

    .venv/bin/python bench/net_rx_micro.py [--frames N] [--frame BYTES] [--buf BYTES] [--queue N]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio import net as N
from hypyr.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.memory import GuestMemory


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


class Ring:
    """The guest's receive ring: ``size`` single-buffer chains, recycled as the driver would."""

    def __init__(self, mem: GuestMemory, size: int, buf: int):
        self.mem, self.size = mem, size
        self.desc, self.avail = 0x1000, 0x1000 + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.data = 0x100000
        self.avail_idx = self.used_seen = 0
        for i in range(size):
            mem.write(self.desc + 16 * i, struct.pack("<QIHH", self.data + i * buf, buf, 2, 0))
            self.publish(i)

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def recycle(self) -> None:
        """Give every used buffer back."""
        idx = self.mem.read_u16(self.used + 2)
        while self.used_seen != idx:
            head, _ = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.used_seen % self.size), 8))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
            self.publish(head)
        self.mem.write_u16(self.avail + 4 + 2 * self.size, self.used_seen)  # used_event


def writer(sock: socket.socket, frame: bytes, count: int) -> None:
    for _ in range(count):
        sock.send(frame)
    sock.recv(1)  # stay until the parent is done (an end of file would be a 0-byte frame to it)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--frame", type=int, default=65535 + 14, help="frame bytes after the 12-byte header")
    ap.add_argument("--buf", type=int, default=4096)
    ap.add_argument("--queue", type=int, default=256)
    a = ap.parse_args()

    mem = GuestMemory.anonymous([(0, 0x100000 + a.queue * a.buf + 0x1000)], hugepages=False)
    ring = Ring(mem, a.queue, a.buf)
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (host, guest):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    frame = bytes(12) + os.urandom(a.frame)
    pid = os.fork()
    if pid == 0:
        guest.close()
        try:
            writer(host, frame, a.frames)
        finally:
            os._exit(0)
    host.close()

    dev = N.VirtioNet(guest.fileno(), bytes.fromhex("00163e123456"), ifname="bench0")
    N.tap.set_offload = lambda fd, flags: None  # a socket is no TAP
    t = VirtioMmioTransport(dev, mem, trigger=lambda: None)
    feats = VIRTIO_F_VERSION_1 | N.F_MRG_RXBUF | N.F_GUEST_CSUM | N.F_GUEST_TSO4 | VIRTIO_F_RING_EVENT_IDX
    wr(t, M.STATUS, 3)
    for sel in (0, 1):
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFFFFFF)
    wr(t, M.STATUS, 11)
    for qi, (desc, avail, used) in enumerate(((ring.desc, ring.avail, ring.used), (0x80000, 0x81000, 0x82000))):
        wr(t, M.QUEUE_SEL, qi)
        wr(t, M.QUEUE_NUM, a.queue)
        for lo, addr in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail), (M.QUEUE_DEVICE_LOW, used)):
            wr(t, lo, addr)
            wr(t, lo + 4, 0)
        wr(t, M.QUEUE_READY, 1)
    wr(t, M.STATUS, 15)

    poller = select.poll()
    poller.register(guest.fileno(), select.POLLIN)
    busy = 0.0
    done = 0
    start = time.perf_counter()
    while done < a.frames:
        poller.poll(100)
        t0 = time.perf_counter()
        dev._receive()
        busy += time.perf_counter() - t0
        ring.recycle()
        done = dev.counters.rx_packets
        if dev.pending_error():
            raise SystemExit(dev.pending_error())
    wall = time.perf_counter() - start
    total = a.frames * (12 + a.frame)
    c = dev.counters
    assert c.rx_packets == a.frames and c.rx_dropped == 0, c
    print(f"{a.frames} frames of {12 + a.frame} bytes into "
          f"{a.queue} x {a.buf}-byte buffers: "
          f"{total / busy / 1e6:.0f} MB/s in the receive path ({busy / a.frames * 1e6:.1f} us/frame), "
          f"{total / wall / 1e6:.0f} MB/s wall")
    dev.close()
    guest.close()
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
