"""virtio-net against a mock driver: the TAP is played by a SOCK_SEQPACKET socket pair (one
read or write per frame, as a TAP), so frames really cross; hostile chains come from hypothesis."""

import os
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_mock import MEM_SIZE, Buf, MockDriver

from hypyr.cli.domains import virtio_lines
from hypyr.devices.ratelimit import TokenBucket
from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio import net as N
from hypyr.devices.virtio import net_rx
from hypyr.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.memory import GuestMemory

ACK, DRV, DRV_OK, FEAT_OK, NEEDS_RESET = 1, 2, 4, 8, 64
MAC = bytes.fromhex("00163e123456")


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


class Edge:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def set_up_queues(t, features, rings):
    """A driver's steps up to DRIVER_OK: negotiate ``features``, then set up each queue from
    ``rings`` (size, descriptor table, avail ring, used ring), in queue order."""
    wr(t, M.STATUS, ACK | DRV)
    for sel in (0, 1):
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    wr(t, M.STATUS, ACK | DRV | FEAT_OK)
    assert rd(t, M.STATUS) & FEAT_OK
    for qi, (size, desc, avail, used) in enumerate(rings):
        wr(t, M.QUEUE_SEL, qi)
        wr(t, M.QUEUE_NUM, size)
        for lo, addr in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail), (M.QUEUE_DEVICE_LOW, used)):
            wr(t, lo, addr)
            wr(t, lo + 4, 0)
        wr(t, M.QUEUE_READY, 1)


class Nic:
    """A VirtioNet behind a transport, both queues driven by mock drivers in one guest memory."""

    def __init__(self, features, *, tx_rate=None, clock=None, size=16, monkeypatch=None, tap_fd=None):
        self.mem = GuestMemory.anonymous([(0, MEM_SIZE)], hugepages=False)
        self.rx = MockDriver(size=size, mem=self.mem, base=0x1000)
        self.tx = MockDriver(size=size, mem=self.mem, base=0x3000)
        self.rx.data_next, self.tx.data_next = 0x10000, 0x80000
        self.host, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._guest_side = guest_side
        self.offloads = []
        if monkeypatch is not None:  # without it, tap_fd is a real TAP
            monkeypatch.setattr(N.tap, "set_offload", lambda fd, flags: self.offloads.append(flags))
        self.dev = N.VirtioNet(guest_side.fileno() if tap_fd is None else tap_fd, MAC, mtu=1500,
                               tx_rate=tx_rate, clock=clock, ifname="test0")
        self.edge = Edge()
        self.t = VirtioMmioTransport(self.dev, self.mem, trigger=self.edge)
        self.bring_up(features)

    def bring_up(self, features):
        """What the driver does: negotiate ``features``, set up both queues, DRIVER_OK."""
        set_up_queues(self.t, features, [(d.size, d.desc, d.avail, d.used) for d in (self.rx, self.tx)])
        wr(self.t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)

    def status(self):
        return rd(self.t, M.STATUS)

    def close(self):
        self.dev.close()
        self.host.close()
        self._guest_side.close()


@pytest.fixture
def nic(monkeypatch):
    made = []

    def make(features=VIRTIO_F_VERSION_1 | N.F_MRG_RXBUF | N.F_GUEST_CSUM | N.F_GUEST_TSO4, **kw):
        n = Nic(features, monkeypatch=monkeypatch, **kw)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


def hdr(num_buffers=0, flags=0):
    return struct.pack("<BBHHHHH", flags, 0, 0, 0, 0, 0, num_buffers)


def test_config_space_and_features(nic):
    n = nic()
    offered = n.t.offered_features
    for f in (N.F_MAC, N.F_STATUS, N.F_MRG_RXBUF, N.F_CSUM, N.F_HOST_TSO4, N.F_GUEST_TSO6, N.F_MTU):
        assert offered & f
    cfg = n.t.read(M.CONFIG, 12)
    mac, status, pairs, mtu = struct.unpack("<6sHHH", cfg)
    assert (mac, status, pairs, mtu) == (MAC, N.S_LINK_UP, 1, 1500)
    # the guest's receive side takes checksum and TSO4 offloads: the TAP is told so
    assert n.offloads == [N.tap.TUN_F_CSUM | N.tap.TUN_F_TSO4]


