"""The split virtqueue (virtio 1.2 §2.7), device side.

Everything the driver wrote is untrusted: it is read through
:class:`~hypyr.memory.GuestMemory` (bounds-checked) and validated here, and a violation raises
:class:`~.chain.QueueError`, which puts the device into NEEDS_RESET.  What a popped request is:
:class:`~.chain.DescriptorChain` (:mod:`.chain`).  The checks, the bound on chains in flight and
the fast path for indirect tables: docs/devices.md, "The split virtqueue".
"""

from __future__ import annotations

import functools
import struct
import threading
from array import array

from hypyr.memory import GuestMemory, GuestMemoryError

from .chain import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, DescriptorChain, QueueError

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_INDIRECT = 1024  # descriptors in one indirect table (Linux never uses more than the queue size)

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U16_PAIR = struct.Struct("<HH")  # a ring's flags and index


_FENCE = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier: on x86 a store may pass a later load except across a locked
    instruction, and taking a lock is one (what QEMU's smp_mb() does after setting avail_event)."""
    with _FENCE:
        pass


@functools.lru_cache(maxsize=64)
def _next_pattern(count: int) -> array:
    """The ``next`` fields of a linear chain of ``count`` descriptors, but the last: 1..count-1."""
    return array("H", range(1, count))


@functools.lru_cache(maxsize=256)
def _flags_pattern(count: int, nread: int) -> array:
    """The flags of a linear chain: ``nread`` readable descriptors, then writable ones."""
    f = [VIRTQ_DESC_F_NEXT] * nread + [VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE] * (count - nread)
    f[-1] &= ~VIRTQ_DESC_F_NEXT
    return array("H", f)


def _linear_table(table: bytes, count: int) -> tuple[array, int] | None:
    """The chain of an indirect table in the layout every driver uses (descriptor i points to
    i+1, NEXT on all but the last, none INDIRECT, readable before writable), checked with
    C-level array comparisons, as (the table as an ``array('I')``, number of readable
    descriptors); None if the table is laid out any other way (then it is walked one by one).
    The buffers' ranges are not checked here."""
    halves = array("H", table)
    if halves[7:8 * count - 8:8] != _next_pattern(count):
        return None
    flags = halves[6::8]
    last = flags[-1]
    if last == VIRTQ_DESC_F_WRITE:
        # a read (header, then writable buffers) or a write (readable buffers, then the status)
        # request, tried before counting
        for nread in (1, count - 1):
            if flags == _flags_pattern(count, nread):
                return array("I", table), nread
        nread = flags.count(VIRTQ_DESC_F_NEXT)
    elif last == 0:
        nread = count
    else:
        return None
    if flags != _flags_pattern(count, nread):
        return None
    return array("I", table), nread


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
            # views of exactly the rings' bytes (set by activate(); dropping them lets the
            # guest memory be unmapped)
            self._desc_v: memoryview | None = None
            self._avail_v: memoryview | None = None
            self._used_v: memoryview | None = None
            self.last_avail = 0       # next avail ring slot we will consume (free-running u16)
            self.next_used = 0        # next used ring slot we will fill (free-running u16)
            self.signalled_used = 0   # used idx at the last interrupt decision
            self.in_flight = 0        # chains popped and not yet returned (at most size)

    # -- setup ------------------------------------------------------------------------------------
    def _ring_views(self, mem: GuestMemory) -> tuple[memoryview, memoryview, memoryview]:
        """Check the driver's configuration (size, alignment, each ring in one region of guest
        RAM) and return views of the descriptor table, available ring and used ring."""
        n = self.size
        if n < 1 or n > self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of two in 1..{self.max_size}")
        views = []
        for what, addr, align, length in (("descriptor table", self.desc_table, 16, DESC_SIZE * n),
                                          ("available ring", self.avail_ring, 2, 6 + 2 * n),
                                          ("used ring", self.used_ring, 4, 6 + 8 * n)):
            if addr % align:
                raise QueueError(f"{what} at {addr:#x} is not {align}-byte aligned")
            if not mem.check_range(addr, length):
                raise QueueError(f"{what} at {addr:#x}+{length:#x} is not in guest RAM")
            try:
                views.append(mem.view(addr, length))
            except GuestMemoryError:
                raise QueueError(f"{what} at {addr:#x}+{length:#x} crosses from one RAM region into another") from None
        return views[0], views[1], views[2]

    def validate(self, mem: GuestMemory) -> None:
        """Check the driver's configuration (size, alignment, rings inside RAM)."""
        for v in self._ring_views(mem):
            v.release()

    def activate(self, mem: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        views = self._ring_views(mem)
        with self._lock:  # publish mem last, and atomically for pop()/add_used()
            self._desc_v, self._avail_v, self._used_v = views
            self.event_idx, self.indirect = event_idx, indirect
            self.mem = mem

    # -- consuming requests -------------------------------------------------------------------------
    def has_available(self) -> bool:
        with self._lock:
            avail = self._avail_v  # set with mem, by activate()
            return self.mem is not None and avail is not None and _U16.unpack_from(avail, 2)[0] != self.last_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises QueueError on any protocol violation."""
        with self._lock:
            return self._take_locked() if self._pending_locked() else None

    def pop_all(self) -> tuple[list[DescriptorChain], QueueError | None]:
        """Every available chain, in order, taken under one lock; and the QueueError that
        stopped the popping early (the chains before the bad one are returned), or None.
        avail.idx is read again after the last chain: a driver that added one while we were
        taking the others may have read the old avail_event and not notified us."""
        chains: list[DescriptorChain] = []
        with self._lock:
            try:
                while pending := self._pending_locked():
                    for _ in range(pending):
                        chains.append(self._take_locked())
            except QueueError as e:
                return chains, e
        return chains, None

    def pop_many(self, count: int) -> tuple[list[DescriptorChain], QueueError | None]:
        """Up to ``count`` available chains, in order, taken under one lock; and the QueueError
        that stopped the popping early (the chains before the bad one are returned), or None.
        Every check of :meth:`pop` applies (the in-flight bound included).  A chain of one
        device-writable descriptor (a receive buffer, as Linux's virtio-net posts them) is
        taken without the general walk."""
        chains: list[DescriptorChain] = []
        if count <= 0:
            return chains, None
        with self._lock:
            try:
                while len(chains) < count and (pending := self._pending_locked()):
                    self._take_many_locked(min(pending, count - len(chains)), chains)
            except QueueError as e:
                return chains, e
        return chains, None

    def _take_many_locked(self, count: int, out: list[DescriptorChain]) -> None:
        """Append the next ``count`` available chains (the caller knows there are that many) to
        ``out``; as ``count`` calls of :meth:`_take_locked`, which takes any chain that is not a
        single writable buffer inside RAM."""
        size, mem, avail, used, table = self.size, self.mem, self._avail_v, self._used_v, self._desc_v
        assert mem is not None and avail is not None and used is not None and table is not None
        unpack_desc, unpack_u16, check_range = _DESC.unpack_from, _U16.unpack_from, mem.check_range
        append, chain = out.append, DescriptorChain
        for _ in range(count):
            last = self.last_avail
            head = unpack_u16(avail, 4 + 2 * (last % size))[0]
            if head < size and self.in_flight < size:
                addr, length, flags, _ = unpack_desc(table, DESC_SIZE * head)
                if flags == VIRTQ_DESC_F_WRITE and length and check_range(addr, length):
                    self.last_avail = last = (last + 1) & 0xFFFF
                    if self.event_idx:
                        _U16.pack_into(used, 4 + 8 * size, last)
                    self.in_flight += 1
                    append(chain(head, [], [(addr, length)], 0, length))
                    continue
            append(self._take_locked())  # anything else, and every error, the general way

    def _pending_locked(self) -> int:
        """How many chains the driver has made available that we have not taken (0 while the
        queue is not active)."""
        avail = self._avail_v  # set with mem, by activate()
        if self.mem is None or avail is None:
            return 0
        avail_idx = _U16.unpack_from(avail, 2)[0]
        if avail_idx == self.last_avail and self.event_idx:
            # empty: but a driver that published just now may have read avail_event before our
            # last write of it reached memory, and not notify us; look again after a barrier
            _full_fence()
            avail_idx = _U16.unpack_from(avail, 2)[0]
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"avail.idx {avail_idx} is {pending} ahead of {self.last_avail}, "
                             f"more than the queue size {self.size}")
        return pending

    def _take_locked(self) -> DescriptorChain:
        """Take the next available chain (the caller knows there is one)."""
        size, last = self.size, self.last_avail
        mem, avail, used = self.mem, self._avail_v, self._used_v
        assert mem is not None and avail is not None and used is not None  # active: the caller checked
        if self.in_flight >= size:  # a driver publishing heads we still hold
            raise QueueError(f"Virtqueue size exceeded: {self.in_flight} chains in flight and "
                             f"another published (queue size {size})")
        head = _U16.unpack_from(avail, 4 + 2 * (last % size))[0]
        self.last_avail = last = (last + 1) & 0xFFFF
        if self.event_idx:  # avail_event: notify us again when the driver passes this index
            _U16.pack_into(used, 4 + 8 * size, last)
        try:
            chain = self._walk(mem, head)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from None
        self.in_flight += 1
        return chain

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise QueueError(f"head descriptor index {head} >= queue size {size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        table: bytes | memoryview | None = self._desc_v  # the table walked: the queue's, or an indirect one
        assert table is not None     # set with mem, by activate()
        count = ttl = size
        in_indirect = False
        unpack_from = _DESC.unpack_from
        desc = unpack_from(table, DESC_SIZE * head)
        addr, length, flags, _ = desc
        if (flags == VIRTQ_DESC_F_INDIRECT and self.indirect and length and not length % DESC_SIZE
                and length <= MAX_INDIRECT * DESC_SIZE and mem.check_range(addr, length)):
            # the usual request: one indirect table (the checks are those of the loop below)
            table = mem.read(addr, length)
            fast = _linear_table(table, length // DESC_SIZE)
            if fast is not None:
                return self._linear_chain(mem, head, table, *fast)
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
                    raise QueueError(f"indirect table length {length} is not a multiple of 16 in "
                                     f"16..{MAX_INDIRECT * 16}")
                if not mem.check_range(addr, length):
                    raise QueueError(f"indirect table at {addr:#x}+{length:#x} is not in guest RAM")
                table = mem.read(addr, length)  # one snapshot of the whole table
                count = ttl = length // DESC_SIZE
                in_indirect = True
                fast = None if readable or writable else _linear_table(table, count)
                if fast is not None:  # the usual layout, checked in one go
                    return self._linear_chain(mem, head, table, *fast)
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
            desc = unpack_from(table, DESC_SIZE * nxt)
        bad = mem.first_outside(readable + writable)
        if bad is not None:
            raise QueueError(f"buffer at {bad[0]:#x}+{bad[1]:#x} is not in guest RAM")
        return DescriptorChain(head, readable, writable, rlen, wlen)

    @staticmethod
    def _linear_chain(mem: GuestMemory, head: int, table: bytes, words: array, nread: int) -> DescriptorChain:
        """A chain from a table that passed :func:`_linear_table` (``table``, also as ``words``):
        check every buffer against guest RAM (at once, in C, when RAM is one region) and count
        the bytes."""
        count = len(words) >> 2
        if not mem.descs_inside(table):  # outside RAM, or RAM in several regions: one buffer at a time
            chain = DescriptorChain(head, table=words, nread=nread)
            bad = mem.first_outside(chain.readable + chain.writable)
            if bad is not None:
                raise QueueError(f"buffer at {bad[0]:#x}+{bad[1]:#x} is not in guest RAM")
            return chain
        total = sum(words[2::4])
        if nread == count:
            rlen = total
        elif nread == 1:
            rlen = words[2]
        elif nread == count - 1:
            rlen = total - words[-2]
        else:
            rlen = sum(words[2:4 * nread:4])
        return DescriptorChain(head, table=words, nread=nread, readable_len=rlen, writable_len=total - rlen)

    # -- save/restore --------------------------------------------------------------------------------
    def unpop(self, count: int) -> None:
        """Hand back the ``count`` chains popped last and not used (for save/restore: the driver
        still owns them, and the device takes them again, as new, after a resume or a restore).
        With EVENT_IDX, avail_event is moved back too, so the driver's next buffer notifies us."""
        with self._lock:
            if not 0 <= count <= self.in_flight:
                raise ValueError(f"cannot hand back {count} chains, {self.in_flight} are in flight")
            self.last_avail = (self.last_avail - count) & 0xFFFF
            self.in_flight -= count
            if count and self.event_idx and self._used_v is not None:
                _U16.pack_into(self._used_v, 4 + 8 * self.size, self.last_avail)

    def resync(self, last_avail: int) -> None:
        """Take over the ring progress from an outside data path (vhost): ``last_avail`` as it
        reports it, the next used index as the used ring shows it; every chain popped and not
        used is in flight.  Raises QueueError if those disagree by more than the queue size."""
        with self._lock:
            if self._used_v is None:
                return
            used = _U16.unpack_from(self._used_v, 2)[0]
            in_flight = (last_avail - used) & 0xFFFF
            if in_flight > self.size:
                raise QueueError(f"last avail index {last_avail} is {in_flight} ahead of used index {used}, "
                                 f"more than the queue size {self.size}")
            self.last_avail, self.next_used, self.signalled_used = last_avail & 0xFFFF, used, used
            self.in_flight = in_flight

    def indices(self) -> dict:
        """Where the device and the driver stand (`hypyr info DOMAIN --queues`): the device's
        own counters and, while the queue is active, the indices and flags the rings hold.
        Read without the lock, so that a report never waits for a stuck thread."""
        out = {"size": self.size, "ready": self.ready, "event_idx": self.event_idx,
               "last_avail": self.last_avail, "next_used": self.next_used,
               "signalled_used": self.signalled_used, "in_flight": self.in_flight}
        avail, used, size = self._avail_v, self._used_v, self.size
        if self.mem is not None and avail is not None and used is not None:
            try:
                out["avail_flags"], out["avail_idx"] = _U16_PAIR.unpack_from(avail, 0)
                out["used_flags"], out["used_idx"] = _U16_PAIR.unpack_from(used, 0)
                out["used_event"] = _U16.unpack_from(avail, 4 + 2 * size)[0]
                out["avail_event"] = _U16.unpack_from(used, 4 + 8 * size)[0]
            except ValueError:  # reset meanwhile: its views released
                pass
        return out

    # -- completing requests -------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, with ``written`` bytes written into it."""
        self.add_used_many(((head, written),))

    def add_used_many(self, entries) -> None:
        """Return several chains ``(head, written)`` to the driver, in order, publishing the used
        index once (after all the elements)."""
        with self._lock:
            used = self._used_v
            if used is None:
                return  # reset while the requests were in flight: drop them, the driver forgot them too
            size, nxt = self.size, self.next_used
            pack_into = _USED_ELEM.pack_into
            for head, written in entries:
                pack_into(used, 4 + 8 * (nxt % size), head, written)
                nxt = (nxt + 1) & 0xFFFF
            if nxt == self.next_used:
                return
            # never below 0: a late completion from before a reset must not make room for more
            self.in_flight = max(0, self.in_flight - ((nxt - self.next_used) & 0xFFFF))
            self.next_used = nxt
            _U16.pack_into(used, 2, nxt)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added since the last call."""
        with self._lock:
            avail = self._avail_v
            if avail is None:
                return False
            old, new = self.signalled_used, self.next_used
            self.signalled_used = new
            if old == new:
                return False
            if self.event_idx:
                used_event = _U16.unpack_from(avail, 4 + 2 * self.size)[0]
                return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            return not _U16.unpack_from(avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
