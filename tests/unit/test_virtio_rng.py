"""virtio-rng end to end: a mock driver sets it up through the MMIO registers."""

import logging
import struct

from virtio_mock import MEM_SIZE, Buf, MockDriver

from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio.chain import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hypyr.devices.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_RNG,
)
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.devices.virtio.mmio_regs import QUEUE_NOTIFY_OFFSET
from hypyr.devices.virtio.rng import MAX_REQUEST, VirtioRng

ACK, DRV, DRV_OK, FEAT_OK, NEEDS_RESET = 1, 2, 4, 8, 64


class Line:
    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, level):
        self.calls.append(level)


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


def start(features=VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC, size=16):
    drv = MockDriver(size=size)
    line = Line()
    rng = VirtioRng()
    t = VirtioMmioTransport(rng, drv.mem, line)
    assert rd(t, M.MAGIC) == 0x74726976 and rd(t, M.VERSION) == 2 and rd(t, M.DEVICE_ID) == VIRTIO_ID_RNG == 4
    wr(t, M.STATUS, 0)
    wr(t, M.STATUS, ACK | DRV)
    wr(t, M.DEVICE_FEATURES_SEL, 0)
    assert rd(t, M.DEVICE_FEATURES) == VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX  # nothing rng-specific
    for sel in (0, 1):
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    wr(t, M.STATUS, ACK | DRV | FEAT_OK)
    assert rd(t, M.STATUS) & FEAT_OK
    wr(t, M.QUEUE_SEL, 0)
    assert rd(t, M.QUEUE_NUM_MAX) == 256
    wr(t, M.QUEUE_SEL, 1)
    assert rd(t, M.QUEUE_NUM_MAX) == 0  # one queue only
    wr(t, M.QUEUE_SEL, 0)
    wr(t, M.QUEUE_NUM, drv.size)
    for lo, addr in ((M.QUEUE_DESC_LOW, drv.desc), (M.QUEUE_DRIVER_LOW, drv.avail), (M.QUEUE_DEVICE_LOW, drv.used)):
        wr(t, lo, addr)
        wr(t, lo + 4, 0)
    wr(t, M.QUEUE_READY, 1)
    wr(t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)
    assert rd(t, M.STATUS) == ACK | DRV | FEAT_OK | DRV_OK
    return t, rng, drv, line


def test_entropy_request_end_to_end():
    t, rng, drv, line = start()
    buf = drv.alloc(64)
    head = drv.add_chain([Buf(buf, 64, write=True)])
    assert drv.mem.read(buf, 64) == bytes(64)
    wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert drv.take_used() == [(head, 64)]
    assert drv.mem.read(buf, 64) != bytes(64)
    assert rd(t, M.INTERRUPT_STATUS) == 1 and line.calls == [True]
    wr(t, M.INTERRUPT_ACK, 1)
    assert rd(t, M.INTERRUPT_STATUS) == 0 and line.calls == [True, False]


def test_several_requests_one_interrupt_and_scatter():
    t, rng, drv, line = start()
    a, b, c = drv.alloc(16), drv.alloc(16), drv.alloc(32)
    drv.mem.fill(a, 16, 0)
    h1 = drv.add_chain([Buf(a, 8, write=True), Buf(a + 8, 8, write=True)])
    h2 = drv.add_chain([Buf(b, 16, write=True)], indirect=True)
    h3 = drv.add_chain([Buf(c, 32, write=True)])
    interrupts = []
    orig = rng._interrupt
    rng._interrupt = lambda i: (interrupts.append(i), orig(i))
    t.notify(0)
    assert drv.take_used() == [(h1, 16), (h2, 16), (h3, 32)]
    assert interrupts == [0]  # signal_used once per notification
    assert line.calls == [True]
    t.notify(0)  # nothing new: no interrupt, nothing used
    assert drv.take_used() == [] and interrupts == [0]


def test_request_capped_at_64k():
    t, rng, drv, line = start()
    big = drv.alloc(MAX_REQUEST + 4096)
    head = drv.add_chain([Buf(big, MAX_REQUEST + 4096, write=True)])
    t.notify(0)
    assert drv.take_used() == [(head, MAX_REQUEST)]
    assert drv.mem.read(big + MAX_REQUEST, 4096) == bytes(4096)  # past the cap: untouched
    assert drv.mem.read(big + MAX_REQUEST - 64, 64) != bytes(64)