def test_link_down_is_a_config_change(nic):
    n = nic()
    before = n.edge.count
    n.dev.set_link(False)
    assert n.edge.count == before + 1 and rd(n.t, M.INTERRUPT_STATUS) & M.INT_CONFIG
    assert struct.unpack("<H", n.t.read(M.CONFIG + 6, 2))[0] == 0


def test_transmit_reaches_the_tap_intact(nic):
    n = nic()
    frame = os.urandom(1500)
    a = n.tx.alloc(hdr() + frame[:700])
    b = n.tx.alloc(frame[700:])
    head = n.tx.add_chain([Buf(a, 12 + 700), Buf(b, 800)])
    n.t.notify(1)
    assert n.host.recv(70000) == hdr() + frame
    assert n.tx.take_used() == [(head, 0)]
    assert n.edge.count == 1
    assert n.dev.counters.tx_packets == 1 and n.dev.counters.tx_bytes == 1500


def test_receive_merges_buffers(nic):
    n = nic()
    bufs = [n.rx.alloc(2048) for _ in range(3)]
    heads = [n.rx.add_chain([Buf(a, 2048, write=True)]) for a in bufs]
    frame = os.urandom(3000)
    n.host.send(hdr() + frame)
    n.dev._rx_ready()
    used = n.rx.take_used()
    assert used == [(heads[0], 2048), (heads[1], 3012 - 2048)]
    got = n.mem.read(bufs[0], 2048) + n.mem.read(bufs[1], 3012 - 2048)
    assert got[:12] == hdr(num_buffers=2) and got[12:] == frame
    # the third buffer waits for the next frame
    n.host.send(hdr() + b"x" * 60)
    n.dev._rx_ready()
    assert n.rx.take_used() == [(heads[2], 72)]


def test_receive_waits_for_buffers_then_delivers(nic):
    n = nic()
    frame = os.urandom(5000)
    n.host.send(hdr() + frame)
    n.dev._rx_ready()  # no buffers yet: the frame is kept
    a = n.rx.alloc(4096)
    n.rx.add_chain([Buf(a, 4096, write=True)])
    n.t.notify(0)  # one buffer is not enough for 5012 bytes
    assert n.rx.take_used() == []
    b = n.rx.alloc(4096)
    n.rx.add_chain([Buf(b, 4096, write=True)])
    n.t.notify(0)
    assert [w for _, w in n.rx.take_used()] == [4096, 5012 - 4096]
    assert (n.mem.read(a, 4096) + n.mem.read(b, 916))[12:] == frame


def test_report_shows_the_rings_and_the_frame_waiting(nic):
    n = nic()
    n.host.send(hdr() + os.urandom(5000))
    a = n.rx.alloc(4096)
    n.rx.add_chain([Buf(a, 4096, write=True)])
    n.t.notify(0)  # one buffer is not enough: the frame waits
    r = n.t.report()
    rxq, txq = r["queues"]
    assert (r["device"], r["status"] & DRV_OK, r["vhost"]) == ("net(test0)", DRV_OK, False)
    assert (rxq["avail_idx"], rxq["used_idx"], txq["avail_idx"]) == (1, 0, 0)
    assert r["rx"]["chains_held"] == 1 and r["rx"]["frame_waiting"] > 0
    lines = virtio_lines({"virtio0": r})
    assert lines[0].startswith("virtio0 net(test0): status 0xf") and "vhost False" in lines[0]
    assert lines[1].startswith("  queue 0: size 16; avail idx 1 ") and "used idx 0 " in lines[1]


def test_receive_without_mergeable_buffers_drops_what_does_not_fit(nic):
    n = nic(VIRTIO_F_VERSION_1)
    small = n.rx.alloc(100)
    h1 = n.rx.add_chain([Buf(small, 100, write=True)])
    big = n.rx.alloc(2000)
    h2 = n.rx.add_chain([Buf(big, 2000, write=True)])
    n.host.send(hdr() + b"a" * 500)   # too big for the first buffer: dropped
    n.host.send(hdr() + b"b" * 500)
    n.dev._rx_ready()
    assert n.rx.take_used() == [(h1, 0), (h2, 512)]
    assert n.mem.read(big, 512) == hdr(num_buffers=1) + b"b" * 500
    assert n.dev.counters.rx_dropped == 1
    assert not n.status() & NEEDS_RESET


