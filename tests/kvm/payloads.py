"""Tiny hand-assembled guest payloads for the host-KVM tests, and the vCPU setup they need.

Every payload is a list of ``(machine code, Intel-syntax assembly)`` pairs, so the bytes
document themselves; ``test_kvm_payloads.py`` re-assembles the text with GNU ``as`` (when
it is installed) and checks that it gives exactly these bytes.

Two execution environments are used:

* **real mode** (:func:`setup_real_mode`): CS=DS=ES=SS=0 (base 0), interrupts off, code at
  ``CODE_ADDR``.  Needs guest RAM at [0, 64 KiB).
* **64-bit long mode** (:func:`setup_long_mode`): hypyr's own boot GDT (flat 64-bit code,
  flat data), identity-mapped page tables for [0, 4 GiB) with 2 MiB pages, an **empty IDT**
  (limit 0: any exception triple-faults), interrupts off, code at ``CODE_ADDR``.  Uses the
  low-memory layout of :mod:`hypyr.arch.x86.layout` (GDT at 0x500, stack below 0x9000,
  page tables at 0x9000-0xefff), so it needs guest RAM at [0, 1 MiB).

Each payload keeps far below the ~100k instructions that an emulating KVM runs in a tenth of
a second; the only loops are ``jmp $`` and the counter loop, which the host stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypyr.arch.x86 import gdt as x86gdt
from hypyr.arch.x86 import paging as x86paging
from hypyr.arch.x86 import regs as x86regs
from hypyr.kvm import B, Kvm, Vcpu
from hypyr.memory import GuestMemory

CODE_ADDR = 0x1000        # where every payload is loaded and entered
DATA_ADDR = 0x3000        # scratch RAM the long-mode payloads store results in
MSG_ADDR = 0x1800         # the string the PIO payload sends with rep outsb
COUNTER_ADDR = 0x2000     # the dword the counter payload increments
REAL_MODE_STACK = 0x8000

# test device addresses (all outside RAM / on otherwise unused ports)
PIO_BASE = 0x10           # the PIO test device: 16 ports 0x10-0x1f
ID_PORT = 0x20            # where each vCPU reports its id
UNCLAIMED_PORT = 0x99     # no device: reads 0xff
MMIO_BASE = 0xD000_0000   # the MMIO test device (start of hypyr's MMIO hole)


@dataclass(frozen=True)
class Payload:
    name: str
    bits: int                            # 16 (real mode) or 64 (long mode)
    lines: tuple[tuple[bytes, str], ...]

    @property
    def code(self) -> bytes:
        return b"".join(code for code, _ in self.lines)

    @property
    def asm(self) -> str:
        return "\n".join(text for _, text in self.lines)


def _p(name: str, bits: int, *lines: tuple[str, str]) -> Payload:
    return Payload(name, bits, tuple((bytes.fromhex(h), a) for h, a in lines))


# -- real mode ----------------------------------------------------------------------------------
PIO_ROUNDTRIP = _p(
    "pio_roundtrip", 16,
    ("ba 10 00", "mov dx, 0x10"),            # 32-bit port I/O through DX
    ("66 ed", "in eax, dx"),                 # eax <- device register at 0x10
    ("66 40", "inc eax"),
    ("ba 14 00", "mov dx, 0x14"),
    ("66 ef", "out dx, eax"),                # device sees value + 1 at 0x14
    ("e4 18", "in al, 0x18"),                # 8-bit immediate-port I/O
    ("fe c0", "inc al"),
    ("e6 19", "out 0x19, al"),               # device sees value + 1 at 0x19
    ("be 00 18", "mov si, 0x1800"),          # MSG_ADDR
    ("b9 05 00", "mov cx, 5"),
    ("ba 1a 00", "mov dx, 0x1a"),
    ("fc", "cld"),
    ("f3 6e", "rep outsb"),                  # 5 bytes of MSG_ADDR to port 0x1a
    ("f4", "hlt"),
)

HLT = _p("hlt", 16, ("f4", "hlt"))

SPIN = _p("spin", 16, ("eb fe", "jmp ."))

# increments the dword at COUNTER_ADDR forever (2 instructions per iteration)
COUNTER = _p(
    "counter", 16,
    ("66 ff 06 00 20", "inc dword ptr [0x2000]"),
    ("eb f9", "jmp . - 5"),
)

# each vCPU starts with its id in BL and reports it on ID_PORT, then spins
REPORT_ID = _p(
    "report_id", 16,
    ("88 d8", "mov al, bl"),
    ("e6 20", "out 0x20, al"),
    ("eb fe", "jmp ."),
)

# the NMI handler of the trigger test: real mode's interrupt vector 2 (IVT entry at 0x8) points
# here; it reports 0x4e ('N') on PIO_BASE (ID_PORT is the in-kernel PIC's), then spins
NMI_HANDLER_ADDR = 0x1100
NMI_REPORT = _p(
    "nmi_report", 16,
    ("b0 4e", "mov al, 0x4e"),
    ("e6 10", "out 0x10, al"),
    ("eb fe", "jmp ."),
)


# save/restore and migration guests (tests/kvm/test_kvm_snapshot.py), one per vCPU: count in memory,
# write the count into 16 pages in turn through ES (the host sets its base) and report it with
# an OUT (an I/O exit every round); the other vCPU counts at 0x2800 and reports on port 0x11
DIRTY_COUNTER = _p(
    "dirty_counter", 16,
    ("66 ff 06 00 20", "inc dword ptr [0x2000]"),
    ("66 a1 00 20", "mov eax, dword ptr [0x2000]"),
    ("26 66 89 07", "mov dword ptr es:[bx], eax"),
    ("81 c3 04 10", "add bx, 0x1004"),              # the next page (64 KiB wrap: 16 pages)
    ("66 e7 10", "out 0x10, eax"),
    ("eb ea", "jmp . - 0x14"),
)
AP_COUNTER = _p(
    "ap_counter", 16,
    ("66 ff 06 00 28", "inc dword ptr [0x2800]"),
    ("66 a1 00 28", "mov eax, dword ptr [0x2800]"),
    ("66 e7 11", "out 0x11, eax"),
    ("eb f2", "jmp . - 12"),
)


def exit_status(value: int) -> Payload:
    """Report ``value`` on hypyr's exit-status port (0xf4), then spin until stopped."""
    return _p(
        f"exit_status_{value}", 16,
        (f"b0 {value:02x}", f"mov al, {value:#x}"),
        ("e6 f4", "out 0xf4, al"),
        ("eb fe", "jmp ."),
    )


