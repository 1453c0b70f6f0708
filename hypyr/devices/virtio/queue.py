"""The split virtqueue (virtio 1.2 §2.7), device side.

Everything the driver wrote is untrusted: ring indices, descriptor indices, addresses, lengths,
flags.  All of it is read through :class:`~hypyr.memory.GuestMemory` (bounds-checked) and
validated here; a violation raises :class:`QueueError` (a :class:`DeviceError`) and the transport puts the device into NEEDS_RESET.

- descriptor chains are walked with a time-to-live (the queue size, or the indirect table's
  length), so loops end; nested indirect tables are refused;
- every buffer must lie wholly in guest RAM; device-readable buffers must precede writable ones;
- the used ring is written only at indices we own; ``avail.idx`` jumping by more than the
  queue size is an error.

Speed: a chain is walked from one snapshot of its descriptor table (an indirect table is read
with one ``mem.read``; the main table too, once a chain has more than one descriptor in it and
the table is at most :data:`MAIN_TABLE_SNAPSHOT` bytes), all its buffers are range-checked in one
call, and its readable/writable byte counts are computed once.  A device does its I/O through
:meth:`DescriptorChain.readable_ranges`/:meth:`~DescriptorChain.writable_ranges` and
:meth:`GuestMemory.preadv <hypyr.memory.GuestMemory.preadv>`/``pwritev`` (scatter/gather straight
into the guest's buffers; a chain built from an indirect table in the usual layout also keeps its
descriptor columns in :attr:`DescriptorChain.cols` for ``preadv_cols``/``pwritev_cols``); :meth:`SplitQueue.add_used_many` completes several chains with one used-index
update.
"""

from __future__ import annotations

import functools
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
MAIN_TABLE_SNAPSHOT = 16384  # walk a multi-descriptor chain from one read of a main table this small

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class DeviceError(Exception):
    """The driver broke the protocol (bad descriptor, bad length...); the device needs a reset."""


class QueueError(DeviceError):
    """The driver broke the virtqueue protocol."""


