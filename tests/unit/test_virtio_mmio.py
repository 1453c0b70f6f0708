"""The virtio-mmio transport, driven the way Linux's virtio_mmio driver drives it."""

import contextlib
import logging
import struct
import threading

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_mock import MEM_SIZE, Buf, MockDriver

from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio.chain import QueueError
from hypyr.devices.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceError,
    VirtioDevice,
)
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.devices.virtio.mmio_regs import MMIO_WINDOW, QUEUE_NOTIFY_OFFSET
from hypyr.errors import StateError
from hypyr.memory import GuestMemory

DEV_FEATURE = 1 << 5
ACK, DRV, DRV_OK, FEAT_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128


class FakeDevice(VirtioDevice):
    device_id = 42
    queue_max_sizes = (16, 8)
    name = "fake"

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.config = bytearray(range(0x10, 0x30))
        self.raise_on_notify: BaseException | None = None
        self.raise_on_activate: BaseException | None = None
        self.on_notify = None

    def device_features(self):
        return DEV_FEATURE

    def config_read(self, offset, size):
        self.calls.append(("config_read", offset, size))
        return bytes((self.config + bytes(size))[offset:offset + size]) if offset < len(self.config) else bytes(size)

    def config_write(self, offset, data):
        self.calls.append(("config_write", offset, bytes(data)))

    def activate(self, mem, queues, driver_features, interrupt):
        self.calls.append(("activate", driver_features, len(queues)))
        if self.raise_on_activate is not None:
            raise self.raise_on_activate
        super().activate(mem, queues, driver_features, interrupt)

    def queue_notify(self, index):
        self.calls.append(("notify", index))
        if self.on_notify is not None:
            self.on_notify(index)
        if self.raise_on_notify is not None:
            raise self.raise_on_notify

    def reset(self):
        self.calls.append(("reset",))
        super().reset()

    def names(self):
        return [c[0] for c in self.calls]


class Line:
    """A recording IrqLine."""

    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, level: bool):
        self.calls.append(level)

    @property
    def level(self):
        return bool(self.calls) and self.calls[-1]


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


def make(device=None, mem=None):
    dev = device or FakeDevice()
    drv = MockDriver(size=16, mem=mem)
    line = Line()
    return VirtioMmioTransport(dev, drv.mem, line), dev, drv, line


def negotiate(t, accept=None):
    """Linux: reset, ACKNOWLEDGE, DRIVER, read features, write them, FEATURES_OK.  Returns the
    features read and whether FEATURES_OK stuck."""
    wr(t, M.STATUS, 0)
    assert rd(t, M.STATUS) == 0
    wr(t, M.STATUS, ACK)
    wr(t, M.STATUS, ACK | DRV)
    wr(t, M.DEVICE_FEATURES_SEL, 1)
    offered = rd(t, M.DEVICE_FEATURES) << 32
    wr(t, M.DEVICE_FEATURES_SEL, 0)
    offered |= rd(t, M.DEVICE_FEATURES)
    features = offered if accept is None else accept
    wr(t, M.DRIVER_FEATURES_SEL, 1)
    wr(t, M.DRIVER_FEATURES, features >> 32)
    wr(t, M.DRIVER_FEATURES_SEL, 0)
    wr(t, M.DRIVER_FEATURES, features & 0xFFFFFFFF)
    wr(t, M.STATUS, ACK | DRV | FEAT_OK)
    return offered, bool(rd(t, M.STATUS) & FEAT_OK)


def setup_queue(t, index, drv: MockDriver, *, desc=None, avail=None, used=None, num=None):
    wr(t, M.QUEUE_SEL, index)
    assert rd(t, M.QUEUE_READY) == 0
    assert rd(t, M.QUEUE_NUM_MAX) >= drv.size
    wr(t, M.QUEUE_NUM, drv.size if num is None else num)
    for lo, addr in ((M.QUEUE_DESC_LOW, drv.desc if desc is None else desc),
                     (M.QUEUE_DRIVER_LOW, drv.avail if avail is None else avail),
                     (M.QUEUE_DEVICE_LOW, drv.used if used is None else used)):
        wr(t, lo, addr & 0xFFFFFFFF)
        wr(t, lo + 4, addr >> 32)
    wr(t, M.QUEUE_READY, 1)
    assert rd(t, M.QUEUE_READY) == 1


def bring_up(t, drv, accept=None, **queue_kw):
    _, ok = negotiate(t, accept)
    assert ok
    setup_queue(t, 0, drv, **queue_kw)
    wr(t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)
    return rd(t, M.STATUS)


@contextlib.contextmanager
def captured(level=logging.DEBUG):
    records: list[logging.LogRecord] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = H(level)
    logger = logging.getLogger("hypyr.dev")
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


# ---------------------------------------------------------------------------- identification
def test_identification_registers():
    t, dev, _, _ = make()
    assert rd(t, M.MAGIC) == 0x74726976
    assert t.read(0, 4) == b"virt"
    assert rd(t, M.VERSION) == 2
    assert rd(t, M.DEVICE_ID) == 42
    assert rd(t, M.VENDOR) == 0x52595048
    assert rd(t, M.CONFIG_GENERATION) == 0
    assert MMIO_WINDOW == 0x1000 and QUEUE_NOTIFY_OFFSET == 0x50 and t.LENGTH == MMIO_WINDOW