# -- 64-bit long mode ---------------------------------------------------------------------------
MMIO_ROUNDTRIP = _p(
    "mmio_roundtrip", 64,
    ("bb 00 00 00 d0", "mov ebx, 0xd0000000"),          # rbx = MMIO_BASE (zero-extended)
    ("b8 0d f0 fe ca", "mov eax, 0xcafef00d"),
    ("89 03", "mov [rbx], eax"),                        # 32-bit MMIO write at offset 0
    ("8b 43 04", "mov eax, [rbx+4]"),                   # 32-bit MMIO read at offset 4
    ("89 04 25 00 30 00 00", "mov [0x3000], eax"),      # -> DATA_ADDR
    ("48 8b 43 08", "mov rax, [rbx+8]"),                # 64-bit MMIO read at offset 8
    ("48 89 04 25 08 30 00 00", "mov [0x3008], rax"),   # -> DATA_ADDR + 8
    ("c6 43 10 5a", "mov byte ptr [rbx+16], 0x5a"),     # 8-bit MMIO write at offset 16
    ("f4", "hlt"),
)

UD2 = _p("ud2", 64, ("0f 0b", "ud2"))
# #DE.  (Not int3: KVM's instruction emulator, which runs these guests on kvm_pvm, cannot
# emulate int3 and reports an emulation failure instead of delivering #BP.)
DIV0 = _p("div0", 64, ("31 c9", "xor ecx, ecx"), ("f7 f1", "div ecx"))