def test_bad_transmit_chains_are_dropped_not_fatal(nic):
    n = nic()
    short = n.tx.alloc(8)
    h1 = n.tx.add_chain([Buf(short, 8)])                        # shorter than the header
    w = n.tx.alloc(64)
    h2 = n.tx.add_chain([Buf(w, 64, write=True)])               # nothing readable
    big = n.tx.alloc(0)
    n.tx.data_next += N.MAX_PACKET + 16
    h3 = n.tx.add_chain([Buf(big, N.MAX_PACKET + 1)])           # longer than any frame
    ok = n.tx.alloc(hdr() + b"z" * 60)
    h4 = n.tx.add_chain([Buf(ok, 72)])
    n.t.notify(1)
    assert n.tx.take_used() == [(h1, 0), (h2, 0), (h3, 0), (h4, 0)]
    assert n.host.recv(100) == hdr() + b"z" * 60
    assert n.dev.counters.tx_dropped == 3 and not n.status() & NEEDS_RESET


def test_transmit_outside_ram_needs_reset(nic):
    n = nic()
    n.tx.add_chain([Buf(MEM_SIZE - 10, 100)])
    n.t.notify(1)
    assert n.status() & NEEDS_RESET
    wr(n.t, M.STATUS, 0)  # the driver resets: back to a clean device
    assert n.status() == 0


def test_rate_limit_holds_frames_until_credit(nic):
    now = [0.0]
    n = nic(tx_rate=(100_000, 0.05), clock=lambda: now[0])
    frames = [os.urandom(40_000) for _ in range(3)]
    heads = [n.tx.add_chain([Buf(n.tx.alloc(hdr() + f), 12 + len(f))]) for f in frames]
    n.t.notify(1)
    # the bucket holds one interval's credit but at least one whole packet (MAX_PACKET): two go now
    sent = [h for h, _ in n.tx.take_used()]
    assert sent == heads[:1] or sent == heads[:2]
    assert n.dev._tx_held is not None and n.dev._tx_timer is not None
    while n.dev._tx_held is not None:  # each timer: one more frame's credit, never more than the bucket
        n.dev._tx_timer.cancel()
        now[0] += 1.0
        n.dev._tx_resume()
        sent += [h for h, _ in n.tx.take_used()]
    assert sent == heads
    assert [n.host.recv(70000)[12:] for _ in frames] == frames


def test_token_bucket_rate():
    now = [0.0]
    b = TokenBucket(1000, 0.1, clock=lambda: now[0])
    assert b.capacity == 100 and b.take(100) and not b.take(1)
    assert b.wait_time(50) == pytest.approx(0.05)
    now[0] += 0.05
    assert b.take(50) and not b.take(1)
    now[0] += 10
    assert b.take(100) and not b.take(1)  # never more than the capacity


def test_sticky_used_interrupt_while_external(nic):
    n = nic()
    assert rd(n.t, M.INTERRUPT_STATUS) == 0
    n.dev.external_used_interrupts = True
    wr(n.t, M.STATUS, 0)
    assert rd(n.t, M.INTERRUPT_STATUS) == 0  # reset clears it


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, MEM_SIZE + 4096), st.integers(0, 70000), st.booleans()),
                min_size=1, max_size=6),
       st.booleans(), st.binary(min_size=12, max_size=12))
def test_hostile_transmit_chains_never_crash(nic, bufs, indirect, header):
    n = nic()
    n.mem.write(0x80000, header)
    try:
        n.tx.add_chain([Buf(a, ln, w) for a, ln, w in bufs], indirect=indirect)
    except Exception:
        return  # the mock cannot even write such a chain
    n.t.notify(1)  # must not raise: a bad chain is a drop or NEEDS_RESET
    n.host.setblocking(False)
    try:
        while len(n.host.recv(70000)) <= N.MAX_PACKET:
            pass
    except BlockingIOError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, MEM_SIZE + 4096), st.integers(0, 9000)), min_size=1, max_size=8),
       st.integers(0, 9000), st.booleans())