@dataclass
class DescriptorChain:
    """One request: device-readable buffers, then device-writable ones, as (address, length).

    ``readable_len``/``writable_len`` are computed once (by the queue when it builds the chain,
    else on first use): do not change the buffer lists after that."""
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    _readable_len: int | None = field(default=None, repr=False, compare=False)
    _writable_len: int | None = field(default=None, repr=False, compare=False)
    # (addresses, lengths, number of readable buffers) as the queue saw them, when it built the
    # chain from columns (an indirect table in the usual layout); a device fast path may use them.
    cols: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def readable_len(self) -> int:
        n = self._readable_len
        if n is None:
            n = self._readable_len = sum(n for _, n in self.readable)
        return n

    @property
    def writable_len(self) -> int:
        n = self._writable_len
        if n is None:
            n = self._writable_len = sum(n for _, n in self.writable)
        return n

    @staticmethod
    def _slice(bufs: list[tuple[int, int]], total: int, offset: int, length: int) -> list[tuple[int, int]]:
        """The (addr, len) pieces of bytes [offset, offset+length) of ``bufs`` (whose lengths add up
        to ``total``; the range is already checked).  Whole buffers in the middle are taken as one
        list slice: only the ends are looked at one by one."""
        if length <= 0:
            return []
        i = 0
        while offset >= bufs[i][1]:  # skip the buffers wholly before offset
            offset -= bufs[i][1]
            total -= bufs[i][1]
            i += 1
        excess = total - offset - length  # bytes after the range, in bufs[i:]
        j = len(bufs)
        while excess >= bufs[j - 1][1]:  # drop the buffers wholly after it
            excess -= bufs[j - 1][1]
            j -= 1
        out = bufs[i:j]
        if offset:
            addr, n = out[0]
            out[0] = (addr + offset, n - offset)
        if excess:
            addr, n = out[-1]
            out[-1] = (addr, n - excess)
        return out

    def readable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Guest ranges of ``length`` bytes (default: the rest) of the readable buffers from ``offset``."""
        total = self.readable_len
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise QueueError(f"read of {length} bytes at {offset} from a chain with {total} readable bytes")
        return self._slice(self.readable, total, offset, length)

    def writable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Guest ranges of ``length`` bytes (default: the rest) of the writable buffers from ``offset``."""
        total = self.writable_len
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise QueueError(f"write of {length} bytes at {offset} into a chain with {total} writable bytes")
        return self._slice(self.writable, total, offset, length)

    def read(self, mem: GuestMemory, length: int | None = None, offset: int = 0) -> bytes:
        """Gather ``length`` bytes (default: all) of the readable buffers from ``offset``."""
        ranges = self.readable_ranges(offset, length)
        if len(ranges) == 1:
            return mem.read(*ranges[0])
        return b"".join(mem.read(a, n) for a, n in ranges)

    def write(self, mem: GuestMemory, data: bytes, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers starting at byte ``offset`` of them."""
        if offset < 0 or offset + len(data) > self.writable_len:
            raise QueueError(f"write of {len(data)} bytes at {offset} into a chain with "
                             f"{self.writable_len} writable bytes")
        view = memoryview(data)
        pos = 0
        for addr, n in self._slice(self.writable, self.writable_len, offset, len(data)):
            mem.write(addr, view[pos:pos + n])
            pos += n
        return len(data)


@functools.lru_cache(maxsize=64)
def _table_layout(count: int) -> tuple[struct.Struct, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """For a table of ``count`` descriptors: a Struct unpacking all of it at once, the ``next``
    fields of a linear chain (1..count-1), and runs of readable and writable NEXT flags."""
    return (struct.Struct("<" + "QIHH" * count), tuple(range(1, count)),
            (VIRTQ_DESC_F_NEXT,) * count, (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,) * count)


def _linear_table(table: bytes, count: int):
    """The chain of an indirect table in the layout every driver uses (descriptor i points to
    i+1, NEXT on all but the last, none INDIRECT, no empty buffer, readable before writable),
    checked with C-level tuple operations, as (addresses, lengths, number of readable buffers);
    None if the table is laid out any other way (then it is walked one by one).  The buffers'
    ranges are not checked here."""
    fmt, nexts, readable_flags, writable_flags = _table_layout(count)
    fields = fmt.unpack(table)
    flags = fields[2::4]
    if fields[3::4][:-1] != nexts:
        return None
    last = flags[-1]
    if last == VIRTQ_DESC_F_WRITE:
        nread = flags.count(VIRTQ_DESC_F_NEXT)
        if flags[:nread] != readable_flags[:nread] or flags[nread:-1] != writable_flags[:count - 1 - nread]:
            return None
    elif last == 0:
        nread = count
        if flags[:-1] != readable_flags[:count - 1]:
            return None
    else:
        return None
    lengths = fields[1::4]
    if 0 in lengths:
        return None
    return fields[0::4], lengths, nread


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
        size = self.size
        if head >= size:
            raise QueueError(f"head descriptor index {head} >= queue size {size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        base = self.desc_table
        table: bytes | None = None   # snapshot of the table being walked (None: read one at a time)
        count = ttl = size
        in_indirect = False
        unpack_from = _DESC.unpack_from
        desc = _DESC.unpack(mem.read(base + DESC_SIZE * head, DESC_SIZE))
        while True:
            if ttl == 0:
                raise QueueError(f"descriptor chain from {head} is longer than its table (a loop?)")
            ttl -= 1
            addr, length, flags, nxt = desc
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
                table = mem.read(addr, length)  # one snapshot of the whole table
                count = ttl = length // DESC_SIZE
                in_indirect = True
                fast = None if readable or writable else _linear_table(table, count)
                if fast is not None:  # the usual layout, checked in one go
                    addrs, lengths, nread = fast
                    if not mem.all_inside(addrs, lengths):
                        bad = mem.first_outside(zip(addrs, lengths))
                        raise QueueError(f"buffer at {bad[0]:#x}+{bad[1]:#x} is not in guest RAM")
                    return DescriptorChain(head, list(zip(addrs[:nread], lengths[:nread])),
                                           list(zip(addrs[nread:], lengths[nread:])),
                                           sum(lengths[:nread]), sum(lengths[nread:]),
                                           (addrs, lengths, nread))
                desc = unpack_from(table, 0)
                continue
            if length:
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append((addr, length))
                    wlen += length
                else:
                    if writable:
                        raise QueueError("device-readable buffer after a device-writable one")
                    readable.append((addr, length))
                    rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= count:
                raise QueueError(f"next descriptor index {nxt} >= table size {count}")
            if table is None and DESC_SIZE * count <= MAIN_TABLE_SNAPSHOT:
                table = mem.read(base, DESC_SIZE * count)
            if table is not None:
                desc = unpack_from(table, DESC_SIZE * nxt)
            else:
                desc = _DESC.unpack(mem.read(base + DESC_SIZE * nxt, DESC_SIZE))
        bad = mem.first_outside(readable + writable)
        if bad is not None:
            raise QueueError(f"buffer at {bad[0]:#x}+{bad[1]:#x} is not in guest RAM")
        return DescriptorChain(head, readable, writable, rlen, wlen)

    # -- completing requests -------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, with ``written`` bytes written into it."""
        self.add_used_many(((head, written),))

    def add_used_many(self, entries) -> None:
        """Return several chains ``(head, written)`` to the driver, in order, publishing the used
        index once (after all the elements)."""
        with self._lock:
            mem = self.mem
            if mem is None:
                return  # reset while the requests were in flight: drop them, the driver forgot them too
            size, ring, nxt = self.size, self.used_ring + 4, self.next_used
            run = bytearray()   # elements for consecutive slots, written with one mem.write
            run_slot = nxt % size
            for head, written in entries:
                slot = nxt % size
                if slot == 0 and run:  # the ring wraps: flush the run
                    mem.write(ring + 8 * run_slot, run)
                    run, run_slot = bytearray(), 0
                run += _USED_ELEM.pack(head, written)
                nxt = (nxt + 1) & 0xFFFF
            if not run:
                return
            mem.write(ring + 8 * run_slot, run)
            self.next_used = nxt
            mem.write_u16(self.used_ring + 2, nxt)

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
