"""Build a Linux-booting Machine from a validated config — a flat recipe of small steps.

create VM and memory → vCPUs → legacy devices → virtio devices (:func:`build_vm`), then, for a
boot, load kernel/initrd and write boot tables → configure vCPUs (CPUID, MSRs, LAPIC,
registers) (:func:`boot_linux`).  A restore builds the same VM with :func:`build_vm` (same
devices, memory layout, GSIs and MMIO windows, since they follow from the config alone) and
loads saved state instead of a kernel (:mod:`hypyr.vmm.snapshot`).  The result is a
:class:`LinuxVm` whose vCPUs are not yet started.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypyr import preopened, procfs
from hypyr.arch.x86 import acpi, layout, msrs
from hypyr.arch.x86 import cpuid as x86cpuid
from hypyr.arch.x86.acpi import MmioDevice
from hypyr.devices.legacy.acpi_ged import AcpiGed
from hypyr.devices.legacy.acpi_pm import AcpiPm
from hypyr.devices.legacy.i8042 import I8042
from hypyr.devices.legacy.rtc import Rtc
from hypyr.devices.legacy.serial import Serial
from hypyr.devices.pvexit import PvExit
from hypyr.devices.pvpanic import PVPANIC_PORT, PvPanic
from hypyr.devices.virtio.console import VirtioConsole
from hypyr.devices.virtio.device import VIRTIO_ID_NET
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.devices.virtio.mmio_regs import INT_VRING, INTERRUPT_ACK, QUEUE_NOTIFY_OFFSET
from hypyr.devices.virtio.rng import VirtioRng
from hypyr.errors import HypyrError
from hypyr.kvm import B, Kvm, KvmUnavailable
from hypyr.memory import GuestMemory

from .config import VmConfig
from .iothread import IoThread
from .machine import Machine, check_vcpu_count

if TYPE_CHECKING:
    from hypyr.arch.x86.regs import BootCpuState
    from hypyr.devices.virtio.net import VirtioNet

log = logging.getLogger("hypyr.vmm")

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


VIRTIO_GSI_BASE = 16        # IOAPIC pins 16-23: no ISA device can claim them
MAX_VIRTIO_DEVICES = 8


class LinuxVm:
    """A built VM: the machine plus the devices the front end talks to."""

    def __init__(self, machine: Machine, serial: Serial, i8042: I8042, config: VmConfig,
                 console: Serial | VirtioConsole, virtio: list, devices: dict, mmio_windows: list):
        self.machine = machine
        self.serial = serial
        self.i8042 = i8042
        self.config = config
        self.console = console   # where terminal input goes: the UART or the virtio console
        self.virtio = virtio   # VirtioDevice instances, in window order
        # every device with state (devices/state.py), by a stable name, in build order: "serial0",
        # "i8042", "rtc", "acpi_pm", "pvexit", "pvpanic", "acpi_ged", then "virtio0".. (the
        # virtio-mmio transports)
        self.devices = devices
        # MmioDevice per virtio device (ACPI, snapshots)
        self.mmio_windows = mmio_windows
        self.saved_paused = False   # restored: the domain was paused when it was saved

    def request_poweroff(self) -> str:
        """Ask the guest to power off as Xen and QEMU do: press the ACPI power button if the
        guest's ACPI listens to it (its GED interrupt is unmasked), else send Ctrl-Alt-Del if
        its keyboard driver is up.  Returns which of the two was sent, or "" for neither."""
        if self.machine.gsi_unmasked(acpi.GED_GSI):
            self.devices["acpi_ged"].press_power_button()
            return "the ACPI power button"
        if self.i8042.inject_ctrl_alt_del():
            return "Ctrl-Alt-Del"
        return ""

    def virtio_report(self) -> dict[str, dict]:
        """Each virtio-mmio transport's report ("virtio0": device, status, queue indices, what
        the device holds), for `hypyr info DOMAIN --queues`."""
        return {name: dev.report() for name, dev in self.devices.items() if isinstance(dev, VirtioMmioTransport)}

    def close(self) -> None:
        """Devices first (a disk finishes its in-flight I/O while guest memory still exists)."""
        for dev in self.virtio:
            close = getattr(dev, "close", None)
            if close is not None:
                close()
        for dev in self.devices.values():
            if isinstance(dev, VirtioMmioTransport):
                dev.release_register_page()
        self.machine.close()


def host_available_memory() -> int:
    """MemAvailable in bytes (as good as unlimited if /proc/meminfo cannot be read)."""
    kib = procfs.meminfo().get("MemAvailable")
    return kib * 1024 if kib is not None else 1 << 62


def validate(config: VmConfig, kvm: Kvm | None = None, *, boot: bool = True) -> None:
    """Check the config; file checks come first, so they are reported even without /dev/kvm.
    ``boot=False``: the kernel and initrd are not needed (a restore)."""
    if len(config.disks) + len(config.nets) + 2 > MAX_VIRTIO_DEVICES:
        raise HypyrError(f"at most {MAX_VIRTIO_DEVICES - 2} disks and NICs together can be attached")
    if config.nets:   # the NIC modules only for a VM with NICs (hypyr run's start, issue #14)
        from hypyr.devices.virtio.net import parse_mac
        from hypyr.devices.virtio.tap import TapError, check_tap
    for i, net in enumerate(config.nets):
        try:
            parse_mac(net.mac)
            check_tap(net.tap_fd)
        except (ValueError, TapError) as e:
            raise HypyrError(f"NIC {i}: {e}") from None
    if config.seccomp not in ("kill", "log", "off"):
        raise HypyrError(f"seccomp must be kill, log or off, not {config.seccomp!r}")
    if config.console not in ("serial", "virtio"):
        raise HypyrError(f"the console must be serial or virtio, not {config.console!r}")
    for disk in config.disks:
        if not preopened.is_file(disk.path):
            raise HypyrError(f"disk image {disk.path} does not exist or is not a file")
        if not preopened.can_open(disk.path, not disk.read_only):
            raise HypyrError(f"no permission to {'read' if disk.read_only else 'read and write'} disk image "
                             f"{disk.path}")
    files = [(config.kernel, "kernel"), (config.initrd, "initrd")] + [(p, "module") for p, _ in config.modules]
    for path, what in files:
        if path is None or not boot:
            continue
        if not preopened.is_file(path) and not os.path.exists(path):
            raise HypyrError(f"{what} file {path} does not exist")
        if not preopened.is_file(path) or not preopened.can_open(path, False):
            raise HypyrError(f"{what} file {path} is not a readable file")
    check_vcpu_count(config.vcpus, kvm)  # VcpuCountError; without kvm, hypyr's own limit only
    if config.memory < 16 << 20:
        raise HypyrError(f"guest memory must be at least 16 MiB (got {config.memory >> 20} MiB)")
    avail = host_available_memory()
    if config.memory > avail:
        raise HypyrError(f"guest memory of {config.memory >> 20} MiB is more than this host has available "
                         f"({avail >> 20} MiB)")


def guest_cpuid(kvm: Kvm, vcpu_id: int, nr: int) -> list:
    """The CPUID of vCPU ``vcpu_id`` of ``nr``: what this KVM supports, adjusted for the guest,
    with the TSC-deadline timer KVM's LAPIC emulates but does not list (as QEMU offers it)."""
    return x86cpuid.adjust_cpuid(kvm.supported_cpuid(), vcpu_id, nr,
                                 tsc_deadline=bool(kvm.check_extension(B.KVM_CAP_TSC_DEADLINE_TIMER)))


