"""hypyr.vmm.machine.Machine running tiny real guests on /dev/kvm: exits, devices, stopping.

Tests that expect a HLT exit use ``irqchip=False`` (with the in-kernel irqchip KVM handles
HLT itself and never exits); the others use the default in-kernel irqchip where it matters.
"""

from __future__ import annotations

import struct
import threading
import time

import payloads as P
import pytest

from hypyr.cli.run import run_exit_code
from hypyr.devices.pvexit import PORT as PVEXIT_PORT
from hypyr.devices.pvexit import PvExit
from hypyr.errors import Conflict, NotFound
from hypyr.vmm.machine import VcpuState
from hypyr.vmm.stop import StopKind, StopReason

MiB = 1 << 20
TIMEOUT = 20  # generous: an emulating KVM in a loaded nested lab is slow, but these guests are tiny


class Recorder:
    """A bus device that answers reads from ``values`` and records every access with its thread."""

    def __init__(self, values: dict[int, bytes] | None = None):
        self.values = values or {}
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes, int]] = []  # (offset, data, thread id)
        self.lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            self.reads.append((offset, size))
        return self.values.get(offset, b"\0" * size)[:size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.writes.append((offset, bytes(data), threading.get_ident()))

    def written(self, offset: int) -> list[bytes]:
        with self.lock:
            return [d for o, d, _ in self.writes if o == offset]


def run_to_stop(machine, timeout: float = TIMEOUT) -> StopReason:
    machine.start()
    reason = machine.wait(timeout)
    assert reason is not None, f"the guest did not stop within {timeout}s"
    assert all(not vt.thread.is_alive() for vt in machine.vcpus)
    return reason


def wait_until(pred, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- 1. port I/O ----------------------------------------------------------------------------------
def test_port_io_round_trip_and_rep_outsb(make_machine):
    m = make_machine()
    P.load(m.memory, P.PIO_ROUNDTRIP)
    m.memory.write(P.MSG_ADDR, b"hello")
    dev = Recorder({0: struct.pack("<I", 0x1234_5677), 8: b"\x41"})
    m.pio.register(P.PIO_BASE, 16, dev)
    P.setup_real_mode(m.vcpus[0].vcpu)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.HALT, reason
    assert (0, 4) in dev.reads and (8, 1) in dev.reads          # the guest's IN at 0x10 (32-bit) and 0x18
    assert dev.written(4) == [struct.pack("<I", 0x1234_5678)]   # value + 1 at 0x14
    assert dev.written(9) == [b"\x42"]                          # value + 1 at 0x19
    assert b"".join(dev.written(0xA)) == b"hello"               # rep outsb, however KVM batched it
    assert all(len(d) == 1 for d in dev.written(0xA))


# -- 2. MMIO --------------------------------------------------------------------------------------
class Computing:
    """MMIO device: offset 4 reads back the bitwise NOT of the last dword written at offset 0."""

    def __init__(self):
        self.last = 0
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        if offset == 4 and size == 4:
            return struct.pack("<I", ~self.last & 0xFFFF_FFFF)
        if offset == 8 and size == 8:
            return struct.pack("<Q", 0x0123_4567_89AB_CDEF)
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))
        if offset == 0 and len(data) == 4:
            self.last = struct.unpack("<I", data)[0]


def test_mmio_write_and_computed_read(make_machine, kvm):
    m = make_machine()
    dev = Computing()
    m.mmio.register(P.MMIO_BASE, 0x1000, dev)
    P.load(m.memory, P.MMIO_ROUNDTRIP)
    P.setup_long_mode(kvm, m.vcpus[0].vcpu, m.memory)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.HALT, reason
    assert dev.writes == [(0, struct.pack("<I", 0xCAFE_F00D)), (16, b"\x5a")]
    assert m.memory.read_u32(P.DATA_ADDR) == ~0xCAFE_F00D & 0xFFFF_FFFF
    assert m.memory.read_u64(P.DATA_ADDR + 8) == 0x0123_4567_89AB_CDEF


# -- 3. HLT ---------------------------------------------------------------------------------------
def test_hlt_stops_the_machine_with_halt(make_machine):
    m = make_machine(irqchip=False)
    P.load(m.memory, P.HLT)
    P.setup_real_mode(m.vcpus[0].vcpu)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.HALT
    assert run_exit_code(reason) == 0
    assert reason.vcpu == 0
    assert m.stop_reason is reason


# -- 4. triple fault ------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [P.UD2, P.DIV0], ids=lambda p: p.name)
def test_exception_with_empty_idt_triple_faults(make_machine, kvm, payload):
    m = make_machine()
    P.load(m.memory, payload)
    P.setup_long_mode(kvm, m.vcpus[0].vcpu, m.memory)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.TRIPLE_FAULT, reason
    assert run_exit_code(reason) == 121
    assert reason.vcpu == 0
    # a register dump is there; its values are not checked: on AMD SVM, KVM resets the vCPU after a
    # shutdown intercept, so the dump shows the reset state rather than the faulting one
    assert "rip=" in reason.registers and "cr3=" in reason.registers


