"""Save/restore of every device (hypyr/devices/state.py, docs/save-restore.md): each is driven into
a non-trivial state through its registers, as a guest would, quiesced, saved, loaded into a
fresh device and resumed, and both must then behave alike; the virtio ones continue their rings
where they stopped, with nothing lost or done twice.  Garbled states raise StateError only."""

import copy
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtio_blk import _route
from test_virtio_mmio import Line, bring_up, negotiate, rd, setup_queue, wr
from virtio_mock import Buf, MockDriver

from hypyr.devices.legacy import i8042 as K
from hypyr.devices.legacy import rtc as R
from hypyr.devices.legacy import serial as S
from hypyr.devices.legacy.acpi_ged import AcpiGed
from hypyr.devices.legacy.acpi_pm import AcpiPm, AcpiReset
from hypyr.devices.legacy.i8042 import I8042
from hypyr.devices.legacy.rtc import Rtc
from hypyr.devices.legacy.serial import Serial
from hypyr.devices.pvexit import PvExit
from hypyr.devices.pvpanic import PvPanic
from hypyr.devices.state import StateError, Stateful
from hypyr.devices.virtio import blk as B
from hypyr.devices.virtio import blk_spec as spec
from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio import net as N
from hypyr.devices.virtio.console import VirtioConsole
from hypyr.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.devices.virtio.rng import VirtioRng
from hypyr.errors import HypyrError
from hypyr.memory import GuestMemory

T0 = 1_709_214_307  # 2024-02-29 13:45:07 UTC
ACK, DRV, DRV_OK, FEAT_OK, NEEDS_RESET = 1, 2, 4, 8, 64


def nop(*_):
    pass


def move(dev, fresh):
    """The whole life cycle: quiesce, save, load a copy into ``fresh``, resume both."""
    dev.quiesce()
    s = dev.save_state()
    fresh.load_state(copy.deepcopy(s))
    assert fresh.save_state() == s  # loaded exactly (and left quiesced)
    dev.resume()
    fresh.resume()
    return s


def b(v: int) -> bytes:
    return bytes([v])