def test_hostile_receive_buffers_never_write_outside(nic, bufs, frame_len, mergeable):
    feats = VIRTIO_F_VERSION_1 | (N.F_MRG_RXBUF if mergeable else 0) | VIRTIO_F_RING_EVENT_IDX
    n = nic(feats)
    for a, ln in bufs:
        try:
            n.rx.add_chain([Buf(a, ln, write=True)])
        except Exception:
            pass
    n.host.send(hdr() + bytes(frame_len))
    n.dev._rx_ready()  # must not raise
    for _head, written in n.rx.take_used():
        assert written <= 12 + frame_len


def test_receive_buffers_republished_while_held_need_reset(nic):
    n = nic()
    a = n.rx.alloc(16)
    for _ in range(n.rx.size + 4):  # the same 16-byte head, published again and again
        n.rx.mem.write_u16(n.rx.avail + 4 + 2 * (n.rx.avail_idx % n.rx.size), 0)
        n.rx.write_desc(0, a, 16, 2, 0)
        n.rx.avail_idx = (n.rx.avail_idx + 1) & 0xFFFF
        n.rx.mem.write_u16(n.rx.avail + 2, n.rx.avail_idx)
        if n.rx.avail_idx % n.rx.size == 0:
            n.host.send(hdr() + bytes(3000))
            n.t.notify(0)
    n.host.send(hdr() + bytes(3000))
    n.t.notify(0)
    assert n.status() & NEEDS_RESET
    assert len(n.dev.rx.chains) <= n.rx.size


def test_receive_ring_error_found_by_the_tap_path_resets_at_the_next_notify(nic):
    n = nic()
    n.rx.add_chain([Buf(MEM_SIZE + 4096, 2048, write=True)])  # outside RAM
    n.host.send(hdr() + b"x" * 100)
    n.dev._rx_ready()  # the I/O thread finds it: kept, not lost
    assert not n.status() & NEEDS_RESET
    n.t.notify(0)
    assert n.status() & NEEDS_RESET


class _FakeVhost:
    """Stands for VhostNet: records the ring progress it was started from."""

    def __init__(self):
        self.running = False
        self.bases = None

    def start(self, mem, rings, features):
        self.bases = [r.last_avail for r in rings]
        self.running = True

    def stop(self):
        self.running = False


def test_vhost_starts_after_a_receive_in_progress_and_from_its_progress(nic):
    """A resume (or DRIVER_OK) that hands the rings to vhost-net while the I/O thread is in the
    middle of a userspace receive waits for it, and vhost starts after the chains it used: no
    buffer is used twice (the guest's 'input.0:id N is not a head!')."""
    n = nic()
    a = n.rx.alloc(2048)
    head = n.rx.add_chain([Buf(a, 2048, write=True)])
    n.host.send(hdr() + b"y" * 100)
    inside, go = threading.Event(), threading.Event()
    read_frame = n.dev.rx.read_frame

    def slow_receive(*args):  # after the receive looked whether vhost runs, before it takes chains
        inside.set()
        go.wait(5)
        return read_frame(*args)
    n.dev.rx.read_frame = slow_receive
    io = threading.Thread(target=n.dev._rx_ready)
    io.start()
    assert inside.wait(5)
    n.dev.attach_vhost(vhost := _FakeVhost())
    handover = threading.Thread(target=n.dev._start_data_path)
    handover.start()
    handover.join(0.3)
    go.set()
    io.join(5)
    handover.join(5)
    assert n.rx.take_used() == [(head, 112)]
    assert vhost.running and vhost.bases == [1, 0]


def test_vhost_gets_back_the_receive_chains_the_userspace_path_kept(nic):
    n = nic()
    heads = [n.rx.add_chain([Buf(n.rx.alloc(2048), 2048, write=True)]) for _ in range(2)]
    n.host.send(hdr() + bytes(5000))  # does not fit in 2 x 2048: both chains are kept
    n.dev._rx_ready()
    assert len(n.dev.rx.chains) == 2 and n.rx.take_used() == []
    n.dev.attach_vhost(vhost := _FakeVhost())
    n.dev._start_data_path()
    assert vhost.bases == [0, 0] and not n.dev.rx.chains and heads


