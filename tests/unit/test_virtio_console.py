import logging
import struct
import threading

import pytest
from virtio_mock import Buf, MockDriver

from hypyr.devices.virtio import console as C
from hypyr.devices.virtio.chain import DeviceError
from hypyr.devices.virtio.console import VirtioConsole
from hypyr.errors import StateError


class Rig:
    def __init__(self, activate=True):
        self.out: list[bytes] = []
        self.dev = VirtioConsole(self.out.append)
        self.rx = MockDriver(16)                                 # receiveq at 0x1000
        self.tx = MockDriver(16, mem=self.rx.mem, base=0x4000)   # transmitq at 0x4000
        self.tx.data_next = 0x80000                              # separate buffer areas
        self.irqs: list[int] = []
        if activate:
            self.activate()

    def activate(self):
        self.dev.activate(self.rx.mem, [self.rx.queue(), self.tx.queue()], 1 << C.VIRTIO_CONSOLE_F_SIZE,
                          self.irqs.append)

    def send(self, *pieces: bytes, indirect=False) -> int:
        return self.tx.add_chain([Buf(self.tx.alloc(p), len(p)) for p in pieces], indirect=indirect)

    def give_rx(self, *sizes: int) -> tuple[int, list[int]]:
        addrs = [self.rx.alloc(n) for n in sizes]
        return self.rx.add_chain([Buf(a, n, write=True) for a, n in zip(addrs, sizes)]), addrs

    @property
    def output(self) -> bytes:
        return b"".join(self.out)


def test_identity_and_config():
    dev = VirtioConsole(lambda b: None)
    assert dev.device_id == 3 and list(dev.queue_max_sizes) == [256, 256]
    f = dev.device_features()
    assert f & (1 << C.VIRTIO_CONSOLE_F_SIZE) and not f & (1 << C.VIRTIO_CONSOLE_F_MULTIPORT)
    assert struct.unpack("<HH", dev.config_read(0, 4)) == (80, 25)
    assert dev.config_read(2, 2) == struct.pack("<H", 25)
    assert dev.config_read(4, 4) == bytes(4)          # max_nr_ports: no MULTIPORT
    assert dev.config_read(0x40, 8) == bytes(8)
    assert dev.config_read(-2, 2) == bytes(2)


def test_emergency_write():
    r = Rig()
    r.dev.config_write(8, struct.pack("<I", ord("!")))
    assert r.output == b"!"
    r.dev.config_write(0, b"\x10\x00")                # cols: ignored
    assert r.dev.config_read(0, 2) == struct.pack("<H", 80)


def test_transmit_in_order_across_chains():
    r = Rig()
    heads = [r.send(b"hello, "), r.send(b"wor", b"ld", indirect=True), r.send(b"!", b"\n", b"bye")]
    r.dev.queue_notify(C.TRANSMITQ)
    assert r.output == b"hello, world!\nbye"
    assert r.tx.take_used() == [(h, 0) for h in heads]
    assert r.irqs == [C.TRANSMITQ]                    # signalled once for the batch
    r.dev.queue_notify(C.TRANSMITQ)                   # nothing new: no output, no interrupt
    assert r.irqs == [C.TRANSMITQ]


def test_transmit_large_chain_chunked(monkeypatch):
    monkeypatch.setattr(C, "TX_CHUNK", 100)
    r = Rig()
    data = bytes(range(256)) * 3
    r.send(data[:300], data[300:])
    r.dev.queue_notify(C.TRANSMITQ)
    assert r.output == data and max(len(b) for b in r.out) <= 100


def test_transmit_chain_with_only_writable_buffers():
    r = Rig()
    a = r.tx.alloc(8)
    h1 = r.tx.add_chain([Buf(a, 8, write=True)])
    h2 = r.send(b"ok")
    r.dev.queue_notify(C.TRANSMITQ)
    assert r.tx.take_used() == [(h1, 0), (h2, 0)]
    assert r.output == b"ok"


def test_transmit_bad_chain_is_device_error():
    r = Rig()
    r.tx.mem.write_u16(r.tx.avail + 2, 100)           # avail.idx jumps past the queue size
    with pytest.raises(DeviceError):
        r.dev.queue_notify(C.TRANSMITQ)


def test_out_callback_failure_is_contained():
    def boom(_):
        raise RuntimeError("tty gone")
    r = Rig()
    r.dev._out = boom
    h = r.send(b"x")
    r.dev.queue_notify(C.TRANSMITQ)
    assert r.tx.take_used() == [(h, 0)]


def test_input_before_activation_is_delivered_later():
    r = Rig(activate=False)
    assert r.dev.enqueue_input(b"early") == 5
    assert r.dev.input_room() == C.RX_BUFFER_SIZE - 5
    r.activate()
    assert r.rx.take_used() == [] and r.irqs == []    # no receive buffers yet
    head, (addr,) = r.give_rx(64)
    r.dev.queue_notify(C.RECEIVEQ)
    assert r.rx.take_used() == [(head, 5)]
    assert r.rx.mem.read(addr, 5) == b"early"
    assert r.irqs == [C.RECEIVEQ]
    assert r.dev.input_room() == C.RX_BUFFER_SIZE


def test_input_delivered_immediately_when_buffers_available():
    r = Rig()
    head, (addr,) = r.give_rx(16)
    r.dev.queue_notify(C.RECEIVEQ)                    # no input yet: the buffer stays available
    assert r.rx.take_used() == []
    assert r.dev.enqueue_input(b"ls\n") == 3
    assert r.rx.take_used() == [(head, 3)]
    assert r.rx.mem.read(addr, 3) == b"ls\n"
    assert r.irqs == [C.RECEIVEQ]


