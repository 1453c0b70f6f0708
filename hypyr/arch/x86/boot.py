"""One call that prepares guest memory for a direct kernel boot (Linux 64-bit entry, PVH or
multiboot) and returns vCPU 0's state."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from hypyr.errors import HypyrError
from hypyr.memory import GuestAddress, GuestMemory

from . import acpi, bootparams, gdt, layout, loader, paging
from .bootfile import BootFile, KernelData
from .loader import KernelImage
from .regs import BootCpuState, boot_cpu_state, protected_mode_cpu_state

if TYPE_CHECKING:
    from . import elf


class BootSetup(NamedTuple):
    cpu: BootCpuState  # for vCPU 0 only; the others wait for SIPI
    kernel: KernelImage
    initrd: tuple[GuestAddress, int] | None  # (address, size); multiboot: the first module
    cmdline_addr: GuestAddress
    boot_params_addr: GuestAddress  # boot_params, or the hvm_start_info / multiboot information
    rsdp_addr: GuestAddress
    e820: list[bootparams.E820Entry]


def setup_linux_boot(mem: GuestMemory, kernel_path: str | os.PathLike,
                     initrd: bytes | str | os.PathLike | None, cmdline: str, nr_vcpus: int,
                     mmio_devices: list[acpi.MmioDevice] | None = None,
                     modules: Sequence[tuple[bytes | str | os.PathLike, str]] = ()) -> BootSetup:
    """Load the kernel (and initrd), write cmdline, boot tables and ACPI tables; return vCPU 0's state.

    The kernel's format (:func:`loader.detect_format`) picks the protocol: a bzImage or ELF
    vmlinux gets the 64-bit Linux entry (page tables, boot_params); a PVH kernel the 32-bit PVH
    entry (hvm_start_info, the initrd as its first module); a multiboot kernel the multiboot
    entry, where ``initrd`` (if any) is the first module, then ``modules`` (``(data or path,
    arguments)`` each).  ``cmdline`` is used as given (a multiboot kernel sees its path first)."""
    rsdp_addr = acpi.write_acpi_tables(mem, nr_vcpus, mmio_devices)  # checks nr_vcpus before anything slow
    name = os.fspath(kernel_path)
    with BootFile(kernel_path, "kernel") as data:  # read where used: the kernel goes straight to RAM
        kind = loader.detect_format(data)
        if kind == loader.KIND_MULTIBOOT:
            mods = ([(initrd, _module_string(initrd, ""))] if initrd is not None else []) + [
                (src, _module_string(src, args)) for src, args in modules]
            return _setup_multiboot(mem, data, name, mods, cmdline, rsdp_addr)
        if modules:
            raise HypyrError(f"Kernel {name} is a Linux kernel, not a multiboot one: it takes one initrd, "
                             "not multiboot modules.")
        if kind == loader.KIND_PVH:
            return _setup_pvh(mem, data, name, initrd, cmdline, rsdp_addr)
        kernel = loader.load_kernel_data(mem, data, name)
    initrd_range = loader.load_initrd(mem, initrd, kernel) if initrd is not None else None
    cmdline_addr = loader.write_cmdline(mem, cmdline, kernel.cmdline_size)
    cr3 = paging.write_page_tables(mem)
    gdt.write_gdt(mem)
    e820 = bootparams.e820_map(mem)
    params = bootparams.build_boot_params(kernel.setup_header, cmdline_addr=cmdline_addr, initrd=initrd_range,
                                          e820=e820, rsdp_addr=rsdp_addr)
    bootparams.write_boot_params(mem, params, layout.BOOT_PARAMS_ADDR)
    cpu = boot_cpu_state(int(kernel.entry), cr3=cr3, boot_params=layout.BOOT_PARAMS_ADDR)
    return BootSetup(cpu=cpu, kernel=kernel, initrd=initrd_range, cmdline_addr=cmdline_addr,
                     boot_params_addr=GuestAddress(layout.BOOT_PARAMS_ADDR), rsdp_addr=GuestAddress(rsdp_addr),
                     e820=e820)


def _module_string(src: bytes | str | os.PathLike, args: str) -> str:
    """A multiboot module's string: its path, then its arguments (as QEMU and GRUB legacy give it)."""
    path = "module" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    return f"{path} {args}" if args else path


