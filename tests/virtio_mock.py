"""A mock virtio driver: lays out a split virtqueue in ordinary GuestMemory (no KVM) and plays
the guest's part — writing descriptors, publishing them, reading the used ring.

Used by the virtqueue, transport and device tests; tests may also write raw (hostile) bytes
anywhere through ``mem``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypyr.devices.virtio.chain import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hypyr.devices.virtio.queue import SplitQueue
from hypyr.memory import GuestMemory

MEM_SIZE = 1 << 20


@dataclass
class Buf:
    addr: int
    length: int
    write: bool = False  # device-writable


class MockDriver:
    """One queue of ``size`` entries at fixed addresses in a 1 MiB guest; buffers from 0x10000 up."""

    def __init__(self, size: int = 16, mem: GuestMemory | None = None, base: int = 0x1000):
        self.mem = mem or GuestMemory.anonymous([(0, MEM_SIZE)], hugepages=False)
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.data_next = 0x10000
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0

    def queue(self, max_size: int | None = None, *, event_idx: bool = False, indirect: bool = True) -> SplitQueue:
        q = SplitQueue(max_size or self.size)
        q.size, q.desc_table, q.avail_ring, q.used_ring = self.size, self.desc, self.avail, self.used
        q.activate(self.mem, event_idx=event_idx, indirect=indirect)
        return q

    def alloc(self, data: bytes | int) -> int:
        """Copy ``data`` (or reserve that many zero bytes) into guest memory; return its address."""
        n = data if isinstance(data, int) else len(data)
        addr = self.data_next
        self.data_next = (addr + n + 15) & ~15
        if not isinstance(data, int):
            self.mem.write(addr, data)
        return addr

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def add_chain(self, bufs: list[Buf], *, indirect: bool = False) -> int:
        """Write a chain (or one indirect descriptor pointing at a table) and publish it; return head."""
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, b in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(i, b.addr, b.length, flags, i + 1 if i + 1 < len(bufs) else 0, table=table)
            head = self.next_desc
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.next_desc = (head + 1) % self.size
        else:
            head = self.next_desc
            idx = [(head + i) % self.size for i in range(len(bufs))]
            for i, b in enumerate(bufs):
                last = i + 1 == len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(idx[i], b.addr, b.length, flags, 0 if last else idx[i + 1])
            self.next_desc = (head + len(bufs)) % self.size
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written) for every used element published since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            elem = self.used + 4 + 8 * (self.used_seen % self.size)
            out.append(struct.unpack("<II", self.mem.read(elem, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out
