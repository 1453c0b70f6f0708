"""The `hypyr` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypyr.errors import HypyrError

if TYPE_CHECKING:
    from hypyr.vmm.machine import StopReason

EXIT_ERROR = 1
EXIT_NOT_NATIVE = 3  # `hypyr doctor --native`: KVM works but guests would be emulated


def parse_size(text: str, default_unit: str = "M") -> int:
    """'256M', '1G', '512' (MiB, as in xl.cfg), '65536K' → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:([KMGT])(?:i?B)?|(B))?\s*", text, re.IGNORECASE)
    if not m:
        raise HypyrError(f"'{text}' is not a size (use e.g. 256M or 1G)")
    if m.group(3):
        return int(m.group(1))
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _setup_logging(verbose: int) -> None:
    from hypyr.toolstack import logs
    logs.setup(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


def _say(msg: str) -> None:
    # one line on stderr; \r first in case the terminal was left mid-line by the guest
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + f"hypyr: {msg}\n")
    sys.stderr.flush()


# -- run ------------------------------------------------------------------------------------------
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
        _say(f"warning: {w}")
    if args.verbose:
        _say(f"booting {boot.title!r} from {boot.config}")
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
            _say(f"warning: --net {spec!r}: {w}")
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
    from hypyr.vmm.machine import StopKind, StopReason

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
            _say("not in the terminal's foreground: its input is not forwarded to the guest")
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
        _say(reason.message)
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
    from hypyr.vmm.machine import StopKind, StopReason

    def on_sigterm(signum, frame):
        # from another thread: the interrupted main thread may hold a lock machine.stop takes
        threading.Thread(target=machine.stop, args=(StopReason(StopKind.DESTROYED, "stopped by SIGTERM"),),
                         name="sigterm", daemon=True).start()

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- doctor ---------------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from hypyr import doctor
    if args.backend:
        print(doctor.kvm_backend())
        return 0
    d = doctor.diagnose(args.device)
    if args.native:
        return 0 if d.usable and d.native else EXIT_NOT_NATIVE if d.usable else EXIT_ERROR
    print("\n".join(doctor.report(d)))
    return 0 if d.usable else EXIT_ERROR


# -- image ----------------------------------------------------------------------------------------
def cmd_image(args) -> int:
    from hypyr.image import build as image
    from hypyr.image import default
    if args.image_cmd == "path":
        print(default.image_dir())
        return 0
    if args.system:   # a bootable Debian disk image (hypyr/image/system.py, docs/boot.md)
        return _image_build_system(args)
    if args.out or args.root_password or args.ssh_key or args.packages:
        raise HypyrError("--out, --root-password, --ssh-key and --packages go with --system")
    if args.dir:   # another image beside the default one (e.g. for a second kernel)
        os.environ["HYPYR_IMAGE_DIR"] = os.path.abspath(args.dir)
    deb = args.kernel_deb
    if deb is not None and args.kernel_package:
        raise HypyrError("give the kernel as --kernel-deb FILE or as --kernel-package NAME, not both")
    if deb is not None and not os.path.isfile(deb):
        raise HypyrError(f"kernel package {deb} does not exist")
    if args.kernel_package:
        from hypyr.image import debs
        deb = debs.download(debs.resolve_package(args.kernel_package))
    paths = image.build(kernel_deb=deb, force=args.force)
    print(paths.dir)
    return 0


def _image_build_system(args) -> int:
    from hypyr.image import system
    if args.kernel_deb or args.kernel_package or args.dir:
        raise HypyrError("--kernel-deb, --kernel-package and --dir are for the default image, not --system")
    pw = args.root_password
    if pw == "-":   # from stdin (asked for on a terminal): keeps the password out of the process list
        if sys.stdin.isatty():
            import getpass
            pw = getpass.getpass("root password for the image: ")
        else:
            pw = sys.stdin.readline().rstrip("\n")
    out = args.out or system.default_out(create_dir=True)
    spec = system.make_spec(out, size=args.size, hostname=args.hostname, root_password=pw,
                            ssh_key_file=args.ssh_key, force=args.force,
                            packages=[p for a in args.packages for p in a.split(",")])
    print(system.build(spec))
    return 0


# -- lab ------------------------------------------------------------------------------------------
def cmd_lab(args) -> int:
    from hypyr import lab
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise HypyrError("give the command to run in the lab after --, e.g. hypyr lab -- hypyr doctor")
    if cmd[0] == "hypyr":  # the same hypyr as this one, whatever PATH says inside the lab
        cmd = [sys.executable, "-m", "hypyr"] + cmd[1:]
    more = {} if args.stall is None else {"stall": args.stall or None}
    return lab.run(cmd, cpus=args.cpus, memory=args.memory, timeout=args.timeout, share=args.share, **more)