# -- 5. two memslots ------------------------------------------------------------------------------
def test_guest_sees_both_memslots_and_the_hole_between(make_machine, kvm):
    m = make_machine(layout=[(0, MiB), (2 * MiB, MiB)])
    assert [(r.start, r.size) for r in m.memory.regions] == [(0, MiB), (2 * MiB, MiB)]
    P.load(m.memory, P.TWO_SLOTS)
    m.memory.write_u32(0x1800, 0xFEED_FACE)
    m.memory.write_u32(0x200020, 0x5107_0002)
    P.setup_long_mode(kvm, m.vcpus[0].vcpu, m.memory)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.HALT, reason
    assert m.memory.read_u32(0x200010) == 0xFEED_FACE   # slot 0 -> slot 1
    assert m.memory.read_u32(0x1804) == 0x5107_0002     # slot 1 -> slot 0
    assert m.memory.read_u32(0x1808) == 0xFFFF_FFFF     # the unbacked gap reads as all ones
    assert m.memory.read_u32(0x2FFFFC) == 0x600D_F00D   # last dword of slot 1
    assert not m.memory.check_range(0x150000, 4)


# -- 6. two vCPUs ---------------------------------------------------------------------------------
def test_two_vcpus_run_on_two_host_threads(make_machine):
    m = make_machine(nr_vcpus=2, irqchip=False)
    P.load(m.memory, P.REPORT_ID)
    seen: list[tuple[int, int]] = []
    both = threading.Event()

    class IdPort:
        def read(self, offset, size):
            return b"\0" * size

        def write(self, offset, data):
            seen.append((data[0], threading.get_ident()))
            if len(seen) >= 2:
                both.set()

    m.pio.register(P.ID_PORT, 1, IdPort())
    for vt in m.vcpus:  # no irqchip: no INIT/SIPI, every vCPU starts where we put it
        P.setup_real_mode(vt.vcpu, rbx=vt.vcpu.id)
    m.start()
    try:
        assert both.wait(TIMEOUT), f"only saw {seen}"
    finally:
        m.stop(StopReason(StopKind.DESTROYED, "test done"))
    reason = m.wait(TIMEOUT)
    assert reason is not None and reason.kind is StopKind.DESTROYED
    assert sorted(v for v, _ in seen) == [0, 1]
    threads = {v: t for v, t in seen}
    assert threads[0] != threads[1]
    assert threading.get_ident() not in threads.values()
    assert threads == {vt.vcpu.id: vt.thread.ident for vt in m.vcpus}


# -- 7. exit-status port --------------------------------------------------------------------------
@pytest.mark.parametrize("status", [42, 0, 255])
def test_exit_status_port_stops_with_the_guest_status(make_machine, status):
    m = make_machine(irqchip=True)
    m.pio.register(PVEXIT_PORT, 1, PvExit(m.device_stop))
    P.load(m.memory, P.exit_status(status))
    P.setup_real_mode(m.vcpus[0].vcpu)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.EXIT_STATUS, reason
    assert reason.status == status and run_exit_code(reason) == status
    assert all(vt.state is VcpuState.EXITED for vt in m.vcpus)


# -- 8. stop / pause / resume from another thread --------------------------------------------------
@pytest.mark.parametrize("nr_vcpus", [1, 2])
def test_stop_from_another_thread_interrupts_a_spinning_guest(make_machine, nr_vcpus):
    m = make_machine(nr_vcpus=nr_vcpus, irqchip=False)
    P.load(m.memory, P.SPIN)
    for vt in m.vcpus:
        P.setup_real_mode(vt.vcpu)
    m.start()
    wait_until(lambda: all(vt.thread.is_alive() for vt in m.vcpus), what="vCPU threads")
    time.sleep(0.2)  # let the guests spin inside KVM_RUN
    assert m.wait(0) is None

    given = StopReason(StopKind.DESTROYED, "stopped by the test")
    t0 = time.monotonic()
    stopper = threading.Thread(target=m.stop, args=(given,))
    stopper.start()
    reason = m.wait(5)
    elapsed = time.monotonic() - t0
    stopper.join()

    assert reason is given, reason
    assert elapsed < 5
    assert run_exit_code(reason) == 130
    assert all(not vt.thread.is_alive() for vt in m.vcpus)
    m.stop(StopReason(StopKind.POWEROFF, "too late"))
    assert m.stop_reason is given  # the first reason wins


