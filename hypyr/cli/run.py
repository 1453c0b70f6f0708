"""`hypyr run`: one VM in this process, its serial console on this terminal."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from hypyr.cli.common import parse_size, say
from hypyr.errors import HypyrError

if TYPE_CHECKING:
    from hypyr.vmm.stop import StopReason


def add_commands(sub: Any, common: Any) -> None:
    """Add `hypyr run`'s parser to ``sub`` (see hypyr.cli.build_parser)."""
    r = sub.add_parser("run", parents=[common], help="boot a Linux guest with its serial console on this terminal")
    r.add_argument("--kernel", help="bzImage, ELF vmlinux (PVH when it has the note) or multiboot kernel "
                                    "(default: the default guest image)")
    r.add_argument("--initrd", help="initial ramdisk (default: the default image's, when --kernel is not given); "
                                    "for a multiboot kernel, modules A,B,...")
    r.add_argument("--module", action="append", default=[], metavar="PATH[,ARGS]",
                   help="a multiboot module with its arguments (repeatable; after --initrd's)")
    r.add_argument("--cmdline", help="kernel command line (replaces hypyr's default)")
    r.add_argument("--append", help="text appended to the kernel command line")
    r.add_argument("--memory", default="256M", help="guest RAM, e.g. 256M or 1G (default 256M)")
    r.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    r.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                   help="run CMD in the guest under sh -c, power off, exit with its status")
    r.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                   help="attach a raw disk image as /dev/vda, /dev/vdb, ... (repeatable; ,ro = read-only)")
    r.add_argument("--rootfs", nargs="?", const="", metavar="PATH",
                   help="boot with this ext4 image as the root filesystem on /dev/vda "
                        "(default: the default image's rootfs.ext4)")
    r.add_argument("--console", choices=("serial", "virtio"), default="serial",
                   help="the guest console: the 8250 UART (ttyS0) or virtio-console (hvc0)")
    r.add_argument("--net", action="append", default=[], metavar="VIF",
                   help="a NIC, in xl vif syntax: bridge=BR[,mac=M][,ip=A/P][,rate=10Mb/s][,vhost=off]... "
                        "(repeatable; default bridge xenbr0)")
    r.add_argument("--seccomp", choices=("kill", "log", "off"), default="kill",
                   help="seccomp filters of the VMM threads: kill (default), log (the kernel logs what would "
                        "be killed) or off; see docs/confinement.md")
    r.add_argument("--boot", choices=("kernel", "disk"), default="kernel",
                   help="disk: boot the kernel, initrd and command line of the first --disk's own "
                        "/boot/grub/grub.cfg or extlinux.conf (as Xen's pygrub; docs/boot.md)")
    r.add_argument("--boot-entry", metavar="NAME",
                   help="with --boot disk: the entry to boot, by title, id, index or GRUB path such as 1>2 "
                        "(default: the config's default)")
    r.add_argument("--no-input", action="store_true", help="do not forward this terminal's input to the guest")
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from hypyr.arch.x86.layout import MAX_VCPUS
    from hypyr.vmm.config import DiskConfig

    if not 1 <= args.vcpus <= MAX_VCPUS:   # before any work (building the default image)
        raise HypyrError(f"--vcpus must be a number from 1 to {MAX_VCPUS}, not {args.vcpus}")
    if args.boot_entry is not None and args.boot != "disk":
        raise HypyrError("--boot-entry chooses an entry of the disk's boot loader config: give --boot disk too")
    kernel, initrd = args.kernel, args.initrd
    disks = [DiskConfig.parse(spec) for spec in args.disk]
    boot = _disk_boot(args, disks) if args.boot == "disk" else None
    try:
        if boot is not None:
            kernel, initrd = boot.kernel, boot.initrd
        return _run_with(args, kernel, initrd, disks, boot.cmdline if boot is not None else None)
    finally:
        if boot is not None:
            boot.close()   # the extracted kernel and initrd: private temporary files