# -- toolstack (xl-style) -----------------------------------------------------------------------
def cmd_create(args) -> int:
    from hypyr.toolstack import api
    rec = api.create(args.config)
    print(f"hypyr: domain {rec.name} created (id {rec.domid})", file=sys.stderr)
    if args.console:
        from hypyr.toolstack.console import attach
        return attach(rec.name)
    return 0


MIB = 1 << 20


class _ProgressLine:
    """One line on stderr, rewritten in place, for a tty only (nothing otherwise)."""

    def __init__(self, what: str):
        self.what = what
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, p: dict) -> None:
        if not self.tty:
            return
        try:
            done, total = int(p.get("pages", 0)), max(1, int(p.get("total_pages", 0)))
            text = f"{self.what}: {p.get('phase', '')} {int(p.get('bytes', 0)) / MIB:.1f} MiB"
            if p.get("phase") in ("memory", "state", "loading"):
                text += f" ({min(100, 100 * done // total)}% of RAM)"
            else:
                text += (f", pass {int(p.get('iteration', 0))}, {int(p.get('dirty_pages', 0))} pages dirty, "
                         f"dirty rate {float(p.get('dirty_rate', 0.0)) * 4096 / MIB:.1f} MiB/s")
        except (TypeError, ValueError):
            return
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def cmd_save(args) -> int:
    from hypyr.toolstack import api
    bar = _ProgressLine(f"saving {args.name}")
    try:
        r = api.save(args.name, args.file, keep_running=args.keep_running, progress=bar)
    finally:
        bar.done()
    print(f"hypyr: domain {r.name} saved to {r.file} in {r.seconds:.2f} s: {r.bytes / MIB:.1f} MiB written, "
          f"{r.pages_data} pages data, {r.pages_zero} zero"
          + ("; it keeps running" if r.keep_running else "; destroyed"))
    return 0


def cmd_restore(args) -> int:
    from hypyr.toolstack import api
    rec = api.restore(args.file, paused=args.paused)
    print(f"hypyr: domain {rec.name} restored (id {rec.domid})" + (", paused" if args.paused else ""))
    return 0


def cmd_migrate(args) -> int:
    from hypyr.toolstack import api
    host, port = api.parse_address(args.host)
    bar = _ProgressLine(f"migrating {args.name}")
    try:
        r = api.migrate(args.name, host, port, downtime_ms=args.downtime_ms, max_iterations=args.max_iterations,
                        progress=bar)
    finally:
        bar.done()
    down = "n/a (it was paused)" if r.downtime_ms is None else f"{r.downtime_ms:.1f} ms"
    print(f"hypyr: domain {r.name} migrated to {r.to} in {r.seconds:.2f} s: {r.iterations} iterations, "
          f"{r.pages_data} pages data, {r.pages_zero} zero, {r.bytes / MIB:.1f} MiB, downtime {down}")
    return 0


def cmd_migrate_receive(args) -> int:
    from hypyr.toolstack import api
    host, port = api.parse_address(args.listen, default_host="127.0.0.1")
    r = api.migrate_receive(host, port,
                            on_listening=lambda a: _say(f"waiting for a migration on {a[0]}:{a[1]}"),
                            on_incoming=lambda src, name: _say(f"receiving domain {name} from {src}"))
    if r.renamed:
        print(f"hypyr: domain {r.name} migrated here from {r.source} (id {r.domid}) in {r.seconds:.2f} s")
    else:
        print(f"hypyr: domain {r.name} migrated here from {r.source} (id {r.domid}) in {r.seconds:.2f} s; "
              f"it keeps this name: {r.note}")
    return 0


def cmd_list(args) -> int:
    from hypyr.toolstack import api
    doms = api.list_domains(args.names or None)
    if args.json:
        import dataclasses
        import json
        print(json.dumps([dataclasses.asdict(d) for d in doms], indent=2))
        return 0
    print(f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}\t{'State':<8}{'Time(s)':>8}")
    if not args.names:  # as xl: the host first, as Domain-0 (the JSON output lists guests only)
        host = api.host_domain()
        print(f"{host.name:<40}{host.domid:>5}{host.memory:>6}{host.vcpus:>6}\t{host.state:<8}{host.cpu_time:>8.1f}")
    for d in doms:
        print(f"{d.name:<40}{d.domid:>5}{d.memory:>6}{d.vcpus:>6}\t{d.state:<8}{d.cpu_time:>8.1f}")
    return 0


