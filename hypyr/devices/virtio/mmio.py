"""The virtio-mmio transport, version 2 ("modern", virtio 1.2 §4.2), as a bus device.

Register it on the MMIO bus with length :data:`MMIO_WINDOW`; its interrupt is level triggered
(``irq``) or edge triggered (``trigger``, e.g. a KVM irqfd).  Everything the driver writes is
untrusted: accesses it does not take are logged (rate-limited) and ignored, and a queue or device
error puts the device in DEVICE_NEEDS_RESET.  InterruptStatus and the line are
:mod:`.mmio_irq`'s; its lock is always taken after ``_lock``, never before, and ``irq`` must not
call back into the transport.  The register map is
:mod:`.mmio_regs`; a saved state is checked by :mod:`.mmio_state` before :meth:`load_state` applies it.
Design notes (registers, status machine, interrupts, threading): docs/devices.md, "virtio-mmio transport".
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

from hypyr.devices.bus import IrqLine
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import StateError
from hypyr.memory import GuestMemory

from .chain import DeviceError
from .device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VirtioDevice
from .mmio_irq import MmioInterrupt
from .mmio_regs import (
    CONFIG,
    CONFIG_GENERATION,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DEVICE_ID,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    INT_CONFIG,
    INT_VRING,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC,
    MAGIC_VALUE,
    MMIO_VERSION,
    MMIO_WINDOW,
    PAGE_REGISTERS,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY_OFFSET,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    SHM_BASE_HIGH,
    SHM_BASE_LOW,
    SHM_LEN_HIGH,
    SHM_LEN_LOW,
    SHM_SEL,
    STATUS,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    TRANSPORT_FEATURES,
    VENDOR,
    VENDOR_ID,
    VERSION,
    features_acceptable,
)
from .mmio_state import QUEUE_FIELDS, parse_saved
from .queue import SplitQueue

log = logging.getLogger("hypyr.dev.virtio_mmio")
_U32_LE = struct.Struct("<I")
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


class VirtioMmioTransport:
    """A virtio device behind a version-2 virtio-mmio register window."""

    LENGTH = MMIO_WINDOW

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: IrqLine | None = None, *,
                 trigger: Callable[[], None] | None = None, ack_eventfd: int | None = None):
        self.device = device
        self.mem = mem
        self._name = f"virtio-mmio({getattr(device, 'name', 'virtio')})"
        self._intr = MmioInterrupt(self._name, irq, trigger, ack_eventfd)
        self._rlog = RateLimitedLog(log)  # every line the driver can cause; fixed keys
        self._lock = threading.Lock()  # taken before self._intr.lock, never after
        self.queues = [SplitQueue(m) for m in device.queue_max_sizes]
        self.offered_features = (device.device_features() | TRANSPORT_FEATURES) & _U64
        if hasattr(device, "on_config_change"):
            device.on_config_change = self.config_changed
        self._page: memoryview | None = None  # see use_register_page()
        self._epoch = 0  # bumped by every reset: stale errors from before it are dropped
        self._quiesced = False  # save/restore: notifications are not forwarded (see quiesce())
        self._notifying = 0  # notifications being handled by the device right now
        self._idle = threading.Condition(self._lock)  # _notifying dropped to 0 while quiesced
        self._clear_registers()

    def _clear_registers(self) -> None:
        self._status = 0
        self._device_features_sel = 0
        self._driver_features = 0
        self._driver_features_sel = 0
        self._queue_sel = 0

    # ------------------------------------------------------------------ bus interface
    def read(self, offset: int, size: int) -> bytes:
        if offset == INTERRUPT_STATUS and size == 4:  # the hot one: read in every interrupt handler
            return _U32_LE.pack(self._intr.value())
        if size <= 0:
            return b""
        if offset < 0 or offset + size > MMIO_WINDOW:
            self._rlog.debug("read-outside", "%s: read of %d bytes at %#x outside the window",
                             self._name, size, offset)
            return bytes(size)
        if offset >= CONFIG:
            with self._lock:
                return self._config_read(offset - CONFIG, size)
        if size != 4 or offset % 4:
            self._rlog.debug("narrow-read", "%s: ignored %d-byte read at %#x (registers take aligned "
                             "32-bit reads)", self._name, size, offset)
            return bytes(size)
        with self._lock:
            value = self._read_register(offset)
        return _U32_LE.pack(value & _U32)

    def write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        size = len(data)
        if size == 0:
            return
        if offset < 0 or offset + size > MMIO_WINDOW:
            self._rlog.debug("write-outside", "%s: write of %d bytes at %#x outside the window",
                             self._name, size, offset)
            return
        if offset >= CONFIG:
            with self._lock:
                self._config_write(offset - CONFIG, data)
                self._publish()
            return
        if size != 4 or offset % 4:
            self._rlog.debug("narrow-write", "%s: ignored %d-byte write at %#x (registers take aligned "
                             "32-bit writes)", self._name, size, offset)
            return
        value = _U32_LE.unpack(data)[0]
        if offset == INTERRUPT_ACK:  # the other hot one
            self._intr.ack(value)
            return
        if offset == QUEUE_NOTIFY_OFFSET:
            self.notify(value)  # without the lock: the device may block or call back
            return
        with self._lock:
            self._write_register(offset, value)
            self._publish()

    # ------------------------------------------------------------------ register page
    def use_register_page(self, page: memoryview) -> None:
        """Keep ``page`` (one window's bytes) holding what a read of each register and of the
        config space returns, from now on (InterruptStatus and the status are updated by
        whichever thread changes them, everything else after each register write).  The VMM
        maps it read-only over the window (a read-only KVM memslot): the driver's reads, above
        all the read of InterruptStatus in every interrupt handler, are then plain memory reads
        with no exit, while its writes still exit (or hit an ioeventfd) and reach :meth:`write`.
        Narrow or unaligned register reads then see the register's bytes instead of zeros."""
        if len(page) != MMIO_WINDOW:
            raise ValueError(f"a register page is {MMIO_WINDOW} bytes, not {len(page)}")
        with self._lock:
            self._page = page
            with self._intr.lock:
                self._intr.page = page
            self._publish()

    def release_register_page(self) -> None:
        """Stop writing the register page (before its owner unmaps it)."""
        with self._lock, self._intr.lock:
            self._page = self._intr.page = None

    def _publish(self) -> None:  # with self._lock held, self._intr.lock not
        page = self._page
        if page is None:
            return
        for off in PAGE_REGISTERS:
            _U32_LE.pack_into(page, off, self._read_register(off) & _U32)
        config = self._config_read(0, MMIO_WINDOW - CONFIG)
        page[CONFIG:] = config
        self._intr.publish()

    # ------------------------------------------------------------------ notifications
    def notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index`` (QueueNotify write, or the
        VMM's ioeventfd thread).  Never raises."""
        with self._lock:
            epoch = self._epoch
            status = self._status
            if self._quiesced:  # resume() looks at every queue once
                self._rlog.debug("notify-quiesced", "%s: notify(%d) while quiesced left for resume",
                                 self._name, index)
                return
            if not status & STATUS_DRIVER_OK or status & STATUS_DEVICE_NEEDS_RESET:
                self._rlog.debug("notify-ignored", "%s: notify(%d) ignored in status %#x",
                                 self._name, index, status)
                return
            if not 0 <= index < len(self.queues) or not self.queues[index].ready:
                self._rlog.debug("notify-ignored", "%s: notify of queue %d, which is not active, ignored",
                                 self._name, index)
                return
            self._notifying += 1
        try:
            self.device.queue_notify(index)
        except DeviceError as e:
            self._rlog.warning("notify-error", "%s: queue %d: %s; device needs reset", self._name, index, e)
            self._enter_needs_reset(epoch)
        except Exception:
            self._rlog.exception("notify-bug", "%s: device failed handling a notification of queue %d; "
                       "device needs reset", self._name, index)
            self._enter_needs_reset(epoch)
        finally:
            with self._lock:
                self._notifying -= 1
                if self._quiesced:
                    self._idle.notify_all()

    def _interrupt(self, queue_index: int) -> None:
        """Called by the device (any thread) after adding used buffers to queue ``queue_index``:
        raises the used-buffer interrupt if the queue's notification suppression allows it."""
        if not 0 <= queue_index < len(self.queues):
            log.debug("%s: interrupt for unknown queue %d ignored", self._name, queue_index)
            return
        try:
            wanted = self.queues[queue_index].needs_interrupt()
        except Exception as e:  # the driver's ring is unreadable: it is its own loss
            self._rlog.debug("interrupt-decision", "%s: queue %d: cannot decide on an interrupt: %s",
                             self._name, queue_index, e)
            wanted = True
        if wanted:
            self._intr.raise_bits(INT_VRING)

    def config_changed(self) -> None:
        """For the device: its config space changed.  Bumps ConfigGeneration and, once the
        driver is up, raises the configuration-change interrupt."""
        driver_ok = bool(self._status & STATUS_DRIVER_OK)  # a racy read is fine: one interrupt more or less
        self._intr.config_changed(driver_ok)
        if self._page is not None:
            config = self._config_read(0, MMIO_WINDOW - CONFIG)
            with self._intr.lock:  # (release_register_page holds it too)
                if self._page is not None:
                    self._page[CONFIG:] = config

    def _enter_needs_reset(self, epoch: int | None = None) -> None:
        """Set DEVICE_NEEDS_RESET and raise the configuration-change interrupt.  ``epoch`` is the
        reset epoch the error belongs to; if the driver has reset the device since, drop it."""
        if epoch is None:
            self._set_needs_reset()
            return
        with self._lock:
            if epoch != self._epoch:
                self._rlog.debug("stale-error", "%s: error from before a device reset dropped", self._name)
                return
            self._set_needs_reset()

    def _set_needs_reset(self) -> None:  # with self._lock held
        if self._status & STATUS_DEVICE_NEEDS_RESET:
            return
        self._status |= STATUS_DEVICE_NEEDS_RESET
        self._intr.raise_bits(INT_CONFIG)
        self._publish()

    # ------------------------------------------------------------------ config space
    def _config_read(self, offset: int, size: int) -> bytes:
        try:
            data = bytes(self.device.config_read(offset, size))
        except Exception:
            self._rlog.exception("config-bug", "%s: config read of %d bytes at %#x failed",
                       self._name, size, offset)
            return bytes(size)
        if len(data) != size:
            self._rlog(logging.ERROR, "config-bug", "%s: device returned %d bytes for a %d-byte config read",
                       self._name, len(data), size)
            data = (data + bytes(size))[:size]
        return data

    def _config_write(self, offset: int, data: bytes) -> None:
        try:
            self.device.config_write(offset, data)
        except DeviceError as e:
            self._rlog.warning("config-error", "%s: config write at %#x: %s; device needs reset",
                               self._name, offset, e)
            self._set_needs_reset()
        except Exception:
            self._rlog.exception("config-bug", "%s: config write of %d bytes at %#x failed",
                       self._name, len(data), offset)

    # ------------------------------------------------------------------ registers
    def _selected_queue(self) -> SplitQueue | None:
        sel = self._queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC:
            return MAGIC_VALUE
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            sel = self._device_features_sel
            return (self.offered_features >> (32 * sel)) & _U32 if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            q = self._selected_queue()
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            q = self._selected_queue()
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self._intr.value()
        if offset == STATUS:
            return self._status
        if offset == CONFIG_GENERATION:
            return self._intr.generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return _U32  # no shared memory regions: length (and base) -1
        self._rlog.debug("reserved-read", "%s: read of write-only or reserved register %#x", self._name, offset)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        """The registers but InterruptACK and QueueNotify (:meth:`write` takes those, lock-free)."""
        if offset == DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self._queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                        QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            self._write_queue_register(offset, value)
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            pass  # no regions; reads of SHMLen/SHMBase say so whatever is selected
        else:
            self._rlog.debug("reserved-write", "%s: write %#x to read-only or reserved register %#x ignored",
                             self._name, value, offset)

    def _write_driver_features(self, value: int) -> None:
        if self._status & STATUS_FEATURES_OK:
            self._rlog.debug("features-write", "%s: DriverFeatures write after FEATURES_OK ignored", self._name)
            return
        sel = self._driver_features_sel
        if sel >= 2:
            if value:
                self._rlog.debug("features-write", "%s: driver features %#x in word %d (none offered) ignored",
                                 self._name, value, sel)
            return
        shift = 32 * sel
        self._driver_features = (self._driver_features & ~(_U32 << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            self._rlog.debug("queue-write", "%s: write to queue register %#x of missing queue %d ignored",
                             self._name, offset, self._queue_sel)
            return
        if self._status & STATUS_DRIVER_OK:
            self._rlog.debug("queue-write", "%s: queue %d register %#x write after DRIVER_OK ignored",
                             self._name, self._queue_sel, offset)
            return
        if offset == QUEUE_READY:
            if value not in (0, 1):
                self._rlog.debug("queue-write", "%s: QueueReady write %#x ignored", self._name, value)
                return
            q.ready = bool(value)
            return
        if q.ready:
            self._rlog.debug("queue-write", "%s: queue %d register %#x write while the queue is ready "
                             "ignored", self._name, self._queue_sel, offset)
            return
        if offset == QUEUE_NUM:
            q.size = value
            return
        attr = {QUEUE_DESC_LOW: "desc_table", QUEUE_DESC_HIGH: "desc_table",
                QUEUE_DRIVER_LOW: "avail_ring", QUEUE_DRIVER_HIGH: "avail_ring",
                QUEUE_DEVICE_LOW: "used_ring", QUEUE_DEVICE_HIGH: "used_ring"}[offset]
        shift = 32 if offset & 4 else 0
        old = getattr(q, attr)
        setattr(q, attr, (old & ~(_U32 << shift)) | (value << shift))

    # ------------------------------------------------------------------ status state machine
    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self._status
        new = (value & 0xFF & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
        if value & ~0xFF or old & ~new:
            self._rlog.debug("status-write", "%s: status write %#x would clear bits of %#x; ignored",
                             self._name, value, old)
            return
        added = new & ~old
        if added & STATUS_FEATURES_OK and not self._features_acceptable():
            self._rlog.warning("features-refused", "%s: driver features %#x refused (offered %#x, "
                               "VERSION_1 required)", self._name, self._driver_features, self.offered_features)
            new &= ~STATUS_FEATURES_OK
            added &= ~STATUS_FEATURES_OK
        if added & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            self._rlog.warning("driver-ok-early", "%s: DRIVER_OK without FEATURES_OK ignored", self._name)
            new &= ~STATUS_DRIVER_OK
            added &= ~STATUS_DRIVER_OK
        self._status = new
        if added & STATUS_DRIVER_OK and not new & STATUS_DEVICE_NEEDS_RESET:
            self._activate()

    def _features_acceptable(self) -> bool:
        return features_acceptable(self._driver_features, self.offered_features)

    def _activate(self) -> bool:
        """DRIVER_OK: validate and activate the ready queues, then the device.  On failure set
        NEEDS_RESET and leave every queue inactive.  Returns whether the device is running."""
        features = self._driver_features
        event_idx = bool(features & VIRTIO_F_RING_EVENT_IDX)
        indirect = bool(features & VIRTIO_F_RING_INDIRECT_DESC)
        try:
            for i, q in enumerate(self.queues):
                if q.ready:
                    try:
                        q.validate(self.mem)
                    except DeviceError as e:
                        raise DeviceError(f"queue {i}: {e}") from None
            for q in self.queues:
                if q.ready:
                    q.activate(self.mem, event_idx=event_idx, indirect=indirect)
            self.device.activate(self.mem, list(self.queues), features, self._interrupt)
            self._intr.set_sticky(getattr(self.device, "external_used_interrupts", False))
            self._rlog.debug("activated", "%s: activated (features %#x, queues ready %s)", self._name,
                             features, [i for i, q in enumerate(self.queues) if q.ready])
            return True
        except DeviceError as e:
            self._rlog.warning("activate-error", "%s: activation failed: %s; device needs reset",
                               self._name, e)
        except Exception:
            self._rlog.exception("activate-bug", "%s: device activation failed; device needs reset",
                       self._name)
        self._reset_device_and_queues()
        self._set_needs_reset()
        return False

    def _reset_device_and_queues(self) -> None:
        self._intr.set_sticky(False)
        try:
            self.device.reset()
        except Exception:
            self._rlog.exception("reset-bug", "%s: device reset failed", self._name)
        for q in self.queues:
            q.reset()

    def _reset(self) -> None:  # with self._lock held
        self._epoch += 1
        self._reset_device_and_queues()
        self._clear_registers()
        self._intr.clear()
        self._publish()

    def report(self) -> dict:
        """The device status, InterruptStatus, each queue's indices and what the device holds,
        for `hypyr info DOMAIN --queues`; read without locks, nothing changes."""
        return {"device": self.device.name, "status": self._status, "interrupt_status": self._intr.value(),
                "queues": [q.indices() for q in self.queues], **self.device.report()}

    # ------------------------------------------------------------------ snapshot
    def registers(self) -> dict:
        """The transport's registers (as a save holds them, with the not-readable ones such as
        the driver's features) and per queue its registers and ring progress."""
        with self._lock:
            isr, gen = self._intr.snapshot()
            queues = [{"ready": q.ready, **{name: getattr(q, name) for name, _ in QUEUE_FIELDS}}
                      for q in self.queues]
            return {"status": self._status, "device_features_sel": self._device_features_sel,
                    "driver_features": self._driver_features, "driver_features_sel": self._driver_features_sel,
                    "queue_sel": self._queue_sel, "interrupt_status": isr, "config_generation": gen,
                    "queues": queues}

    def _load_locked(self, regs: dict, queues: list[dict], load_device: Callable[[], None]) -> None:
        """Reset the device, ``load_device()`` (its own state), load the checked registers and
        queues and reactivate.  With ``self._lock`` held."""
        self._epoch += 1
        self._reset_device_and_queues()
        load_device()
        status = regs["status"]
        self._status = status
        self._device_features_sel = regs["device_features_sel"]
        self._driver_features = regs["driver_features"]
        self._driver_features_sel = regs["driver_features_sel"]
        self._queue_sel = regs["queue_sel"]
        for q, qs in zip(self.queues, queues):
            q.ready = qs["ready"]
            for name, _ in QUEUE_FIELDS:
                setattr(q, name, qs[name])
        self._intr.load(regs["interrupt_status"], regs["config_generation"])
        if status & STATUS_DRIVER_OK and not status & STATUS_DEVICE_NEEDS_RESET:
            self._activate()  # keeps the ring progress just loaded; on failure: NEEDS_RESET
        self._publish()

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    STATE_KIND = "virtio-mmio"
    STATE_VERSION = 1

    def _running(self) -> bool:  # with self._lock held
        return bool(self._status & STATUS_DRIVER_OK) and not self._status & STATUS_DEVICE_NEEDS_RESET

    def quiesce(self) -> None:
        """Stop forwarding notifications (the ones that arrive meanwhile are made up for by
        :meth:`resume`), wait for those the device is handling, then quiesce the device: it
        finishes or hands back every chain it holds.  A driver error the device keeps for the
        next notification puts the device in NEEDS_RESET now.  Call with the vCPUs paused."""
        with self._lock:
            self._quiesced = True
            self._idle.wait_for(lambda: self._notifying == 0)
        self.device.quiesce()
        error = self.device.pending_error()
        if error is not None:  # it would have put the device in NEEDS_RESET at the next notify
            with self._lock:
                if self._running():
                    self._rlog.warning("notify-error", "%s: %s; device needs reset", self._name, error)
                    self._set_needs_reset()

    def resume(self) -> None:
        """Forward notifications again, resume the device and look at every active queue once
        (a notification may have been left over while quiesced, or lost with the old VM)."""
        with self._lock:
            self._quiesced = False
        self.device.resume()
        with self._lock:
            running = self._running()
            # vhost may have started (or not) again: see _activate
            self._intr.set_sticky(running and getattr(self.device, "external_used_interrupts", False))
            ready = [i for i, q in enumerate(self.queues) if q.ready] if running else []
        for i in ready:
            self.notify(i)

    def save_state(self) -> dict:
        """Registers, per queue its registers and ring progress, InterruptStatus, ConfigGeneration
        and the line level, and the device's own state under ``"device"``.  Only after
        :meth:`quiesce`; no chain may then be in flight (StateError otherwise)."""
        with self._lock:
            if not self._quiesced:
                raise StateError(f"{self._name}: the device must be quiesced before it is saved")
            if self._running():
                for i, q in enumerate(self.queues):
                    if q.ready and (q.in_flight or q.last_avail != q.next_used):
                        raise StateError(f"{self._name}: queue {i} still has chains in flight after quiesce "
                                         f"(a device bug)")
        regs = self.registers()
        return {"kind": self.STATE_KIND, "v": self.STATE_VERSION, "device_id": self.device.device_id,
                "device_features": self.offered_features, **regs, "irq": regs["interrupt_status"] != 0,
                "device": self.device.save_state()}

    def load_state(self, state: dict) -> None:
        """Check everything (StateError), then load: the device is reset, gets its own state and,
        if the driver had it running, is reactivated with every queue where it stopped.  The
        line is driven to the restored level.  Leaves transport and device quiesced."""
        regs, queues, device_state = parse_saved(
            state, self._name, self.STATE_KIND, self.STATE_VERSION, device=self.device,
            offered_features=self.offered_features, queue_max_sizes=[q.max_size for q in self.queues], mem=self.mem)

        def load_device() -> None:
            self.device.apply_state(device_state)

        with self._lock:
            self._quiesced = True
            self._load_locked(regs, queues, load_device)
