"""A receive side modelled on Linux's virtio_net with mergeable buffers (6.1), to drive the
device's userspace receive path against, and to check that it writes only where it may.

What the model does as Linux does (drivers/net/virtio_net.c):

- buffers are carved back to back out of 32 KiB page frags (``skb_page_frag_refill``: a frag
  whose only reference is the allocator's is reused from offset 0), each takes a reference on
  its page; the last buffer of a frag takes the hole at the end (``add_recvbuf_mergeable``);
- their length comes from an EWMA of the packet lengths seen (``get_mergeable_buf_len``: clamp
  to [min_buf_len, PAGE_SIZE - hdr], aligned to 64);
- heads come from a LIFO free list (``detach_buf_split``), so a head just used is given again
  at once, for a buffer at another address;
- NAPI takes used elements in ring order, up to a budget, trusting ``num_buffers`` and each used
  length (``receive_mergeable``), drops the page references at once (the skb is freed) and
  refills when more than half the budget is free (``virtnet_receive``); the driver kicks only
  if ``vring_need_event`` says so (EVENT_IDX);
- a page whose last reference goes is free: poisoned, and may be anything (a page table).

After every device call, :meth:`LinuxRx.check_writes` finds every byte of the data area that
changed and requires it to lie in a buffer that was outstanding (given and not yet used) when
the call began.  Frames are checked whole, in order.
"""

from __future__ import annotations

import random
import socket
import struct

from test_virtio_net import ACK, DRV, DRV_OK, FEAT_OK, NEEDS_RESET, hdr, set_up_queues
from test_virtio_net import rd as _rd
from test_virtio_net import wr as _wr

from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio import net as N
from hypyr.devices.virtio.chain import VIRTQ_DESC_F_WRITE
from hypyr.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.memory import GuestMemory

HDR = 12
PAGE = 4096
FRAG = 32768
SIZE = 256                 # ring entries, as hypyr offers
RX_DESC, RX_AVAIL, RX_USED = 0x1000, 0x2000, 0x3000
TX_DESC, TX_AVAIL, TX_USED = 0x5000, 0x6000, 0x7000
DATA = 0x100000
NFRAGS = 96                # 3 MiB of frag pages
MEM = DATA + NFRAGS * FRAG
POISON = 0xDB
BUDGET = 64
MIN_BUF = 1518             # mergeable_min_buf_len with big packets: GOOD_PACKET_LEN

class Violation(AssertionError):
    pass