def cmd_console(args) -> int:
    from hypyr.toolstack.console import attach
    return attach(args.name)


def cmd_domain_op(args) -> int:
    from hypyr.toolstack import api
    if args.cmd == "shutdown":
        api.shutdown(args.name, wait=args.wait)
    else:
        getattr(api, args.cmd)(args.name)
    return 0


def cmd_trigger(args) -> int:
    from hypyr.toolstack import api
    api.trigger(args.name, args.what, args.vcpu)
    return 0


def cmd_vcpu_list(args) -> int:
    from hypyr.toolstack import api
    rows = api.vcpu_list(args.name)
    if args.json:
        import json
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'Name':<32}{'ID':>5}{'VCPU':>6}{'CPU':>5}{'State':>7}{'Time(s)':>9}  Affinity (Hard)")
    for r in rows:
        aff = _cpulist(r["affinity"])
        cpu = "-" if r["cpu"] is None else r["cpu"]
        print(f"{r['name']:<32}{r['domid']:>5}{r['vcpu']:>6}{cpu:>5}{r['state']:>7}{r['time']:>9.1f}  {aff}")
    return 0


def _cpulist(cpus: list[int]) -> str:
    if set(cpus) == set(range(os.cpu_count() or 1)):
        return "all"
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def cmd_vcpu_pin(args) -> int:
    from hypyr.toolstack import api
    from hypyr.toolstack.xlcfg import parse_cpulist
    api.vcpu_pin(args.name, args.vcpu, parse_cpulist(args.cpus, os.cpu_count() or 1))
    return 0


def cmd_sched_credit(args) -> int:
    from hypyr.toolstack import sched
    from hypyr.toolstack.registry import Registry
    if args.domain:
        with Registry() as reg:
            rec = reg.get(args.domain)
        if args.weight is not None or args.cap is not None:
            sched.set_params(rec, weight=args.weight, cap=args.cap)
        rows = [(rec.domid, rec.name, *sched.get_params(rec))]
    else:
        if args.weight is not None or args.cap is not None:
            raise HypyrError("give the domain to change with -d NAME")
        with Registry() as reg:
            names = {(r.domid, r.uuid): r.name for r in reg.list()}   # a stale group matches no domain
        rows = [(d, names[d, u], w, c) for d, u, w, c in sched.list_params() if (d, u) in names]
    print(f"{'Name':<32}{'ID':>5}{'Weight':>8}{'Cap':>6}")
    for domid, name, weight, cap in rows:
        print(f"{name:<32}{domid:>5}{weight:>8}{cap:>6}")
    return 0


def cmd_net_create(args) -> int:
    from hypyr.toolstack import network
    net = network.net_create(args.name, args.subnet, dhcp=args.dhcp, nat=args.nat)
    extras = [w for w, on in (("DHCP", net.dhcp), ("NAT", net.nat)) if on]
    print(f"hypyr: network {net.name} created: bridge {net.bridge}, host address {net.subnet}"
          + (f", {' and '.join(extras)}" if extras else ""), file=sys.stderr)
    return 0


def cmd_net_list(args) -> int:
    from hypyr.toolstack import network
    nets = network.net_list()
    if args.json:
        import json
        print(json.dumps([network.info_dict(n) for n in nets], indent=2))
        return 0
    print(f"{'Name':<16}{'Bridge':<16}{'Subnet':<20}{'DHCP':<6}{'NAT':<5}Taps")
    for n in nets:
        taps = ",".join(n.taps) if n.present else "(bridge missing)"
        print(f"{n.name:<16}{n.bridge:<16}{n.subnet:<20}{'yes' if n.dhcp else 'no':<6}"
              f"{'yes' if n.nat else 'no':<5}{taps or '-'}")
    return 0


def cmd_net_destroy(args) -> int:
    from hypyr.toolstack import network
    network.net_destroy(args.name)
    return 0


def cmd_network_list(args) -> int:
    from hypyr.toolstack import api
    rows = api.network_list(args.name)
    if args.json:
        import json
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'Idx':<4}{'MAC':<19}{'Bridge':<16}{'Tap':<16}{'RxBytes':>14}{'TxBytes':>14}")
    for r in rows:
        rx = "-" if r["rx_bytes"] is None else r["rx_bytes"]
        tx = "-" if r["tx_bytes"] is None else r["tx_bytes"]
        print(f"{r['devid']:<4}{r['mac'] or '-':<19}{r['bridge'] or '-':<16}{r['tap']:<16}{rx:>14}{tx:>14}")
    return 0