def _disk_boot(args, disks):
    """--boot disk: the kernel, initrd and command line of the first --disk's own boot loader
    config (hypyr.image.diskboot), extracted into temporary files the caller closes."""
    from hypyr.image import diskboot
    given = [o for o, v in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--cmdline", args.cmdline),
                            ("--module", args.module), ("--rootfs", args.rootfs is not None)) if v]
    if given:
        raise HypyrError(f"--boot disk takes the kernel, initrd and command line from the disk's boot loader "
                         f"config, so {given[0]} cannot be given with it")
    if not disks:
        raise HypyrError("--boot disk needs a --disk whose boot loader config (e.g. /boot/grub/grub.cfg) to boot")
    boot = diskboot.load(disks[0].path, args.boot_entry)
    for w in boot.warnings:
        say(f"warning: {w}")
    if args.verbose:
        say(f"booting {boot.title!r} from {boot.config}")
    return boot


def _run_with(args, kernel, initrd, disks, disk_cmdline: str | None) -> int:
    from hypyr.vmm.config import DEFAULT_CMDLINE, DiskConfig, VmConfig

    if kernel is None or args.rootfs == "":
        from hypyr.image import default as image
        files = image.current()
        if files is None:   # build it (the common case needs no pathlib: see hypyr.image.default)
            img = image.ensure()
            files = (str(img.kernel), str(img.initrd), str(img.rootfs))
        if kernel is None:
            kernel, initrd = files[0], (initrd or files[1])
        if args.rootfs == "":
            args.rootfs = files[2]
    if args.rootfs is not None:
        disks.insert(0, DiskConfig(args.rootfs))
    modules = _multiboot_modules(args, kernel, initrd)  # None: a Linux kernel
    if modules is not None:
        initrd = None  # its files are the first modules
    cmdline = args.cmdline if args.cmdline is not None else DEFAULT_CMDLINE if modules is None else ""
    if disk_cmdline is not None:
        cmdline = disk_cmdline
    if args.append:
        cmdline = f"{cmdline} {args.append}".strip()
    config = VmConfig(kernel=kernel, initrd=initrd, cmdline=cmdline, memory=parse_size(args.memory),
                      vcpus=args.vcpus, exec_cmd=args.exec_cmd, disks=disks,
                      root_disk=args.rootfs is not None, console=args.console, seccomp=args.seccomp,
                      modules=modules or [])
    taps: list[int] = []
    try:
        if args.net:
            nets, taps, extra = _plug_nics(args.net)
            config = config._replace(nets=nets)
            if modules is None:  # a multiboot kernel gets no Linux ip= arguments
                config = config._replace(cmdline=f"{config.cmdline} {extra}".strip())
        return _run_vm(args, config)
    finally:
        for fd in taps:
            os.close(fd)  # the TAP goes away with its last descriptor


def _multiboot_modules(args, kernel: str, initrd: str | None) -> list[tuple[str, str]] | None:
    """None for a Linux kernel; for a multiboot one, its modules: --initrd's comma-separated
    files, then each --module PATH[,ARGS].  What only a Linux guest understands is refused."""
    from hypyr.arch.x86 import loader
    try:
        multiboot = os.path.isfile(kernel) and loader.kernel_format(kernel) == loader.KIND_MULTIBOOT
    except HypyrError:
        multiboot = False  # unreadable: the builder says so
    if not multiboot:
        if args.module:
            raise HypyrError(f"--module is only for multiboot kernels, and {kernel} is not one "
                             "(give a Linux kernel its initrd with --initrd)")
        return None
    for option, given in (("--exec", args.exec_cmd is not None), ("--rootfs", args.rootfs is not None),
                          ("--console virtio", args.console == "virtio")):
        if given:
            raise HypyrError(f"{option} needs the default image's Linux init, and {kernel} is a multiboot kernel")
    paths = initrd.split(",") if initrd else []
    modules = [(p, "") for p in paths] + [(spec.partition(",")[0], spec.partition(",")[2]) for spec in args.module]
    if any(not p for p, _ in modules):
        raise HypyrError("a multiboot module (--initrd A,B or --module PATH[,ARGS]) has an empty path")
    return modules


