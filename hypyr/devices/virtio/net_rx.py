"""The userspace receive path of a virtio-net device: frames from its TAP into the guest's
receive chains, on the VM's I/O thread, under the device's receive lock.

With MRG_RXBUF a frame is read with one ``readv`` straight into the receive chains held, once
they can take the largest packet; otherwise (too few buffers yet, or no MRG_RXBUF) it is read
into a bounce buffer and copied.  docs/networking.md, "The device".
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
from .chain import DescriptorChain, DeviceError

if TYPE_CHECKING:
    from hypyr.memory import GuestMemory

    from .net import NetCounters
    from .queue import SplitQueue

_rlog = RateLimitedLog(logging.getLogger("hypyr.dev.virtio_net"))

HDR_LEN = tap.VNET_HDR_LEN
MAX_FRAME = 65535 + 14 + 4       # the largest (GSO) frame plus Ethernet and VLAN headers
MAX_PACKET = HDR_LEN + MAX_FRAME  # header + frame: a transmit chain longer than this is dropped
_NUM_BUFFERS = struct.Struct("<H")
# the direct receive path reads when its buffers hold MAX_PACKET, and tops them up (views, and
# chains if available) to this much, so that small frames do not cost a refill each
_RX_VIEW_ROOM = 2 * MAX_PACKET

Used = list[tuple[int, int]]  # (head, bytes written) of the chains used, for add_used_many


class Receiver:
    """The receive side of one NIC: the bounce buffer with the frame waiting in it, and the
    receive chains taken from the ring and not yet used."""

    def __init__(self, tap_fd: int, name: str, counters: NetCounters):
        self.tap_fd, self.name, self.counters = tap_fd, name, counters
        self.buf = bytearray(MAX_PACKET)
        self.length = 0                          # a frame read from the TAP and not yet delivered
        self.spare: deque[DescriptorChain] = deque()  # receive chains taken, not yet used
        self.spare_mixed = False  # a receive chain taken after them was used (see hand_back)
        # receive_direct's views of the first spare chains: (chains, views, views per chain, room)
        self.cache: tuple[list[DescriptorChain], list[memoryview], list[int], int] = ([], [], [], 0)

    def reset(self) -> None:
        self.length = 0
        self.spare.clear()
        self.cache = ([], [], [], 0)

    def report(self) -> dict:
        """The receive chains held and the bytes of a frame waiting (`hypyr info --queues`)."""
        return {"chains_held": len(self.spare), "frame_waiting": self.length}

    def hand_back(self, q: SplitQueue) -> bool:
        """Give the spare chains back to the ring unused (quiesce, vhost-net's start): taken
        again, as new, later.  Should a chain taken after them have been used (too small: so
        they are not the last ones taken), they are used empty instead, as that one was: then
        True (the caller signals the used ring)."""
        n = len(self.spare)
        used = self.spare_mixed
        if not used:  # they are the last n chains taken
            q.unpop(n)
        else:
            q.add_used_many([(c.head, 0) for c in self.spare])
        self.spare.clear()
        self.cache = ([], [], [], 0)
        return used

    def frame(self) -> bytes:
        """The frame read from the TAP and not yet delivered (for a save)."""
        return bytes(self.buf[:self.length])

    def load_frame(self, frame: bytes) -> None:
        self.buf[:len(frame)] = frame
        self.length = len(frame)

    def receive(self, q: SplitQueue, mem: GuestMemory, mergeable: bool, done: Used) -> None:
        """Deliver what the TAP has while the ring has room; adds the chains used to ``done``."""
        while True:
            if not self.length and mergeable:
                direct = self.receive_direct(q, mem, done)
                if direct is not None:
                    if not direct:
                        break  # the TAP is empty
                    continue
                # not room for the largest frame yet: through the bounce buffer
            if not self.length:
                try:
                    self.length = os.readv(self.tap_fd, [self.buf])
                except BlockingIOError:
                    break
                except OSError as e:
                    _rlog.warning("tapread", "%s: TAP read failed: %s", self.name, e.strerror)
                    break
                if self.length < HDR_LEN:
                    self.length = 0
                    continue
            if not self.deliver(q, mem, mergeable, done):
                break  # no room: the driver's next receive notify brings us back

    def _drop_chain(self, chain: DescriptorChain, done: Used) -> None:
        self.counters.rx_dropped += 1
        _rlog.warning("rxsmall", "%s: receive buffer of %d bytes is too small; returned unused",
                      self.name, chain.writable_len)
        done.append((chain.head, 0))

    def receive_direct(self, q: SplitQueue, mem: GuestMemory, done: Used) -> bool | None:  # noqa: C901 (too complex: pyproject.toml)
        """MRG_RXBUF: read one frame from the TAP straight into the guest's receive buffers.
        Takes receive chains into ``spare`` (in order, in flight) until their room from the
        front holds the largest packet (MAX_PACKET: the read can then never cut a frame), reads
        with one ``readv`` into those chains' buffers, sets num_buffers in the
        header (in the first buffer), uses the chains the frame filled and keeps the rest for the
        next frame.  Returns True if a frame was read, False if the TAP had none, None if there
        is not room for MAX_PACKET (or too many pieces for one readv): the bounce path then.
        Unusable chains are returned empty as by :meth:`deliver`."""
        spare = self.spare
        if not spare:
            self.spare_mixed = False
        while spare and spare[0].writable_len < HDR_LEN:  # the first buffer must hold the header
            self._drop_chain(spare.popleft(), done)     # (the rest stay the last ones taken)
        # the views of the spare chains from the front, kept from frame to frame (while they stay
        # at the front: other paths only pop there, or push back what they popped) until they
        # hold MAX_PACKET; made afresh while dirty tracking is on (views() marks the pages)
        chains, views, nviews, room = self.cache
        if mem.dirty_tracking or not chains or not spare or chains[0] is not spare[0]:
            chains, views, nviews, room = [], [], [], 0
        i = len(chains)
        while room < MAX_PACKET:
            if i < len(spare):  # views of the next spare chains, made in one go
                new: list[DescriptorChain] = []
                ranges: list[tuple[int, int]] = []
                counts: list[int] = []
                while i < len(spare) and room < _RX_VIEW_ROOM:
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
            per = spare[-1].writable_len if spare else 4096
            got, err = q.pop_many(min(q.size, -(-(_RX_VIEW_ROOM - room) // max(per, 1))))
            for c in got:
                if c.writable_len < (1 if spare else HDR_LEN):
                    if spare:  # used after chains we keep: those are no longer the last ones taken
                        self.spare_mixed = True
                    self._drop_chain(c, done)
                    continue
                spare.append(c)
            if err is not None:
                self.cache = (chains, views, nviews, room)
                raise err
            if not got:
                self.cache = (chains, views, nviews, room)
                return None
        self.cache = (chains, views, nviews, room)
        if len(views) > IOV_MAX:
            return None
        try:
            n = os.readv(self.tap_fd, views)
        except BlockingIOError:
            return False
        except OSError as e:
            _rlog.warning("tapread", "%s: TAP read failed: %s", self.name, e.strerror)
            return False
        if n < HDR_LEN:
            return True  # (as the bounce path: nothing to deliver)
        first = views[0]
        used = consumed = 0
        left = n
        while left > 0:
            c = spare.popleft()
            part = c.writable_len
            consumed += part
            if part > left:
                part = left
            done.append((c.head, part))
            left -= part
            used += 1
        if len(first) >= HDR_LEN:
            _NUM_BUFFERS.pack_into(first, 10, used)
        else:  # a header in several descriptors of the first chain
            self._write_num_buffers(mem, chains[0].writable, used)
        del views[:sum(nviews[:used])], nviews[:used], chains[:used]
        self.cache = (chains, views, nviews, room - consumed)
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n - HDR_LEN
        return True

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

    def _take(self, q: SplitQueue) -> DescriptorChain | None:
        if self.spare:
            return self.spare.popleft()
        return q.pop()

    def deliver(self, q: SplitQueue, mem: GuestMemory, mergeable: bool, done: Used) -> bool:
        """Copy the pending frame into receive chains; False if there are not enough yet."""
        n = self.length
        frame = memoryview(self.buf)[:n]
        if not mergeable:
            chain = self._take(q)
            if chain is None:
                return False
            self.length = 0
            _NUM_BUFFERS.pack_into(self.buf, 10, 1)  # VERSION_1 without MRG_RXBUF: always 1
            if chain.writable_len < n:
                self.counters.rx_dropped += 1
                _rlog.warning("rxsmall", "%s: receive buffer of %d bytes for a %d-byte packet; dropped",
                              self.name, chain.writable_len, n)
                done.append((chain.head, 0))
                return True
            chain.write(mem, frame)
            done.append((chain.head, n))
        else:
            chains: list[DescriptorChain] = []
            room = 0
            if not self.spare:
                self.spare_mixed = False
            while room < n:
                if not self.spare and len(chains) >= q.size:  # it would never fit: not stall for ever
                    raise DeviceError(f"a {n}-byte frame needs more receive buffers than the queue holds "
                                      f"({q.size})")
                chain = self._take(q)
                if chain is None:
                    self.spare.extendleft(reversed(chains))  # keep them for this frame
                    return False
                if chain.writable_len < (HDR_LEN if not chains else 1):
                    # a buffer that cannot hold its part (the first must hold the header)
                    self.counters.rx_dropped += 1
                    _rlog.warning("rxsmall", "%s: receive buffer of %d bytes is too small; returned unused",
                                  self.name, chain.writable_len)
                    done.append((chain.head, 0))
                    if chains:  # used after chains we keep: those are no longer the last ones taken
                        self.spare_mixed = True
                    continue
                chains.append(chain)
                room += chain.writable_len
            self.length = 0
            _NUM_BUFFERS.pack_into(self.buf, 10, len(chains))  # (the TAP leaves it 0)
            pos = 0
            for chain in chains:
                part = min(chain.writable_len, n - pos)
                chain.write(mem, frame[pos:pos + part])
                done.append((chain.head, part))
                pos += part
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n - HDR_LEN
        return True
