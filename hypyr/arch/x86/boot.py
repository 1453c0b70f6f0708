"""One call that prepares guest memory for a direct Linux boot and returns vCPU 0's state."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypyr.memory import GuestAddress, GuestMemory

from . import acpi, bootparams, gdt, layout, loader, paging
from .loader import KernelImage
from .regs import BootCpuState, boot_cpu_state


@dataclass
class BootSetup:
    cpu: BootCpuState  # for vCPU 0 only; the others wait for SIPI
    kernel: KernelImage
    initrd: tuple[GuestAddress, int] | None  # (address, size)
    cmdline_addr: GuestAddress
    boot_params_addr: GuestAddress
    rsdp_addr: GuestAddress
    e820: list[bootparams.E820Entry]


def setup_linux_boot(mem: GuestMemory, kernel_path: str | os.PathLike,
                     initrd: bytes | str | os.PathLike | None, cmdline: str, nr_vcpus: int,
                     mmio_devices: list[acpi.MmioDevice] | None = None) -> BootSetup:
    """Load the kernel (and initrd), write cmdline, page tables, GDT, ACPI tables and boot_params."""
    rsdp_addr = acpi.write_acpi_tables(mem, nr_vcpus, mmio_devices)  # checks nr_vcpus before anything slow
    kernel = loader.load_kernel(mem, kernel_path)
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
