"""The interface between the virtio-mmio transport and a device model.

A device knows nothing of MMIO or KVM: it declares its id, queues and feature bits, serves its
config space, and is handed its queues, guest memory and an interrupt callback when the driver
sets DRIVER_OK.  A device that finds the driver misbehaving raises :class:`DeviceError`; the
transport then sets DEVICE_NEEDS_RESET and raises a config-change interrupt.

Save/restore (:mod:`hypyr.devices.state`): the transport is what the VMM saves; its state holds
its device's, which the device produces and checks through the hooks at the end of
:class:`VirtioDevice` (``quiesce``/``resume``, ``save_state``, ``parse_state``/``apply_state``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypyr.devices.state import StateReader
from hypyr.memory import GuestMemory

from .chain import DeviceError  # noqa: F401  (part of this interface)
from .queue import SplitQueue

# Device-independent feature bits (virtio 1.2 §6)
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

# Device ids (virtio 1.2 §5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19


class VirtioDevice:
    """Base class.  Subclasses set ``device_id`` and ``queue_max_sizes`` and override the hooks."""

    device_id: int = 0
    queue_max_sizes: Sequence[int] = (256,)
    name: str = "virtio"
    state_kind: str = "virtio"  # "kind" of the saved state: one per device model
    STATE_VERSION = 1

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.queues: list[SplitQueue] = []
        self.driver_features = 0
        self._interrupt: Callable[[int], None] | None = None
        self._quiesced = False  # see quiesce()

    # -- declared by the device -----------------------------------------------------------------
    def device_features(self) -> int:
        """Device-specific feature bits (the transport adds VERSION_1, INDIRECT_DESC, EVENT_IDX)."""
        return 0

    def config_read(self, offset: int, size: int) -> bytes:
        """Read from the device-specific config space; out-of-range reads return zeros."""
        return bytes(size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Write to the config space (most devices ignore this)."""

    # -- lifecycle, called by the transport -------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: list[SplitQueue], driver_features: int,
                 interrupt: Callable[[int], None]) -> None:
        """DRIVER_OK: the queues are validated and ready.  ``interrupt(queue_index)`` signals
        used buffers for that queue (it applies the queue's notification suppression itself)."""
        self.mem, self.queues, self.driver_features, self._interrupt = mem, queues, driver_features, interrupt
        self.on_activate()

    def on_activate(self) -> None:
        pass

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index`` (called from the notifying
        thread: a vCPU on an MMIO exit, or an I/O thread with ioeventfd).  Raise DeviceError
        on protocol violations."""

    def reset(self) -> None:
        """Device reset (status written 0, or NEEDS_RESET recovery): stop all work, forget queues."""
        self.mem, self.queues, self.driver_features, self._interrupt = None, [], 0, None

    # -- helpers for subclasses -------------------------------------------------------------------
    def signal_used(self, index: int) -> None:
        if self._interrupt is not None:
            self._interrupt(index)

    def report(self) -> dict:
        """What the device holds for the guest now, beyond its queues (`hypyr info DOMAIN
        --queues`); read without locks."""
        return {}

    # -- save/restore (hypyr/devices/state.py), called by the transport ---------------------------
    def quiesce(self) -> None:
        """The transport forwards no notifications any more (and waited for those in progress):
        finish every request in flight, or hand its chains back (:meth:`SplitQueue.unpop`), and
        take no work from the host side until :meth:`resume`.  Afterwards no queue has a chain
        in flight.  Raise StateError if that cannot be done."""
        self._quiesced = True

    def resume(self) -> None:
        """Take work again (the transport then looks at every queue once)."""
        self._quiesced = False

    def pending_error(self) -> str | None:
        """A driver error the device found off the notify path and keeps for the next notify
        (:meth:`quiesce` does not wait for that: the transport enters NEEDS_RESET at once)."""
        return None

    def save_state(self) -> dict:
        """The device's own state (after :meth:`quiesce`): config that the guest sees or sets and
        what the device holds for the guest; not the queues (the transport saves those)."""
        return {"kind": self.state_kind, "v": self.STATE_VERSION, **self._state_fields()}

    def parse_state(self, state: object) -> object:
        """Check ``state`` (a StateError for anything wrong, including a state that does not fit
        this device's configuration) and return what :meth:`apply_state` takes; changes nothing."""
        r = StateReader(state, self.state_kind, self.state_kind, self.STATE_VERSION)
        parsed = self._parse_fields(r)
        r.done()
        return parsed

    def apply_state(self, parsed: object) -> None:
        """Load what :meth:`parse_state` returned into this reset device, before it is activated
        again; leaves the device quiesced."""
        self._quiesced = True

    def load_state(self, state: dict) -> None:
        """:meth:`parse_state` then :meth:`apply_state` (the transport's ``load_state`` does this
        between its own checks and the reactivation)."""
        self.apply_state(self.parse_state(state))

    def _state_fields(self) -> dict:
        return {}

    def _parse_fields(self, r: StateReader) -> object:
        return None