def test_offered_features():
    t, _, _, _ = make()
    offered, _ = negotiate(t, accept=VIRTIO_F_VERSION_1)
    assert offered == DEV_FEATURE | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
    for sel in (2, 3, 0xFFFFFFFF):
        wr(t, M.DEVICE_FEATURES_SEL, sel)
        assert rd(t, M.DEVICE_FEATURES) == 0


def test_no_shared_memory_regions_and_reserved_registers():
    t, _, _, _ = make()
    wr(t, M.SHM_SEL, 0)
    assert rd(t, M.SHM_LEN_LOW) == rd(t, M.SHM_LEN_HIGH) == 0xFFFFFFFF
    for off in (M.QUEUE_RESET, 0x028, 0x040, 0x0F8, M.DEVICE_FEATURES_SEL, M.QUEUE_SEL, M.QUEUE_DESC_LOW):
        assert rd(t, off) == 0


# ---------------------------------------------------------------------------- feature negotiation
def test_features_ok_accepted_for_subset_with_version_1():
    t, dev, drv, _ = make()
    _, ok = negotiate(t, accept=VIRTIO_F_VERSION_1 | DEV_FEATURE)
    assert ok and t.registers()["driver_features"] == VIRTIO_F_VERSION_1 | DEV_FEATURE
    assert rd(t, M.STATUS) == ACK | DRV | FEAT_OK


@pytest.mark.parametrize("features", [
    0,                                    # legacy driver: no VERSION_1
    DEV_FEATURE,                          # still no VERSION_1
    VIRTIO_F_VERSION_1 | 1 << 6,          # a bit the device does not offer
    VIRTIO_F_VERSION_1 | 1 << 33,         # ... in the high word
])
def test_features_ok_refused(features):
    t, dev, drv, _ = make()
    with captured(logging.WARNING) as logs:
        _, ok = negotiate(t, accept=features)
    assert not ok and rd(t, M.STATUS) == ACK | DRV
    assert any("refused" in r.getMessage() for r in logs)
    # the driver gives up: DRIVER_OK without FEATURES_OK does nothing
    wr(t, M.STATUS, ACK | DRV | DRV_OK)
    assert rd(t, M.STATUS) == ACK | DRV
    assert "activate" not in dev.names()
    wr(t, M.STATUS, ACK | DRV | FAILED)
    assert rd(t, M.STATUS) == ACK | DRV | FAILED


def test_driver_features_frozen_after_features_ok():
    t, _, _, _ = make()
    negotiate(t, accept=VIRTIO_F_VERSION_1)
    wr(t, M.DRIVER_FEATURES_SEL, 0)
    wr(t, M.DRIVER_FEATURES, DEV_FEATURE)
    assert t.registers()["driver_features"] == VIRTIO_F_VERSION_1


def test_driver_features_beyond_word_1_ignored():
    t, _, _, _ = make()
    wr(t, M.DRIVER_FEATURES_SEL, 7)
    wr(t, M.DRIVER_FEATURES, 0xFFFFFFFF)
    assert t.registers()["driver_features"] == 0


# ---------------------------------------------------------------------------- status machine
def test_status_bits_cannot_be_cleared_except_by_reset():
    t, dev, _, _ = make()
    wr(t, M.STATUS, ACK | DRV)
    wr(t, M.STATUS, ACK)
    assert rd(t, M.STATUS) == ACK | DRV
    wr(t, M.STATUS, 0x100 | ACK | DRV)  # bits beyond the 8-bit status
    assert rd(t, M.STATUS) == ACK | DRV
    wr(t, M.STATUS, NEEDS_RESET | ACK | DRV)  # the driver cannot set the device's bit
    assert rd(t, M.STATUS) == ACK | DRV
    wr(t, M.STATUS, 0)
    assert rd(t, M.STATUS) == 0 and dev.names() == ["reset"]


def test_full_bring_up_activates_ready_queues_and_device():
    t, dev, drv, line = make()
    status = bring_up(t, drv)
    assert status == ACK | DRV | FEAT_OK | DRV_OK
    features = DEV_FEATURE | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
    assert dev.calls == [("reset",), ("activate", features, 2)]
    q0, q1 = dev.queues
    assert dev.queues == t.queues and dev.mem is drv.mem and dev.driver_features == features
    assert q0.mem is drv.mem and q0.event_idx and q0.indirect and q0.size == 16
    assert (q0.desc_table, q0.avail_ring, q0.used_ring) == (drv.desc, drv.avail, drv.used)
    assert q1.mem is None and not q1.ready  # not set up: inactive
    assert line.calls == []


def test_negotiated_ring_features_reach_the_queue():
    t, dev, drv, _ = make()
    bring_up(t, drv, accept=VIRTIO_F_VERSION_1)
    q0 = dev.queues[0]
    assert q0.mem is drv.mem and not q0.event_idx and not q0.indirect


