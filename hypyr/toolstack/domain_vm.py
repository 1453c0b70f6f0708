"""Where a domain process's VM comes from: built afresh from the domain's configuration
(``vm_config``), restored from a save file (``restore``) or received by a live migration
(``receive``); a restored or received VM keeps its saved devices, its NICs put on this domain's
taps (``configure_nets``); and, for a jailed VMM, its input files opened beforehand
(``open_for_vmm``).  Used by :class:`hypyr.toolstack.domain.Domain`, which keeps the lifecycle:
boot, supervision, on_* actions.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hypyr import preopened
from hypyr.toolstack import nics
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.errors import MigrationFailed, SaveFileError, save_file_sentence
from hypyr.vmm import seccomp
from hypyr.vmm.builder import LinuxVm
from hypyr.vmm.config import DEFAULT_CMDLINE, DiskConfig, VmConfig

if TYPE_CHECKING:
    from hypyr.image.diskboot import DiskBoot  # pygrub's (imported when a domain uses it)

log = logging.getLogger("hypyr.domain")


def vm_config(cfg: DomainConfig, tap_fds: Sequence[int] = (), domid: int = 0, boot: DiskBoot | None = None,
              ip_args: str | None = None) -> VmConfig:
    """The VMM's view of an xl.cfg domain: direct boot, disks in vdev order, one NIC per vif
    (``tap_fds[i]`` is vif i's open tap).  With ``bootloader = "pygrub"``, ``boot`` is what
    ``hypyr.image.diskboot`` extracted: its kernel, initrd and command line (then the cfg's).
    ``ip_args``: the vifs' addresses for the guest (default: looked up in the networks now)."""
    nets = nics.net_configs(cfg.vifs, tap_fds, [v.tap_name(domid) for v in cfg.vifs])
    kernel, initrd, base = cfg.kernel, cfg.ramdisk, DEFAULT_CMDLINE
    if boot is not None:
        kernel, initrd, base = boot.kernel, boot.initrd, boot.cmdline
    if ip_args is None:
        ip_args = nics.guest_ip_args(cfg.vifs)
    cmdline = " ".join(x for x in (base, cfg.cmdline_string(), ip_args) if x)
    return VmConfig(kernel=kernel, initrd=initrd, cmdline=cmdline,
                    memory=cfg.memory << 20, vcpus=cfg.vcpus,
                    disks=[DiskConfig(d.target, d.read_only) for d in cfg.disks], nets=nets, seccomp=cfg.seccomp)


def configure_nets(cfg: DomainConfig, tap_fds: Sequence[int], domid: int):
    """``configure`` for a restore or migration: the saved VM, its NICs on this domain's taps."""
    names = [v.tap_name(domid) for v in cfg.vifs]

    def configure(header) -> VmConfig:
        c = header.vm_config(tap_fds)
        return c._replace(nets=[n._replace(name=name) for n, name in zip(c.nets, names)],
                          seccomp=cfg.seccomp)   # this domain's filters, not the saver's
    return configure


def restore(path: str, console_out: Callable[[bytes], None], configure) -> LinuxVm:
    """The VM saved in ``path``, its NICs on this domain's taps (``configure``: configure_nets)."""
    from hypyr.errors import SnapshotError
    from hypyr.vmm import snapshot
    try:
        with open(preopened.open_file(path, os.O_RDONLY | os.O_CLOEXEC), "rb") as f:
            return snapshot.restore(f, console_out, configure=configure)
    except OSError as e:
        raise SaveFileError(f"cannot read the save file {path}: {e.strerror or e}") from None
    except SnapshotError as e:
        raise SaveFileError(save_file_sentence(path, e)) from None


def receive(fd: int, watch_fd: int | None, name: str, seccomp_mode: str, console_out: Callable[[bytes], None],
            configure) -> LinuxVm:
    """Receive the live migration on the connection ``fd``; abandon it if `migrate-receive`
    goes away (its watch pipe ``watch_fd`` ends) before the VM runs.  ``name``: the domain's,
    for the log; ``seccomp_mode``: its xl.cfg ``seccomp``, for the watch thread."""
    from hypyr.errors import MigrationError
    from hypyr.vmm import migration
    sock = socket.socket(fileno=fd)
    done = threading.Event()

    def watch(watch_fd: int) -> None:
        seccomp.install("control", seccomp_mode)
        try:
            while os.read(watch_fd, 64):
                pass
        except OSError:
            pass
        if not done.is_set():
            log.warning("domain %s: migrate-receive went away: abandoning the migration", name)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        os.close(watch_fd)
    if watch_fd is not None:
        threading.Thread(target=watch, args=(watch_fd,), name="migrate-watch", daemon=True).start()
    try:
        vm = migration.migrate_receive(sock, console_out, configure=configure)
    except MigrationError as e:
        raise MigrationFailed(str(e)) from None
    finally:
        done.set()
        sock.close()
    return vm


def open_for_vmm(cfg: DomainConfig, boot: DiskBoot | None, restore_file: str | None) -> None:
    """Open the files the jailed VMM reads by path (hypyr.preopened): disk images, kernel,
    initrd (``boot``'s, for a pygrub boot), a save file to restore."""
    kernel, initrd = (boot.kernel, boot.initrd) if boot is not None else (cfg.kernel, cfg.ramdisk)
    files = [(d.target, not d.read_only) for d in cfg.disks]
    files += [(p, False) for p in (kernel, initrd, restore_file) if p]
    for path, writable in files:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError:
            continue     # the VMM's own open fails the same way, with the usual sentence
        preopened.register(path, writable, fd)