def _fresh_rings(n):
    """The driver after a reset: new, empty rings at the same places."""
    for drv, data in ((n.rx, 0x10000), (n.tx, 0x80000)):
        n.mem.fill(drv.desc, drv.used + 6 + 8 * drv.size - drv.desc)
        drv.__init__(size=drv.size, mem=n.mem, base=drv.desc)
        drv.data_next = data


def test_chains_held_by_the_device_are_in_flight_until_used(nic):
    """Receive chains kept for a frame that does not fit yet, and a transmit chain held for
    rate credit, count against the queue size until they are used, and a reset forgets them."""
    now = [0.0]
    n = nic(tx_rate=(100_000, 0.05), clock=lambda: now[0])
    rxq, txq = n.t.queues
    a = n.rx.alloc(2048)
    h1 = n.rx.add_chain([Buf(a, 2048, write=True)])
    n.host.send(hdr() + bytes(3000))
    n.dev._rx_ready()
    assert n.rx.take_used() == [] and rxq.in_flight == 1          # kept for the frame
    h2 = n.rx.add_chain([Buf(n.rx.alloc(2048), 2048, write=True)])
    n.t.notify(0)
    assert [h for h, _ in n.rx.take_used()] == [h1, h2] and rxq.in_flight == 0

    frames = [hdr() + os.urandom(40_000) for _ in range(3)]
    for f in frames:
        n.tx.add_chain([Buf(n.tx.alloc(f), len(f))])
    n.t.notify(1)
    assert n.dev._tx_held is not None and txq.in_flight == 1     # waiting for credit
    while n.dev._tx_held is not None:
        n.dev._tx_timer.cancel()
        now[0] += 1.0
        n.dev._tx_resume()
    assert len(n.tx.take_used()) == 3 and txq.in_flight == 0

    # held again on both sides, then the driver resets the device
    n.rx.add_chain([Buf(n.rx.alloc(2048), 2048, write=True)])
    n.host.send(hdr() + bytes(3000))
    n.dev._rx_ready()
    for f in frames:
        n.tx.add_chain([Buf(n.tx.alloc(f), len(f))])
    n.t.notify(1)
    assert rxq.in_flight == 1 and txq.in_flight >= 1
    n.dev._tx_timer.cancel()
    wr(n.t, M.STATUS, 0)
    assert rxq.in_flight == txq.in_flight == 0
    assert n.dev._tx_held is None and not n.dev.rx.chains
    # a fresh driver may hand over a full ring: one frame takes every buffer of it
    _fresh_rings(n)
    n.bring_up(VIRTIO_F_VERSION_1 | N.F_MRG_RXBUF)
    heads = [n.rx.add_chain([Buf(n.rx.alloc(256), 256, write=True)]) for _ in range(n.rx.size)]
    n.host.recv(70000)  # (what the TAP got before the reset)
    n.host.send(hdr() + bytes(n.rx.size * 256 - 12))
    n.dev._rx_ready()
    assert [h for h, _ in n.rx.take_used()] == heads and not n.status() & NEEDS_RESET


def test_many_rounds_through_a_small_ring_never_exceed_it(nic):
    """A well-behaved driver cycling its buffers through a 4-entry ring, frames split across
    buffers and transmit rate-limited, for many times the ring size: no false alarm."""
    now = [0.0]
    n = nic(tx_rate=(1_000_000, 0.05), clock=lambda: now[0], size=4)
    sent = got = 0
    for round_ in range(12):
        for _ in range(4):
            n.rx.add_chain([Buf(0x10000 + 0x1000 * (round_ % 4), 1500, write=True)])
        n.host.send(hdr() + bytes(2000))  # two buffers each
        n.host.send(hdr() + bytes(2000))
        n.dev._rx_ready()
        got += len(n.rx.take_used())
        for _ in range(4):
            f = hdr() + bytes(60_000)
            n.tx.add_chain([Buf(0x80000, len(f))])
        n.t.notify(1)
        while n.dev._tx_held is not None:
            n.dev._tx_timer.cancel()
            now[0] += 1.0
            n.dev._tx_resume()
        sent += len(n.tx.take_used())
        n.host.setblocking(False)
        try:
            while n.host.recv(70000):
                pass
        except BlockingIOError:
            pass
    assert (got, sent) == (48, 48) and not n.status() & NEEDS_RESET
    assert [q.in_flight for q in n.t.queues] == [0, 0]