def test_reset_after_bring_up():
    t, dev, drv, line = make()
    bring_up(t, drv)
    drv.add_chain([Buf(drv.alloc(4), 4)])
    q = dev.queues[0]
    q.add_used(q.pop().head, 0)
    dev._interrupt(0)
    assert rd(t, M.INTERRUPT_STATUS) == 1 and line.calls == [True]
    dev.calls.clear()
    wr(t, M.STATUS, 0)
    assert dev.calls == [("reset",)]
    assert rd(t, M.STATUS) == 0 and rd(t, M.INTERRUPT_STATUS) == 0 and line.calls == [True, False]
    assert all(q.mem is None and not q.ready for q in t.queues)
    s = t.registers()
    assert (s["driver_features"], s["queue_sel"], s["device_features_sel"], s["driver_features_sel"]) == (0, 0, 0, 0)
    wr(t, M.QUEUE_SEL, 0)
    assert rd(t, M.QUEUE_READY) == 0
    # and the device can be brought up again
    drv2 = MockDriver(size=16, mem=drv.mem, base=0x4000)
    assert bring_up(t, drv2) == ACK | DRV | FEAT_OK | DRV_OK
    assert t.queues[0].desc_table == 0x4000


# ---------------------------------------------------------------------------- queue registers
def test_queue_num_max_and_missing_queue():
    t, _, _, _ = make()
    for sel, expect in ((0, 16), (1, 8), (2, 0), (0xFFFFFFFF, 0)):
        wr(t, M.QUEUE_SEL, sel)
        assert rd(t, M.QUEUE_NUM_MAX) == expect
    wr(t, M.QUEUE_SEL, 5)
    wr(t, M.QUEUE_NUM, 4)
    wr(t, M.QUEUE_READY, 1)
    assert rd(t, M.QUEUE_READY) == 0
    assert [q.size for q in t.queues] == [16, 8]


def test_queue_addresses_are_64_bit():
    t, _, _, _ = make()
    wr(t, M.QUEUE_SEL, 1)
    wr(t, M.QUEUE_DESC_LOW, 0x89ABC000)
    wr(t, M.QUEUE_DESC_HIGH, 0x1234567)
    wr(t, M.QUEUE_DRIVER_HIGH, 0xFFFFFFFF)
    wr(t, M.QUEUE_DEVICE_LOW, 0x3000)
    q = t.queues[1]
    assert q.desc_table == 0x0123456789ABC000 and q.avail_ring == 0xFFFFFFFF << 32 and q.used_ring == 0x3000


def test_queue_config_ignored_while_ready_and_after_driver_ok():
    t, dev, drv, _ = make()
    negotiate(t)
    setup_queue(t, 0, drv)
    wr(t, M.QUEUE_NUM, 8)  # ready: ignored
    wr(t, M.QUEUE_DESC_LOW, 0x8000)
    assert t.queues[0].size == 16 and t.queues[0].desc_table == drv.desc
    wr(t, M.QUEUE_READY, 0)  # Linux's error path un-readies a queue before DRIVER_OK
    assert rd(t, M.QUEUE_READY) == 0
    wr(t, M.QUEUE_READY, 2)  # not a valid value
    assert rd(t, M.QUEUE_READY) == 0
    wr(t, M.QUEUE_READY, 1)
    wr(t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)
    for off, v in ((M.QUEUE_READY, 0), (M.QUEUE_NUM, 4), (M.QUEUE_DESC_LOW, 0), (M.QUEUE_DEVICE_HIGH, 1)):
        wr(t, off, v)
    q = t.queues[0]
    assert q.ready and q.size == 16 and q.desc_table == drv.desc and q.used_ring == drv.used
    wr(t, M.QUEUE_SEL, 1)  # a queue that was not set up cannot be after DRIVER_OK either
    wr(t, M.QUEUE_READY, 1)
    assert rd(t, M.QUEUE_READY) == 0


@pytest.mark.parametrize("kw", [
    {"desc": MEM_SIZE - 0x80},        # descriptor table runs off the end of RAM
    {"avail": MEM_SIZE},              # available ring outside RAM
    {"used": 1 << 40},                # used ring far outside RAM
    {"desc": 0x1008},                 # misaligned
    {"num": 12},                      # not a power of two
    {"num": 32},                      # above QueueNumMax
])
def test_bad_queue_setup_needs_reset_at_driver_ok(kw):
    t, dev, drv, line = make()
    with captured(logging.WARNING) as logs:
        status = bring_up(t, drv, **kw)
    assert status == ACK | DRV | FEAT_OK | DRV_OK | NEEDS_RESET
    assert "activate" not in dev.names()
    assert all(q.mem is None for q in t.queues)
    assert rd(t, M.INTERRUPT_STATUS) == 2 and line.calls == [True]
    assert [r.levelno for r in logs] == [logging.WARNING] and "queue 0" in logs[0].getMessage()
    wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert "notify" not in dev.names()
    wr(t, M.INTERRUPT_ACK, 2)
    assert line.calls == [True, False]
    wr(t, M.STATUS, 0)  # the driver recovers
    assert rd(t, M.STATUS) == 0
    assert bring_up(t, drv) == ACK | DRV | FEAT_OK | DRV_OK


