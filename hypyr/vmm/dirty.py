"""Dirty-page tracking for live migration: KVM's dirty log of each RAM slot (the guest's writes)
joined with the pages the VMM wrote itself (docs/migration.md, "Live migration")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hypyr.kvm import B, KvmError

from .stream import PAGE

if TYPE_CHECKING:
    from .builder import LinuxVm

log = logging.getLogger("hypyr.migration")


_ALL_64 = (1 << 64) - 1


def bitmap_pages(bitmap: bytes, limit: int) -> list[int]:
    """Indices of the set bits of a KVM dirty bitmap (bit n of byte n // 8), below ``limit``."""
    out: list[int] = []
    for wi, w in enumerate(memoryview(bitmap).cast("Q")):  # KVM's bitmaps are whole 64-bit words
        if w == _ALL_64:  # a guest writing a buffer dirties whole words
            out.extend(range(wi * 64, wi * 64 + 64))
        elif w:
            base = wi * 64
            while w:
                low = w & -w
                out.append(base + low.bit_length() - 1)
                w ^= low
    return [i for i in out if i < limit] if out and out[-1] >= limit else out


class DirtyTracker:
    """The pages written since the last look: KVM's dirty log of each RAM slot (the guest's
    writes) with the pages the VMM wrote itself (GuestMemory's marks, lent views included)."""

    def __init__(self, vm: LinuxVm):
        self.machine = vm.machine
        self.on = False
        self._manual = False

    def start(self) -> None:
        m = self.machine
        vm = m.vm
        if vm.manual_dirty_log_protect_flags() & B.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            try:
                vm.enable_manual_dirty_log_protect()
                self._manual = True
            except KvmError as e:
                log.debug("manual dirty-log protection unavailable: %s", e)
        m.memory.start_dirty_tracking()
        self.on = True
        for slot in m.ram_slots:
            vm.set_dirty_logging(slot, True)

    def harvest(self) -> list[list[int]]:
        """Per RAM region, the sorted indices of the pages dirtied since the last call."""
        m = self.machine
        vmm = m.memory.take_dirty()
        out = []
        for slot, region, own in zip(m.ram_slots, m.memory.regions, vmm):
            bitmap = m.vm.get_dirty_log(slot)
            if self._manual:
                m.vm.clear_dirty_log(slot, 0, bitmap)
            pages = bitmap_pages(bitmap, region.size // PAGE)
            out.append(sorted(set(pages).union(own)) if own else pages)
        return out

    def stop(self) -> None:
        if not self.on:
            return
        self.on = False
        m = self.machine
        m.memory.stop_dirty_tracking()
        for slot in m.ram_slots:
            try:
                m.vm.set_dirty_logging(slot, False)
            except KvmError as e:  # a closed VM: nothing to undo
                log.debug("dirty logging off for slot %d: %s", slot, e)


def merge_dirty(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per RAM region, the pages dirty in ``a`` or ``b``."""
    return [sorted(set(x).union(y)) for x, y in zip(a, b)]