def test_chain_without_writable_buffer_returned_empty(caplog):
    t, rng, drv, line = start()
    r = drv.alloc(b"no room here")
    head = drv.add_chain([Buf(r, 12)])
    with caplog.at_level(logging.DEBUG, logger="hypyr.dev"):
        t.notify(0)
    assert drv.take_used() == [(head, 0)]
    assert drv.mem.read(r, 12) == b"no room here"
    assert rd(t, M.STATUS) == ACK | DRV | FEAT_OK | DRV_OK  # not an error
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no writable buffer" in r.getMessage() for r in caplog.records)


def test_readable_prefix_is_ignored():
    t, rng, drv, line = start()
    r, w = drv.alloc(b"hdr!"), drv.alloc(8)
    head = drv.add_chain([Buf(r, 4), Buf(w, 8, write=True)])
    t.notify(0)
    assert drv.take_used() == [(head, 8)] and drv.mem.read(r, 4) == b"hdr!"


def test_bad_chain_needs_reset_but_good_ones_are_returned(caplog):
    t, rng, drv, line = start()
    good = drv.alloc(8)
    h1 = drv.add_chain([Buf(good, 8, write=True)])
    drv.add_chain([Buf(MEM_SIZE - 4, 8, write=True)])  # runs off the end of RAM
    with caplog.at_level(logging.WARNING, logger="hypyr.dev"):
        wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert drv.take_used() == [(h1, 8)]
    assert rd(t, M.STATUS) & NEEDS_RESET
    assert rd(t, M.INTERRUPT_STATUS) == 3 and line.calls == [True]
    assert len(caplog.records) == 1 and "not in guest RAM" in caplog.records[0].getMessage()
    wr(t, M.STATUS, 0)
    assert rd(t, M.STATUS) == 0 and line.calls == [True, False] and rng.queues == []


def test_event_idx_suppresses_interrupts():
    t, rng, drv, line = start(features=VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX)
    buf = drv.alloc(4)
    drv.set_used_event(1)  # interrupt only once the second buffer is used
    drv.add_chain([Buf(buf, 4, write=True)])
    t.notify(0)
    assert line.calls == [] and rd(t, M.INTERRUPT_STATUS) == 0
    drv.add_chain([Buf(buf, 4, write=True)])
    t.notify(0)
    assert line.calls == [True]
    assert drv.mem.read_u16(drv.used + 4 + 8 * drv.size) == 2  # avail_event follows our progress


def test_notify_for_other_queue_and_before_activation_ignored():
    rng = VirtioRng()
    rng.queue_notify(0)  # not activated: nothing to do
    rng.queue_notify(3)
    t, rng, drv, line = start()
    drv.add_chain([Buf(drv.alloc(4), 4, write=True)])
    rng.queue_notify(1)
    assert drv.take_used() == []


def test_hand_built_descriptors():
    """The request as Linux's virtio-rng builds it: one device-writable descriptor."""
    t, rng, drv, line = start(size=4)
    buf = drv.alloc(32)
    drv.write_desc(2, buf, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3)
    drv.write_desc(3, buf + 16, 16, VIRTQ_DESC_F_WRITE, 0)
    drv.publish(2)
    t.notify(0)
    assert drv.take_used() == [(2, 32)]


def test_guest_triggerable_log_lines_are_rate_limited(caplog):
    t, rng, drv, line = start()
    r = drv.alloc(b"no room here")
    with caplog.at_level(logging.DEBUG, logger="hypyr.dev"):
        for _ in range(4):
            for _ in range(16):
                drv.add_chain([Buf(r, 12)])  # nothing writable
            t.notify(0)
            assert len(drv.take_used()) == 16
        for _ in range(40):
            rng.queue_notify(3)  # no such queue
    messages = [rec.msg for rec in caplog.records]
    assert 1 <= messages.count(messages[0]) <= 5 and 1 <= messages.count(messages[-1]) <= 5
    assert len(set(messages)) == 2
