"""Micro-benchmark of the vCPU exit path (Machine's exit loop), on the host's /dev/kvm.

Two parts, each run ``--rounds`` times (median, min and max per exit):

* **decode** (no guest code): a real Machine and vCPU whose ``run`` is replaced by a canned list
  of exit reasons, with one synthetic exit (PIO out/in of 1 byte, MMIO write/read of 4 bytes)
  written into the vCPU's kvm_run page.  What is timed is the loop's own work per exit: read
  the exit from kvm_run, dispatch it to the bus (a device that does nothing), complete a read.
* **guest**: tiny guests doing ``--guest-exits`` port writes (real mode) and as many MMIO
  accesses (64-bit, alternating write and read), through Machine.start/wait: KVM_RUN included,
  so on an emulating KVM (PVM) this is mostly KVM's time; it shows the loop's share in context.

    .venv/bin/python bench/exit_micro.py [--exits N] [--guest-exits N] [--rounds N] [--no-guest]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "kvm"))   # payloads.py: the host-KVM tests' vCPU setup

import payloads as P  # noqa: E402

from hypyr.kvm import B, Kvm  # noqa: E402
from hypyr.memory import GuestMemory  # noqa: E402
from hypyr.vmm.machine import Machine  # noqa: E402
from hypyr.vmm.stop import StopKind  # noqa: E402

MiB = 1 << 20
PORT = 0x10


class Null:
    """A bus device that does nothing (reads return zeros)."""

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def machine(kvm: Kvm) -> Machine:
    m = Machine(GuestMemory.anonymous([(0, MiB)], hugepages=False), 1, irqchip=False, kvm=kvm)
    m.pio.register(PORT, 16, Null())
    m.mmio.register(P.MMIO_BASE, 0x1000, Null())
    return m


def close(m: Machine) -> None:
    m.close()


def fill(vcpu, kind: str) -> None:
    """One synthetic exit of ``kind`` in the kvm_run page (setup, not timed)."""
    run = vcpu._run if hasattr(vcpu, "_run") else vcpu.run_state   # (its name before it became private)
    ex = run.exit
    if kind in ("pio-out", "pio-in"):
        io = ex.io
        io.direction = B.KVM_EXIT_IO_OUT if kind == "pio-out" else B.KVM_EXIT_IO_IN
        io.size, io.port, io.count, io.data_offset = 1, PORT, 1, 4096   # where KVM puts it too
    else:
        mm = ex.mmio
        mm.phys_addr, mm.len, mm.is_write = P.MMIO_BASE, 4, 1 if kind == "mmio-write" else 0


def decode_round(kvm: Kvm, kind: str, n: int) -> float:
    """ns per exit of the exit loop for ``n`` synthetic exits of ``kind``."""
    m = machine(kvm)
    try:
        vt = m.vcpus[0]
        fill(vt.vcpu, kind)
        reason = B.KVM_EXIT_IO if kind.startswith("pio") else B.KVM_EXIT_MMIO
        vt.vcpu.run = iter([reason] * n + [B.KVM_EXIT_HLT]).__next__   # a C callable: no Python frame
        t0 = time.perf_counter_ns()
        m._vcpu_loop(vt)
        dt = time.perf_counter_ns() - t0
        assert m.stop_reason is not None and m.stop_reason.kind is StopKind.HALT, m.stop_reason
        assert vt.exits == n + 1
        return dt / n
    finally:
        close(m)


def pio_loop(n: int) -> bytes:
    assert 0 < n < 0x10000
    return bytes([0xB9, n & 0xFF, n >> 8,      # mov cx, n
                  0xE6, PORT,                  # out PORT, al
                  0xE2, 0xFC,                  # loop (back to out)
                  0xF4])                       # hlt


def mmio_loop(n: int) -> bytes:
    return (bytes.fromhex("bb 00 00 00 d0")            # mov ebx, MMIO_BASE
            + b"\xb9" + n.to_bytes(4, "little")        # mov ecx, n
            + bytes.fromhex("89 03"                    # mov [rbx], eax   (MMIO write)
                            "8b 43 04"                 # mov eax, [rbx+4] (MMIO read)
                            "ff c9"                    # dec ecx
                            "75 f7"                    # jnz (back to the write)
                            "f4"))                     # hlt


def guest_round(kvm: Kvm, kind: str, n: int) -> float:
    """µs per exit, wall, of a guest making ``n`` exits of ``kind`` (pio or mmio)."""
    m = machine(kvm)
    try:
        vcpu = m.vcpus[0].vcpu
        if kind == "pio":
            m.memory.write(P.CODE_ADDR, pio_loop(n))
            P.setup_real_mode(vcpu)
        else:
            m.memory.write(P.CODE_ADDR, mmio_loop(n // 2))
            P.setup_long_mode(kvm, vcpu, m.memory)
        t0 = time.perf_counter()
        m.start()
        reason = m.wait(600)
        dt = time.perf_counter() - t0
        assert reason is not None and reason.kind is StopKind.HALT, reason
        return dt / m.vcpus[0].exits * 1e6
    finally:
        close(m)


def report(name: str, samples: list[float], unit: str) -> None:
    print(f"{name:<14} median {statistics.median(samples):8.1f} {unit}   min {min(samples):8.1f}   "
          f"max {max(samples):8.1f}   ({len(samples)} rounds)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=200_000, help="synthetic exits per decode round")
    ap.add_argument("--guest-exits", type=int, default=20_000, help="exits per guest round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-guest", action="store_true", help="only the decode part")
    a = ap.parse_args()
    kvm = Kvm()
    try:
        print(f"decode: {a.exits} synthetic exits per round, ns per exit (exit loop + bus dispatch)")
        for kind in ("pio-out", "pio-in", "mmio-write", "mmio-read"):
            report(kind, [decode_round(kvm, kind, a.exits) for _ in range(a.rounds)], "ns")
        if not a.no_guest:
            print(f"guest: {a.guest_exits} exits per round, µs per exit (wall, KVM_RUN included)")
            for kind in ("pio", "mmio"):
                report(kind, [guest_round(kvm, kind, a.guest_exits) for _ in range(a.rounds)], "µs")
    finally:
        kvm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