def _kernel_image(kind: str, path: str, segments: Sequence[elf.Segment], entry: int) -> KernelImage:
    end = (max(s.end for s in segments) + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    return KernelImage(path=path, kind=kind, load_addr=GuestAddress(min(s.paddr for s in segments)),
                       entry=GuestAddress(entry), end=GuestAddress(end),
                       setup_header=b"", protocol_version=0, cmdline_size=layout.DEFAULT_CMDLINE_SIZE,
                       initrd_addr_max=0x7FFFFFFF, xloadflags=0)


def _setup_multiboot(mem: GuestMemory, data: KernelData, path: str,
                     modules: Sequence[tuple[bytes | str | os.PathLike, str]], cmdline: str,
                     rsdp_addr: int) -> BootSetup:
    from . import elf, multiboot  # only for these kernels (hypyr run's start, issue #14)
    _header, segments, entry = multiboot.image_layout(data, path)
    elf.check_segments(mem, path, segments, limit=layout.FOUR_GIB)
    elf.load_segments(mem, data, segments)
    kernel = _kernel_image(loader.KIND_MULTIBOOT, path, segments, entry)
    loaded = multiboot.load_modules(mem, modules, int(kernel.end))
    full = f"{path} {cmdline}" if cmdline else path
    cmdline_addr = loader.write_cmdline(mem, full, layout.CMDLINE_MAX_SIZE - 1)
    e820 = bootparams.e820_map(mem)
    mem_lower, mem_upper = multiboot.memory_sizes(mem)
    info = multiboot.build_info(layout.BOOT_INFO_ADDR, mem_lower=mem_lower, mem_upper=mem_upper,
                                cmdline_addr=int(cmdline_addr), modules=loaded, e820=e820)
    info_addr = multiboot.write_info(mem, info)
    gdt.write_gdt(mem, gdt.boot_gdt32())
    cpu = protected_mode_cpu_state(entry, eax=multiboot.BOOTLOADER_MAGIC, ebx=int(info_addr))
    first = (GuestAddress(loaded[0].start), loaded[0].end - loaded[0].start) if loaded else None
    return BootSetup(cpu=cpu, kernel=kernel, initrd=first, cmdline_addr=cmdline_addr, boot_params_addr=info_addr,
                     rsdp_addr=GuestAddress(rsdp_addr), e820=e820)


def _setup_pvh(mem: GuestMemory, data: KernelData, path: str, initrd: bytes | str | os.PathLike | None,
               cmdline: str, rsdp_addr: int) -> BootSetup:
    from . import elf, pvh  # only for these kernels
    image = elf.parse(data, path)
    entry = pvh.phys32_entry(image)
    assert entry is not None  # detect_format said PVH
    if image.machine not in (elf.EM_386, elf.EM_X86_64):
        raise elf.fail(path, "has a PVH note but is not an x86 ELF file")
    elf.check_segments(mem, path, image.segments)
    if entry >= layout.FOUR_GIB or not any(s.paddr <= entry < s.end for s in image.segments):
        raise elf.fail(path, f"has its PVH entry point {entry:#x} outside its loadable segments")
    elf.load_segments(mem, data, image.segments)
    kernel = _kernel_image(loader.KIND_PVH, path, image.segments, entry)
    initrd_range = loader.load_initrd(mem, initrd, kernel) if initrd is not None else None
    cmdline_addr = loader.write_cmdline(mem, cmdline, kernel.cmdline_size)
    e820 = bootparams.e820_map(mem)
    mods = [(int(initrd_range[0]), initrd_range[1], 0)] if initrd_range else []
    info = pvh.build_start_info(layout.BOOT_INFO_ADDR, cmdline_addr=int(cmdline_addr), modules=mods, e820=e820,
                                rsdp_addr=rsdp_addr)
    mem.write(layout.BOOT_INFO_ADDR, info)
    gdt.write_gdt(mem, gdt.boot_gdt32())
    cpu = protected_mode_cpu_state(entry, ebx=layout.BOOT_INFO_ADDR)
    return BootSetup(cpu=cpu, kernel=kernel, initrd=initrd_range, cmdline_addr=cmdline_addr,
                     boot_params_addr=GuestAddress(layout.BOOT_INFO_ADDR), rsdp_addr=GuestAddress(rsdp_addr),
                     e820=e820)