class LinuxRx:
    def __init__(self, seed: int = 0, *, budget: int = BUDGET, kick_always: bool = False,
                 oom: float = 0.0):
        self.rng = random.Random(seed)
        self.oom = oom            # chance that a GFP_ATOMIC refill stops early
        self.budget, self.kick_always = budget, kick_always
        self.mem = GuestMemory.anonymous([(0, MEM)], hugepages=False)
        self.host, self._guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self._guest_side.setblocking(False)
        self._set_offload, N.tap.set_offload = N.tap.set_offload, lambda fd, flags: None  # (no TAP)
        self.dev = N.VirtioNet(self._guest_side.fileno(), bytes.fromhex("00163e123456"), mtu=1500, ifname="lx0")
        self.irqs = 0
        self.t = VirtioMmioTransport(self.dev, self.mem, trigger=self._irq)
        # driver state
        self.free_heads = list(range(SIZE - 1, -1, -1))  # a stack: pop() gives 0 first
        self.state: dict[int, tuple[int, int, int]] = {}  # head -> (addr, len, frag index)
        self.avail_idx = 0
        self.kicked_at = 0        # avail idx at the last kick decision
        self.last_used = 0
        self.frag_refs = [0] * NFRAGS
        self.free_frags = list(range(NFRAGS))
        self.cur: int | None = None  # the allocator's frag (it holds one reference)
        self.offset = 0
        self.ewma = 0.0           # EWMA(pkt_len, 0, 64)
        self.sent: list[bytes] = []
        self.frames: list[bytes] = []
        self.steps = 0
        self.mem.fill(DATA, NFRAGS * FRAG, POISON)
        self._bring_up()
        self.shadow = bytearray(self.mem.read(DATA, NFRAGS * FRAG))

    def close(self):
        N.tap.set_offload = self._set_offload
        self.dev.close()
        self.host.close()
        self._guest_side.close()

    def _irq(self):
        self.irqs += 1

    def _bring_up(self):
        t = self.t
        features = (VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | N.F_MRG_RXBUF | N.F_GUEST_CSUM
                    | N.F_GUEST_TSO4 | N.F_GUEST_TSO6 | N.F_CSUM | N.F_HOST_TSO4)
        set_up_queues(t, features, [(SIZE, RX_DESC, RX_AVAIL, RX_USED), (SIZE, TX_DESC, TX_AVAIL, TX_USED)])
        self.try_fill_recv(kick=False)   # virtnet_open fills before DRIVER_OK... close enough
        _wr(t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)

    # ------------------------------------------------------------------ the allocator
    def _frag_put(self, f: int) -> None:
        self.frag_refs[f] -= 1
        assert self.frag_refs[f] >= 0
        if self.frag_refs[f] == 0:   # the page is free: it may become anything
            self.free_frags.append(f)
            self._poke(DATA + f * FRAG, bytes([POISON]) * FRAG)

    def _frag_refill(self, sz: int) -> int:
        if self.cur is not None:
            if self.frag_refs[self.cur] == 1:   # only ours: reuse from the start
                self.offset = 0
                return self.cur
            if self.offset + sz <= FRAG:
                return self.cur
            f, self.cur = self.cur, None
            self._frag_put(f)
        i = self.rng.randrange(len(self.free_frags))
        f = self.free_frags.pop(i)
        self.frag_refs[f] = 1
        self.cur, self.offset = f, 0
        return f

    def _buf_len(self) -> int:
        n = HDR + min(max(int(self.ewma), MIN_BUF), PAGE - HDR)
        return (n + 63) & ~63

    def _poke(self, addr: int, data: bytes) -> None:
        """A write by the guest (not the device)."""
        self.mem.write(addr, data)
        off = addr - DATA
        if 0 <= off < len(getattr(self, "shadow", b"")):
            self.shadow[off:off + len(data)] = data

    # ------------------------------------------------------------------ the ring
    def add_recvbuf(self) -> None:
        length = self._buf_len()
        f = self._frag_refill(length)
        addr = DATA + f * FRAG + self.offset
        self.frag_refs[f] += 1
        self.offset += length
        hole = FRAG - self.offset
        if hole < length:
            length += hole
            self.offset += hole
        head = self.free_heads.pop()
        self.mem.write(RX_DESC + 16 * head, struct.pack("<QIHH", addr, length, VIRTQ_DESC_F_WRITE, 0))
        self.mem.write_u16(RX_AVAIL + 4 + 2 * (self.avail_idx % SIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(RX_AVAIL + 2, self.avail_idx)
        self.state[head] = (addr, length, f)

    def try_fill_recv(self, kick: bool = True, limit: int | None = None) -> None:
        n = 0
        while self.free_heads and (limit is None or n < limit):
            self.add_recvbuf()
            n += 1
        if kick and n:
            self.kick_prepare_and_notify()

    def kick_prepare_and_notify(self) -> None:
        old, new = self.kicked_at, self.avail_idx
        self.kicked_at = new
        event = self.mem.read_u16(RX_USED + 4 + 8 * SIZE)
        if self.kick_always or ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF):
            self.device(lambda: self.t.notify(0))

    def device(self, call) -> None:
        """One call into the device, then the check of what it wrote."""
        before = {h: (a, n) for h, (a, n, _) in self.state.items()}
        call()
        self.steps += 1
        self.check_writes(before)
        if _rd(self.t, M.STATUS) & NEEDS_RESET or self.dev._pending_error:
            raise Violation(f"device needs reset: {self.dev._pending_error}")

    def check_writes(self, outstanding: dict[int, tuple[int, int]]) -> None:
        cur = self.mem.read(DATA, NFRAGS * FRAG)
        shadow = self.shadow
        if cur == shadow:
            return
        spans = sorted((a - DATA, a - DATA + n) for a, n in outstanding.values())
        gaps, pos = [], 0          # the bytes outside every outstanding buffer
        for s, e in spans:
            if s > pos:
                gaps.append((pos, s))
            pos = max(pos, e)
        gaps.append((pos, len(cur)))
        for s, e in gaps:
            if cur[s:e] != shadow[s:e]:
                i = next(j for j in range(s, e) if cur[j] != shadow[j])
                owner = [h for h, (a, n, _) in self.state.items() if a - DATA <= i < a - DATA + n]
                frag = i // FRAG
                raise Violation(
                    f"step {self.steps}: device wrote at {DATA + i:#x} (frag {frag}, refs "
                    f"{self.frag_refs[frag]}), outside every buffer outstanding when the call began; "
                    f"now the buffer of head(s) {owner} lies there")
        self.shadow[:] = cur

    # ------------------------------------------------------------------ NAPI
    def _get_buf(self):
        used_idx = self.mem.read_u16(RX_USED + 2)
        if used_idx == self.last_used:
            return None
        head, length = struct.unpack("<II", self.mem.read(RX_USED + 4 + 8 * (self.last_used % SIZE), 8))
        self.last_used = (self.last_used + 1) & 0xFFFF
        if head not in self.state:
            raise Violation(f"used id {head} is not a head!")
        addr, blen, f = self.state.pop(head)
        self.free_heads.append(head)   # detach_buf: head goes to the front of the free list
        if length > blen:
            raise Violation(f"used len {length} exceeds the buffer's {blen} (head {head})")
        data = self.mem.read(addr, length) if length else b""
        return head, data, f

    def napi(self) -> int:
        """virtnet_poll: up to ``budget`` packets, then refill, then re-arm (used_event)."""
        pkts = 0
        while pkts < self.budget:
            got = self._get_buf()
            if got is None:
                break
            _, data, f = got
            refs = [f]
            if len(data) < HDR + 14:
                self._frag_put(f)   # "packet too short": dropped
                raise Violation(f"frame of {len(data)} bytes")
            num = struct.unpack_from("<H", data, 10)[0]
            if num < 1:
                raise Violation("num_buffers 0")
            parts = [data]
            for k in range(num - 1):
                nxt = self._get_buf()
                if nxt is None:
                    raise Violation(f"rx error: {num - 1 - k} buffers out of {num} missing")
                parts.append(nxt[1])
                refs.append(nxt[2])
            frame = b"".join(parts)
            self.frames.append(frame)
            self.ewma = len(frame) - HDR if not self.ewma else self.ewma + (len(frame) - HDR - self.ewma) / 64
            for r in refs:          # the skb goes: its page references with it
                self._frag_put(r)
            pkts += 1
        if SIZE - len(self.state) > min(self.budget, SIZE) // 2:
            limit = self.rng.randrange(48) if self.rng.random() < self.oom else None
            self.try_fill_recv(limit=limit)   # (short: the refill work fills later)
        if pkts < self.budget:      # virtqueue_napi_complete: used_event = last_used
            self.mem.write_u16(RX_AVAIL + 4 + 2 * SIZE, self.last_used)
        self.check_frames()
        return pkts

    def check_frames(self) -> None:
        for i in range(len(self.frames)):
            got, want = self.frames[i], self.sent[i]
            if got[:10] != want[:10] or got[12:] != want[12:]:
                raise Violation(f"frame {i} of {len(want)} bytes arrived as {len(got)} bytes, not intact")
        # (frames checked: forget them)
        del self.sent[:len(self.frames)]
        self.frames.clear()

    # ------------------------------------------------------------------ the host side
    def send(self, length: int) -> bool:
        frame = hdr() + self.rng.randbytes(length)
        try:
            self.host.send(frame)
        except BlockingIOError:
            return False
        self.sent.append(frame)
        return True

    def tap_ready(self) -> None:
        self.device(self.dev._rx_ready)


def frame_len(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.choice((54, 60, 66, 78))                # ACKs
    if r < 0.8:
        return rng.randint(1400, 1514)
    return rng.randint(2000, 65535 + 14)                   # GSO


def run(seed: int, steps: int = 400, p_send: float = 0.45, p_napi: float = 0.35, p_quiesce: float = 0.0,
        **kw) -> LinuxRx:
    """One random schedule; raises Violation on the first wrong write or frame."""
    g = LinuxRx(seed, **kw)
    rng = g.rng
    try:
        for _ in range(steps):
            r = rng.random()
            if rng.random() < p_quiesce:   # a save or a migration's last pass
                g.device(lambda: (g.t.quiesce(), g.t.resume()))
            if r < p_send:
                for _ in range(rng.randint(1, 6)):
                    if not g.send(frame_len(rng)):
                        break
                if rng.random() < 0.7:
                    g.tap_ready()
            elif r < 1 - p_napi - 0.05:
                g.tap_ready()
            elif r < 1 - p_napi:
                g.try_fill_recv()     # the refill work, after a failed GFP_ATOMIC refill
            else:
                g.napi()
        for _ in range(200):   # drain
            g.tap_ready()
            g.napi()
            if not g.sent:
                break
        if g.sent:
            raise Violation(f"{len(g.sent)} frames never arrived")
    finally:
        g.close()
    return g


if __name__ == "__main__":
    import sys
    first, count = (int(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else ("0", "50")))
    bad = 0
    kw = {}
    for a in sys.argv[3:]:
        k, v = a.split("=")
        kw[k] = float(v) if "." in v else int(v)
    for s in range(first, first + count):
        try:
            run(s, **kw)
        except Violation as e:
            bad += 1
            print(f"seed {s}: {e}")
    print(f"{bad} of {count} seeds failed")