def _configure_vcpu(vcpu, nr: int, boot: BootCpuState | None) -> None:
    entries = guest_cpuid(vcpu.vm.kvm, vcpu.id, nr)
    vcpu.set_cpuid(entries)
    vcpu.set_msrs(msrs.boot_msrs(x86cpuid.cpu_vendor(entries)))
    fpu = vcpu.get_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        v = int.from_bytes(bytes(lapic.regs[off:off + 4]), "little")
        v = (v & ~0x700) | (mode << 8)
        lapic.regs[off:off + 4] = list(v.to_bytes(4, "little"))
    vcpu.set_lapic(lapic)
    if boot is not None:
        apply_boot_state(vcpu, boot)


def apply_boot_state(vcpu, boot: BootCpuState) -> None:
    s = vcpu.get_sregs()
    sr = boot.sregs
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        seg, dst = getattr(sr, name), getattr(s, name)
        for f in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
            setattr(dst, f, getattr(seg, f))
    s.gdt.base, s.gdt.limit = sr.gdt.base, sr.gdt.limit
    s.idt.base, s.idt.limit = sr.idt.base, sr.idt.limit
    s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer = sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8, sr.efer
    vcpu.set_sregs(s)
    r = B.kvm_regs()
    for f, *_ in B.kvm_regs._fields_:
        setattr(r, f, getattr(boot.regs, f))
    vcpu.set_regs(r)


