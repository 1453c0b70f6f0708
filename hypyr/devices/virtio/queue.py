"""The split virtqueue (virtio 1.2 §2.7), device side.

Everything the driver wrote is untrusted: ring indices, descriptor indices, addresses, lengths,
flags.  All of it is read through :class:`~hypyr.memory.GuestMemory` (bounds-checked) and
validated here; a violation raises :class:`QueueError` (a :class:`DeviceError`) and the transport puts the device into NEEDS_RESET.

- descriptor chains are walked with a time-to-live (the queue size, or the indirect table's
  length), so loops end; nested indirect tables are refused;
- every buffer must lie wholly in guest RAM; device-readable buffers must precede writable ones;
- the used ring is written only at indices we own; ``avail.idx`` jumping by more than the
  queue size is an error.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from hypyr.memory import GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_INDIRECT = 1024  # descriptors in one indirect table (Linux never uses more than the queue size)


class DeviceError(Exception):
    """The driver broke the protocol (bad descriptor, bad length...); the device needs a reset."""


class QueueError(DeviceError):
    """The driver broke the virtqueue protocol."""


@dataclass
class DescriptorChain:
    """One request: device-readable buffers, then device-writable ones, as (address, length)."""
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read(self, mem: GuestMemory, length: int | None = None, offset: int = 0) -> bytes:
        """Gather ``length`` bytes (default: all) of the readable buffers from ``offset``."""
        total = self.readable_len
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise QueueError(f"read of {length} bytes at {offset} from a chain with {total} readable bytes")
        out = bytearray()
        pos = 0
        for addr, n in self.readable:
            if length == 0:
                break
            if pos + n > offset:
                start = max(offset - pos, 0)
                take = min(n - start, length)
                out += mem.read(addr + start, take)
                length -= take
                offset += take
            pos += n
        return bytes(out)

    def write(self, mem: GuestMemory, data: bytes, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers starting at byte ``offset`` of them."""
        if offset < 0 or offset + len(data) > self.writable_len:
            raise QueueError(f"write of {len(data)} bytes at {offset} into a chain with "
                             f"{self.writable_len} writable bytes")
        view = memoryview(data)
        pos = 0
        for addr, n in self.writable:
            if not view:
                break
            if pos + n > offset:
                start = max(offset - pos, 0)
                take = min(n - start, len(view))
                mem.write(addr + start, view[:take])
                view = view[take:]
                offset += take
            pos += n
        return len(data)


class SplitQueue:
    """One split virtqueue.  The transport sets size/addresses/ready; the device pops and
    completes chains.  Safe to use from several threads (one lock per queue)."""

    def __init__(self, max_size: int):
        if max_size < 1 or max_size > 32768 or max_size & (max_size - 1):
            raise ValueError("queue max size must be a power of two up to 32768")
        self.max_size = max_size
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        # Under the lock: a device thread may be inside pop()/add_used() right now, and must
        # not see a half-reset queue (e.g. the old ``mem`` with ``used_ring`` already 0).
        with self._lock:
            self.size = self.max_size
            self.ready = False
            self.desc_table = 0
            self.avail_ring = 0
            self.used_ring = 0
            self.event_idx = False
            self.indirect = False
            self.mem: GuestMemory | None = None
            self.last_avail = 0       # next avail ring slot we will consume (free-running u16)
            self.next_used = 0        # next used ring slot we will fill (free-running u16)
            self.signalled_used = 0   # used idx at the last interrupt decision

    # -- setup ------------------------------------------------------------------------------------
    def validate(self, mem: GuestMemory) -> None:
        """Check the driver's configuration (size, alignment, rings inside RAM)."""
        n = self.size
        if n < 1 or n > self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of two in 1..{self.max_size}")
        for what, addr, align, length in (("descriptor table", self.desc_table, 16, DESC_SIZE * n),
                                          ("available ring", self.avail_ring, 2, 6 + 2 * n),
                                          ("used ring", self.used_ring, 4, 6 + 8 * n)):
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            if not mem.check_range(addr, length):
                raise QueueError(f"{what} at {addr:#x}+{length:#x} is not in guest RAM")

    def activate(self, mem: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        self.validate(mem)
        with self._lock:  # publish mem last, and atomically for pop()/add_used()
            self.event_idx, self.indirect = event_idx, indirect
            self.mem = mem

    # -- consuming requests -------------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return self.mem.read_u16(self.avail_ring + 2)

    def has_available(self) -> bool:
        with self._lock:
            return self.mem is not None and self._avail_idx() != self.last_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises QueueError on any protocol violation."""
        with self._lock:
            mem = self.mem
            if mem is None:
                return None
            try:
                avail_idx = self._avail_idx()
                pending = (avail_idx - self.last_avail) & 0xFFFF
                if pending == 0:
                    return None
                if pending > self.size:
                    raise QueueError(f"avail.idx {avail_idx} is {pending} ahead of {self.last_avail}, "
                                     f"more than the queue size {self.size}")
                slot = self.avail_ring + 4 + 2 * (self.last_avail % self.size)
                head = mem.read_u16(slot)
                self.last_avail = (self.last_avail + 1) & 0xFFFF
                if self.event_idx:  # avail_event: notify us again when the driver passes this index
                    mem.write_u16(self.used_ring + 4 + 8 * self.size, self.last_avail)
                return self._walk(mem, head)
            except GuestMemoryError as e:
                raise QueueError(str(e)) from None

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        if head >= self.size:
            raise QueueError(f"head descriptor index {head} >= queue size {self.size}")
        chain = DescriptorChain(head)
        table, count, index = self.desc_table, self.size, head
        ttl = count
        in_indirect = False
        while True:
            if ttl == 0:
                raise QueueError(f"descriptor chain from {head} is longer than its table (a loop?)")
            ttl -= 1
            addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError("indirect descriptor used but VIRTIO_F_RING_INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise QueueError("nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise QueueError(f"indirect table length {length} is not a multiple of 16 in 16..{MAX_INDIRECT * 16}")
                if not mem.check_range(addr, length):
                    raise QueueError(f"indirect table at {addr:#x}+{length:#x} is not in guest RAM")
                table, count, index, ttl, in_indirect = addr, length // DESC_SIZE, 0, length // DESC_SIZE, True
                continue
            if length:
                if not mem.check_range(addr, length):
                    raise QueueError(f"buffer at {addr:#x}+{length:#x} is not in guest RAM")
                if flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.append((addr, length))
                else:
                    if chain.writable:
                        raise QueueError("device-readable buffer after a device-writable one")
                    chain.readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise QueueError(f"next descriptor index {nxt} >= table size {count}")
            index = nxt

    # -- completing requests -------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, with ``written`` bytes written into it."""
        with self._lock:
            mem = self.mem
            if mem is None:
                return  # reset while the request was in flight: drop it, the driver forgot it too
            elem = self.used_ring + 4 + 8 * (self.next_used % self.size)
            mem.write(elem, struct.pack("<II", head, written))
            self.next_used = (self.next_used + 1) & 0xFFFF
            mem.write_u16(self.used_ring + 2, self.next_used)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added since the last call."""
        with self._lock:
            mem = self.mem
            if mem is None:
                return False
            old, new = self.signalled_used, self.next_used
            self.signalled_used = new
            if old == new:
                return False
            if self.event_idx:
                used_event = mem.read_u16(self.avail_ring + 4 + 2 * self.size)
                return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            return not mem.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