# -- the direct receive path (MRG_RXBUF: the TAP read straight into the guest's buffers)
def _ring_of(n, count, size):
    bufs = [n.rx.alloc(size) for _ in range(count)]
    return bufs, [n.rx.add_chain([Buf(a, size, write=True)]) for a in bufs]


def test_direct_receive_spans_many_buffers_and_keeps_the_rest(nic):
    n = nic(size=64)
    bufs, heads = _ring_of(n, 40, 4096)
    big = os.urandom(65535 + 14)
    n.host.send(hdr() + big)
    n.dev._rx_ready()
    used = n.rx.take_used()
    k = -(-(12 + len(big)) // 4096)
    assert [h for h, _ in used] == heads[:k]
    assert [w for _, w in used] == [4096] * (k - 1) + [12 + len(big) - 4096 * (k - 1)]
    got = b"".join(n.mem.read(bufs[i], w) for i, (_, w) in enumerate(used))
    assert got == hdr(num_buffers=k) + big
    assert n.dev.counters.rx_packets == 1 and n.dev.counters.rx_bytes == len(big)
    # the spare chains (taken for the largest frame) carry over to the next frames, in order
    assert n.t.queues[0].in_flight == len(n.dev.rx.chains) > 0
    small = [os.urandom(4084), os.urandom(100)]
    for f in small:
        n.host.send(hdr() + f)
    n.dev._rx_ready()
    assert n.rx.take_used() == [(heads[k], 4096), (heads[k + 1], 112)]
    assert n.mem.read(bufs[k], 4096) == hdr(num_buffers=1) + small[0]
    assert n.mem.read(bufs[k + 1], 112) == hdr(num_buffers=1) + small[1]
    # quiesce hands the spare chains back unused: the ring is where the driver left it
    n.t.quiesce()
    assert n.t.queues[0].in_flight == 0 and n.t.queues[0].last_avail == k + 2 and not n.dev.rx.chains


def test_direct_receive_exact_fit_and_header_split_across_descriptors(nic):
    n = nic(size=64)
    # the first chain's header in two descriptors (5 + 3000 bytes), then 4096-byte chains
    a, b = n.rx.alloc(5), n.rx.alloc(3000)
    h0 = n.rx.add_chain([Buf(a, 5, write=True), Buf(b, 3000, write=True)])
    bufs, heads = _ring_of(n, 20, 4096)
    frame = os.urandom(3005 + 4096 - 12)  # exactly fills the first two chains
    n.host.send(hdr() + frame)
    n.dev._rx_ready()
    assert n.rx.take_used() == [(h0, 3005), (heads[0], 4096)]
    got = n.mem.read(a, 5) + n.mem.read(b, 3000) + n.mem.read(bufs[0], 4096)
    assert got == hdr(num_buffers=2) + frame


def test_direct_receive_drops_buffers_too_small(nic):
    n = nic(size=64)
    tiny = n.rx.add_chain([Buf(n.rx.alloc(8), 8, write=True)])     # smaller than the header: first
    bufs, heads = _ring_of(n, 2, 4096)
    empty = n.rx.add_chain([Buf(n.rx.alloc(16), 0, write=True)])    # no room at all, in the middle
    one = n.rx.add_chain([Buf(n.rx.alloc(1), 1, write=True)])       # 1 byte: fine after the header
    more, heads2 = _ring_of(n, 20, 4096)
    frame = os.urandom(8192 - 12 + 1 + 50)
    n.host.send(hdr() + frame)
    n.dev._rx_ready()
    used = n.rx.take_used()
    assert used == [(tiny, 0), (empty, 0), (heads[0], 4096), (heads[1], 4096), (one, 1), (heads2[0], 50)]
    got = n.mem.read(bufs[0], 4096) + n.mem.read(bufs[1], 4096)
    assert got[:12] == hdr(num_buffers=4) and got[12:] == frame[:8180]
    assert n.mem.read(more[0], 50) == frame[-50:]
    assert n.dev.counters.rx_dropped == 2
    # a used chain followed kept ones: quiesce returns the kept ones empty, not to the ring
    n.t.quiesce()
    assert n.t.queues[0].in_flight == 0
    assert all(w == 0 for _, w in n.rx.take_used())


def test_direct_receive_without_room_for_the_largest_frame_uses_the_bounce_buffer(nic):
    n = nic(size=16)
    bufs, heads = _ring_of(n, 4, 2048)   # 8 KiB: not room for a 64 KiB frame, enough for this one
    frame = os.urandom(5000)
    n.host.send(hdr() + frame)
    n.dev._rx_ready()
    assert [w for _, w in n.rx.take_used()] == [2048, 2048, 5012 - 4096]
    assert (n.mem.read(bufs[0], 2048) + n.mem.read(bufs[1], 2048) + n.mem.read(bufs[2], 916)) == \
        hdr(num_buffers=3) + frame
    assert n.t.queues[0].in_flight == 1  # the fourth one is kept


def test_receive_into_more_pieces_than_one_readv_takes_spills_and_completes(nic):
    """Buffers of many small pieces (more than IOV_MAX for one frame): the readv takes the
    chains it can and spills the rest, which then goes into the following chains; the frame
    arrives whole."""
    n = nic(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | N.F_MRG_RXBUF, size=256)
    pieces = []
    heads = []
    for _ in range(200):
        bufs = [n.rx.alloc(16) for _ in range(8)]
        pieces.append(bufs)
        heads.append(n.rx.add_chain([Buf(a, 16, write=True) for a in bufs], indirect=True))
    frame = os.urandom(20_000 - 12)
    n.host.send(hdr() + frame)
    n.dev._rx_ready()
    used = n.rx.take_used()
    k = -(-20_000 // 128)
    assert [h for h, _ in used] == heads[:k] and sum(w for _, w in used) == 20_000
    got = b"".join(n.mem.read(a, 16) for bufs in pieces[:k] for a in bufs)[:20_000]
    assert got == hdr(num_buffers=k) + frame
    assert n.dev.counters.rx_packets == 1 and not n.status() & NEEDS_RESET


def test_direct_receive_marks_the_pages_it_writes_while_tracking(nic):
    n = nic(size=64)
    bufs, heads = _ring_of(n, 20, 4096)
    n.host.send(hdr() + bytes(100))
    n.dev._rx_ready()                    # views kept from before the tracking...
    n.mem.start_dirty_tracking()
    n.host.send(hdr() + bytes(6000))
    n.dev._rx_ready()                    # ...are not trusted to mark: these pages are
    dirty = set(n.mem.take_dirty()[0])
    assert [h for h, _ in n.rx.take_used()] == heads[:3]
    assert {bufs[1] // 4096, bufs[2] // 4096} <= dirty


def test_direct_receive_hostile_ring_needs_reset(nic):
    n = nic(size=64)
    _ring_of(n, 5, 4096)
    n.rx.add_chain([Buf(MEM_SIZE - 100, 4096, write=True)])  # runs out of RAM
    _ring_of(n, 20, 4096)
    n.host.send(hdr() + b"x" * 100)
    n.dev._rx_ready()
    assert n.rx.take_used() == []
    n.t.notify(0)
    assert n.status() & NEEDS_RESET
    wr(n.t, M.STATUS, 0)
    assert n.t.queues[0].in_flight == 0 and not n.dev.rx.chains


def test_pop_many_matches_pop():
    from virtio_mock import MockDriver

    from hypyr.devices.virtio.chain import QueueError
    drv = MockDriver(size=8)
    q = drv.queue(event_idx=True)
    for i in range(3):
        drv.add_chain([Buf(0x10000 + 0x100 * i, 0x100, write=True)])
    drv.add_chain([Buf(0x20000, 16), Buf(0x20100, 64, write=True)])   # not a single writable buffer
    chains, err = q.pop_many(10)
    assert err is None and [c.head for c in chains] == [0, 1, 2, 3]
    assert [c.writable for c in chains] == [[(0x10000 + 0x100 * i, 0x100)] for i in range(3)] + [[(0x20100, 64)]]
    assert chains[3].readable == [(0x20000, 16)] and q.in_flight == 4 and q.last_avail == 4
    assert drv.mem.read_u16(drv.used + 4 + 8 * 8) == 4  # avail_event follows
    drv.add_chain([Buf(0x10000, 0x100, write=True)])
    drv.add_chain([Buf(MEM_SIZE, 0x100, write=True)])                   # outside RAM
    chains, err = q.pop_many(5)
    assert [c.head for c in chains] == [5] and isinstance(err, QueueError)
    assert q.pop_many(0) == ([], None)


class _LinuxLikeReceiver:
    """The receive side of a mergeable-buffer driver, as Linux keeps it: every buffer it gave is
    outstanding until used, and a used element for any other head is the guest's "id N is not a
    head!" (a ring fault). Frames are put together again from num_buffers. Each buffer's page
    is 4 KiB: what lies past the buffer, and the whole page once the buffer came back (the guest
    reuses that memory), hold a pattern the device must never write."""

    SLOT = 4096

    def __init__(self, n: "Nic"):
        self.n, self.outstanding, self.frames = n, {}, []
        self._parts: list[bytes] = []
        self._left = 0
        self._returned: set[int] = set()  # pages of buffers used and not given again

    def refill(self, count: int, size: int) -> None:
        drv = self.n.rx
        for _ in range(min(count, drv.size - len(self.outstanding))):
            head = drv.next_desc
            assert head not in self.outstanding
            addr = 0x10000 + head * self.SLOT
            self.n.mem.write(addr + size, b"\xee" * (self.SLOT - size))
            drv.add_chain([Buf(addr, size, write=True)])
            self.outstanding[head] = (addr, size)
            self._returned.discard(addr)

    def take(self) -> None:
        for head, written in self.n.rx.take_used():
            assert head in self.outstanding, f"used id {head} is not a head the driver gave"
            addr, size = self.outstanding.pop(head)
            assert 0 < written <= size
            data = self.n.mem.read(addr, written)
            self.n.mem.write(addr, b"\xcd" * self.SLOT)
            self._returned.add(addr)
            if not self._left:
                self._left = struct.unpack_from("<H", data, 10)[0]
                assert self._left >= 1
            self._parts.append(data)
            self._left -= 1
            if not self._left:
                self.frames.append(b"".join(self._parts))
                self._parts = []

    def check_untouched(self) -> None:
        """No write past a buffer, none into a buffer the device gave back."""
        mem = self.n.mem
        for addr, size in self.outstanding.values():
            assert mem.read(addr + size, self.SLOT - size) == b"\xee" * (self.SLOT - size), "past a buffer"
        for addr in self._returned:
            assert mem.read(addr, self.SLOT) == b"\xcd" * self.SLOT, f"into the returned buffer at {addr:#x}"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "ready", "take", "refill", "quiesce"]),
                          st.integers(14, net_rx.MAX_FRAME), st.integers(1518, 4096)), min_size=4, max_size=120))