@pytest.mark.parametrize("exc,level", [(DeviceError("bad config"), logging.WARNING),
                                       (RuntimeError("bug"), logging.ERROR)])
def test_device_activation_failure_needs_reset(exc, level):
    t, dev, drv, line = make()
    dev.raise_on_activate = exc
    with captured(logging.WARNING) as logs:
        status = bring_up(t, drv)
    assert status & NEEDS_RESET and line.level and rd(t, M.INTERRUPT_STATUS) == 2
    assert dev.names()[-2:] == ["activate", "reset"]  # cleaned up after the failed activation
    assert all(q.mem is None for q in t.queues)
    assert max(r.levelno for r in logs) == level


# ---------------------------------------------------------------------------- notifications
def test_notify_reaches_device_only_when_running():
    t, dev, drv, _ = make()
    wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert "notify" not in dev.names()
    bring_up(t, drv)
    wr(t, QUEUE_NOTIFY_OFFSET, 0)
    t.notify(0)  # the ioeventfd path
    wr(t, QUEUE_NOTIFY_OFFSET, 1)  # queue 1 is not ready
    wr(t, QUEUE_NOTIFY_OFFSET, 99)
    t.notify(-1)
    t.write(QUEUE_NOTIFY_OFFSET, b"\0\0")  # not 32-bit: ignored
    assert [c for c in dev.calls if c[0] == "notify"] == [("notify", 0), ("notify", 0)]