def cmd_info(args) -> int:
    if args.domain is not None and args.registers:
        from hypyr.toolstack import api
        for i, text in enumerate(api.vcpu_registers(args.domain)):
            print(f"vCPU {i}:\n{text}")
        return 0
    if args.domain is not None:
        import json

        from hypyr.toolstack import api
        info = api.vmm_info(args.domain)
        jail = info.get("jail")
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        filtered = info.get("seccomp_filtered") or [0, 0]
        print(f"domain {info.get('name')} (id {info.get('domid')}): {info.get('state')}, VMM pid {info.get('pid')}, "
              f"seccomp {info.get('seccomp')} (a filter on {filtered[0]} of its {filtered[1]} threads)")
        if jail:
            print(f"jail: uid {jail['uid']} gid {jail['gid']}, capabilities {jail['capabilities']}, root "
                  f"{jail['root']} holding {', '.join(jail['read_only'])} (read-only), "
                  f"{', '.join(jail['writable'])} (read-write), {', '.join(jail['devices'])}")
        else:
            print("jail: none (jail = \"off\", or the toolstack does not run as root)")
        return 0
    from hypyr.toolstack import monitor
    return monitor.cli_info(args)


def cmd_top(args) -> int:
    from hypyr.toolstack import monitor
    return monitor.cli_top(args)


def cmd_serve(args) -> int:
    from hypyr.toolstack import server
    return server.cli_main(args.socket)


class _NotBuilt:
    """Stands in for the parser of a command this command line does not run (see build_parser)."""

    def __getattr__(self, name: str) -> Callable[..., _NotBuilt]:
        return lambda *args, **kwargs: self


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, then stdout's
    terminal, else 80), without importing shutil (with bz2 and lzma: ~2 ms of every start)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            pass
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized by :func:`_columns` (argparse makes one per argument added)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with :class:`_Formatter`; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


class _OnlyCommand:
    """The subcommands, of which only ``only`` gets a real parser."""

    def __init__(self, sub: argparse._SubParsersAction, only: str):
        self.sub, self.only, self.built = sub, only, False

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if name != self.only:
            return _NotBuilt()
        self.built = True
        return self.sub.add_parser(name, **kwargs)


