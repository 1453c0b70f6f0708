"""What a VM is built from (:class:`VmConfig`, its disks and NICs), and its plain-data form as a
save file or migration stream carries it.  Plain data only: importing this builds nothing, so
the toolstack can read a save file's header without loading the device model."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import NamedTuple

from hypyr.devices.state import StateReader
from hypyr.errors import HypyrError, StateError

# Firecracker-like defaults: no PCI, the i8042 only as a reset line, panics reboot (→ exit code).
DEFAULT_CMDLINE = ("console=ttyS0 reboot=k panic=-1 pci=off nomodeset i8042.noaux i8042.nomux "
                   "i8042.dumbkbd 8250.nr_uarts=1 tsc=reliable no_timer_check quiet")


class DiskConfig(NamedTuple):
    path: str
    read_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> DiskConfig:
        """A disk given as `PATH[,ro|,rw]`."""
        path, _, opts = spec.partition(",")
        flags = [o for o in opts.split(",") if o]
        bad = [o for o in flags if o not in ("ro", "rw")]
        if not path or bad:
            raise HypyrError(f"disk {spec!r} is not PATH[,ro]")
        return cls(path, read_only="ro" in flags)


class NetConfig(NamedTuple):
    """One NIC.  The TAP is opened and attached to its bridge by the toolstack (host plumbing
    never happens in the VMM); the VMM is handed the descriptor and never closes it."""
    tap_fd: int                 # an open TAP (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)
    mac: str                    # "00:16:3e:12:34:56"
    mtu: int | None = None
    vhost: bool | None = None   # None: vhost-net when /dev/vhost-net is usable; False: userspace path
    tx_rate: tuple[int, float] | None = None   # (bytes per second, interval in seconds)
    name: str = ""              # the TAP's name, for logs


class VmConfig(NamedTuple):
    kernel: str
    initrd: str | None = None
    cmdline: str = DEFAULT_CMDLINE
    memory: int = 256 << 20          # bytes
    vcpus: int = 1
    exec_cmd: str | None = None      # run under `sh -c` by the default init, then power off
    disks: Sequence[DiskConfig] = ()   # /dev/vda, /dev/vdb, ...
    root_disk: bool = False          # the first disk is the root filesystem (root=/dev/vda)
    console: str = "serial"          # "serial" (ttyS0) or "virtio" (hvc0)
    nets: Sequence[NetConfig] = ()      # eth0, eth1, ...
    # multiboot kernels only: (path, arguments) per module, after the initrd if there is one
    modules: Sequence[tuple[str, str]] = ()
    seccomp: str = "kill"            # the VMM threads' seccomp filters: kill, log or off (hypyr.vmm.seccomp)

    def full_cmdline(self) -> str:
        parts = [self.cmdline]
        if self.root_disk:
            parts.append("root=/dev/vda rw")
        if self.console == "virtio":
            parts.append("hypyr.console=hvc0")
        if self.exec_cmd is not None:
            parts.append("hypyr.exec=" + base64.b64encode(self.exec_cmd.encode()).decode())
        return " ".join(p for p in parts if p)


def config_to_dict(c: VmConfig) -> dict:
    """What rebuilds the VM, as plain data (no descriptors: the NICs' taps are the caller's)."""
    return {"kernel": c.kernel, "initrd": c.initrd, "cmdline": c.cmdline, "memory": c.memory, "vcpus": c.vcpus,
            "exec_cmd": c.exec_cmd, "disks": [{"path": d.path, "read_only": d.read_only} for d in c.disks],
            "root_disk": c.root_disk, "console": c.console,
            "nets": [{"mac": n.mac, "mtu": n.mtu, "vhost": n.vhost,
                      "tx_rate": [n.tx_rate[0], n.tx_rate[1]] if n.tx_rate else None, "name": n.name}
                     for n in c.nets]}


def config_from_dict(d: object) -> VmConfig:
    """The VmConfig of :func:`config_to_dict`'s output, checked (StateError); NICs have tap -1."""
    r = StateReader(d, "config")
    kernel = r.text("kernel", 4096)
    initrd = r.text("initrd", 4096, optional=True)
    cmdline = r.text("cmdline", 1 << 16)
    memory = r.integer("memory", 0, 1 << 50)
    vcpus = r.integer("vcpus", 1, 4096)
    exec_cmd = r.text("exec_cmd", 1 << 16, optional=True)
    disks = []
    for i, raw in enumerate(r.items("disks", 64)):
        dr = StateReader(raw, f"config.disks[{i}]")
        disks.append(DiskConfig(dr.text("path", 4096), dr.flag("read_only")))
        dr.done()
    root_disk = r.flag("root_disk")
    console = r.text("console", 16)
    nets = []
    for i, raw in enumerate(r.items("nets", 64)):
        nr = StateReader(raw, f"config.nets[{i}]")
        mac, mtu = nr.text("mac", 17), nr.integer("mtu", 68, 65535, optional=True)
        vhost = nr.raw("vhost")
        rate = nr.raw("tx_rate")
        name = nr.text("name", 64)
        nr.done()
        if vhost is not None and not isinstance(vhost, bool):
            raise StateError(f"config.nets[{i}].vhost must be a bool or None")
        if rate is not None:
            ok = (isinstance(rate, list) and len(rate) == 2 and isinstance(rate[0], int)
                  and not isinstance(rate[0], bool) and isinstance(rate[1], (int, float))
                  and not isinstance(rate[1], bool) and 0 < rate[0] < 1 << 40 and 0 < rate[1] < 3600)
            if not ok:
                raise StateError(f"config.nets[{i}].tx_rate must be [bytes per second, interval]")
            rate = (rate[0], float(rate[1]))
        nets.append(NetConfig(tap_fd=-1, mac=mac, mtu=mtu, vhost=vhost, tx_rate=rate, name=name))
    r.done()
    return VmConfig(kernel=kernel, initrd=initrd, cmdline=cmdline, memory=memory, vcpus=vcpus, exec_cmd=exec_cmd,
                    disks=disks, root_disk=root_disk, console=console, nets=nets)