def build_linux_vm(config: VmConfig, console_out: Callable[[bytes], object], *, kvm: Kvm | None = None) -> LinuxVm:
    """A VM ready to boot ``config``'s kernel: :func:`build_vm`, then :func:`boot_linux`."""
    vm = build_vm(config, console_out, kvm=kvm)
    try:
        boot_linux(vm)
    except BaseException:
        vm.close()
        raise
    return vm


def build_vm(config: VmConfig, console_out: Callable[[bytes], object], *, kvm: Kvm | None = None,
             memory: GuestMemory | None = None, boot: bool = True, lock_disks: bool = True) -> LinuxVm:
    """The machine and every device ``config`` asks for, with no kernel loaded and the vCPUs
    not configured.  ``memory``: guest RAM to use (it must have ``config``'s layout), closed
    with the VM, or on failure here; ``boot=False``: the kernel files are not checked;
    ``lock_disks=False``: the images are opened unlocked (see ``VirtioBlk.relock_image``)."""
    try:
        validate(config, boot=boot)
        own_kvm = kvm is None
        try:
            kvm = kvm or Kvm()
        except KvmUnavailable as e:
            raise HypyrError(str(e)) from None
        try:
            validate(config, kvm, boot=boot)
        except BaseException:
            if own_kvm:
                kvm.close()
            raise
        ram = layout.ram_layout(config.memory)
        if memory is None:
            memory = GuestMemory.anonymous(ram)
        elif [(int(r.start), r.size) for r in memory.regions] != ram:
            raise HypyrError("the guest memory given does not have the configured layout")
    except BaseException:
        if memory is not None:
            memory.close()
        raise
    machine = None
    virtio_devices: list = []
    try:
        virtio_devices = _virtio_devices(config, console_out, lock_disks)
        # the transports' register pages (see attach_virtio), mapped before the irqchip is made
        machine = Machine(memory, config.vcpus, kvm=kvm, own_kvm=own_kvm, seccomp=config.seccomp,
                          read_only_pages=(layout.VIRTIO_MMIO_BASE, len(virtio_devices)))
        serial = Serial(machine.irq_line(4), console_out)
        i8042 = I8042(machine.device_stop, kbd_irq=machine.irq_line(1))
        devices: dict = {"serial0": serial, "i8042": i8042, "rtc": Rtc(), "acpi_pm": AcpiPm(machine.device_stop),
                         "pvexit": PvExit(machine.device_stop), "pvpanic": PvPanic(machine.device_stop),
                         "acpi_ged": AcpiGed(machine.irq_line(acpi.GED_GSI))}
        machine.pio.register(0x3F8, 8, serial)
        machine.pio.register(0x60, 1, i8042.data_port)
        machine.pio.register(0x64, 1, i8042.command_port)
        machine.pio.register(0x70, 2, devices["rtc"])
        machine.pio.register(0x600, 2, devices["acpi_pm"])
        machine.pio.register(0xF4, 1, devices["pvexit"])
        machine.pio.register(PVPANIC_PORT, 1, devices["pvpanic"])
        machine.pio.register(acpi.GED_PORT, 1, devices["acpi_ged"])

        transports: list = []
        mmio_windows = attach_virtio(machine, virtio_devices, transports)
        for i, transport in enumerate(transports):
            devices[f"virtio{i}"] = transport
        console = next((d for d in virtio_devices if isinstance(d, VirtioConsole)), serial)
        return LinuxVm(machine=machine, serial=serial, i8042=i8042, config=config, console=console,
                       virtio=virtio_devices, devices=devices, mmio_windows=mmio_windows)
    except BaseException:
        for dev in virtio_devices:
            getattr(dev, "close", lambda: None)()
        if machine is not None:
            machine.close()
        else:
            memory.close()
        raise


def boot_linux(vm: LinuxVm) -> None:
    """Load the kernel and initrd, write the boot tables and set up every vCPU to boot.  (The
    boot protocols are imported here: a restore or a migration loads no kernel.)"""
    from hypyr.arch.x86.boot import setup_linux_boot
    config, machine = vm.config, vm.machine
    boot = setup_linux_boot(machine.memory, config.kernel, config.initrd, config.full_cmdline(), config.vcpus,
                            mmio_devices=vm.mmio_windows, modules=config.modules)
    for vt in machine.vcpus:
        _configure_vcpu(vt.vcpu, config.vcpus, boot.cpu if vt.vcpu.id == 0 else None)
    log.info("built VM: %d MiB, %d vCPU(s), kernel %s (%s), entry %#x", config.memory >> 20, config.vcpus,
             config.kernel, boot.kernel.kind, boot.kernel.entry)