@pytest.mark.parametrize("exc", [DeviceError("descriptor says nonsense"), QueueError("loop in chain")])
def test_device_error_on_notify_needs_reset(exc):
    t, dev, drv, line = make()
    bring_up(t, drv)
    dev.raise_on_notify = exc
    with captured() as logs:
        wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert rd(t, M.STATUS) & NEEDS_RESET
    assert rd(t, M.INTERRUPT_STATUS) == 2 and line.calls == [True]
    warnings = [r for r in logs if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(exc) in warnings[0].getMessage() and not warnings[0].exc_info
    # no more notifications until reset
    wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert dev.names().count("notify") == 1
    # a driver status write keeps the device's bit
    wr(t, M.STATUS, rd(t, M.STATUS) | FAILED)
    assert rd(t, M.STATUS) == ACK | DRV | FEAT_OK | DRV_OK | NEEDS_RESET | FAILED
    wr(t, M.STATUS, 0)
    assert rd(t, M.STATUS) == 0 and not line.level


def test_unexpected_device_exception_on_notify_is_contained():
    t, dev, drv, line = make()
    bring_up(t, drv)
    dev.raise_on_notify = ZeroDivisionError("oops")
    with captured(logging.ERROR) as logs:
        t.notify(0)  # must not raise into the vCPU loop
    assert rd(t, M.STATUS) & NEEDS_RESET and line.level
    assert len(logs) == 1 and logs[0].exc_info  # rate-limited, with the traceback
    assert isinstance(logs[0].exc_info[1], ZeroDivisionError)


def test_stale_error_after_reset_is_dropped():
    """A notification that fails after the driver has reset the device must not poison the
    freshly reset device."""
    t, dev, drv, line = make()
    bring_up(t, drv)

    def reset_meanwhile(_):
        wr(t, M.STATUS, 0)  # another vCPU resets the device while this one is in the device
    dev.on_notify = reset_meanwhile
    dev.raise_on_notify = DeviceError("late")
    t.notify(0)
    assert rd(t, M.STATUS) == 0 and rd(t, M.INTERRUPT_STATUS) == 0 and not line.level


def test_device_may_interrupt_from_its_own_thread_during_notify():
    t, dev, drv, line = make()
    bring_up(t, drv)
    q = dev.queues[0]

    def worker(_):
        def run():
            q.add_used(q.pop().head, 0)
            dev.signal_used(0)
        th = threading.Thread(target=run)
        th.start()
        th.join(5)
        assert not th.is_alive(), "deadlock: device thread blocked on the transport"
    dev.on_notify = worker
    drv.add_chain([Buf(drv.alloc(4), 4)])
    wr(t, QUEUE_NOTIFY_OFFSET, 0)
    assert rd(t, M.INTERRUPT_STATUS) == 1 and line.calls == [True]
    assert drv.take_used() == [(0, 0)]


# ---------------------------------------------------------------------------- interrupts
def test_interrupt_and_ack_levels():
    t, dev, drv, line = make()
    bring_up(t, drv, accept=VIRTIO_F_VERSION_1)  # no event idx: plain NO_INTERRUPT semantics
    q = dev.queues[0]
    dev.signal_used(0)  # nothing used: no interrupt
    assert line.calls == [] and rd(t, M.INTERRUPT_STATUS) == 0
    for _ in range(2):
        drv.add_chain([Buf(drv.alloc(4), 4)])
        q.add_used(q.pop().head, 0)
        dev.signal_used(0)
    assert rd(t, M.INTERRUPT_STATUS) == 1 and line.calls == [True]  # level: asserted once
    wr(t, M.INTERRUPT_ACK, 2)  # acking a bit that is not set changes nothing
    assert line.calls == [True]
    wr(t, M.INTERRUPT_ACK, 1)
    assert rd(t, M.INTERRUPT_STATUS) == 0 and line.calls == [True, False]
    wr(t, M.INTERRUPT_ACK, 1)
    assert line.calls == [True, False]
    # the driver suppresses interrupts
    drv.set_avail_flags(1)
    drv.add_chain([Buf(drv.alloc(4), 4)])
    q.add_used(q.pop().head, 0)
    dev.signal_used(0)
    assert line.calls == [True, False] and rd(t, M.INTERRUPT_STATUS) == 0
    dev.signal_used(7)  # unknown queue: ignored
    assert line.calls == [True, False]


def test_both_interrupt_causes_line_drops_when_all_acked():
    t, dev, drv, line = make()
    bring_up(t, drv)
    q = dev.queues[0]
    drv.set_used_event(0)
    drv.add_chain([Buf(drv.alloc(4), 4)])
    q.add_used(q.pop().head, 0)
    dev.signal_used(0)
    t.config_changed()
    assert rd(t, M.INTERRUPT_STATUS) == 3 and rd(t, M.CONFIG_GENERATION) == 1
    wr(t, M.INTERRUPT_ACK, 1)
    assert line.calls == [True]
    wr(t, M.INTERRUPT_ACK, 2)
    assert line.calls == [True, False]


def test_config_change_before_driver_ok_only_bumps_generation():
    t, _, _, line = make()
    t.config_changed()
    assert rd(t, M.CONFIG_GENERATION) == 1 and rd(t, M.INTERRUPT_STATUS) == 0 and line.calls == []


def test_irq_failure_is_contained():
    dev = FakeDevice()
    drv = MockDriver(size=16)

    def bad_line(level):
        raise OSError("KVM_IRQ_LINE failed")
    t = VirtioMmioTransport(dev, drv.mem, bad_line)
    with captured(logging.ERROR) as logs:
        bring_up(t, drv)
        t.config_changed()
    assert rd(t, M.INTERRUPT_STATUS) == 2 and len(logs) == 1


# ---------------------------------------------------------------------------- access widths
@pytest.mark.parametrize("off,size", [(M.MAGIC, 1), (M.MAGIC, 2), (M.MAGIC, 8), (M.MAGIC + 1, 4), (M.STATUS + 2, 2),
                                      (0xFE, 4), (0xFF, 1)])
def test_non_32_bit_register_reads_return_zeros(off, size):
    t, _, _, _ = make()
    assert t.read(off, size) == bytes(size)


def test_non_32_bit_register_writes_ignored():
    t, dev, _, _ = make()
    with captured() as logs:
        t.write(M.STATUS, b"\x01")
        t.write(M.STATUS, b"\x01\x00")
        t.write(M.STATUS, struct.pack("<Q", 1))
        t.write(M.STATUS + 1, b"\x01\x00\x00\x00")
        t.write(M.QUEUE_SEL, b"")
    assert rd(t, M.STATUS) == 0
    assert logs and all(r.levelno == logging.DEBUG for r in logs)


def test_writes_to_read_only_registers_ignored():
    t, dev, _, _ = make()
    for off in (M.MAGIC, M.VERSION, M.DEVICE_ID, M.VENDOR, M.DEVICE_FEATURES, M.QUEUE_NUM_MAX,
                M.INTERRUPT_STATUS, M.CONFIG_GENERATION, M.SHM_LEN_LOW):
        wr(t, off, 0x12345678)
    assert rd(t, M.MAGIC) == 0x74726976 and rd(t, M.DEVICE_ID) == 42 and rd(t, M.INTERRUPT_STATUS) == 0
    wr(t, M.QUEUE_SEL, 0)
    assert rd(t, M.QUEUE_NUM_MAX) == 16


def test_out_of_window_accesses():
    t, dev, _, _ = make()
    assert t.read(MMIO_WINDOW - 2, 4) == bytes(4)
    assert t.read(-4, 4) == bytes(4)
    assert t.read(0, 0) == b""
    t.write(MMIO_WINDOW, b"\1\2\3\4")
    assert "config_write" not in dev.names()


def _per_message(records):
    counts: dict[str, int] = {}
    for r in records:
        counts[r.msg] = counts.get(r.msg, 0) + 1
    return counts


def test_guest_triggerable_log_lines_are_rate_limited():
    """A driver hammering bad accesses, bad queue setups and failing devices gets a few lines
    of each kind into the log, not one per access."""
    t, dev, drv, _ = make()
    with captured() as logs:
        for _ in range(30):
            t.read(M.MAGIC, 1)                       # narrow register read
            t.write(M.STATUS, b"\1")                 # narrow register write
            t.read(MMIO_WINDOW - 2, 4)               # outside the window
            t.write(MMIO_WINDOW, b"\0" * 4)
            rd(t, 0x0F0)                             # reserved register
            wr(t, 0x0F0, 1)
            wr(t, M.QUEUE_SEL, 7)                    # missing queue
            wr(t, M.QUEUE_NUM, 8)
            wr(t, M.QUEUE_SEL, 0)
            wr(t, M.QUEUE_READY, 5)                  # bad QueueReady value
            wr(t, M.DRIVER_FEATURES_SEL, 9)          # feature word beyond 1
            wr(t, M.DRIVER_FEATURES, 1)
            wr(t, QUEUE_NOTIFY_OFFSET, 0)            # not running
            wr(t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)  # DRIVER_OK without FEATURES_OK
            wr(t, M.STATUS, ACK)                     # would clear bits
            wr(t, M.STATUS, 0)
    assert logs and max(_per_message(logs).values()) <= 5, _per_message(logs)

    with captured() as logs:
        for i in range(20):
            assert bring_up(t, drv, num=12) & NEEDS_RESET     # bad queue: activation fails
            wr(t, M.STATUS, 0)
            bring_up(t, drv)
            dev.raise_on_notify = DeviceError("bad chain") if i % 2 else ZeroDivisionError("bug")
            t.notify(0)                                        # the device fails: NEEDS_RESET
            t.notify(0)                                        # ignored while it needs a reset
            wr(t, M.STATUS, 0)
            dev.raise_on_notify = None
    assert logs and max(_per_message(logs).values()) <= 5, _per_message(logs)


# ---------------------------------------------------------------------------- config space
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_config_space_any_width(size):
    t, dev, _, _ = make()
    assert t.read(0x103, size) == bytes(dev.config[3:3 + size])
    assert dev.calls[-1] == ("config_read", 3, size)
    t.write(0x105, bytes(range(size)))
    assert dev.calls[-1] == ("config_write", 5, bytes(range(size)))


def test_config_space_misbehaving_device_contained():
    class Bad(FakeDevice):
        def config_read(self, offset, size):
            return b"\1" * (size + 3) if offset else 1 / 0

        def config_write(self, offset, data):
            raise DeviceError("read-only config")

    t, dev, drv, line = make(Bad())
    with captured(logging.ERROR):
        assert t.read(0x100, 4) == bytes(4)
        assert t.read(0x101, 2) == b"\1\1"
    bring_up(t, drv)
    t.write(0x100, b"\0")
    assert rd(t, M.STATUS) & NEEDS_RESET and line.level


# ---------------------------------------------------------------------------- snapshot
def test_state_restore_round_trip():
    t, dev, drv, line = make()
    bring_up(t, drv)
    q = dev.queues[0]
    for _ in range(3):
        drv.add_chain([Buf(drv.alloc(4), 4, write=True)])
    q.add_used(q.pop().head, 4)
    drv.set_used_event(0)
    dev.signal_used(0)
    wr(t, M.QUEUE_SEL, 1)
    t.quiesce()
    s = t.save_state()
    assert s["status"] == ACK | DRV | FEAT_OK | DRV_OK and s["interrupt_status"] == 1 and s["queue_sel"] == 1
    assert s["queues"][0]["ready"] and s["queues"][0]["last_avail"] == 1 and s["queues"][0]["next_used"] == 1

    dev2, line2 = FakeDevice(), Line()
    t2 = VirtioMmioTransport(dev2, drv.mem, line2)
    t2.load_state(s)
    assert t2.save_state() == s
    assert line2.calls == [True]
    assert dev2.names() == ["reset", "activate"] and dev2.queues[0].mem is drv.mem
    # the restored queue carries on where the old one stopped
    t2.resume()
    c = dev2.queues[0].pop()
    assert c is not None and dev2.queues[0].last_avail == 2
    for bad in ("nope", {**s, "status": 0x100}, {**s, "queues": s["queues"][:1]}):
        with pytest.raises(StateError):
            t2.load_state(bad)  # type: ignore[arg-type]


def test_load_of_a_queue_outside_ram_is_refused_and_changes_nothing():
    t, dev, drv, _ = make()
    bring_up(t, drv)
    t.quiesce()
    s = t.save_state()
    bad = {**s, "queues": [{**s["queues"][0], "desc_table": MEM_SIZE}, s["queues"][1]]}
    line2, dev2 = Line(), FakeDevice()
    t2 = VirtioMmioTransport(dev2, drv.mem, line2)
    with pytest.raises(StateError, match="saved queue 0"):
        t2.load_state(bad)
    assert rd(t2, M.STATUS) == 0 and line2.calls == [] and dev2.names() == []


# ---------------------------------------------------------------------------- hostile driver
SMALL_MEM = 0x10000
_offsets = st.one_of(
    st.sampled_from([M.MAGIC, M.DEVICE_FEATURES, M.DEVICE_FEATURES_SEL, M.DRIVER_FEATURES, M.DRIVER_FEATURES_SEL,
                     M.QUEUE_SEL, M.QUEUE_NUM_MAX, M.QUEUE_NUM, M.QUEUE_READY, QUEUE_NOTIFY_OFFSET,
                     M.INTERRUPT_STATUS, M.INTERRUPT_ACK, M.STATUS, M.QUEUE_DESC_LOW, M.QUEUE_DESC_HIGH,
                     M.QUEUE_DRIVER_LOW, M.QUEUE_DRIVER_HIGH, M.QUEUE_DEVICE_LOW, M.QUEUE_DEVICE_HIGH,
                     M.SHM_SEL, M.CONFIG_GENERATION, 0x100, 0x104]),
    st.integers(0, MMIO_WINDOW - 1),
)
_values = st.one_of(st.sampled_from([0, 1, 2, 4, 8, 15, 16, 0x1000, 0x2000, 0x3000, SMALL_MEM - 16,
                                     0x80000000, 0xFFFFFFFF]),
                    st.integers(0, 0xFFFFFFFF), st.integers(0, 255))
_ops = st.lists(st.tuples(st.booleans(), _offsets, st.sampled_from([1, 2, 4, 4, 4, 8]), _values), max_size=60)
_ring_addr = st.one_of(st.sampled_from([0x1000, 0x2000, 0x3000, 0x2004, SMALL_MEM - 0x100, SMALL_MEM]), _values)


def _bring_up_ops(low_features, queue, num, desc, avail, used, driver_ok):
    """A Linux-like bring-up with fuzzed features and queue parameters."""
    w = lambda off, v: (True, off, 4, v)  # noqa: E731
    return [w(M.STATUS, ACK | DRV), w(M.DRIVER_FEATURES_SEL, 1), w(M.DRIVER_FEATURES, 1),
            w(M.DRIVER_FEATURES_SEL, 0), w(M.DRIVER_FEATURES, low_features), w(M.STATUS, ACK | DRV | FEAT_OK),
            w(M.QUEUE_SEL, queue), w(M.QUEUE_NUM, num), w(M.QUEUE_DESC_LOW, desc), w(M.QUEUE_DRIVER_LOW, avail),
            w(M.QUEUE_DEVICE_LOW, used), w(M.QUEUE_READY, 1)] + \
        [w(M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)] * driver_ok


_prelude = st.one_of(st.just([]), st.builds(
    _bring_up_ops, st.sampled_from([0, DEV_FEATURE, 1 << 28, 1 << 29, 3 << 28, 1 << 6]), st.integers(0, 2),
    st.one_of(st.sampled_from([16, 8, 4, 1]), _values), _ring_addr, _ring_addr, _ring_addr, st.booleans()))
_notifies = st.lists(st.tuples(st.just(True), st.just(QUEUE_NOTIFY_OFFSET), st.just(4), st.integers(0, 2)),
                     max_size=3)
_script = st.tuples(_prelude, _ops, _notifies).map(lambda t: t[0] + t[1] + t[2])


class _ActivationWatch(FakeDevice):
    """Pops and fills chains like a real device, and remembers whether it was ever activated."""

    def __init__(self):
        super().__init__()
        self.ever_active = False
        self.used_rings: list[tuple[int, int]] = []

    def activate(self, mem, queues, driver_features, interrupt):
        super().activate(mem, queues, driver_features, interrupt)
        self.ever_active = True
        self.used_rings += [(q.used_ring, 6 + 8 * q.size) for q in queues if q.mem is not None]

    def queue_notify(self, index):
        super().queue_notify(index)
        q = self.queues[index]
        while (c := q.pop()) is not None:
            c.write(self.mem, b"\xAA" * c.writable_len)
            q.add_used(c.head, c.writable_len)
        self.signal_used(index)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_script, seed=st.binary(min_size=64, max_size=64))