def test_input_spans_several_buffers():
    r = Rig()
    data = bytes(range(256)) * 2
    h1, a1 = r.give_rx(100)
    h2, a2 = r.give_rx(50, 50)
    assert r.dev.enqueue_input(data) == len(data)
    assert r.rx.take_used() == [(h1, 100), (h2, 100)]
    h3, a3 = r.give_rx(1000)
    r.dev.queue_notify(C.RECEIVEQ)
    assert r.rx.take_used() == [(h3, len(data) - 200)]
    got = r.rx.mem.read(a1[0], 100) + r.rx.mem.read(a2[0], 50) + r.rx.mem.read(a2[1], 50)
    got += r.rx.mem.read(a3[0], len(data) - 200)
    assert got == data


def test_input_is_bounded():
    r = Rig(activate=False)
    assert r.dev.enqueue_input(bytes(C.RX_BUFFER_SIZE - 10)) == C.RX_BUFFER_SIZE - 10
    assert r.dev.input_room() == 10
    assert r.dev.enqueue_input(b"x" * 25) == 10
    assert r.dev.input_room() == 0
    assert r.dev.enqueue_input(b"y") == 0
    assert r.dev.enqueue_input(b"") == 0
    assert r.dev.save_state()["rx"] == bytes(C.RX_BUFFER_SIZE - 10) + b"x" * 10


def test_input_survives_reset_and_state_roundtrip():
    r = Rig()
    r.dev.enqueue_input(b"pending")
    r.dev.reset()
    assert r.dev.queues == []
    assert r.dev.enqueue_input(b"!") == 1
    s = r.dev.save_state()
    assert s["rx"] == b"pending!"
    other = VirtioConsole(lambda b: None)
    other.load_state(s)
    assert other.save_state() == s
    for bad in ({**s, "rx": bytes(C.RX_BUFFER_SIZE + 1)}, "nope"):
        with pytest.raises(StateError):
            other.load_state(bad)  # type: ignore[arg-type]


def test_receive_chain_without_writable_space_returned_unused():
    r = Rig()
    a = r.rx.alloc(4)
    h1 = r.rx.add_chain([Buf(a, 4)])                  # device-readable only
    h2, (addr,) = r.give_rx(8)
    r.dev.enqueue_input(b"abc")
    assert r.rx.take_used() == [(h1, 0), (h2, 3)]
    assert r.rx.mem.read(addr, 3) == b"abc"


def test_receive_queue_error_from_console_thread_does_not_raise():
    r = Rig()
    r.rx.mem.write_u16(r.rx.avail + 2, 100)           # broken receive queue
    assert r.dev.enqueue_input(b"abc") == 3           # accepted and held, no exception
    with pytest.raises(DeviceError):                  # the notify path reports it
        r.dev.queue_notify(C.RECEIVEQ)


def test_concurrent_input_and_output():
    r = Rig()
    total = 4000
    chunks = [bytes([65 + i % 26]) * 10 for i in range(total // 10)]

    def typist():
        for c in chunks:
            while r.dev.enqueue_input(c) == 0:
                pass

    t = threading.Thread(target=typist)
    t.start()
    received = bytearray()
    while len(received) < total:
        head, (addr,) = r.give_rx(64)
        r.dev.queue_notify(C.RECEIVEQ)
        while not (used := r.rx.take_used()):
            if not t.is_alive() and r.dev.input_room() == C.RX_BUFFER_SIZE:
                break
            r.dev.queue_notify(C.RECEIVEQ)
        for h, n in used:
            assert h == head
            received += r.rx.mem.read(addr, n)
        r.rx.data_next = 0x10000                      # reuse buffer memory
        r.send(b".")
        r.dev.queue_notify(C.TRANSMITQ)
    t.join(10)
    assert bytes(received) == b"".join(chunks)
    assert r.output == b"." * len(r.out)


def test_activate_needs_two_queues():
    dev = VirtioConsole(lambda b: None)
    with pytest.raises(DeviceError):
        dev.activate(MockDriver().mem, [], 0, lambda i: None)
    dev.queue_notify(0)
    dev.queue_notify(1)
    dev.queue_notify(7)


def test_guest_triggerable_log_lines_are_rate_limited(caplog):
    """Bad chains, config writes, notifies of missing queues and a broken receive queue found
    from the console thread: a few lines each, however often the driver does it."""
    r = Rig()
    with caplog.at_level(logging.DEBUG, logger="hypyr.dev"):
        for _ in range(40):
            r.dev.config_write(0, b"\1\2")
            r.dev.queue_notify(7)
        for _ in range(3):
            for _ in range(8):
                r.tx.add_chain([Buf(r.tx.alloc(b"x"), 1), Buf(r.tx.alloc(4), 4, write=True)])
                r.rx.add_chain([Buf(r.rx.alloc(4), 4)])
            r.dev.queue_notify(C.TRANSMITQ)
            r.dev.enqueue_input(b"y" * 8)
            assert len(r.tx.take_used()) == len(r.rx.take_used()) == 8
        for _ in range(10):  # the driver breaks its receive queue, resets, and again
            r.dev.reset()
            r.rx = MockDriver(16)
            r.tx = MockDriver(16, mem=r.rx.mem, base=0x4000)
            r.rx.mem.write_u16(r.rx.avail + 2, 100)
            r.activate()
            r.dev.enqueue_input(b"z")
    counts: dict[str, int] = {}
    for rec in caplog.records:
        counts[rec.msg] = counts.get(rec.msg, 0) + 1
    assert len(counts) == 5 and max(counts.values()) <= 5, counts
