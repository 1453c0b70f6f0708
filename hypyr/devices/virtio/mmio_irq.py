"""A virtio-mmio transport's InterruptStatus and ConfigGeneration, and the line they drive.

The line is level triggered (``irq(level)``, follows InterruptStatus != 0) or edge triggered
(``trigger()``, once per raise, e.g. a KVM irqfd), in which case KVM may absorb the driver's
InterruptACK writes of INT_VRING into ``ack_eventfd``.  ``lock`` also guards the register
page's InterruptStatus and ConfigGeneration words.  docs/devices.md, "virtio-mmio transport".
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable

from hypyr.devices.bus import IrqLine

from .mmio_regs import CONFIG_GENERATION, INT_CONFIG, INT_VRING, INTERRUPT_STATUS

log = logging.getLogger("hypyr.dev.virtio_mmio")
_U32_LE = struct.Struct("<I")
_U32 = 0xFFFFFFFF


class MmioInterrupt:
    """InterruptStatus (what the device raised, less what the driver acknowledged), the bits
    kept set while a device's interrupts bypass us (``sticky``), and ConfigGeneration."""

    def __init__(self, name: str, irq: IrqLine | None = None, trigger: Callable[[], None] | None = None,
                 ack_eventfd: int | None = None):
        if (irq is None) == (trigger is None):
            raise ValueError("give the transport either a level-triggered irq line or an edge trigger")
        if ack_eventfd is not None and trigger is None:
            raise ValueError("InterruptACK writes can be absorbed only with an edge trigger")
        self._name = name
        self._irq = irq
        self._trigger = trigger
        self._ack_fd = ack_eventfd
        self.lock = threading.Lock()
        self.page: memoryview | None = None  # the transport's register page, if it has one
        self.status = 0
        self.sticky = 0   # INT_VRING while the device's used-buffer interrupts bypass us (vhost)
        self.generation = 0
        self._level = False

    def value(self) -> int:
        """What a read of InterruptStatus returns (an int read: no lock needed)."""
        return self.status | self.sticky

    def ack(self, bits: int) -> None:
        """The driver wrote ``bits`` to InterruptACK."""
        with self.lock:
            self.status &= ~bits
            self._publish_status()
            if self._trigger is None:
                self._update_line()

    def raise_bits(self, bits: int) -> None:
        """Set ``bits`` (INT_VRING, INT_CONFIG) in InterruptStatus and interrupt the driver."""
        with self.lock:
            self._absorb_acks()
            self.status |= bits
            self._publish_status()
            if self._trigger is None:
                self._update_line()
                return
        self._call_line(True)  # an edge: after the update, outside the lock

    def config_changed(self, driver_ok: bool) -> None:
        """Bump ConfigGeneration and, once the driver is up (``driver_ok``), raise INT_CONFIG."""
        with self.lock:
            self.generation = (self.generation + 1) & _U32
            if self.page is not None:
                _U32_LE.pack_into(self.page, CONFIG_GENERATION, self.generation)
        if driver_ok:
            self.raise_bits(INT_CONFIG)

    def clear(self) -> None:
        """A device reset: InterruptStatus 0 and the line lowered (:meth:`set_sticky` clears the rest)."""
        with self.lock:
            self._absorb_acks()
            self.status = 0
            self._update_line()

    def set_sticky(self, external: bool) -> None:
        """Keep INT_VRING set while the device's used-buffer interrupts reach the guest without
        us (``external``: vhost's call eventfd is the irqfd), so the driver always looks at its rings."""
        with self.lock:
            self.sticky = INT_VRING if external else 0
            self._publish_status()

    def snapshot(self) -> tuple[int, int]:
        """(InterruptStatus, ConfigGeneration) as a save holds them, absorbed ACKs applied."""
        with self.lock:
            self._absorb_acks()
            return self.status, self.generation

    def load(self, status: int, generation: int) -> None:
        """Restore both registers and drive the line to the restored level."""
        with self.lock:
            self.status, self.generation = status, generation
            self._level = status != 0
            self._call_line(self._level)

    def publish(self) -> None:
        """Write both registers into the register page, if there is one."""
        with self.lock:
            self._publish_status()
            if self.page is not None:
                _U32_LE.pack_into(self.page, CONFIG_GENERATION, self.generation)

    def _publish_status(self) -> None:  # with self.lock held
        if self.page is not None:
            _U32_LE.pack_into(self.page, INTERRUPT_STATUS, self.status | self.sticky)

    def _absorb_acks(self) -> None:  # with self.lock held
        """Apply the InterruptACK writes of INT_VRING that KVM absorbed since the last call.
        Called before every raise, so an acknowledgement never hides a later interrupt; a read
        may still show INT_VRING after the driver acknowledged it (one more look at its rings)."""
        if self._ack_fd is not None:
            try:
                os.eventfd_read(self._ack_fd)
            except BlockingIOError:
                return
            self.status &= ~INT_VRING
            self._publish_status()

    def _update_line(self) -> None:  # with self.lock held; level triggered only
        level = self.status != 0
        if level != self._level:
            self._level = level
            self._call_line(level)

    def _call_line(self, level: bool) -> None:
        try:
            if self._trigger is not None:
                if level:
                    self._trigger()
            else:
                assert self._irq is not None  # __init__: exactly one of irq and trigger
                self._irq(level)
        except Exception:
            log.exception("%s: interrupt (%s) failed", self._name, level)