def test_register_fuzz_never_raises_or_touches_memory(ops, seed):
    mem = GuestMemory.anonymous([(0, SMALL_MEM)], hugepages=False)
    for off in range(0, SMALL_MEM, 0x1000):  # recognisable, non-zero contents everywhere
        mem.write(off, seed * (0x1000 // 64))
    before = mem.read(0, SMALL_MEM)
    dev, line = _ActivationWatch(), Line()
    t = VirtioMmioTransport(dev, mem, line)
    with captured(logging.ERROR) as errors:
        for is_write, off, size, value in ops:
            size = min(size, MMIO_WINDOW - off)
            if is_write:
                t.write(off, value.to_bytes(8, "little")[:size])
            else:
                assert len(t.read(off, size)) == size
            s = t.registers()
            # the line is high exactly while InterruptStatus is non-zero; irq only on changes
            assert line.level == (s["interrupt_status"] != 0)
            assert all(a != b for a, b in zip(line.calls, line.calls[1:]))
            assert not s["status"] & ~0xFF
    assert not errors, [r.getMessage() for r in errors]
    final = t.registers()["status"]
    event(f"activated={dev.ever_active} features_ok={bool(final & FEAT_OK)} needs_reset={bool(final & NEEDS_RESET)}")
    after = mem.read(0, SMALL_MEM)
    if not dev.ever_active:
        assert after == before
    else:  # only the active used rings, and buffers the device filled with 0xAA, may change
        for pos in (i for i in range(SMALL_MEM) if after[i] != before[i]):
            assert after[pos] == 0xAA or any(a <= pos < a + n for a, n in dev.used_rings), hex(pos)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_script)
def test_register_page_always_shows_what_reads_return(ops):
    """The page the VMM maps read-only over the window (so the driver's reads cost no exit)
    holds, after every access, exactly what a read of each register and of the config returns."""
    mem = GuestMemory.anonymous([(0, SMALL_MEM)], hugepages=False)
    dev = _ActivationWatch()
    t = VirtioMmioTransport(dev, mem, Line())
    page = memoryview(bytearray(MMIO_WINDOW))
    t.use_register_page(page)
    for is_write, off, size, value in ops:
        size = min(size, MMIO_WINDOW - off)
        if is_write:
            t.write(off, value.to_bytes(8, "little")[:size])
        else:
            t.read(off, size)
        for reg in range(0, M.CONFIG, 4):
            assert bytes(page[reg:reg + 4]) == t.read(reg, 4), hex(reg)
        assert bytes(page[M.CONFIG:M.CONFIG + 64]) == t.read(M.CONFIG, 64)


def test_register_page_follows_interrupts_from_device_threads():
    t, dev, drv, edges = make_edge()
    page = memoryview(bytearray(MMIO_WINDOW))
    t.use_register_page(page)
    bring_up(t, drv, accept=VIRTIO_F_VERSION_1)
    _use_one(drv, dev.queues[0], dev)
    assert struct.unpack_from("<I", page, M.INTERRUPT_STATUS)[0] == 1
    t.config_changed()
    assert struct.unpack_from("<II", page, M.INTERRUPT_STATUS)[0] == 3
    assert struct.unpack_from("<I", page, M.CONFIG_GENERATION)[0] == 1
    t._enter_needs_reset()
    assert struct.unpack_from("<I", page, M.STATUS)[0] & NEEDS_RESET


# ---------------------------------------------------------------------------- edge-triggered (irqfd)
def make_edge(ack_eventfd=None):
    dev = FakeDevice()
    drv = MockDriver(size=16)
    edges: list[int] = []
    t = VirtioMmioTransport(dev, drv.mem, trigger=lambda: edges.append(1), ack_eventfd=ack_eventfd)
    return t, dev, drv, edges


def _use_one(drv, q, dev):
    drv.add_chain([Buf(drv.alloc(4), 4)])
    q.add_used(q.pop().head, 0)
    dev.signal_used(0)


def test_edge_trigger_one_edge_per_interrupt_and_ack_only_clears():
    t, dev, drv, edges = make_edge()
    bring_up(t, drv, accept=VIRTIO_F_VERSION_1)
    q = dev.queues[0]
    dev.signal_used(0)  # nothing used: no edge
    assert edges == []
    _use_one(drv, q, dev)
    _use_one(drv, q, dev)
    assert edges == [1, 1] and rd(t, M.INTERRUPT_STATUS) == 1  # an edge for each, even with the bit set
    wr(t, M.INTERRUPT_ACK, 1)
    assert rd(t, M.INTERRUPT_STATUS) == 0 and edges == [1, 1]  # no edge for an ACK
    t.config_changed()
    assert rd(t, M.INTERRUPT_STATUS) == 2 and edges == [1, 1, 1]


def test_transport_needs_exactly_one_interrupt_kind():
    drv = MockDriver(size=16)
    with pytest.raises(ValueError):
        VirtioMmioTransport(FakeDevice(), drv.mem)
    with pytest.raises(ValueError):
        VirtioMmioTransport(FakeDevice(), drv.mem, Line(), trigger=lambda: None)
    with pytest.raises(ValueError):
        VirtioMmioTransport(FakeDevice(), drv.mem, Line(), ack_eventfd=3)


def test_absorbed_acks_are_applied_before_the_next_interrupt_never_after():
    """KVM absorbs InterruptACK=1 writes into an eventfd; the transport applies them before it
    sets a bit again, so an old acknowledgement can never hide a newer interrupt."""
    import os
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        t, dev, drv, edges = make_edge(efd)
        bring_up(t, drv, accept=VIRTIO_F_VERSION_1)
        q = dev.queues[0]
        _use_one(drv, q, dev)
        assert rd(t, M.INTERRUPT_STATUS) == 1 and edges == [1]
        os.eventfd_write(efd, 1)            # the driver acknowledged (absorbed by KVM)
        assert rd(t, M.INTERRUPT_STATUS) == 1  # may still show: only a second look at the rings
        t.config_changed()                  # the next change applies the acknowledgement first
        assert rd(t, M.INTERRUPT_STATUS) == 2 and edges == [1, 1]
        os.eventfd_write(efd, 1)            # an ACK of 1 while only CONFIG is set: harmless
        _use_one(drv, q, dev)               # a new used buffer after it: its bit survives
        assert rd(t, M.INTERRUPT_STATUS) == 3 and edges == [1, 1, 1]
        wr(t, M.INTERRUPT_ACK, 3)           # other values still reach the transport
        assert rd(t, M.INTERRUPT_STATUS) == 0
        os.eventfd_write(efd, 1)            # a stale absorbed ACK across a reset...
        wr(t, M.STATUS, 0)
        drv2 = MockDriver(size=16, mem=drv.mem)
        bring_up(t, drv2, accept=VIRTIO_F_VERSION_1)
        _use_one(drv2, dev.queues[0], dev)  # ...never clears the first interrupt after it
        assert rd(t, M.INTERRUPT_STATUS) == 1 and edges == [1, 1, 1, 1]
    finally:
        os.close(efd)
