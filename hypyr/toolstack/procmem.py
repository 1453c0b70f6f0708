"""A domain process's memory outside guest RAM (issue #14; figures: bench/README.md, "domain_mem.py").

One malloc arena for the whole process, free malloc pages handed back once it settles, and the
modules either side of the jail's fork would import after it imported before it, so the
supervisor and the VMM share them instead of each copying pages (docs/toolstack.md).
"""

from __future__ import annotations

import ctypes
import importlib
from typing import TYPE_CHECKING

from hypyr import libc

if TYPE_CHECKING:
    from hypyr.toolstack.domconfig import DomainConfig

M_ARENA_MAX = -8   # glibc's mallopt() parameter


def one_malloc_arena() -> None:
    """glibc's malloc gives each thread that allocates an arena of its own (some 130 KiB
    resident each, in every domain's VMM); the domain's threads allocate under the GIL anyway:
    one arena for all (issue #14).  Before the first thread starts; a no-op without glibc."""
    mallopt = libc.optional_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is not None:
        mallopt(M_ARENA_MAX, 1)


def trim_malloc() -> None:
    """Give the kernel back the pages malloc holds free (glibc's malloc_trim), before this
    process settles down: each is a page of its own, or one it shares with its jail twin that
    one of the two would copy once it allocates there (issue #14).  Not under seccomp: madvise."""
    trim = libc.optional_function("malloc_trim", [ctypes.c_size_t])
    if trim is not None:
        trim(0)


# What a domain process would import only when it needs it (the kernel loaders, the cgroup code
# for the supervisor, the devices, restore and migration): imported before the jail's fork by
# import_before_fork, and all of it by `hypyr serve`'s fork server before its first fork.
BOOT_MODULES = ("hypyr.arch.x86.boot", "hypyr.arch.x86.elf", "hypyr.arch.x86.multiboot", "hypyr.arch.x86.pvh",
                "hypyr.toolstack.sched")
DISK_MODULES = ("hypyr.devices.virtio.blk",)
NIC_MODULES = ("hypyr.devices.virtio.net", "hypyr.devices.virtio.vhost")
RESTORE_MODULES = ("hypyr.vmm.snapshot",)
MIGRATION_MODULES = ("hypyr.vmm.migration",)
LATE_MODULES = BOOT_MODULES + DISK_MODULES + NIC_MODULES + RESTORE_MODULES + MIGRATION_MODULES


def import_before_fork(cfg: DomainConfig, *, restoring: bool, receiving: bool) -> None:
    """Import, before the jail fork, what each side would import after it: the supervisor its
    cgroup code, the VMM child its boot code (the kernel formats' too), and the disk, NIC,
    restore and migration code when this domain uses them.  An import after the fork gives that
    process its own copy of the module and copies pages the two share (the interned names, the
    import system's state): sched alone had the supervisor copy 2.8 MiB (issue #14)."""
    modules: tuple[str, ...] = BOOT_MODULES
    if cfg.disks:
        modules += DISK_MODULES
    if cfg.vifs:
        modules += NIC_MODULES
    if restoring or receiving:
        modules += RESTORE_MODULES
    if receiving:
        modules += MIGRATION_MODULES
    for name in modules:
        importlib.import_module(name)
