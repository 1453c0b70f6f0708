"""Reading and checking a saved virtio-mmio transport state (devices/state.py).

A saved state is untrusted input, like the guest: :func:`parse_saved` reads it, checks that it
fits the transport it is loaded into and is consistent (a StateError names what is wrong) and
returns the registers, the queues and the device's parsed state, without changing anything; the
transport then applies them under its lock (``VirtioMmioTransport.load_state``).
:data:`QUEUE_FIELDS` names what a save holds per queue.  Format: docs/save-restore.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypyr.devices.state import StateError, StateReader
from hypyr.memory import GuestMemory, GuestMemoryError

from .chain import DeviceError
from .device import VirtioDevice
from .mmio_regs import (
    INT_CONFIG,
    INT_VRING,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    features_acceptable,
)
from .queue import SplitQueue

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

# What a save holds of the transport (besides the device's own state): each register with its
# largest value or the bits it can have, and per queue, besides "ready", its registers and ring
# progress, named as SplitQueue's attributes (the free-running 16-bit indices; chains a device
# held are not saved: the restored queue starts with none in flight).
_REGISTERS = (("status", 0xFF), ("device_features_sel", _U32), ("driver_features", _U64),
              ("driver_features_sel", _U32), ("queue_sel", _U32), ("interrupt_status", INT_VRING | INT_CONFIG),
              ("config_generation", _U32))
QUEUE_FIELDS = (("size", _U32), ("desc_table", _U64), ("avail_ring", _U64), ("used_ring", _U64),
                ("last_avail", 0xFFFF), ("next_used", 0xFFFF), ("signalled_used", 0xFFFF))


def parse_saved(state: dict, where: str, kind: str, version: int, *, device: VirtioDevice, offered_features: int,
                queue_max_sizes: Sequence[int], mem: GuestMemory) -> tuple[dict, list[dict], object]:
    """Check ``state`` (StateError) against the transport named ``where``, whose ``device``
    offered ``offered_features`` and has queues of ``queue_max_sizes`` in ``mem``.  Returns the
    registers (by the names of a save), per queue its fields (:data:`QUEUE_FIELDS` and
    ``"ready"``) and what ``device.parse_state`` made of the device's own state."""
    r = StateReader(state, where, kind, version)
    if r.integer("device_id", 0, _U32) != device.device_id:
        raise StateError(f"{where}: the saved device is another kind of virtio device")
    if r.integer("device_features", 0, _U64) != offered_features:
        raise StateError(f"{where}: the saved device offered other features than this one (a different "
                         f"device configuration)")
    regs = {name: r.integer(name, 0, limit) for name, limit in _REGISTERS}
    irq = r.flag("irq")
    raw_queues = r.items("queues", len(queue_max_sizes), len(queue_max_sizes))
    device_state = device.parse_state(r.raw("device"))
    r.done()
    queues = [_parse_queue(where, i, raw) for i, raw in enumerate(raw_queues)]
    status = regs["status"]
    if irq != (regs["interrupt_status"] != 0):
        raise StateError(f"{where}: the saved line level does not follow from InterruptStatus")
    if status & STATUS_DRIVER_OK and not status & STATUS_FEATURES_OK:
        raise StateError(f"{where}: the saved status has DRIVER_OK without FEATURES_OK")
    if status & STATUS_FEATURES_OK and not features_acceptable(regs["driver_features"], offered_features):
        raise StateError(f"{where}: the saved driver features are not a subset of the offered ones "
                         f"with VERSION_1")
    if status & STATUS_DRIVER_OK and not status & STATUS_DEVICE_NEEDS_RESET:
        for i, qs in enumerate(queues):
            if qs["ready"]:
                _check_queue(where, i, qs, queue_max_sizes[i], mem)
    return regs, queues, device_state


def _parse_queue(where: str, i: int, raw: object) -> dict:
    q = StateReader(raw, f"{where}.queues[{i}]")
    fields = {name: q.integer(name, 0, limit) for name, limit in QUEUE_FIELDS}
    fields["ready"] = q.flag("ready")
    q.done()
    return fields


def _check_queue(where: str, i: int, qs: dict, max_size: int, mem: GuestMemory) -> None:
    """A queue the driver had running: its rings must lie in RAM, and no chain in flight."""
    probe = SplitQueue(max_size)
    probe.size, probe.desc_table, probe.avail_ring, probe.used_ring = (qs["size"], qs["desc_table"],
                                                                       qs["avail_ring"], qs["used_ring"])
    try:
        probe.validate(mem)
    except (DeviceError, GuestMemoryError) as e:
        raise StateError(f"{where}: saved queue {i}: {e}") from None
    if qs["last_avail"] != qs["next_used"]:
        raise StateError(f"{where}: saved queue {i} has chains in flight (last avail index "
                         f"{qs['last_avail']}, next used index {qs['next_used']})")
