"""The Machine: a KVM VM with guest memory, two buses and one host thread per vCPU.

The vCPU loop is deliberately small: KVM_RUN, dispatch the exit to a bus, obey the
running/paused/stopping state.  Any vCPU (or device, or the user) may stop the whole
machine with :meth:`Machine.stop`; the other vCPU threads are kicked out of KVM_RUN with a
signal (``immediate_exit`` closes the race), so no thread ever busy-waits.  Why it stopped (and
the faulting vCPU's registers): :mod:`hypyr.vmm.stop`.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import overload

from hypyr.arch.x86 import layout
from hypyr.devices.bus import Bus
from hypyr.devices.events import GuestEvent, StopRequest
from hypyr.errors import Conflict, NotFound, VcpuCountError
from hypyr.kvm import B, Kvm, KvmError, Vcpu, Vm
from hypyr.memory import GuestMemory
from hypyr.vmm.stop import StopKind, StopReason, register_dump

log = logging.getLogger("hypyr.vmm")

IOAPIC_REDIR_MASKED = 1 << 16  # the mask bit of an IOAPIC redirection entry
KICK_SIGNAL = signal.SIGRTMIN  # interrupts KVM_RUN in a vCPU thread

MAX_VCPUS = layout.MAX_VCPUS  # the most our MADT can describe (8-bit xAPIC ids, no x2APIC entries)


def vcpu_limit(kvm: Kvm | None = None) -> int:
    """The most vCPUs a machine may have: :data:`MAX_VCPUS`, and no more than ``kvm``'s
    KVM_CAP_MAX_VCPUS."""
    return MAX_VCPUS if kvm is None else min(kvm.max_vcpus, MAX_VCPUS)


def check_vcpu_count(n: object, kvm: Kvm | None = None) -> int:
    """``n`` if it is a vCPU count this host and hypyr allow; :class:`VcpuCountError` otherwise."""
    limit = vcpu_limit(kvm)
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= limit:
        return n
    why = ("this host's KVM_CAP_MAX_VCPUS" if limit < MAX_VCPUS
           else "the most hypyr's MADT describes, with 8-bit APIC ids")
    raise VcpuCountError(f"vcpus must be an integer from 1 to {limit} ({why}), not {n!r}.")


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


def _ignore_signal(signum, frame) -> None:  # the signal's only job is to interrupt KVM_RUN
    pass


class _VcpuThread:
    """One vCPU and the thread that runs it."""

    __slots__ = ("vcpu", "thread", "state", "exits", "nmi_pending")

    def __init__(self, vcpu: Vcpu):
        self.vcpu = vcpu
        self.thread: threading.Thread | None = None
        self.state = VcpuState.CREATED
        self.exits = 0
        self.nmi_pending = False   # set by Machine.inject_nmi, delivered by the vCPU's own thread


class Machine:
    """A VM: memory, buses, vCPUs.  Built by :mod:`hypyr.vmm.builder` or directly by tests."""

    def __init__(self, memory: GuestMemory, nr_vcpus: int, *, irqchip: bool = True, kvm: Kvm | None = None,
                 own_kvm: bool | None = None, seccomp: str = "off", read_only_pages: tuple[int, int] | None = None):
        """``kvm``: an open /dev/kvm to use (default: open one); the machine closes it on close()
        if it opened it itself or ``own_kvm`` is true.  ``seccomp``: the mode of the filter each
        vCPU thread installs on itself (:mod:`hypyr.vmm.seccomp`; the builder passes VmConfig's).
        ``read_only_pages``: (guest address, count) of pages the VMM writes and the guest only
        reads (:meth:`read_only_page`), mapped when KVM has read-only memslots."""
        self.seccomp = seccomp
        self._parked_call: Callable[[], object] | None = None  # run by a parked vCPU (call_on_parked_vcpu)
        self._own_kvm = kvm is None if own_kvm is None else own_kvm
        self.memory = memory
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.irqchip = irqchip
        self.vcpus: list[_VcpuThread] = []
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._reason: StopReason | None = None
        self._done = threading.Event()
        self._eventfds: list[int] = []  # irqfds and absorbed-write eventfds, closed with the VM
        self._closed = False
        self.services: list = []  # objects with start()/stop() that live as long as the VM (I/O threads)
        self.ram_slots: list[int] = []  # the KVM memslot of each memory region, in region order
        self._read_only_area: mmap.mmap | None = None   # see read_only_page()
        self._read_only_views: list[memoryview] = []
        # CLOCK_MONOTONIC (ns) when pause() saw the last vCPU parked, and when the first vCPU ran
        # after start() or resume() (a migration's downtime is measured between the two)
        self.paused_at_ns: int | None = None
        self.running_at_ns: int | None = None
        self._running = threading.Event()  # set when a vCPU runs after start() or resume()
        self.kvm = kvm or Kvm()
        vm: Vm | None = None
        try:
            check_vcpu_count(nr_vcpus, self.kvm)  # before anything is allocated per vCPU
            vm = self.kvm.create_vm()
            self.vm: Vm = vm
            self._setup_vm(nr_vcpus, read_only_pages)
        except BaseException:  # close what exists; the memory stays the caller's
            for vt in self.vcpus:
                vt.vcpu.close()
            if vm is not None:
                vm.close()
            if self._own_kvm:
                self.kvm.close()
            raise

    def _setup_vm(self, nr_vcpus: int, read_only_pages: tuple[int, int] | None) -> None:
        vm = self.vm
        # x86 needs these two pages reserved for VMX real-mode emulation; they lie in the MMIO hole
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        # memslots before the irqchip: once it exists, each memslot change costs KVM an SRCU
        # grace period (5-11 ms on this project's hosts, ~0.2 ms before it)
        self.ram_slots = [vm.set_user_memory_region(region.start, region.size, region.host_address())
                          for region in self.memory.regions]
        if read_only_pages and read_only_pages[1] and self.kvm.check_extension(B.KVM_CAP_READONLY_MEM):
            self._read_only_area = mmap.mmap(-1, read_only_pages[1] * mmap.PAGESIZE)
            view = memoryview(self._read_only_area)
            self._read_only_views.append(view)
            vm.map_read_only(read_only_pages[0], view)
        if self.irqchip:
            vm.create_irqchip()
            vm.create_pit2()
        for i in range(nr_vcpus):
            self.vcpus.append(_VcpuThread(vm.create_vcpu(i)))

    def read_only_page(self, index: int) -> memoryview | None:
        """Page ``index`` of the ``read_only_pages`` area (the VMM writes it, the guest reads it
        with no exit), or None without one.  Valid until close()."""
        if self._read_only_area is None:
            return None
        view = self._read_only_views[0][index * mmap.PAGESIZE:(index + 1) * mmap.PAGESIZE]
        self._read_only_views.append(view)
        return view

    # -- interrupts ---------------------------------------------------------------------------
    def irq_line(self, irq: int) -> Callable[[bool], None]:
        """An IrqLine for ISA/GSI ``irq`` on the in-kernel PIC/IOAPIC."""
        vm = self.vm

        def line(level: bool) -> None:
            vm.irq_line(irq, level)
        return line

    def gsi_unmasked(self, gsi: int) -> bool:
        """Whether the guest has unmasked IOAPIC pin ``gsi`` (a driver listens on it); False
        without the in-kernel irqchip."""
        if not self.irqchip:
            return False
        ioapic = self.vm.get_irqchip(B.KVM_IRQCHIP_IOAPIC).chip.ioapic
        return not ioapic.redirtbl[gsi] & IOAPIC_REDIR_MASKED

    def _kvm_eventfd(self, register: Callable[[int], None]) -> int:
        """A new eventfd handed to KVM by ``register(fd)``; closed with the VM."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            register(fd)
        except BaseException:
            os.close(fd)
            raise
        self._eventfds.append(fd)
        return fd

    def irq_eventfd(self, gsi: int) -> int:
        """A KVM irqfd for ``gsi`` (needs the in-kernel irqchip): each write is an edge."""
        return self._kvm_eventfd(lambda fd: self.vm.irqfd(fd, gsi))

    def irq_trigger(self, gsi: int, fd: int | None = None) -> Callable[[], None]:
        """An edge trigger for ``gsi`` (needs the in-kernel irqchip): a KVM irqfd (``fd`` from
        :meth:`irq_eventfd`, or a new one), so raising the interrupt is one eventfd write from
        any thread."""
        if fd is None:
            fd = self.irq_eventfd(gsi)
        write = os.eventfd_write

        def trigger() -> None:
            if not self._closed:  # never write to a closed (maybe re-used) descriptor
                write(fd, 1)
        return trigger

    def absorb_mmio_write(self, addr: int, length: int, value: int) -> int:
        """Have KVM complete guest writes of ``value`` (``length`` bytes) to ``addr`` itself, with
        no exit to userspace (an ioeventfd); return the eventfd that counts them."""
        return self._kvm_eventfd(lambda fd: self.vm.ioeventfd(fd, addr, length, datamatch=value))

    def device_stop(self, req: StopRequest) -> None:
        """The StopCallback handed to devices."""
        if req.event is GuestEvent.POWEROFF:
            self.stop(StopReason(StopKind.POWEROFF, f"the guest powered off ({req.detail or 'ACPI'})"))
        elif req.event is GuestEvent.PANIC:
            self.stop(StopReason(StopKind.CRASH, f"the guest kernel panicked ({req.detail or 'pvpanic'})"))
        elif req.event is GuestEvent.REBOOT:
            self.stop(StopReason(StopKind.REBOOT, f"the guest asked for a reboot ({req.detail or 'reset'})"))
        else:
            self.stop(StopReason(StopKind.EXIT_STATUS, f"the guest reported exit status {req.status}",
                                 status=req.status))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, _ignore_signal)
        for service in self.services:
            service.start()
        for vt in self.vcpus:
            vt.thread = threading.Thread(target=self._vcpu_main, args=(vt,), name=f"vcpu{vt.vcpu.id}", daemon=True)
            vt.state = VcpuState.RUNNING
            vt.thread.start()

    @overload
    def wait(self, timeout: None = None) -> StopReason: ...
    @overload
    def wait(self, timeout: float) -> StopReason | None: ...

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Block until the machine stops; return why (None on timeout)."""
        if not self._done.wait(timeout):
            return None
        for vt in self.vcpus:
            if vt.thread is not None:
                vt.thread.join()
        return self._reason

    def run(self) -> StopReason:
        self.start()
        try:
            while True:
                reason = self.wait(0.5)  # short waits keep the main thread responsive to signals
                if reason is not None:
                    return reason
        except KeyboardInterrupt:
            self.stop(StopReason(StopKind.DESTROYED, "interrupted"))
            return self.wait()

    @property
    def stop_reason(self) -> StopReason | None:
        return self._reason

    def stop(self, reason: StopReason) -> None:
        """Stop every vCPU; the first reason given wins.  Safe from any thread."""
        with self._cond:
            if self._reason is None:
                self._reason = reason
                log.info("stopping: %s", reason.message)
            self._stopping = True
            self._cond.notify_all()
        self._kick_all()
        if all(vt.thread is None for vt in self.vcpus):
            self._done.set()

    def pause(self) -> None:
        """Park every vCPU and return once all are parked.  A parked vCPU has no I/O exit left
        for KVM to complete (see :meth:`_vcpu_loop`), so its state can be captured."""
        with self._cond:
            self._paused = True
            self._running.clear()
        self._kick_all()
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or all(
                vt.state in (VcpuState.PAUSED, VcpuState.EXITED) for vt in self.vcpus if vt.thread))
            if self.paused_at_ns is None:
                self.paused_at_ns = time.monotonic_ns()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self.paused_at_ns = None
            self._cond.notify_all()

    def wait_running(self, timeout: float | None = None) -> int | None:
        """Wait until a vCPU runs (after :meth:`start` or :meth:`resume`); its CLOCK_MONOTONIC
        time in ns, or None on timeout."""
        return self.running_at_ns if self._running.wait(timeout) else None

    def call_on_parked_vcpu(self, fn: Callable[[], object]) -> None:
        """Have one parked vCPU thread of this paused machine call ``fn`` (under the machine's
        lock; a debugging and test aid, e.g. the seccomp test hook)."""
        with self._cond:
            if not self._paused:
                raise RuntimeError("the machine is not paused")
            self._parked_call = fn
            self._cond.notify_all()

    def inject_nmi(self, index: int) -> None:
        """Queue an NMI on vCPU ``index`` (Xen's `xl trigger DOMAIN nmi`): its thread is kicked
        out of KVM_RUN and issues KVM_NMI itself before it enters again; a paused vCPU gets it
        when it resumes.  NotFound for no such vCPU, Conflict if its thread has ended."""
        if not 0 <= index < len(self.vcpus):
            raise NotFound(f"vCPU {index} does not exist (this domain has {len(self.vcpus)})")
        vt = self.vcpus[index]
        if vt.thread is None or not vt.thread.is_alive():
            raise Conflict(f"vCPU {index} is not running")
        vt.nmi_pending = True
        self._kick(vt)

    @staticmethod
    def _deliver_nmi(vt: _VcpuThread) -> None:
        """On ``vt``'s own thread, outside KVM_RUN: issue the NMI :meth:`inject_nmi` queued, if any."""
        if vt.nmi_pending:
            vt.nmi_pending = False
            vt.vcpu.nmi()
            log.info("vCPU %d: NMI injected", vt.vcpu.id)

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Release everything the machine holds (idempotent), stopping its vCPU threads first if
        they still run.  Guest RAM is unmapped here and now, even while the machine is still
        referenced (a reboot holds the old one while it builds the next)."""
        if self._closed:
            return
        self._closed = True
        me = threading.current_thread()
        live = [t for t in (vt.thread for vt in self.vcpus) if t is not None and t.is_alive() and t is not me]
        if live:  # e.g. parked vCPU threads of a VM given up before it ran: stop them first
            self.stop(StopReason(StopKind.DESTROYED, "the machine was closed"))
            for t in live:
                t.join()
        try:
            for service in reversed(self.services):
                service.stop()
            for vt in self.vcpus:
                vt.vcpu.close()
            self.vm.close()
            for fd in self._eventfds:
                os.close(fd)
            self._eventfds = []
        finally:
            self.memory.close()
            for view in self._read_only_views:
                view.release()
            if self._read_only_area is not None:
                self._read_only_area.close()
            if self._own_kvm:
                self.kvm.close()

    def _kick_all(self) -> None:
        for vt in self.vcpus:
            self._kick(vt)

    @staticmethod
    def _kick(vt: _VcpuThread) -> None:
        """Make ``vt``'s thread leave KVM_RUN (or not enter it): immediate_exit and a signal."""
        vt.vcpu.immediate_exit = True
        t = vt.thread
        if t is not None and t is not threading.current_thread() and t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    # -- the vCPU loop --------------------------------------------------------------------------
    def _vcpu_main(self, vt: _VcpuThread) -> None:
        try:
            if self.seccomp != "off":   # before any guest code runs (hypyr/vmm/seccomp.py)
                from hypyr.vmm import seccomp
                seccomp.install("vcpu", self.seccomp)
            with self._cond:
                if not self._paused and not self._stopping:
                    self._note_running()
            self._vcpu_loop(vt)
        except Exception as e:  # a VMM bug must stop the VM, never leave a zombie thread
            log.exception("vCPU %d: unexpected error", vt.vcpu.id)
            self.stop(StopReason(StopKind.INTERNAL_ERROR, f"vCPU {vt.vcpu.id}: hypyr error: {e}", vcpu=vt.vcpu.id))
        finally:
            with self._cond:
                vt.state = VcpuState.EXITED
                self._cond.notify_all()
                if all(v.state is VcpuState.EXITED or v.thread is None for v in self.vcpus):
                    self._done.set()

    def _park_if_paused(self, vt: _VcpuThread) -> bool:
        """Wait while paused; return False when the machine is stopping."""
        with self._cond:
            if self._paused and not self._stopping:
                vt.state = VcpuState.PAUSED
                self._cond.notify_all()
                while True:
                    self._cond.wait_for(lambda: not self._paused or self._stopping or self._parked_call is not None)
                    call, self._parked_call = self._parked_call, None
                    if call is None:
                        break
                    call()
                vt.state = VcpuState.RUNNING
            if not self._stopping:
                vt.vcpu.immediate_exit = False
                self._note_running()
                self._deliver_nmi(vt)
            return not self._stopping

    def _note_running(self) -> None:  # with self._cond held
        if not self._running.is_set():
            self.running_at_ns = time.monotonic_ns()
            self._running.set()
            log.debug("first KVM_RUN at CLOCK_MONOTONIC %d ns", self.running_at_ns)  # bench/startup.py

    def _vcpu_loop(self, vt: _VcpuThread) -> None:
        vcpu = vt.vcpu
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        io_exit, mmio_exit, mmio_data = vcpu.io_exit, vcpu.mmio_exit, vcpu.mmio_data
        while True:
            if self._paused or self._stopping:
                if vcpu.completion_pending and not self._stopping:
                    # KVM finishes an IO/MMIO instruction only on the next KVM_RUN: enter once
                    # more with immediate_exit set (KVM completes it and returns at once, or
                    # with another I/O exit of the same instruction, handled below) and park
                    # only then, so that a paused vCPU's state is complete
                    vcpu.immediate_exit = True
                elif not self._park_if_paused(vt):
                    return
            reason = vcpu.run()
            vt.exits += 1
            if reason == B.KVM_EXIT_IO:
                is_out, port, size, count, data = io_exit()
                if is_out:
                    for i in range(count):
                        pio_write(port, bytes(data[i * size:(i + 1) * size]))
                else:
                    for i in range(count):
                        data[i * size:(i + 1) * size] = pio_read(port, size)
            elif reason == B.KVM_EXIT_MMIO:
                addr, value, n, is_write = mmio_exit()
                if n not in (1, 2, 4, 8):
                    self._fault(vt, StopKind.INTERNAL_ERROR, f"MMIO access of impossible width {n}")
                    return
                if is_write:
                    mmio_write(addr, value[:n])
                else:
                    mmio_data[:n] = mmio_read(addr, n)  # the bus returns exactly n bytes
            elif reason == B.KVM_EXIT_INTR:   # a kick: pause, stop, or an NMI to issue
                self._deliver_nmi(vt)
                continue
            elif reason == B.KVM_EXIT_HLT:
                self.stop(StopReason(StopKind.HALT, f"vCPU {vcpu.id} halted", vcpu=vcpu.id))
                return
            elif reason == B.KVM_EXIT_SHUTDOWN:
                self._fault(vt, StopKind.TRIPLE_FAULT, "the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
                return
            elif reason == B.KVM_EXIT_SYSTEM_EVENT:
                t = vcpu.system_event()
                if t == B.KVM_SYSTEM_EVENT_SHUTDOWN:
                    self.stop(StopReason(StopKind.POWEROFF, "the guest powered off (system event)", vcpu=vcpu.id))
                elif t == B.KVM_SYSTEM_EVENT_RESET:
                    self.stop(StopReason(StopKind.REBOOT, "the guest asked for a reboot (system event)", vcpu=vcpu.id))
                else:
                    self._fault(vt, StopKind.CRASH, f"the guest crashed (system event {t})")
                return
            elif reason == B.KVM_EXIT_FAIL_ENTRY:
                hw = vcpu.fail_entry_reason()
                self._fault(vt, StopKind.FAIL_ENTRY, f"KVM could not enter the guest (hardware reason {hw:#x})")
                return
            elif reason == B.KVM_EXIT_INTERNAL_ERROR:
                suberror, words = vcpu.internal_error()
                extra = " ".join(f"{w:#x}" for w in words)
                self._fault(vt, StopKind.INTERNAL_ERROR,
                            f"KVM internal error (suberror {suberror}{', data ' + extra if extra else ''})")
                return
            else:
                name = B.EXIT_REASON_NAMES.get(reason, str(reason))
                self._fault(vt, StopKind.INTERNAL_ERROR, f"unexpected KVM exit {name}")
                return

    def _fault(self, vt: _VcpuThread, kind: StopKind, message: str) -> None:
        try:
            dump = register_dump(vt.vcpu)
        except KvmError as e:
            dump = f"(registers unavailable: {e})"
        self.stop(StopReason(kind, f"vCPU {vt.vcpu.id}: {message}", vcpu=vt.vcpu.id, registers=dump))