def test_receive_uses_each_buffer_once_and_frames_arrive_intact(ops):
    """Frames of every size into buffers of Linux's mergeable sizes, with the ring running dry and
    being refilled in any order: every used element is a buffer the driver gave (never one twice),
    and every frame arrives whole, in order, with its num_buffers."""
    with pytest.MonkeyPatch.context() as mp:
        n = Nic(VIRTIO_F_VERSION_1 | N.F_MRG_RXBUF | N.F_GUEST_CSUM | N.F_GUEST_TSO4, monkeypatch=mp, size=64)
    try:
        n.host.setblocking(False)
        guest, sent = _LinuxLikeReceiver(n), []
        for op, length, size in ops:
            if op == "send":
                frame = hdr() + os.urandom(length)
                try:
                    n.host.send(frame)
                    sent.append(frame)
                except BlockingIOError:
                    pass
            elif op == "ready":
                n.dev._rx_ready()
            elif op == "take":
                guest.take()
            elif op == "quiesce":
                n.t.quiesce()
                n.t.resume()
            else:
                guest.refill(length % 64 + 1, size)
            guest.check_untouched()
        for _ in range(4 * len(sent) + 4):  # drain: room for everything, until every frame is in
            guest.refill(64, 4096)
            n.dev._rx_ready()
            guest.take()
            guest.check_untouched()
            if len(guest.frames) == len(sent):
                break
        assert not n.status() & NEEDS_RESET and n.dev._pending_error is None
        assert len(guest.frames) == len(sent)
        for got, frame in zip(guest.frames, sent):
            assert got[:10] == frame[:10] and got[12:] == frame[12:]
    finally:
        n.close()