# for memory [0, 1 MiB) + [2 MiB, 3 MiB): copy across the two memslots both ways, read the
# unbacked gap at 0x150000 (all ones), write the very last dword of the second slot
TWO_SLOTS = _p(
    "two_slots", 64,
    ("8b 04 25 00 18 00 00", "mov eax, [0x1800]"),      # slot 0 ...
    ("89 04 25 10 00 20 00", "mov [0x200010], eax"),    # ... to slot 1
    ("8b 04 25 20 00 20 00", "mov eax, [0x200020]"),    # slot 1 ...
    ("89 04 25 04 18 00 00", "mov [0x1804], eax"),      # ... to slot 0
    ("8b 04 25 00 00 15 00", "mov eax, [0x150000]"),    # the hole between the slots
    ("89 04 25 08 18 00 00", "mov [0x1808], eax"),
    ("c7 04 25 fc ff 2f 00 0d f0 0d 60", "mov dword ptr [0x2ffffc], 0x600df00d"),
    ("f4", "hlt"),
)

# touches an MMIO address and a port nobody claimed: reads must give all ones
UNMAPPED = _p(
    "unmapped", 64,
    ("bb 00 00 00 d0", "mov ebx, 0xd0000000"),
    ("8b 03", "mov eax, [rbx]"),
    ("89 04 25 00 30 00 00", "mov [0x3000], eax"),
    ("48 8b 43 08", "mov rax, [rbx+8]"),
    ("48 89 04 25 08 30 00 00", "mov [0x3008], rax"),
    ("c7 03 34 12 00 00", "mov dword ptr [rbx], 0x1234"),   # ignored
    ("e4 99", "in al, 0x99"),
    ("88 04 25 10 30 00 00", "mov [0x3010], al"),
    ("f4", "hlt"),
)

ALL = [PIO_ROUNDTRIP, HLT, SPIN, COUNTER, REPORT_ID, NMI_REPORT, exit_status(42), MMIO_ROUNDTRIP, UD2, DIV0,
       TWO_SLOTS, UNMAPPED, DIRTY_COUNTER, AP_COUNTER]


# -- vCPU setup ---------------------------------------------------------------------------------
def load(memory: GuestMemory, payload: Payload, addr: int = CODE_ADDR) -> None:
    memory.write(addr, payload.code)


def set_regs(vcpu: Vcpu, **values: int) -> None:
    r = vcpu.get_regs()
    for name, value in values.items():
        setattr(r, name, value)
    vcpu.set_regs(r)


def setup_real_mode(vcpu: Vcpu, rip: int = CODE_ADDR, **regs: int) -> None:
    """Real mode, all segments at base 0, interrupts off, ``rip``; extra GPRs from ``regs``."""
    s = vcpu.get_sregs()
    for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(s)
    set_regs(vcpu, rip=rip, rflags=0x2, rsp=REAL_MODE_STACK, **regs)


def setup_long_mode(kvm: Kvm, vcpu: Vcpu, memory: GuestMemory, rip: int = CODE_ADDR, **regs: int) -> None:
    """64-bit mode with hypyr's boot GDT, identity paging of [0, 4 GiB) and an empty IDT."""
    x86gdt.write_gdt(memory)
    cr3 = x86paging.write_page_tables(memory)
    boot = x86regs.boot_cpu_state(rip, cr3=cr3)
    vcpu.set_cpuid(kvm.supported_cpuid())  # KVM wants CPUID to say "long mode" before EFER.LME
    s = vcpu.get_sregs()
    sr = boot.sregs
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        src, dst = getattr(sr, name), getattr(s, name)
        for f in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
            setattr(dst, f, int(getattr(src, f)))
    s.gdt.base, s.gdt.limit = sr.gdt.base, sr.gdt.limit
    s.idt.base, s.idt.limit = sr.idt.base, sr.idt.limit
    s.cr0, s.cr3, s.cr4, s.efer = sr.cr0, sr.cr3, sr.cr4, sr.efer
    vcpu.set_sregs(s)
    r = B.kvm_regs()
    r.rip, r.rsp, r.rflags = boot.regs.rip, boot.regs.rsp, boot.regs.rflags
    for name, value in regs.items():
        setattr(r, name, value)
    vcpu.set_regs(r)
