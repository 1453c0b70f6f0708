"""`hypyr doctor`: can this host run unmodified guests natively, and if not, what to do.

The decision is made by a probe, not a guess: a tiny real-mode guest runs a counted loop
and we measure how fast KVM executes it.  Hardware virtualisation runs it at native speed
(hundreds of millions of instructions per second); KVM's instruction emulator (what a PVM
host gives a non-PVM guest) manages a few million.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hypyr.kvm import B, Kvm, KvmUnavailable
from hypyr.memory import GuestMemory
from hypyr.procfs import kvm_backend

NATIVE_THRESHOLD = 20_000_000  # instructions per second
PROBE_ITERATIONS = 100_000     # 2 instructions each


@dataclass
class Diagnosis:
    device: str
    usable: bool
    backend: str           # "VT-x", "AMD-V", "PVM", "unknown" or "none"
    nested: bool           # running inside the hypyr lab
    rate: float | None     # measured guest instructions per second
    native: bool
    problem: str = ""

    @property
    def advice(self) -> str:
        if not self.usable:
            return f"{self.problem}; on a host without usable KVM, use `hypyr lab -- hypyr run …`."
        if self.native:
            return "unmodified guests run natively here: use `hypyr run`."
        return ("unmodified guests are emulated here (too slow to boot Linux): "
                "use `hypyr lab -- hypyr run …` to run them in the nested lab.")


def probe_rate(kvm: Kvm) -> float:
    """Run `mov ecx,N; l: dec ecx; jnz l; out 0xf4,al` in real mode; return instructions/s."""
    code = (bytes([0x66, 0xB9]) + PROBE_ITERATIONS.to_bytes(4, "little")
            + bytes([0x66, 0x49, 0x75, 0xFC, 0xE6, 0xF4]))
    vm = kvm.create_vm()
    mem = GuestMemory.anonymous([(0, 0x10000)], hugepages=False)
    vcpu = None
    try:
        region = mem.regions[0]
        vm.set_user_memory_region(0, region.size, region.host_address())
        mem.write(0x1000, code)
        vcpu = vm.create_vcpu(0)
        s = vcpu.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags = 0x1000, 2
        vcpu.set_regs(r)
        t0 = time.perf_counter()
        reason = vcpu.run()
        dt = time.perf_counter() - t0
        if reason != B.KVM_EXIT_IO:
            raise RuntimeError(f"probe guest stopped with {B.EXIT_REASON_NAMES.get(reason, reason)}")
        return 2 * PROBE_ITERATIONS / max(dt, 1e-9)
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        mem.close()


def diagnose(device: str = "/dev/kvm") -> Diagnosis:
    nested = os.environ.get("HYPYR_IN_LAB") == "1"
    backend = kvm_backend() if os.path.exists(device) else "none"
    try:
        kvm = Kvm(device)
    except KvmUnavailable as e:
        return Diagnosis(device, False, backend, nested, None, False, problem=str(e))
    try:
        rate = probe_rate(kvm)
    except Exception as e:  # noqa: BLE001 - any failure here is a finding, reported plainly
        return Diagnosis(device, False, backend, nested, None, False, problem=f"a probe guest failed to run: {e}")
    finally:
        kvm.close()
    return Diagnosis(device, True, backend, nested, rate, rate >= NATIVE_THRESHOLD)


def report(d: Diagnosis) -> list[str]:
    lines = [f"/dev/kvm:  {'usable' if d.usable else 'NOT usable'} ({d.device})",
             f"backend:   {d.backend}{' (inside the hypyr lab: nested, emulated SVM)' if d.nested else ''}"]
    if d.rate is not None:
        lines.append(f"probe:     {d.rate / 1e6:.1f} M guest instructions/s "
                     f"({'hardware virtualisation' if d.native else 'emulated'}; "
                     f"native needs ≥ {NATIVE_THRESHOLD / 1e6:.0f} M)")
    lines.append(f"verdict:   {d.advice}")
    return lines