# ------------------------------------------------------------------------------------ the contract
def test_every_device_has_the_one_contract(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    a, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    blk = B.VirtioBlk(str(img))
    devices = [Serial(nop, nop), I8042(nop), Rtc(), AcpiPm(nop), AcpiReset(nop), AcpiGed(nop), PvExit(nop),
               PvPanic(nop), VirtioRng(), VirtioConsole(nop), blk, N.VirtioNet(a.fileno(), bytes(6)),
               VirtioMmioTransport(VirtioRng(), GuestMemory.anonymous([(0, 1 << 16)], hugepages=False), nop)]
    kinds = set()
    for d in devices:
        assert isinstance(d, Stateful), d
        d.quiesce()
        s = d.save_state()
        assert isinstance(s["kind"], str) and s["v"] == 1
        kinds.add(s["kind"])
    assert len(kinds) == len(devices)  # one kind per device model
    assert issubclass(StateError, HypyrError)
    blk.close()
    a.close()


def test_state_of_another_device_or_version_is_refused():
    s = PvExit(nop).save_state()
    with pytest.raises(StateError, match="pvexit"):
        PvPanic(nop).load_state(s)
    with pytest.raises(StateError, match="version 2"):
        PvExit(nop).load_state({**s, "v": 2})
    with pytest.raises(StateError, match="unknown field"):
        PvExit(nop).load_state({**s, "extra": 1})
    with pytest.raises(StateError, match="missing"):
        AcpiPm(nop).load_state({"kind": "acpi-pm", "v": 1})


# ------------------------------------------------------------------------------------ legacy
class Rec:
    """An interrupt line (or output sink) that records what it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, v):
        self.calls.append(v)


def serial_run(u: Serial) -> list:
    """What a driver would see next: the receive FIFO drained, then the status registers."""
    seen = []
    for _ in range(14):
        seen += [u.read(S.LSR, 1)[0], u.read(S.IIR, 1)[0], u.read(S.RBR, 1)[0]]
    u.write(S.THR, b"!")
    seen += [u.read(S.IIR, 1)[0], u.read(S.MSR, 1)[0], u.read(S.SCR, 1)[0], u.divisor]
    u.write(S.MCR, b(0x1B))  # loopback: a byte goes back into the FIFO
    u.write(S.THR, b"L")
    seen += [u.read(S.RBR, 1)[0], u.read(S.MSR, 1)[0]]
    return seen


def test_serial_continues_identically():
    line1, out1 = Rec(), Rec()
    u = Serial(line1, out1)
    u.write(S.LCR, b(0x83))
    u.write(S.DLL, b(0x01))
    u.write(S.DLM, b(0x02))
    u.write(S.LCR, b(0x03))
    u.write(S.FCR, b(0x41))      # FIFO on, trigger level 4
    u.write(S.MCR, b(0x0B))      # DTR, RTS, OUT2
    u.write(S.IER, b(0x07))      # data, THRE, line status
    u.write(S.SCR, b(0x5A))
    assert u.enqueue_input(b"hello, world") == 12
    assert u.read(S.RBR, 1) == b"h"
    assert line1.calls[-1] is True

    u.quiesce()
    assert u.enqueue_input(b"late") == 0 and u.input_room() == 0  # the caller keeps it
    line2, out2 = Rec(), Rec()
    v = Serial(line2, out2)
    s = move(u, v)
    assert s["rx"] == b"ello, world" and s["irq"] is True
    assert line2.calls == [True]  # the line is driven to the saved level
    n1 = len(line1.calls)
    assert serial_run(u) == serial_run(v)
    assert line1.calls[n1:] == line2.calls[1:] and out1.calls[-1:] == out2.calls == [b"!"]
    assert v.enqueue_input(b"late") == 4  # resumed


def test_serial_state_is_checked():
    s = Serial(nop, nop).save_state()
    for bad in ({"ier": 0x10}, {"fcr": 0x02}, {"rx": b"x" * (S.RX_BUFFER_SIZE + 1)}, {"irq": True},
                {"dll": 256}, {"lcr": True}, {"rx": "text"}):
        with pytest.raises(StateError):
            Serial(nop, nop).load_state({**s, **bad})


def i8042_run(c: I8042) -> list:
    seen = []
    for _ in range(4):
        seen += [c.command_port.read(0, 1)[0], c.data_port.read(0, 1)[0]]
    c.data_port.write(0, b(0x01))     # the parameter of the pending keyboard command (0xED)
    c.command_port.write(0, b(0xD0))  # read the output port
    seen += [c.command_port.read(0, 1)[0], c.data_port.read(0, 1)[0], c.data_port.read(0, 1)[0]]
    return seen


def test_i8042_continues_identically():
    kbd1 = Rec()
    c = I8042(nop, kbd_irq=kbd1)
    c.command_port.write(0, b(0x60))
    c.data_port.write(0, b(0x47))     # command byte: KBDINT, AUXINT, SYS, XLATE
    c.command_port.write(0, b(0xDD))  # A20 off
    c.data_port.write(0, b(0xF2))     # identify: fa ab 83
    assert c.data_port.read(0, 1) == b"\xfa"
    c.data_port.write(0, b(0xED))     # LEDs: waits for its parameter
    assert c.inject_ctrl_alt_del()
    c.quiesce()
    assert not c.inject_ctrl_alt_del()
    kbd2 = Rec()
    d = I8042(nop, kbd_irq=kbd2)
    s = move(c, d)
    assert s["kbd_pending_cmd"] == 0xED and s["kbd_irq"] is True and s["outport"] == K.OUT_RESET
    assert kbd2.calls == [True]
    n = len(kbd1.calls)
    assert i8042_run(c) == i8042_run(d)
    assert kbd1.calls[n:] == kbd2.calls[1:]


def test_i8042_state_is_checked():
    s = I8042(nop).save_state()
    for bad in ({"ram": bytes(31)}, {"output": [[0x100, False]]}, {"output": [[1, 0]]}, {"output": [1]},
                {"pending_cmd": 0x99}, {"kbd_pending_cmd": 0xF2}, {"output": [[1, False]] * 65},
                {"output": [[0xFA, False]]}):  # the last: a byte queued but the line saved low
        with pytest.raises(StateError):
            I8042(nop).load_state({**s, **bad})


def cmos(dev, index, value=None):
    dev.write(0, b(index))
    if value is None:
        return dev.read(1, 1)[0]
    dev.write(1, b(value))


TIME_REGS = (R.REG_SECONDS, R.REG_MINUTES, R.REG_HOURS, R.REG_WEEKDAY, R.REG_DAY, R.REG_MONTH, R.REG_YEAR,
             R.REG_CENTURY)


def test_rtc_keeps_the_guest_clock_right_across_a_restore():
    now1 = [float(T0)]
    r = Rtc(clock=lambda: now1[0])
    cmos(r, R.REG_B, R.REG_B_SET | R.REG_B_24H)  # the guest sets its clock: year 2028, 08:00
    cmos(r, R.REG_YEAR, 0x28)
    cmos(r, R.REG_HOURS, 0x08)
    cmos(r, R.REG_B, R.REG_B_24H)
    cmos(r, 0x40, 0x99)
    cmos(r, 0x0E)                                # index left at 0x0e
    # restored an hour later (elsewhere: the offset is from UTC, not from this host)
    now2 = [float(T0 + 3600)]
    r2 = Rtc(clock=lambda: now2[0])
    s = move(r, r2)
    now1[0] = now2[0]
    assert r2.read(1, 1) == r.read(1, 1)  # the selected index survived
    for i in TIME_REGS + (0x40, R.REG_A, R.REG_B, R.REG_C, R.REG_D):
        assert cmos(r2, i) == cmos(r, i), hex(i)
    assert cmos(r2, R.REG_YEAR) == 0x28 and cmos(r2, R.REG_HOURS) == 0x09  # it kept running
    assert s["frozen"] is None


def test_rtc_frozen_by_set_stays_frozen():
    now = [float(T0)]
    r = Rtc(clock=lambda: now[0])
    cmos(r, R.REG_B, R.REG_B_SET | R.REG_B_24H)
    cmos(r, R.REG_MINUTES, 0x00)
    r2 = Rtc(clock=lambda: T0 + 86400 * 400)
    s = move(r, r2)
    assert s["frozen"] == [2024, 2, 29, 13, 0, 7]
    assert [cmos(r2, i) for i in TIME_REGS] == [cmos(r, i) for i in TIME_REGS]
    for bad in ({"frozen": None}, {"frozen": [2024, 2, 29, 13, 0]}, {"frozen": [10 ** 5000] * 6},
                {"ram": bytes(127)}, {"offset": 1 << 70}, {"index": 0x80}):
        with pytest.raises(StateError):
            Rtc().load_state({**s, **bad})


def test_acpi_pm_and_stateless_ports():
    pm = AcpiPm(nop)
    pm.write(0, b(0x20 | (3 << 2)))  # S3 requested: not entered, immediate wake
    pm2 = AcpiPm(nop)
    move(pm, pm2)
    assert pm2.read(1, 1) == pm.read(1, 1) == b"\x80"
    pm2.write(1, b(0x80))
    assert pm2.read(1, 1) == b"\x00"
    for dev, fresh in ((AcpiReset(nop), AcpiReset(nop)), (PvExit(nop), PvExit(nop)), (PvPanic(nop), PvPanic(nop))):
        s = move(dev, fresh)
        assert set(s) == {"kind", "v"}
        assert fresh.read(0, 1) == dev.read(0, 1)
    with pytest.raises(StateError):
        AcpiPm(nop).load_state({"kind": "acpi-pm", "v": 1, "wake_status": 1})


# ------------------------------------------------------------------------------------ virtio
READABLE = (M.MAGIC, M.VERSION, M.DEVICE_ID, M.VENDOR, M.QUEUE_NUM_MAX, M.QUEUE_READY, M.INTERRUPT_STATUS,
            M.STATUS, M.CONFIG_GENERATION)


def registers(t):
    out = {}
    for sel in range(len(t.queues)):
        wr(t, M.QUEUE_SEL, sel)
        out[sel] = [rd(t, off) for off in READABLE]
    for sel in (0, 1):
        wr(t, M.DEVICE_FEATURES_SEL, sel)
        out[f"f{sel}"] = rd(t, M.DEVICE_FEATURES)
    out["config"] = t.read(M.CONFIG, 16)
    return out


def rng_request(drv, n=8):
    return drv.add_chain([Buf(drv.alloc(n), n, write=True)])


def test_virtio_rng_continues_with_the_next_available_entries():
    drv = MockDriver(16)
    line = Line()
    t = VirtioMmioTransport(VirtioRng(), drv.mem, line)
    bring_up(t, drv)
    first = [rng_request(drv) for _ in range(3)]
    t.notify(0)
    assert [h for h, _ in drv.take_used()] == first
    with pytest.raises(StateError, match="quiesced"):
        t.save_state()
    # two more published; their notification was still on its way when the VM was paused
    more = [rng_request(drv) for _ in range(2)]
    t.quiesce()
    t.notify(0)  # left for resume
    assert drv.used_idx() == 3
    s = t.save_state()
    assert s["queues"][0]["last_avail"] == s["queues"][0]["next_used"] == 3
    assert s["interrupt_status"] == M.INT_VRING and s["irq"] is True
    line2 = Line()
    t2 = VirtioMmioTransport(VirtioRng(), drv.mem, line2)
    t2.load_state(copy.deepcopy(s))
    assert t2.save_state() == s and line2.calls == [True]
    assert drv.used_idx() == 3  # nothing done before resume
    assert registers(t2) == registers(t)
    t2.resume()
    assert [h for h, _ in drv.take_used()] == more  # exactly the new ones: none redone
    again = rng_request(drv)
    t2.notify(0)
    assert drv.take_used() == [(again, 8)]


def test_queue_unpop_and_resync():
    drv = MockDriver(16)
    q = drv.queue(event_idx=True)
    heads = [rng_request(drv) for _ in range(3)]
    assert [q.pop().head for _ in range(3)] == heads and drv.mem.read_u16(drv.used + 4 + 8 * 16) == 3
    q.add_used(heads[0], 8)
    with pytest.raises(ValueError):
        q.unpop(3)  # only chains in flight can be handed back
    q.unpop(2)
    assert (q.last_avail, q.in_flight) == (1, 0)
    assert drv.mem.read_u16(drv.used + 4 + 8 * 16) == 1  # avail_event moved back: the driver notifies
    assert [q.pop().head for _ in range(2)] == heads[1:]  # the same chains, taken again
    drv.mem.write(drv.used + 4 + 8, struct.pack("<II", heads[1], 8))
    drv.mem.write_u16(drv.used + 2, 2)  # an outside data path used one more
    q.resync(3)
    assert (q.last_avail, q.next_used, q.signalled_used, q.in_flight) == (3, 2, 2, 1)


def test_virtio_transport_state_is_checked():
    drv = MockDriver(16)
    t = VirtioMmioTransport(VirtioRng(), drv.mem, Line())
    bring_up(t, drv)
    t.quiesce()
    s = t.save_state()
    q0 = s["queues"][0]
    fresh = lambda: VirtioMmioTransport(VirtioRng(), drv.mem, Line())  # noqa: E731
    for bad in ({"device_id": 1}, {"device_features": 0}, {"status": ACK | DRV | DRV_OK},
                {"driver_features": s["driver_features"] | (1 << 60)}, {"irq": True},
                {"interrupt_status": 4}, {"queues": [q0, q0]}, {"queues": [{**q0, "size": 12}]},
                {"queues": [{**q0, "desc_table": 1 << 40}]}, {"queues": [{**q0, "last_avail": 5}]},
                {"device": {"kind": "virtio-blk", "v": 1}}, {"device": None}):
        with pytest.raises(StateError):
            fresh().load_state({**s, **bad})
    other = VirtioMmioTransport(VirtioConsole(nop), drv.mem, Line())
    with pytest.raises(StateError):
        other.load_state(s)
    # a device the driver had not got running yet may hold any queue values the driver wrote
    t3 = fresh()
    wr(t3, M.QUEUE_NUM, 12)
    t3.quiesce()
    s3 = t3.save_state()
    fresh().load_state(s3)


def test_virtio_needs_reset_survives_and_is_not_activated():
    drv = MockDriver(16)
    t = VirtioMmioTransport(VirtioRng(), drv.mem, Line())
    bring_up(t, drv)
    drv.add_chain([Buf(1 << 30, 8, write=True)])  # outside RAM
    t.notify(0)
    assert rd(t, M.STATUS) & NEEDS_RESET
    t.quiesce()
    s = t.save_state()
    t2 = VirtioMmioTransport(VirtioRng(), drv.mem, Line())
    t2.load_state(s)
    t2.resume()
    assert rd(t2, M.STATUS) & NEEDS_RESET and t2.device.mem is None
    wr(t2, M.STATUS, 0)  # the driver resets as it would have anyway
    assert rd(t2, M.STATUS) == 0


# -- virtio-blk
SECTORS = 64


class BlkVm:
    """A virtio-blk behind its transport, brought up through the registers."""

    def __init__(self, path, mem=None, drv=None, up=True, workers=2):
        self.drv = drv or MockDriver(16, mem=mem)
        self.dev = B.VirtioBlk(str(path), workers=workers, serial="vda")
        self.t = VirtioMmioTransport(self.dev, self.drv.mem, Line())
        if up:
            bring_up(self.t, self.drv)

    def request(self, rtype, sector, *, out=b"", in_len=0):
        d = self.drv
        bufs = [Buf(d.alloc(struct.pack("<IIQ", rtype, 0, sector)), 16)]
        if out:
            bufs.append(Buf(d.alloc(out), len(out)))
        data = d.alloc(in_len) if in_len else None
        if in_len:
            bufs.append(Buf(data, in_len, write=True))
        status = d.alloc(1)
        d.mem.write_u8(status, 0xEE)
        bufs.append(Buf(status, 1, write=True))
        return d.add_chain(bufs), data, status


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    data = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(SECTORS * 512))
    p.write_bytes(data)
    return p, data


def test_blk_quiesce_completes_requests_in_flight_exactly_once(image, monkeypatch):
    path, data = image
    gate, entered = threading.Event(), threading.Semaphore(0)
    reads: list[int] = []
    real = os.preadv

    def gated(fd, bufs, off):
        reads.append(off // 512)
        entered.release()
        gate.wait(10)
        return real(fd, bufs, off)

    _route(monkeypatch, "preadv", gated)
    vm = BlkVm(path)
    try:
        reqs = [vm.request(spec.VIRTIO_BLK_T_IN, i, in_len=512) for i in range(4)]
        notifier = threading.Thread(target=vm.t.notify, args=(0,))  # the I/O thread
        notifier.start()
        assert entered.acquire(timeout=5) and entered.acquire(timeout=5)  # a worker and the I/O thread
        quiescer = threading.Thread(target=vm.t.quiesce)
        quiescer.start()
        deadline = time.monotonic() + 5
        while not vm.t._quiesced and time.monotonic() < deadline:
            time.sleep(0.001)
        late = vm.request(spec.VIRTIO_BLK_T_IN, 9, in_len=512)  # published and notified while quiescing
        vm.t.notify(0)
        quiescer.join(0.3)
        assert quiescer.is_alive()  # waiting for the requests in flight
        gate.set()
        quiescer.join(10)
        notifier.join(10)
        assert not quiescer.is_alive()
        used = vm.drv.take_used()
        assert sorted(h for h, _ in used) == sorted(h for h, _, _ in reqs) and all(n == 513 for _, n in used)
        for i, (_, buf, status) in enumerate(reqs):
            assert vm.drv.mem.read_u8(status) == 0 and vm.drv.mem.read(buf, 512) == data[i * 512:(i + 1) * 512]
        s = vm.t.save_state()
        assert s["queues"][0]["last_avail"] == 4 and not s["device"]["flush_error"]
        vm.dev.close()  # the source lets go of the image (its lock) before the destination opens it

        dst = BlkVm(path, drv=vm.drv, up=False)
        dst.t.load_state(copy.deepcopy(s))
        assert vm.drv.used_idx() == 4
        dst.t.resume()
        assert dst.dev.wait_idle(10)
        assert vm.drv.take_used() == [(late[0], 513)]
        assert vm.drv.mem.read(late[1], 512) == data[9 * 512:10 * 512]
        assert sorted(reads) == [0, 1, 2, 3, 9]  # every read once: none lost, none redone
        dst.dev.close()
    finally:
        gate.set()
        vm.dev.close()


def test_blk_writes_flush_and_identity(image, monkeypatch):
    path, _ = image
    vm = BlkVm(path)
    head, _, status = vm.request(spec.VIRTIO_BLK_T_OUT, 3, out=b"\xab" * 512)
    vm.t.notify(0)
    assert vm.dev.wait_idle(5) and vm.drv.take_used() == [(head, 1)]
    synced = []

    def failing_sync(fd):
        synced.append(fd)
        raise OSError(5, "EIO")
    monkeypatch.setattr(os, "fdatasync", failing_sync)
    vm.t.quiesce()
    assert synced  # quiesce flushed the image (and that failed: sticky)
    s = vm.t.save_state()
    assert s["device"]["flush_error"] is True and s["device"]["serial"] == b"vda".ljust(20, b"\0")
    vm.dev.close()
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    dst = BlkVm(path, drv=vm.drv, up=False)
    for bad in ({"capacity": SECTORS + 1}, {"read_only": True}, {"serial": b"vdb".ljust(20, b"\0")},
                {"features": 0}, {"flush_error": 1}):
        with pytest.raises(StateError):
            dst.t.load_state({**s, "device": {**s["device"], **bad}})
    dst.t.load_state({**s, "device": {**s["device"], "path": "/elsewhere/disk.img"}})  # the path: for the record
    dst.t.resume()
    head, _, status = dst.request(spec.VIRTIO_BLK_T_FLUSH, 0)
    dst.t.notify(0)
    assert dst.dev.wait_idle(5) and vm.drv.take_used() == [(head, 1)]
    assert vm.drv.mem.read_u8(status) == spec.VIRTIO_BLK_S_IOERR  # the flush error stayed
    assert path.read_bytes()[3 * 512:4 * 512] == b"\xab" * 512
    dst.dev.close()


# -- virtio-console
class ConsoleVm:
    def __init__(self, mem=None, up=True):
        self.out = Rec()
        self.rx = MockDriver(16, mem=mem)
        self.tx = MockDriver(16, mem=self.rx.mem, base=0x4000)
        self.tx.data_next = 0x80000
        self.dev = VirtioConsole(self.out)
        self.t = VirtioMmioTransport(self.dev, self.rx.mem, Line())
        if up:
            assert negotiate(self.t)[1]
            setup_queue(self.t, 0, self.rx)
            setup_queue(self.t, 1, self.tx)
            wr(self.t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)


def test_console_pending_input_and_output_are_each_delivered_once():
    vm = ConsoleVm()
    assert vm.dev.enqueue_input(b"typed") == 5  # no receive buffer yet: waits in the device
    a = vm.tx.alloc(b"hello")
    h = vm.tx.add_chain([Buf(a, 5)])             # published, not yet notified
    vm.t.quiesce()
    assert vm.dev.enqueue_input(b"more") == 0 and vm.dev.input_room() == 0
    s = vm.t.save_state()
    assert s["device"]["rx"] == b"typed"
    dst = ConsoleVm(mem=vm.rx.mem, up=False)
    dst.rx, dst.tx = vm.rx, vm.tx
    dst.t.load_state(s)
    dst.t.resume()
    assert b"".join(dst.out.calls) == b"hello" and vm.out.calls == []
    assert vm.tx.take_used() == [(h, 0)]
    buf = vm.rx.alloc(16)
    rh = vm.rx.add_chain([Buf(buf, 16, write=True)])
    dst.t.notify(0)
    assert vm.rx.take_used() == [(rh, 5)] and vm.rx.mem.read(buf, 5) == b"typed"
    assert dst.dev.enqueue_input(b"more") == 4
    with pytest.raises(StateError):
        ConsoleVm(mem=vm.rx.mem, up=False).t.load_state({**s, "device": {**s["device"], "cols": 132}})


def test_console_receive_error_kept_for_the_next_notify_becomes_needs_reset():
    vm = ConsoleVm()
    vm.rx.add_chain([Buf(1 << 30, 16, write=True)])  # outside RAM
    vm.dev.enqueue_input(b"x")  # the console thread finds it: kept for the next notify
    assert not rd(vm.t, M.STATUS) & NEEDS_RESET
    vm.t.quiesce()
    assert rd(vm.t, M.STATUS) & NEEDS_RESET
    s = vm.t.save_state()
    dst = ConsoleVm(mem=vm.rx.mem, up=False)
    dst.t.load_state(s)
    assert rd(dst.t, M.STATUS) & NEEDS_RESET and dst.dev.save_state()["rx"] == b"x"


# -- virtio-net
MAC = bytes.fromhex("00163e123456")
NET_FEATURES = VIRTIO_F_VERSION_1 | N.F_MRG_RXBUF | N.F_GUEST_CSUM | N.F_GUEST_TSO4 | VIRTIO_F_RING_EVENT_IDX


def hdr(num_buffers=0):
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, num_buffers)


class NetVm:
    """A VirtioNet on a SOCK_SEQPACKET pair (one frame per read or write, as a TAP)."""

    def __init__(self, monkeypatch, *, mem=None, up=True, features=NET_FEATURES, vhost=None, **kw):
        self.mem = mem or GuestMemory.anonymous([(0, 1 << 20)], hugepages=False)
        self.rx = MockDriver(16, mem=self.mem, base=0x1000)
        self.tx = MockDriver(16, mem=self.mem, base=0x3000)
        self.rx.data_next, self.tx.data_next = 0x10000, 0x80000
        self.host, self._guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self.offloads = []
        monkeypatch.setattr(N.tap, "set_offload", lambda fd, flags: self.offloads.append(flags))
        self.dev = N.VirtioNet(self._guest.fileno(), MAC, mtu=1500, ifname="t0", **kw)
        if vhost is not None:
            self.dev.attach_vhost(vhost)
        self.t = VirtioMmioTransport(self.dev, self.mem, trigger=nop)
        if up:
            wr(self.t, M.STATUS, ACK | DRV)
            for sel in (0, 1):
                wr(self.t, M.DRIVER_FEATURES_SEL, sel)
                wr(self.t, M.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
            wr(self.t, M.STATUS, ACK | DRV | FEAT_OK)
            setup_queue(self.t, 0, self.rx)
            setup_queue(self.t, 1, self.tx)
            wr(self.t, M.STATUS, ACK | DRV | FEAT_OK | DRV_OK)

    def frames(self):
        got = []
        while True:
            try:
                got.append(self.host.recv(70000))
            except BlockingIOError:
                return got

    def destination(self, monkeypatch, **kw):
        """A fresh device on the same guest memory (and the same mock driver)."""
        d = NetVm(monkeypatch, mem=self.mem, up=False, **kw)
        d.rx, d.tx = self.rx, self.tx
        return d

    def close(self):
        self.dev.close()
        self.host.close()
        self._guest.close()


def test_net_transmit_held_by_the_rate_limit_is_sent_exactly_once(monkeypatch):
    now = [0.0]
    src = NetVm(monkeypatch, tx_rate=(100_000, 0.05), clock=lambda: now[0])
    frames = [hdr() + os.urandom(40_000) for _ in range(3)]
    heads = [src.tx.add_chain([Buf(src.tx.alloc(f), len(f))]) for f in frames]
    src.t.notify(1)
    assert src.dev._tx_held is not None and src.t.queues[1].in_flight == 1
    src.t.quiesce()
    assert src.dev._tx_held is None and src.dev._tx_timer is None and src.t.queues[1].in_flight == 0
    s = src.t.save_state()
    sent = [h for h, _ in src.tx.take_used()]
    assert s["queues"][1]["last_avail"] == len(sent) < 3
    dst = src.destination(monkeypatch, tx_rate=(100_000, 0.05), clock=lambda: now[0])
    dst.t.load_state(s)
    dst.t.resume()
    while dst.dev._tx_held is not None:
        dst.dev._tx_timer.cancel()
        now[0] += 1.0
        dst.dev._tx_resume()
    sent += [h for h, _ in src.tx.take_used()]
    assert sent == heads
    assert src.frames() + dst.frames() == frames  # each frame once, in order
    assert dst.dev.counters.tx_packets == 3  # the counters moved along
    assert dst.offloads == [N.tap.TUN_F_CSUM | N.tap.TUN_F_TSO4] and s["device"]["offloads"] == dst.offloads[0]
    src.close()
    dst.close()


@pytest.mark.parametrize("tiny_first", [True, False])
def test_net_receive_buffers_held_for_a_frame_are_handed_back(monkeypatch, tiny_first):
    src = NetVm(monkeypatch)
    rxq = src.t.queues[0]
    addr = {}
    a = src.rx.alloc(2048)
    chains = [[Buf(a, 2048, write=True)], [Buf(src.rx.alloc(16), 0, write=True)]]  # one too small to use
    if tiny_first:
        chains.reverse()
    heads = [src.rx.add_chain(c) for c in chains]
    addr[heads[1 if tiny_first else 0]] = a
    frame = hdr() + os.urandom(3000)
    src.host.send(frame)
    src.dev._rx_ready()  # the frame needs two buffers: the good one is kept, the tiny one used empty
    tiny = heads[0] if tiny_first else heads[1]
    assert src.rx.take_used() == [(tiny, 0)] and rxq.in_flight == 1
    src.t.quiesce()
    assert rxq.in_flight == 0
    s = src.t.save_state()
    assert s["device"]["rx_frame"] == frame
    if tiny_first:   # the kept chain was the last taken: back to the ring
        assert rxq.last_avail == 1 and src.rx.take_used() == []
    else:            # a chain taken after it was used: returned empty too
        assert rxq.last_avail == 2 and src.rx.take_used() == [(heads[0], 0)]
    dst = src.destination(monkeypatch)
    dst.t.load_state(s)
    more = []
    for _ in range(2):
        buf = src.rx.alloc(2048)
        more.append(src.rx.add_chain([Buf(buf, 2048, write=True)]))
        addr[more[-1]] = buf
    dst.t.resume()
    used = src.rx.take_used()
    assert [h for h, _ in used] == (([heads[1]] if tiny_first else []) + more)[:2]
    assert [n for _, n in used] == [2048, len(frame) - 2048]
    got = b"".join(src.mem.read(addr[h], n) for h, n in used)
    assert got == hdr(num_buffers=2) + frame[12:]  # delivered once, into the buffers handed back first
    assert dst.dev.counters.rx_packets == 1 and src.dev.counters.rx_packets == 0
    src.close()
    dst.close()


class FakeVhost:
    """Plays vhost-net: ``start`` records the rings; the test moves the rings as the kernel would."""

    def __init__(self):
        self.running = False
        self.started = []
        self.bases = None

    def start(self, mem, rings, features):
        self.running = True
        self.started.append([(r.size, r.desc, r.avail, r.used, r.last_avail) for r in rings])

    def stop(self):
        self.running = False

    def suspend(self):
        self.running = False
        return self.bases


def test_net_vhost_rings_are_taken_back_and_reprogrammed(monkeypatch):
    vh = FakeVhost()
    src = NetVm(monkeypatch, vhost=vh)
    assert vh.started == [[(16, 0x1000, src.rx.avail, src.rx.used, 0), (16, 0x3000, src.tx.avail, src.tx.used, 0)]]
    assert src.dev.external_used_interrupts and rd(src.t, M.INTERRUPT_STATUS) & M.INT_VRING
    # the kernel sends three frames: it takes them and puts them on the used ring itself
    for _ in range(3):
        src.tx.add_chain([Buf(src.tx.alloc(hdr() + b"x" * 60), 72)])
    for i in range(3):
        src.mem.write(src.tx.used + 4 + 8 * i, struct.pack("<II", i, 0))
    src.mem.write_u16(src.tx.used + 2, 3)
    vh.bases = [0, 3]
    src.t.quiesce()
    assert not vh.running and src.t.queues[1].last_avail == src.t.queues[1].next_used == 3
    s = src.t.save_state()
    vh2 = FakeVhost()
    dst = src.destination(monkeypatch, vhost=vh2)
    dst.t.load_state(s)
    assert vh2.started == []  # not before resume
    dst.t.resume()
    assert vh2.started == [[(16, 0x1000, src.rx.avail, src.rx.used, 0), (16, 0x3000, src.tx.avail, src.tx.used, 3)]]
    assert rd(dst.t, M.INTERRUPT_STATUS) & M.INT_VRING  # the kernel signals the guest directly again
    src.close()
    dst.close()


def test_net_vhost_that_cannot_be_stopped_cleanly_needs_reset(monkeypatch):
    vh = FakeVhost()
    src = NetVm(monkeypatch, vhost=vh)

    def fail():
        vh.running = False
        raise N.VhostError("GET_VRING_BASE failed")
    vh.suspend = fail
    src.t.quiesce()
    assert rd(src.t, M.STATUS) & NEEDS_RESET
    src.t.save_state()
    src.t.resume()
    assert not vh.running  # not restarted from ring indices that cannot be trusted
    src.close()


def test_net_state_is_checked(monkeypatch):
    src = NetVm(monkeypatch)
    src.t.quiesce()
    s = src.t.save_state()
    dev = s["device"]
    for bad in ({"mac": bytes(6)}, {"mtu": 9000}, {"mtu": None}, {"rx_frame": b"short"},
                {"rx_frame": bytes(N.MAX_PACKET + 1)}, {"offloads": 0x10}, {"counters": {}},
                {"counters": {**dev["counters"], "rx_bytes": -1}}, {"link_up": None}):
        dst = src.destination(monkeypatch)
        with pytest.raises(StateError):
            dst.t.load_state({**s, "device": {**dev, **bad}})
        dst.close()
    dst = src.destination(monkeypatch)
    dst.t.load_state({**s, "device": {**dev, "link_up": False}})
    assert struct.unpack("<H", dst.t.read(M.CONFIG + 6, 2))[0] == 0
    src.close()
    dst.close()


# ------------------------------------------------------------------------------------ garbled states
_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(1 << 80), max_value=1 << 80)
         | st.text(max_size=6) | st.binary(max_size=8) | st.floats(allow_nan=True))
_plain = st.recursive(_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                      max_leaves=8)


def _containers(node, path=()):
    """Every dict or list in ``node`` with its path."""
    if isinstance(node, (dict, list)):
        yield path, node
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            yield from _containers(v, path + (k,))


def garble(data, state):
    """``state`` with a few random fields deleted, replaced by other plain data, or added."""
    state = copy.deepcopy(state)
    for _ in range(data.draw(st.integers(1, 3))):
        spots = list(_containers(state))
        _, node = spots[data.draw(st.integers(0, len(spots) - 1))]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = data.draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
        if op == "add" or not keys:
            if isinstance(node, dict):
                node[data.draw(st.text(max_size=6))] = data.draw(_plain)
            else:
                node.append(data.draw(_plain))
            continue
        k = data.draw(st.sampled_from(keys))
        if op == "delete":
            del node[k]
        elif op == "nudge" and isinstance(node[k], int) and not isinstance(node[k], bool):
            node[k] += data.draw(st.sampled_from([-1, 1, 1 << 16, 1 << 64]))
        elif op == "nudge" and isinstance(node[k], bytes):
            node[k] = node[k] + b"\0" if data.draw(st.booleans()) else node[k][:-1]
        else:
            node[k] = data.draw(_plain)
    return state


def _legacy_devices():
    now = [float(T0)]
    u = Serial(nop, nop)
    u.write(S.MCR, b(0x08))
    u.write(S.IER, b(0x03))
    u.enqueue_input(b"abc")
    c = I8042(nop, kbd_irq=nop)
    c.data_port.write(0, b(0xF2))
    r = Rtc(clock=lambda: now[0])
    cmos(r, R.REG_B, 0x82)
    return [(u, lambda: Serial(nop, nop)), (c, lambda: I8042(nop, kbd_irq=nop)), (r, Rtc),
            (AcpiPm(nop), lambda: AcpiPm(nop)), (AcpiReset(nop), lambda: AcpiReset(nop)),
            (PvExit(nop), lambda: PvExit(nop)), (PvPanic(nop), lambda: PvPanic(nop))]


LEGACY = _legacy_devices()


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_garbled_legacy_states_raise_state_error_only(data):
    dev, make = LEGACY[data.draw(st.integers(0, len(LEGACY) - 1))]
    bad = garble(data, dev.save_state())
    try:
        make().load_state(bad)
    except StateError:
        pass


@settings(max_examples=100, deadline=None)
@given(_plain)
def test_any_plain_data_is_refused_with_state_error(value):
    for make in (lambda: Serial(nop, nop), Rtc, lambda: PvExit(nop), VirtioRng):
        with pytest.raises(StateError):
            make().load_state(value)


@pytest.fixture(scope="module")
def virtio_rigs(tmp_path_factory):
    """Saved states of running virtio devices, and transports to load garbled copies into."""
    mp = pytest.MonkeyPatch()
    img = tmp_path_factory.mktemp("img") / "d.img"
    img.write_bytes(bytes(SECTORS * 512))
    rigs = []
    drv = MockDriver(16)
    t = VirtioMmioTransport(VirtioRng(), drv.mem, Line())
    bring_up(t, drv)
    rng_request(drv)
    t.notify(0)
    t.quiesce()
    rigs.append((t.save_state(), VirtioMmioTransport(VirtioRng(), drv.mem, Line())))
    vm = BlkVm(img)
    vm.t.quiesce()
    s = vm.t.save_state()
    vm.dev.close()
    rigs.append((s, BlkVm(img, drv=vm.drv, up=False).t))
    cvm = ConsoleVm()
    cvm.dev.enqueue_input(b"in")
    cvm.t.quiesce()
    rigs.append((cvm.t.save_state(), ConsoleVm(mem=cvm.rx.mem, up=False).t))
    nvm = NetVm(mp)
    nvm.host.send(hdr() + b"f" * 100)
    nvm.dev._rx_ready()  # read from the TAP, no receive buffer yet: the frame waits in the device
    nvm.t.quiesce()
    dst = nvm.destination(mp)
    rigs.append((nvm.t.save_state(), dst.t))
    yield rigs
    rigs[1][1].device.close()
    nvm.close()
    dst.close()
    mp.undo()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_garbled_virtio_states_raise_state_error_only(virtio_rigs, data):
    state, t = virtio_rigs[data.draw(st.integers(0, len(virtio_rigs) - 1))]
    bad = garble(data, state)
    try:
        t.load_state(bad)
    except StateError:
        return
    t.resume()  # whatever loaded must run
    t.quiesce()
    t.save_state()


def test_after_a_refused_state_a_good_one_still_loads(virtio_rigs):
    for state, t in virtio_rigs:
        with pytest.raises(StateError):
            t.load_state({**state, "queues": []})
        t.load_state(state)
        saved = t.save_state()
        assert {k: v for k, v in saved.items() if k != "device"} == {k: v for k, v in state.items() if k != "device"}


# ------------------------------------------------------------------------------------ reachable states load
_access = st.tuples(st.sampled_from(["r", "w", "w", "in", "cad"]), st.integers(0, 7), st.integers(0, 255))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["serial", "i8042", "rtc", "acpi_pm"]), st.lists(_access, max_size=120))
def test_every_state_a_guest_can_reach_saves_and_loads(name, ops):
    """The consistency checks of load_state never refuse a state the device really got into."""
    now = [float(T0)]
    make = {"serial": lambda: Serial(nop, nop), "i8042": lambda: I8042(nop, kbd_irq=nop, aux_irq=nop),
            "rtc": lambda: Rtc(clock=lambda: now[0]), "acpi_pm": lambda: AcpiPm(nop)}[name]
    dev = make()
    for kind, off, value in ops:
        off %= {"serial": 8, "i8042": 5, "rtc": 2, "acpi_pm": 2}[name]
        if kind == "r":
            dev.read(off, 1)
        elif kind == "w":
            dev.write(off, b(value))
        elif kind == "in" and name == "serial":
            dev.enqueue_input(bytes([value]) * (off + 1))
        elif kind == "cad" and name == "i8042":
            dev.inject_ctrl_alt_del()
        now[0] += value
    move(dev, make())