def test_pause_freezes_and_resume_continues_the_guest(make_machine):
    m = make_machine(irqchip=False)
    P.load(m.memory, P.COUNTER)
    P.setup_real_mode(m.vcpus[0].vcpu)
    counter = lambda: m.memory.read_u32(P.COUNTER_ADDR)  # noqa: E731
    m.start()
    wait_until(lambda: counter() > 0, what="the counter to start")

    m.pause()
    assert m.paused
    assert m.vcpus[0].state is VcpuState.PAUSED
    a = counter()
    time.sleep(0.3)
    b = counter()
    assert a == b, "the guest ran while paused"

    m.resume()
    wait_until(lambda: counter() > b, what="the counter to advance after resume")
    assert m.wait(0) is None  # still running

    m.pause()  # pausing twice works too
    c = counter()
    time.sleep(0.1)
    assert counter() == c
    m.resume()
    wait_until(lambda: counter() > c, what="the counter to advance after the second resume")

    m.stop(StopReason(StopKind.DESTROYED, "test done"))
    assert m.wait(TIMEOUT).kind is StopKind.DESTROYED


def test_stop_while_paused(make_machine):
    m = make_machine(irqchip=False)
    P.load(m.memory, P.SPIN)
    P.setup_real_mode(m.vcpus[0].vcpu)
    m.start()
    m.pause()
    m.stop(StopReason(StopKind.DESTROYED, "stopped while paused"))
    reason = m.wait(TIMEOUT)
    assert reason is not None and reason.message == "stopped while paused"


def test_stop_before_start_and_wait_timeout(make_machine):
    m = make_machine()
    assert m.wait(0.05) is None
    m.stop(StopReason(StopKind.DESTROYED, "never started"))
    assert m.wait(1).message == "never started"


@pytest.mark.parametrize("irqchip,paused", [(False, False), (True, False), (False, True)])
def test_inject_nmi_runs_the_guests_nmi_handler(make_machine, irqchip, paused):
    """A spinning vCPU is kicked out of KVM_RUN to take the NMI; a paused one takes it on resume."""
    m = make_machine(irqchip=irqchip)
    P.load(m.memory, P.SPIN)
    P.load(m.memory, P.NMI_REPORT, P.NMI_HANDLER_ADDR)
    m.memory.write(2 * 4, struct.pack("<HH", P.NMI_HANDLER_ADDR, 0))   # IVT[2]: offset, segment
    seen: list[int] = []

    class IdPort:
        def read(self, offset, size):
            return b"\0" * size

        def write(self, offset, data):
            seen.append(data[0])

    m.pio.register(P.PIO_BASE, 1, IdPort())
    P.setup_real_mode(m.vcpus[0].vcpu)
    with pytest.raises(Conflict):
        m.inject_nmi(0)          # no vCPU thread yet
    m.start()
    try:
        wait_until(lambda: m.vcpus[0].thread.is_alive(), what="the vCPU thread")
        if paused:
            m.pause()
        else:
            time.sleep(0.2)      # spinning inside KVM_RUN
        m.inject_nmi(0)
        if paused:
            time.sleep(0.2)
            assert seen == []    # held while parked
            m.resume()
        wait_until(lambda: seen, what="the guest's NMI handler")
        assert seen == [0x4E]
        with pytest.raises(NotFound):
            m.inject_nmi(1)
    finally:
        m.stop(StopReason(StopKind.DESTROYED, "test done"))
    assert m.wait(TIMEOUT) is not None


# -- 9. bad input ---------------------------------------------------------------------------------
def test_unmapped_mmio_and_ports_read_all_ones(make_machine, kvm):
    m = make_machine(irqchip=False)
    P.load(m.memory, P.UNMAPPED)
    P.setup_long_mode(kvm, m.vcpus[0].vcpu, m.memory)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.HALT, reason
    assert m.memory.read_u32(P.DATA_ADDR) == 0xFFFF_FFFF
    assert m.memory.read_u64(P.DATA_ADDR + 8) == 0xFFFF_FFFF_FFFF_FFFF
    assert m.memory.read_u8(P.DATA_ADDR + 0x10) == 0xFF


def test_mmio_access_straddling_a_device_end_reads_all_ones(make_machine, kvm):
    """A device registered for 8 bytes is not handed an 8-byte read at its offset 8."""
    m = make_machine(irqchip=False)
    dev = Computing()
    m.mmio.register(P.MMIO_BASE, 12, dev)  # covers offsets 0-11: the 8-byte read at 8 sticks out
    P.load(m.memory, P.MMIO_ROUNDTRIP)
    P.setup_long_mode(kvm, m.vcpus[0].vcpu, m.memory)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.HALT, reason
    assert m.memory.read_u64(P.DATA_ADDR + 8) == 0xFFFF_FFFF_FFFF_FFFF
    assert dev.writes == [(0, struct.pack("<I", 0xCAFE_F00D))]  # the byte write at 16 hit nothing


def test_a_device_that_raises_stops_the_machine_cleanly(make_machine, kvm):
    m = make_machine()

    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device bug")

        def write(self, offset, data):
            pass

    m.mmio.register(P.MMIO_BASE, 0x1000, Broken())
    P.load(m.memory, P.MMIO_ROUNDTRIP)
    P.setup_long_mode(kvm, m.vcpus[0].vcpu, m.memory)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.INTERNAL_ERROR, reason
    assert "device bug" in reason.message
    assert run_exit_code(reason) == 122