def _virtio_devices(config: VmConfig, console_out: Callable[[bytes], object], lock_disks: bool = True) -> list:
    """Disks first (so the first disk is /dev/vda), then NICs, the console, the entropy device.
    The disk and NIC modules are imported only for a VM that has them."""
    if config.disks:
        from hypyr.devices.virtio.blk import VirtioBlk
    if config.nets:
        from hypyr.devices.virtio.net import VirtioNet, parse_mac
        from hypyr.devices.virtio.vhost import usable as vhost_usable
    devices: list = [VirtioBlk(d.path, read_only=d.read_only, serial=f"hypyr-vd{chr(ord('a') + i)}", lock=lock_disks)
                     for i, d in enumerate(config.disks)]
    want_vhost = None
    for n in config.nets:
        if n.vhost is None and want_vhost is None:
            want_vhost = vhost_usable()
        devices.append(VirtioNet(n.tap_fd, parse_mac(n.mac), mtu=n.mtu, tx_rate=n.tx_rate, ifname=n.name,
                                 want_vhost=bool(want_vhost) if n.vhost is None else n.vhost))
    if config.console == "virtio":
        devices.append(VirtioConsole(console_out))
    devices.append(VirtioRng())
    return devices


def attach_virtio(machine: Machine, devices: list, transports: list | None = None) -> list[MmioDevice]:
    """Give each device an MMIO window, a GSI and an ioeventfd per queue; return the windows
    (and append each device's transport to ``transports``)."""
    io = IoThread(name="virtio-io", seccomp=machine.seccomp)
    machine.services.append(io)
    windows = []
    for i, dev in enumerate(devices):
        base = layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE
        gsi = VIRTIO_GSI_BASE + i
        irq_fd = None
        if machine.irqchip:  # an irqfd: an interrupt is one eventfd write, no ioctl, no line to lower;
            # the driver's InterruptACK after each used-buffer interrupt is absorbed by KVM
            ack = machine.absorb_mmio_write(base + INTERRUPT_ACK, 4, INT_VRING)
            irq_fd = machine.irq_eventfd(gsi)
            transport = VirtioMmioTransport(dev, machine.memory, trigger=machine.irq_trigger(gsi, irq_fd),
                                            ack_eventfd=ack)
        else:
            transport = VirtioMmioTransport(dev, machine.memory, machine.irq_line(gsi))
        machine.mmio.register(base, layout.VIRTIO_MMIO_SIZE, transport)
        if transports is not None:
            transports.append(transport)
        page = machine.read_only_page(i)   # mapped over the window, if the machine has the pages
        if page is not None:  # the driver reads registers from memory, with no exit
            transport.use_register_page(page)
        kicks = []
        for q in range(len(dev.queue_max_sizes)):
            efd = io.add_eventfd(functools.partial(transport.notify, q))
            machine.vm.ioeventfd(efd, base + QUEUE_NOTIFY_OFFSET, 4, datamatch=q)
            kicks.append(efd)
        if dev.device_id == VIRTIO_ID_NET:
            _attach_net(io, dev, kicks, irq_fd)
        windows.append(MmioDevice(base, layout.VIRTIO_MMIO_SIZE, gsi, edge=machine.irqchip))
        log.info("virtio-%s at %#x, GSI %d", dev.name, base, gsi)
    return windows


def _attach_net(io: IoThread, dev: VirtioNet, kicks: list[int], irq_fd: int | None) -> None:
    """The userspace data path watches the TAP and the rate-limit timer; with vhost-net (which
    needs the irqfd) the kernel takes the kicks and the TAP while it runs."""
    for fd, handler in dev.event_sources():
        io.add_fd(fd, handler)
    if not dev.want_vhost:
        return
    if irq_fd is None:
        log.warning("%s: vhost-net needs the in-kernel irqchip; using the userspace data path", dev.name)
        return

    def on_running(running: bool) -> None:
        for fd in kicks + [dev.tap_fd]:
            io.watch(fd, not running)
    from hypyr.devices.virtio.vhost import VhostNet
    dev.attach_vhost(VhostNet(dev.tap_fd, kicks, irq_fd, on_running))
