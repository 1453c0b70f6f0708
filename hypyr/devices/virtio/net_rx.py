"""The userspace receive path of a virtio-net device: frames from its TAP into the guest's
receive chains.

One path for every frame: one ``readv`` into the receive chains held (taken from the ring in
order, in flight until used), with the spill buffer as its last piece for what they cannot
hold; a spilled tail waits there until the driver posts more buffers.  docs/networking.md,
"The device".
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from typing import TYPE_CHECKING

from hypyr.devices.ratelog import RateLimitedLog
from hypyr.libc import IOV_MAX

from . import tap
from .chain import DescriptorChain, DeviceError, QueueError

if TYPE_CHECKING:
    from hypyr.memory import GuestMemory

    from .net import NetCounters
    from .queue import SplitQueue

_rlog = RateLimitedLog(logging.getLogger("hypyr.dev.virtio_net"))

HDR_LEN = tap.VNET_HDR_LEN
MAX_FRAME = 65535 + 14 + 4       # the largest (GSO) frame plus Ethernet and VLAN headers
MAX_PACKET = HDR_LEN + MAX_FRAME  # header + frame: a transmit chain longer than this is dropped
_NUM_BUFFERS = struct.Struct("<H")
# with MRG_RXBUF the chains held are topped up (views, and chains if the ring has them) to this
# much room once it falls under MAX_PACKET, so that small frames do not cost a refill each
_RX_VIEW_ROOM = 2 * MAX_PACKET

Used = list[tuple[int, int]]  # (head, bytes written) of the chains used, for add_used_many


class Receiver:
    """The receive side of one NIC: the chains it holds, the spill buffer and the frame
    waiting there.  The device calls it under its receive lock."""

    def __init__(self, tap_fd: int, name: str, counters: NetCounters):
        self.tap_fd, self.name, self.counters = tap_fd, name, counters
        self.chains: deque[DescriptorChain] = deque()  # taken from the ring, not yet used
        self.waiting = 0      # bytes of a frame waiting in the spill buffer for more chains
        self._held = 0        # ... whose head is in the first _held chains (0: all of it there)
        self._spill = bytearray(MAX_PACKET)
        self._mixed = False   # a chain taken after those held was used (see release)
        # the views of the first chains held: (chains, views, views per chain, room)
        self._cache: tuple[list[DescriptorChain], list[memoryview], list[int], int] = ([], [], [], 0)

    def receive(self, q: SplitQueue, mem: GuestMemory, mergeable: bool, done: Used) -> None:
        """Deliver what the TAP has while the ring has room: the waiting frame first, then
        frame after frame.  Adds the chains used to ``done``; raises QueueError/DeviceError
        for a bad ring."""
        while self._place_spill(q, mem, mergeable, done) and self.read_frame(q, mem, mergeable, done):
            pass

    def report(self) -> dict:
        """The receive chains held and the bytes of a frame waiting in the spill buffer, its
        head in the first ``held`` chains (`hypyr info --queues`)."""
        return {"chains_held": len(self.chains), "frame_waiting": self.waiting, "held": self._held}

    def release(self, q: SplitQueue, mem: GuestMemory | None) -> bool:
        """Hand back the chains held (quiesce, vhost-net's start).  A frame whose head is in
        some of them is first gathered whole into the spill buffer (delivered once, later).
        The chains go back to the ring unused; should a chain taken after them have been used
        (too small: so they are not the last ones taken), they are used empty instead, as that
        one was: then True (the caller signals the used ring)."""
        if not self.chains:
            return False
        if self._held:
            assert mem is not None  # chains are held only while the queues are active
            head = b"".join(mem.read(a, k) for c in list(self.chains)[:self._held] for a, k in c.writable)
            tail = self.waiting
            self._spill[len(head):len(head) + tail] = self._spill[:tail]
            self._spill[:len(head)] = head
            self.waiting, self._held = len(head) + tail, 0
        used = self._mixed
        if not used:  # they are the last chains taken
            q.unpop(len(self.chains))
        else:
            q.add_used_many([(c.head, 0) for c in self.chains])
        self.chains.clear()
        self._cache = ([], [], [], 0)
        return used

    def reset(self) -> None:
        self.chains.clear()
        self.waiting = self._held = 0
        self._mixed = False
        self._cache = ([], [], [], 0)

    def frame(self) -> bytes:
        """The frame waiting whole in the spill buffer (after :meth:`release`), for a save."""
        assert not self._held
        return bytes(self._spill[:self.waiting])

    def load_frame(self, frame: bytes) -> None:
        self.reset()
        self._spill[:len(frame)] = frame
        self.waiting = len(frame)

    def read_frame(self, q: SplitQueue, mem: GuestMemory, mergeable: bool, done: Used) -> bool:
        """Read one frame from the TAP into the chains held for it (MRG_RXBUF: as many as hold
        MAX_PACKET, or all there are; else one), the spill buffer taking what they cannot.  A
        frame that fits is used at once; with MRG_RXBUF a longer one leaves its tail in the
        spill for :meth:`_place_spill`, without it it is dropped.  False if there is no
        receive buffer or no frame."""
        chains, views, nviews, room = self._held_views(q, mem, mergeable, done)
        if not chains:
            return False  # no buffers: frames wait in the TAP (its queue, then its drops)
        k, nv = len(chains), len(views)   # the chains read into, and their views
        if not mergeable:
            k, nv, room = 1, nviews[0], chains[0].writable_len
        while nv >= IOV_MAX and k > 1:    # (a ring of tiny buffers: as many as one readv takes)
            k -= 1
            nv -= nviews[k]
            room -= chains[k].writable_len
        if nv >= IOV_MAX:  # one chain of over a thousand pieces (no driver does that)
            self.chains.popleft()
            self._forget_views(1)
            self._drop_chain(chains[0], done)
            return True
        iov = views if nv == len(views) else views[:nv]
        if room < MAX_PACKET:
            iov = [*iov, memoryview(self._spill)[:MAX_PACKET - room]]
        try:
            n = os.readv(self.tap_fd, iov)
        except BlockingIOError:
            return False
        except OSError as e:
            _rlog.warning("tapread", "%s: TAP read failed: %s", self.name, e.strerror)
            return False
        if n < HDR_LEN:
            return True  # nothing to deliver (the chains stay held)
        if n > room:
            if mergeable:  # the head in the chains read into, the tail spilled
                self.waiting, self._held = n - room, k
                return True
            self._forget_views(1)
            self._drop_chain(self.chains.popleft(), done, packet=n)
            return True
        spare = self.chains
        used = left = 0
        while left < n:
            c = spare.popleft()
            done.append((c.head, min(c.writable_len, n - left)))
            left += c.writable_len
            used += 1
        first = views[0]
        if len(first) >= HDR_LEN:
            _NUM_BUFFERS.pack_into(first, 10, used)
        else:  # a header in several descriptors of the first chain
            self._write_num_buffers(mem, chains[0].writable, used)
        self._forget_views(used)
        self._count(n)
        return True

    def _held_views(self, q: SplitQueue, mem: GuestMemory, mergeable: bool, done: Used):
        """The chains held at the front of ``chains`` and their buffers' views, topped up
        (views, and chains if the ring has them) to hold MAX_PACKET, or to one chain without
        MRG_RXBUF: (chains, views, views per chain, room).  Kept from frame to frame while
        they stay at the front (other paths only pop there, or push back what they popped);
        made afresh while dirty tracking is on (views() marks the pages).  Chains that cannot
        hold their part are used empty as they are taken."""
        spare = self.chains
        if not spare:
            self._mixed = False
        while spare and spare[0].writable_len < HDR_LEN:  # the first buffer must hold the header
            self._drop_chain(spare.popleft(), done)     # (the rest stay the last ones taken)
        chains, views, nviews, room = self._cache
        if mem.dirty_tracking or not chains or not spare or chains[0] is not spare[0]:
            chains, views, nviews, room = [], [], [], 0
        i = len(chains)
        want = MAX_PACKET if mergeable else 1
        while room < want:
            if i < len(spare):  # views of the next spare chains, made in one go
                new: list[DescriptorChain] = []
                ranges: list[tuple[int, int]] = []
                counts: list[int] = []
                while i < len(spare) and (room < _RX_VIEW_ROOM if mergeable else not new):
                    c = spare[i]
                    i += 1
                    w = c.writable
                    new.append(c)
                    ranges += w
                    counts.append(len(w))
                    room += c.writable_len
                vs = mem.views(ranges)
                if len(vs) != len(ranges):  # a buffer across two RAM regions: chain by chain
                    vs, counts = [], []
                    for c in new:
                        v = mem.views(c.writable)
                        vs += v
                        counts.append(len(v))
                chains += new
                views += vs
                nviews += counts
                continue
            popped, err = self._take_chains(q, done, _RX_VIEW_ROOM - room if mergeable else 1)
            if err is not None:
                self._cache = (chains, views, nviews, room)
                raise err
            if not popped:  # the ring has none
                break
        self._cache = (chains, views, nviews, room)
        return chains, views, nviews, room

    def _take_chains(self, q: SplitQueue, done: Used, room: int) -> tuple[int, QueueError | None]:
        """Append to ``chains`` the ring's next chains, about ``room`` bytes of them; a chain
        that cannot hold its part (the first of a frame: the header) is used empty instead.
        Returns how many chains the ring gave, and the error that stopped it, if any."""
        spare = self.chains
        per = spare[-1].writable_len if spare else 4096
        got, err = q.pop_many(min(q.size, -(-room // max(per, 1))))
        for c in got:
            if c.writable_len < (1 if spare else HDR_LEN):
                if spare:  # used after chains we keep: those are no longer the last ones taken
                    self._mixed = True
                self._drop_chain(c, done)
                continue
            spare.append(c)
        return len(got), err

    def _forget_views(self, used: int) -> None:
        """The first ``used`` cached chains were used: their views go."""
        chains, views, nviews, room = self._cache
        used = min(used, len(chains))
        drop = sum(nviews[:used])
        room -= sum(c.writable_len for c in chains[:used])
        del views[:drop], nviews[:used], chains[:used]
        self._cache = (chains, views, nviews, room)

    def _place_spill(self, q: SplitQueue, mem: GuestMemory, mergeable: bool, done: Used) -> bool:
        """Copy what waits in the spill buffer (a frame's tail, its head in the first
        ``_held`` spare chains; or, after a restore, a whole frame) into the chains after
        those, and use the frame's chains.  True if nothing waits (any more), False if the
        ring has not enough buffers yet."""
        n = self.waiting
        if not n:
            return True
        spare, held = self.chains, self._held
        if not held:
            while spare and spare[0].writable_len < (HDR_LEN if mergeable else 1):
                self._drop_chain(spare.popleft(), done)
        want = n if mergeable else 1
        room = sum(c.writable_len for c in list(spare)[held:]) if mergeable else len(spare)
        while room < want:
            before = len(spare)
            popped, err = self._take_chains(q, done, want - room)
            if err is not None:
                raise err
            if not popped:
                if len(spare) >= q.size and mergeable:  # it would never fit: not stall for ever
                    raise DeviceError(f"a frame needs more receive buffers than the queue holds ({q.size})")
                return False
            room += sum(c.writable_len for c in list(spare)[before:]) if mergeable else len(spare) - before
        self.waiting = self._held = 0
        self._cache = ([], [], [], 0)
        spill = memoryview(self._spill)[:n]
        if not mergeable:
            c = spare.popleft()
            if c.writable_len < n:
                self._drop_chain(c, done, packet=n)
                return True
            _NUM_BUFFERS.pack_into(self._spill, 10, 1)  # VERSION_1 without MRG_RXBUF: always 1
            c.write(mem, spill)
            done.append((c.head, n))
            self._count(n)
            return True
        count = pos = 0  # the chains after the held ones that the spill fills
        for c in list(spare)[held:]:
            count += 1
            pos += c.writable_len
            if pos >= n:
                break
        if held:
            self._write_num_buffers(mem, spare[0].writable, held + count)
        else:
            _NUM_BUFFERS.pack_into(self._spill, 10, count)  # (the TAP leaves it 0)
        frame_len = n
        for _ in range(held):
            c = spare.popleft()
            done.append((c.head, c.writable_len))
            frame_len += c.writable_len
        pos = 0
        for _ in range(count):
            c = spare.popleft()
            part = min(c.writable_len, n - pos)
            c.write(mem, spill[pos:pos + part])
            done.append((c.head, part))
            pos += part
        self._count(frame_len)
        return True

    def _count(self, n: int) -> None:
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n - HDR_LEN

    def _drop_chain(self, chain: DescriptorChain, done: Used, packet: int = 0) -> None:
        """Use ``chain`` empty and count a drop: too small for its part, or (``packet``, without
        MRG_RXBUF) for that whole packet, which is dropped."""
        self.counters.rx_dropped += 1
        if packet:
            _rlog.warning("rxsmall", "%s: receive buffer of %d bytes for a %d-byte packet; dropped",
                          self.name, chain.writable_len, packet)
        else:
            _rlog.warning("rxsmall", "%s: receive buffer of %d bytes is too small; returned unused",
                          self.name, chain.writable_len)
        done.append((chain.head, 0))

    @staticmethod
    def _write_num_buffers(mem: GuestMemory, ranges: list[tuple[int, int]], used: int) -> None:
        """num_buffers (bytes 10..11 of the header) when the header spans several buffers."""
        data = memoryview(_NUM_BUFFERS.pack(used))
        skip, pos = 10, 0
        for addr, n in ranges:
            if skip >= n:
                skip -= n
                continue
            k = min(n - skip, len(data) - pos)
            mem.write(addr + skip, data[pos:pos + k])
            pos += k
            skip = 0
            if pos == len(data):
                return
