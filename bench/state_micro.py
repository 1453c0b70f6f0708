#!/usr/bin/env python3
"""The VM and vCPU state steps of a migration's downtime, on this host's /dev/kvm (no guest boots).

Builds two VMs as a restore does (no kernel; serial, i8042, RTC, ACPI, virtio-blk on a scratch
image, virtio-rng; ``--vcpus`` vCPUs with the CPUID a boot gives them, never run) and times,
per round, each step the source and the destination take between the last vCPU pausing and
the first one running again: ``capture_state`` (KVM's state into records, then plain data),
``encode_json`` (the STATE record's payload), ``decode_json`` and ``apply_state`` (checked
records, then the KVM ioctls).  Prints the median and range of each, in ms.  Compare two trees
by running it with each on ``PYTHONPATH``; see bench/README.md.

    .venv/bin/python bench/state_micro.py [--rounds N] [--vcpus N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from hypyr.arch.x86 import cpuid as x86cpuid
from hypyr.vmm import snapshot, stream
from hypyr.vmm.builder import build_vm
from hypyr.vmm.config import DiskConfig, VmConfig

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--vcpus", type=int, default=2)
    args = p.parse_args()
    times: dict[str, list[float]] = {k: [] for k in ("capture_state", "encode_json", "decode_json", "apply_state")}
    with tempfile.TemporaryDirectory() as tmp:
        vms = []
        for name in ("src.img", "dst.img"):   # one image each: a VMM locks its disks
            disk = os.path.join(tmp, name)
            with open(disk, "wb") as f:
                f.truncate(MiB)
            config = VmConfig(kernel="", memory=16 * MiB, vcpus=args.vcpus, disks=[DiskConfig(disk)])
            vms.append(build_vm(config, lambda _b: None, boot=False))
        src, dst = vms
        supported = src.machine.kvm.supported_cpuid()
        for vm in vms:   # each vCPU's CPUID as a boot gives it (it is part of what a migration moves)
            for vt in vm.machine.vcpus:
                vt.vcpu.set_cpuid(x86cpuid.adjust_cpuid(supported, vt.vcpu.id, args.vcpus))
        try:
            for dev in (*src.devices.values(), *dst.devices.values()):
                dev.quiesce()   # as pause_and_quiesce leaves them (apply_state resumes dst's)
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                state = snapshot.capture_state(src, paused=False)
                t1 = time.perf_counter()
                payload = stream.encode_json(state)
                t2 = time.perf_counter()
                parsed = stream.decode_json(payload, "the stream", "STATE")
                t3 = time.perf_counter()
                snapshot.apply_state(dst, parsed, advance_clock=True, what="the stream")
                t4 = time.perf_counter()
                for dev in dst.devices.values():
                    dev.quiesce()
                for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[key].append(dt * 1e3)
        finally:
            src.close()
            dst.close()
    print(f"state steps of a migration's downtime, {args.vcpus} vCPUs, {args.rounds} rounds "
          f"(STATE record {len(payload)} bytes), python {sys.version.split()[0]}:")
    for key, values in times.items():
        print(f"  {key:14s} {statistics.median(values):7.2f} ms [{min(values):.2f}-{max(values):.2f}]")
    total = sum(statistics.median(v) for v in times.values())
    print(f"  {'sum of medians':14s} {total:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
