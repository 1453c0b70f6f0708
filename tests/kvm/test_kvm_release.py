"""Closing a Machine releases its guest RAM at once, and the vCPU count is bounded.

A reboot closes the old machine and builds a new one while the old objects are still referenced
(and tangled in reference cycles): the old RAM must be unmapped by close() itself, not whenever
Python's cyclic garbage collector runs.
"""

from __future__ import annotations

import gc
import struct

import pytest

from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio.device import VIRTIO_F_VERSION_1
from hypyr.devices.virtio.rng import VirtioRng
from hypyr.errors import HypyrError, VcpuCountError
from hypyr.memory import GuestMemory, GuestMemoryClosedError
from hypyr.vmm import builder
from hypyr.vmm.machine import MAX_VCPUS, Machine, vcpu_limit

MiB = 1 << 20
RAM = 7 * MiB + 5 * 4096  # a size no other mapping in this process has


def ram_mappings() -> int:
    """How many mappings of exactly RAM bytes this process has."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            n += hi - lo == RAM
    return n


def wr(machine: Machine, base: int, offset: int, value: int) -> None:
    machine.mmio.write(base + offset, struct.pack("<I", value))


def build_with_active_queue(kvm) -> Machine:
    """A machine whose virtio-rng queue is live: its transport holds views of the rings."""
    memory = GuestMemory.anonymous([(0, RAM)], hugepages=False)
    machine = Machine(memory, 1, kvm=kvm)
    builder.attach_virtio(machine, [VirtioRng()])
    base = builder.layout.VIRTIO_MMIO_BASE
    for status in (1, 3):
        wr(machine, base, M.STATUS, status)
    wr(machine, base, M.DRIVER_FEATURES_SEL, 1)
    wr(machine, base, M.DRIVER_FEATURES, VIRTIO_F_VERSION_1 >> 32)
    wr(machine, base, M.STATUS, 3 | M.STATUS_FEATURES_OK)
    wr(machine, base, M.QUEUE_SEL, 0)
    wr(machine, base, M.QUEUE_NUM, 16)
    for reg, addr in ((M.QUEUE_DESC_LOW, 0x10000), (M.QUEUE_DRIVER_LOW, 0x11000), (M.QUEUE_DEVICE_LOW, 0x12000)):
        wr(machine, base, reg, addr)
    wr(machine, base, M.QUEUE_READY, 1)
    wr(machine, base, M.STATUS, 3 | M.STATUS_FEATURES_OK | M.STATUS_DRIVER_OK)
    assert machine.mmio.read(base + M.STATUS, 4)[0] & M.STATUS_DRIVER_OK, "the queue did not activate"
    return machine


def test_reboots_leave_only_the_current_ram_mapped(kvm):
    gc.disable()  # the release must not depend on the cyclic collector
    old: list[Machine] = []  # a reboot still holds the old machine while it builds the new one
    try:
        current = build_with_active_queue(kvm)
        for _ in range(10):
            current.close()
            old.append(current)
            current = build_with_active_queue(kvm)
            assert ram_mappings() == 1
        current.close()
        assert ram_mappings() == 0
    finally:
        gc.enable()


def test_closed_memory_raises_a_typed_error(kvm):
    machine = build_with_active_queue(kvm)
    mem = machine.memory
    machine.close()
    for access in (lambda: mem.read(0x1000, 4), lambda: mem.write_u32(0x1000, 1),
                   lambda: mem.views([(0x1000, 16)]), lambda: mem.view(0x1000, 16)):
        with pytest.raises(GuestMemoryClosedError):
            access()
    mem.close()  # idempotent


def test_machine_refuses_more_vcpus_than_the_limit(kvm):
    limit = vcpu_limit(kvm)
    assert 1 <= limit <= MAX_VCPUS and limit <= kvm.max_vcpus
    memory = GuestMemory.anonymous([(0, MiB)], hugepages=False)
    try:
        for n in (limit + 1, 10 ** 9, 0, -1, True, 2.0, "2"):
            with pytest.raises(VcpuCountError, match=f"from 1 to {limit} .*, not {n!r}"):
                Machine(memory, n, kvm=kvm)
        Machine(memory, limit, kvm=kvm).close()  # the limit itself is allowed
    finally:
        memory.close()


@pytest.mark.parametrize("vcpus", [MAX_VCPUS + 1, 10 ** 9, 0])
def test_builder_refuses_a_bad_vcpu_count_in_one_sentence(kvm, tmp_path, vcpus):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    for host_kvm in (None, kvm):  # checked before /dev/kvm is opened, and against it
        with pytest.raises(VcpuCountError) as e:
            builder.validate(builder.VmConfig(kernel=str(kernel), vcpus=vcpus), host_kvm)
        msg = str(e.value)
        assert isinstance(e.value, HypyrError) and "vcpus" in msg and msg.endswith(f"not {vcpus}.")
        assert "\n" not in msg


def register_pages() -> int:
    """Shared anonymous mappings of a few pages: the machine's area for the virtio-mmio
    transports' register pages (one page per transport)."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            n += hi - lo <= 8 * 4096 and fields[1] == "rw-s" and "/dev/zero" in line
    return n


def test_a_closed_vm_unmaps_its_register_pages_at_once(kvm):
    if not kvm.check_extension(builder.B.KVM_CAP_READONLY_MEM):
        pytest.skip("no read-only memslots here: the transports map no register page")
    gc.disable()  # as for the RAM: not whenever the cyclic collector runs
    old = []      # a rebooting domain still holds the old VM while it builds the next
    try:
        before = register_pages()
        for _ in range(5):
            vm = builder.build_vm(builder.VmConfig(kernel="unused", memory=64 * MiB), lambda b: None, kvm=kvm,
                                  boot=False)
            assert register_pages() > before  # (the rng's at least)
            vm.close()
            old.append(vm)
            assert register_pages() == before
    finally:
        gc.enable()