def _plug_nics(specs: list[str]):
    """--net specs (xl vif syntax) → the VMM's NIC configs, the open TAPs, guest cmdline extras."""
    from hypyr.toolstack import nics
    from hypyr.toolstack.vif import check_distinct, parse_vif

    vifs = []
    for i, spec in enumerate(specs):
        vif, warnings = parse_vif(spec, i)
        for w in warnings:
            say(f"warning: --net {spec!r}: {w}")
        vifs.append(vif)
    check_distinct(vifs)
    vifs = list(nics.assign(vifs, {}))
    names = [v.vifname or f"hypr{os.getpid()}.{v.devid}" for v in vifs]
    taps = nics.open_taps(vifs, names)
    return nics.net_configs(vifs, taps, names), taps, nics.guest_ip_args(vifs)


RUN_OUTPUT_LIMIT = 4 << 20   # bytes of guest console output waiting for stdout
RUN_OUTPUT_FLUSH = 5.0       # seconds given to the waiting output once the guest stopped


def _run_vm(args, config) -> int:
    from hypyr.console import InputPump, OutputQueue, Terminal, write_all
    from hypyr.vmm.builder import build_linux_vm
    from hypyr.vmm.stop import StopKind, StopReason

    out_fd = sys.stdout.fileno()
    # the vCPU hands console output to a queue drained by its own thread: a stalled terminal or
    # pipe reader never blocks the guest; past RUN_OUTPUT_LIMIT waiting bytes output is dropped
    out = OutputQueue(lambda data: write_all(out_fd, data), limit=RUN_OUTPUT_LIMIT, name="stdout")
    vm = build_linux_vm(config, out.write)
    machine = vm.machine
    with _stop_on_sigterm(machine), Terminal(attach=not args.no_input) as term:
        pump = InputPump(vm.console.enqueue_input, vm.console.input_room,
                         on_escape=lambda: machine.stop(StopReason(StopKind.DESTROYED, "stopped with Ctrl-]")),
                         escape=term.is_tty)
        forward = not args.no_input and not term.background
        if term.background and not args.no_input:
            say("not in the terminal's foreground: its input is not forwarded to the guest")
        if forward:
            pump.start()
        try:
            reason = machine.run()
        finally:
            if forward:
                pump.stop()
    vm.close()
    out.close(timeout=RUN_OUTPUT_FLUSH)
    if reason.kind not in (StopKind.EXIT_STATUS, StopKind.POWEROFF) or args.verbose:
        say(reason.message)
    if reason.registers:
        sys.stderr.write(reason.registers + "\n")
    return run_exit_code(reason)


# `hypyr run` exit codes by how the guest stopped, keyed by StopKind's value (docs/exit-codes.md);
# a stop through the exit-status port exits with the guest's own status
RUN_EXIT_CODES = {"poweroff": 0, "halt": 0, "reboot": 120, "triple-fault": 121, "crash": 124,
                  "internal-error": 122, "fail-entry": 123, "destroyed": 130}


def run_exit_code(reason: StopReason) -> int:
    """`hypyr run`'s exit status for a machine's StopReason."""
    if reason.kind.value == "exit-status":
        return reason.status or 0
    return RUN_EXIT_CODES[reason.kind.value]


@contextlib.contextmanager
def _stop_on_sigterm(machine):
    """While in the block, SIGTERM stops the guest as Ctrl-] does: the terminal is restored and
    `hypyr run` exits 130."""
    from hypyr.vmm.stop import StopKind, StopReason

    def on_sigterm(signum, frame):
        # from another thread: the interrupted main thread may hold a lock machine.stop takes
        threading.Thread(target=machine.stop, args=(StopReason(StopKind.DESTROYED, "stopped by SIGTERM"),),
                         name="sigterm", daemon=True).start()

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
