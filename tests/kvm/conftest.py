"""Fixtures for the host-KVM tests: they run tiny guests on this host's /dev/kvm.

Every test in this directory is skipped when /dev/kvm cannot be opened (or is unusable),
except those marked ``no_kvm``.  Guests must not depend on how KVM runs them: the same
tests pass on hardware virtualisation, on kvm_pvm (which emulates non-PVM guests) and in
the nested lab (emulated AMD SVM).
"""

from __future__ import annotations

import pytest

from hypyr.kvm import Kvm, KvmUnavailable
from hypyr.memory import GuestMemory
from hypyr.vmm.machine import Machine
from hypyr.vmm.stop import StopKind, StopReason

MiB = 1 << 20


def pytest_configure(config):
    config.addinivalue_line("markers", "no_kvm: a tests/kvm test that runs without /dev/kvm")


@pytest.fixture(scope="session")
def kvm():
    try:
        k = Kvm()
    except KvmUnavailable as e:
        pytest.skip(f"/dev/kvm is not usable here: {e}")
    yield k
    k.close()


@pytest.fixture(autouse=True)
def _require_kvm(request):
    if request.node.get_closest_marker("no_kvm") is None:
        request.getfixturevalue("kvm")


@pytest.fixture
def make_machine(kvm):
    """``make_machine(layout=[(0, 1 MiB)], nr_vcpus=1, irqchip=False)`` -> a Machine, torn down after the test."""
    machines: list[Machine] = []

    def make(layout=((0, MiB),), nr_vcpus: int = 1, *, irqchip: bool = False) -> Machine:
        memory = GuestMemory.anonymous(layout, hugepages=False)
        try:
            m = Machine(memory, nr_vcpus, irqchip=irqchip, kvm=kvm)
        except BaseException:
            memory.close()
            raise
        machines.append(m)
        return m

    yield make
    for m in machines:
        m.stop(StopReason(StopKind.DESTROYED, "test teardown"))
        if m.wait(10) is not None:
            m.close()
        # else a vCPU thread is stuck in KVM_RUN: leak the machine rather than close fds under it