def _command_word(argv: list[str]) -> str | None:
    """The command of ``argv`` (its first word that is not an option), or None for help."""
    for arg in argv:
        if arg in ("-h", "--help", "--"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``only``, with that command's parser alone (the whole
    set takes about as long to build as importing this module), or all if it is not one."""
    p = _Parser(prog="hypyr", description="A Xen-style hypervisor in Python on Linux KVM.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common = _Parser(add_help=False)  # so `hypyr run -v` works as well as `hypyr -v run`
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")
    sub: Any = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    if only is not None:
        sub = _OnlyCommand(sub, only)

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

    d = sub.add_parser("doctor", parents=[common], help="check /dev/kvm and say whether guests run natively here")
    d.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)
    d.add_argument("--native", action="store_true",
                   help="print nothing; exit 0 if unmodified guests run natively, 3 if emulated, 1 if no KVM")
    d.add_argument("--backend", action="store_true", help="print only the KVM backend (VT-x, AMD-V, PVM)")
    d.set_defaults(func=cmd_doctor)

    i = sub.add_parser("image", parents=[common], help="the default guest image")
    isub = i.add_subparsers(dest="image_cmd", required=True, metavar="ACTION")
    ib = isub.add_parser("build", help="build (or refresh) the default guest image")
    ib.add_argument("--kernel-deb", metavar="FILE", help="use this Debian kernel package instead of the cloud kernel")
    ib.add_argument("--kernel-package", metavar="NAME",
                    help="fetch this Debian kernel package (e.g. linux-image-6.12-cloud-amd64) and use it")
    ib.add_argument("--dir", metavar="DIR", help="build into DIR instead of the default image's directory")
    ib.add_argument("--force", action="store_true", help="rebuild even if up to date (--system: replace --out)")
    ib.add_argument("--system", action="store_true",
                    help="build a bootable Debian disk image instead (systemd, DHCP, serial login; needs root "
                         "and mmdebstrap; docs/boot.md)")
    ib.add_argument("--out", metavar="FILE", help="--system: the image file (default ~/.cache/hypyr/system/system.img)")
    ib.add_argument("--size", default="2G", help="--system: the image's size (default 2G)")
    ib.add_argument("--root-password", metavar="PW", help="--system: root's password ('-': one line from stdin)")
    ib.add_argument("--ssh-key", metavar="FILE", help="--system: a public key file for root (installs OpenSSH)")
    ib.add_argument("--hostname", default="hypyr", help="--system: the host name (default hypyr)")
    ib.add_argument("--packages", action="append", default=[], metavar="A,B",
                    help="--system: more Debian packages to install (repeatable)")
    isub.add_parser("path", help="print the image directory")
    i.set_defaults(func=cmd_image)

    c = sub.add_parser("create", parents=[common], help="create a domain from an xl.cfg file")
    c.add_argument("config", metavar="FILE.cfg")
    c.add_argument("-c", dest="console", action="store_true", help="attach to its console")
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", parents=[common], help="list domains (as xl list)")
    ls.add_argument("names", nargs="*", metavar="NAME")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    co = sub.add_parser("console", parents=[common], help="attach to a domain's console (Ctrl-] detaches)")
    co.add_argument("name", metavar="NAME")
    co.set_defaults(func=cmd_console)

    for op, text in (("pause", "pause a domain"), ("unpause", "unpause a domain"),
                     ("shutdown", "ask a domain to power off (the ACPI power button, else Ctrl-Alt-Del)"),
                     ("reboot", "reset a domain (a hard reboot; on_reboot applies)"),
                     ("destroy", "stop a domain immediately")):
        o = sub.add_parser(op, parents=[common], help=text)
        o.add_argument("name", metavar="NAME")
        if op == "shutdown":
            o.add_argument("-w", dest="wait", action="store_true", help="wait until the domain is gone")
        o.set_defaults(func=cmd_domain_op)

    tr = sub.add_parser("trigger", parents=[common], help="send an NMI to a vCPU of a domain (as xl trigger); a "
                        "guest booted with unknown_nmi_panic prints where it was and panics")
    tr.add_argument("name", metavar="DOMAIN")
    tr.add_argument("what", metavar="nmi")
    tr.add_argument("vcpu", metavar="VCPU", type=int, nargs="?", default=0, help="the vCPU (default 0)")
    tr.set_defaults(func=cmd_trigger)

    sa = sub.add_parser("save", parents=[common], help="save a domain's state to a file and destroy it (as xl save)")
    sa.add_argument("name", metavar="DOMAIN")
    sa.add_argument("file", metavar="FILE")
    sa.add_argument("-c", dest="keep_running", action="store_true", help="keep the domain running after the save")
    sa.set_defaults(func=cmd_save)

    rs = sub.add_parser("restore", parents=[common], help="restore a domain from a file made by hypyr save")
    rs.add_argument("file", metavar="FILE")
    rs.add_argument("-p", dest="paused", action="store_true", help="leave it paused (hypyr unpause runs it)")
    rs.set_defaults(func=cmd_restore)

    mg = sub.add_parser("migrate", parents=[common],
                        help="migrate a domain live to a hypyr migrate-receive (as xl migrate)")
    mg.add_argument("name", metavar="DOMAIN")
    mg.add_argument("host", metavar="HOST[:PORT]", help="where hypyr migrate-receive listens (default port 8002)")
    mg.add_argument("--downtime-ms", type=float, default=300.0, metavar="N",
                    help="stop and copy once the rest fits in N ms (default 300)")
    mg.add_argument("--max-iterations", type=int, default=30, metavar="N",
                    help="at most N pre-copy passes, the first included (default 30)")
    mg.set_defaults(func=cmd_migrate)

    mr = sub.add_parser("migrate-receive", parents=[common],
                        help="accept one live migration, then exit (the domain runs on)")
    mr.add_argument("--listen", default="127.0.0.1:8002", metavar="ADDR:PORT",
                    help="address to listen on (default 127.0.0.1:8002; anyone who can connect can send a "
                         "domain: listen on other addresses only on a trusted network)")
    mr.add_argument("--once", action="store_true",
                    help="accept one migration and exit (what it always does; for scripts)")
    mr.set_defaults(func=cmd_migrate_receive)

    vl = sub.add_parser("vcpu-list", parents=[common], help="list vCPUs with host CPU and affinity")
    vl.add_argument("name", nargs="?", metavar="NAME")
    vl.add_argument("--json", action="store_true")
    vl.set_defaults(func=cmd_vcpu_list)

    vp = sub.add_parser("vcpu-pin", parents=[common], help="set a vCPU thread's host CPU affinity")
    vp.add_argument("name", metavar="NAME")
    vp.add_argument("vcpu", metavar="VCPU", help="vCPU number or 'all'")
    vp.add_argument("cpus", metavar="CPUS", help="host CPUs, e.g. 0-1,3 or all")
    vp.set_defaults(func=cmd_vcpu_pin)

    sc = sub.add_parser("sched-credit", parents=[common], help="show or set a domain's credit weight and cap")
    sc.add_argument("-d", dest="domain", metavar="NAME")
    sc.add_argument("-w", dest="weight", type=int, metavar="WEIGHT", help="1-65535 (default 256)")
    sc.add_argument("-c", dest="cap", type=int, metavar="CAP", help="%% of one host CPU, 0 = no cap")
    sc.set_defaults(func=cmd_sched_credit)

    nc = sub.add_parser("net-create", parents=[common],
                        help="create a network: a bridge with the host's address, optional DHCP and NAT")
    nc.add_argument("name", metavar="NAME", help="the network's (and its bridge's) name, e.g. xenbr1")
    nc.add_argument("--subnet", required=True, metavar="CIDR",
                    help="IPv4 subnet, e.g. 10.78.0.0/24; the host takes its first address")
    nc.add_argument("--dhcp", action="store_true", help="serve DHCP on it (dnsmasq)")
    nc.add_argument("--nat", action="store_true", help="masquerade the subnet out of the host's other interfaces")
    nc.set_defaults(func=cmd_net_create)

    nl = sub.add_parser("net-list", parents=[common], help="list the networks hypyr created")
    nl.add_argument("--json", action="store_true", help="machine-readable output")
    nl.set_defaults(func=cmd_net_list)

    nd = sub.add_parser("net-destroy", parents=[common], help="delete a network (no taps may be attached)")
    nd.add_argument("name", metavar="NAME")
    nd.set_defaults(func=cmd_net_destroy)

    nwl = sub.add_parser("network-list", parents=[common],
                         help="a domain's NICs: MAC, bridge, tap, bytes received and sent by the guest")
    nwl.add_argument("name", metavar="DOMAIN")
    nwl.add_argument("--json", action="store_true", help="machine-readable output")
    nwl.set_defaults(func=cmd_network_list)

    inf = sub.add_parser("info", parents=[common], help="host information (CPUs, memory, KVM backend), or "
                                                      "a domain's VMM: pid, seccomp mode, jail")
    inf.add_argument("domain", nargs="?", metavar="DOMAIN", help="a domain's name or id")
    inf.add_argument("--json", action="store_true")
    inf.add_argument("--registers", action="store_true",
                     help="each vCPU's registers and pending events (the domain pauses for the instant; as xenctx)")
    inf.set_defaults(func=cmd_info)

    tp = sub.add_parser("top", parents=[common], help="live table of domains: CPU %%, memory, state (q quits)")
    tp.add_argument("-d", dest="delay", type=float, default=1.0, help="seconds between refreshes")
    tp.add_argument("-n", dest="iterations", type=int, help="stop after N refreshes")
    tp.add_argument("-b", dest="batch", action="store_true", help="plain output, no screen control")
    tp.set_defaults(func=cmd_top)

    sv = sub.add_parser("serve", parents=[common], help="serve the toolstack's REST API on a unix socket")
    sv.add_argument("--socket", metavar="PATH", help="default: <state dir>/api.sock")
    sv.set_defaults(func=cmd_serve)

    lab = sub.add_parser("lab", parents=[common],
                         help="run a command inside the nested lab (QEMU TCG with emulated SVM)")
    lab.add_argument("--cpus", type=int, default=2, help="L1 vCPUs (default 2)")
    lab.add_argument("--memory", default="4G", help="L1 memory (default 4G)")
    lab.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="kill the lab (exit 125) if it is still running after this long")
    lab.add_argument("--stall", type=float, metavar="SECONDS",
                     help="kill the lab (exit 125) when L1's heartbeat has not moved for this long "
                          "(it wedged); 0: never (default 240)")
    lab.add_argument("--share", metavar="DIR",
                     help="a host directory the command may write to, at the same path inside the lab "
                          "(the rest of the host is read-only there)")
    lab.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    lab.set_defaults(func=cmd_lab)
    if isinstance(sub, _OnlyCommand) and not sub.built:
        return build_parser()  # not a command: the whole parser says so, and lists them
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_word(argv)).parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except HypyrError as e:
        _say(f"error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
