"""Why a machine stopped, and what a faulting vCPU looked like.

:class:`StopReason` (a :class:`StopKind`, a message, the guest's exit status or the faulting
vCPU's :func:`register_dump`) is what :meth:`Machine.stop <hypyr.vmm.machine.Machine.stop>` is
given and :meth:`~hypyr.vmm.machine.Machine.wait` returns; the CLI and toolstack map it to exit
codes and domain states (docs/exit-codes.md).  :func:`vcpu_report` is the dump with what is
pending on the vCPU, for ``hypyr info DOMAIN --registers``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from hypyr.arch.x86.msrs import MSR_LSTAR
from hypyr.kvm import Vcpu


class StopKind(enum.Enum):
    POWEROFF = "poweroff"
    EXIT_STATUS = "exit-status"
    REBOOT = "reboot"
    HALT = "halt"                    # HLT with no in-kernel irqchip (test payloads)
    TRIPLE_FAULT = "triple-fault"    # KVM_EXIT_SHUTDOWN
    CRASH = "crash"                  # guest kernel panic (pvpanic), KVM_SYSTEM_EVENT_CRASH
    INTERNAL_ERROR = "internal-error"
    FAIL_ENTRY = "fail-entry"
    DESTROYED = "destroyed"          # stopped by the host (user, signal)


class StopReason(NamedTuple):
    kind: StopKind
    message: str
    status: int | None = None        # guest exit status for EXIT_STATUS
    vcpu: int | None = None
    registers: str = ""              # register dump for faults


def vcpu_report(vcpu: Vcpu) -> str:
    """:func:`register_dump` and what is pending on the vCPU (``hypyr info DOMAIN --registers``):
    the syscall entry (LSTAR: with the kernel's System.map it gives the KASLR offset) and the
    NMI, interrupt and exception KVM holds for it."""
    ev = vcpu.get_vcpu_events()
    lstar = vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR, 0)
    return (f"{register_dump(vcpu)}\nlstar={lstar:016x}  mp_state={vcpu.get_mp_state()}"
            f"  nmi: injected={ev.nmi.injected} pending={ev.nmi.pending} masked={ev.nmi.masked}"
            f"  interrupt: injected={ev.interrupt.injected} nr={ev.interrupt.nr} shadow={ev.interrupt.shadow}"
            f"  exception: injected={ev.exception.injected} nr={ev.exception.nr}")


def register_dump(vcpu: Vcpu) -> str:
    r, s = vcpu.get_regs(), vcpu.get_sregs()
    g = lambda *names: "  ".join(f"{n}={getattr(r, n):016x}" for n in names)  # noqa: E731
    lines = [g("rip", "rsp", "rbp", "rflags"), g("rax", "rbx", "rcx", "rdx"), g("rsi", "rdi", "r8", "r9"),
             g("r10", "r11", "r12", "r13"), g("r14", "r15"),
             f"cr0={s.cr0:016x}  cr2={s.cr2:016x}  cr3={s.cr3:016x}  cr4={s.cr4:016x}",
             f"efer={s.efer:016x}  cs={s.cs.selector:04x} base={s.cs.base:x} l={s.cs.l} db={s.cs.db}"
             f"  ss={s.ss.selector:04x}  gdt={s.gdt.base:x}/{s.gdt.limit:x}  idt={s.idt.base:x}/{s.idt.limit:x}"]
    return "\n".join(lines)
