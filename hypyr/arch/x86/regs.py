"""The register state vCPU 0 starts the kernel with (64-bit boot protocol), as plain data.

The VMM copies these into ``kvm_sregs``/``kvm_regs``.  Application processors get no state:
they wait for INIT/SIPI in the in-kernel local APIC.
"""

from __future__ import annotations

from typing import NamedTuple

from . import gdt as gdtmod
from . import layout

X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_CR4_OSFXSR = 1 << 9
X86_CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

BOOT_CR0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
BOOT_CR4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
BOOT_EFER = EFER_LME | EFER_LMA
RFLAGS_RESERVED = 0x2


class SpecialRegisters(NamedTuple):
    cs: gdtmod.Segment
    ds: gdtmod.Segment
    es: gdtmod.Segment
    fs: gdtmod.Segment
    gs: gdtmod.Segment
    ss: gdtmod.Segment
    tr: gdtmod.Segment
    ldt: gdtmod.Segment
    gdt: gdtmod.DescriptorTable
    idt: gdtmod.DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int


class GeneralRegisters(NamedTuple):
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = RFLAGS_RESERVED


class BootCpuState(NamedTuple):
    sregs: SpecialRegisters
    regs: GeneralRegisters = GeneralRegisters()


def boot_cpu_state(entry: int, *, cr3: int = layout.PML4_ADDR, gdt_table: bytes | None = None,
                   boot_params: int = layout.BOOT_PARAMS_ADDR) -> BootCpuState:
    """Long-mode state for the boot CPU: paging on, flat segments from the boot GDT, rip at ``entry``."""
    table = gdt_table if gdt_table is not None else gdtmod.boot_gdt()
    code = gdtmod.segment_for(table, gdtmod.BOOT_CS)
    data = [gdtmod.segment_for(table, gdtmod.BOOT_DS) for _ in range(5)]
    sregs = SpecialRegisters(
        cs=code, ds=data[0], es=data[1], fs=data[2], gs=data[3], ss=data[4],
        tr=gdtmod.segment_for(table, gdtmod.BOOT_TSS),
        ldt=gdtmod.null_ldt(),
        gdt=gdtmod.DescriptorTable(base=layout.GDT_ADDR, limit=len(table) - 1),
        idt=gdtmod.DescriptorTable(base=layout.IDT_ADDR, limit=layout.IDT_LIMIT),
        cr0=BOOT_CR0, cr2=0, cr3=cr3, cr4=BOOT_CR4, cr8=0, efer=BOOT_EFER,
    )
    regs = GeneralRegisters(rip=int(entry), rsi=boot_params, rsp=layout.BOOT_STACK_POINTER,
                            rbp=layout.BOOT_STACK_POINTER, rflags=RFLAGS_RESERVED)
    return BootCpuState(sregs=sregs, regs=regs)


PROTECTED_CR0 = X86_CR0_PE | X86_CR0_ET  # paging off, no FPU emulation bits; what a loader leaves


def protected_mode_cpu_state(entry: int, *, eax: int = 0, ebx: int = 0,
                             esp: int = layout.BOOT_STACK_POINTER) -> BootCpuState:
    """32-bit protected mode with paging off (multiboot and PVH entry): flat 4 GiB code at
    BOOT_CS and data at BOOT_DS from :func:`gdt.boot_gdt32`, a 32-bit busy TSS, CR4 = EFER = 0,
    interrupts off, eip = ``entry``."""
    table = gdtmod.boot_gdt32()
    code = gdtmod.segment_for(table, gdtmod.BOOT_CS)
    data = [gdtmod.segment_for(table, gdtmod.BOOT_DS) for _ in range(5)]
    tr = gdtmod.decode_descriptor(table[gdtmod.BOOT_TSS:gdtmod.BOOT_TSS + 8], gdtmod.BOOT_TSS)
    sregs = SpecialRegisters(
        cs=code, ds=data[0], es=data[1], fs=data[2], gs=data[3], ss=data[4], tr=tr,
        ldt=gdtmod.null_ldt(),
        gdt=gdtmod.DescriptorTable(base=layout.GDT_ADDR, limit=len(table) - 1),
        idt=gdtmod.DescriptorTable(base=layout.IDT_ADDR, limit=layout.IDT_LIMIT),
        cr0=PROTECTED_CR0, cr2=0, cr3=0, cr4=0, cr8=0, efer=0,
    )
    regs = GeneralRegisters(rip=int(entry), rax=eax, rbx=ebx, rsp=esp, rflags=RFLAGS_RESERVED)
    return BootCpuState(sregs=sregs, regs=regs)
