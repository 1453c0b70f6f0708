"""virtio-console (virtio 1.2 §5.3): a single-port console (no MULTIPORT), e.g. Linux's hvc0.

Queue 0 carries host input to the guest (kept in a bounded buffer until the driver has room),
queue 1 the guest's output to ``out`` (in bounded chunks).  The queues, the config space, the
threading and how protocol violations are reported: docs/devices.md, "virtio-console".
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import cast

from hypyr.devices.overflow import OverflowLog
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import StateError, StateReader
from hypyr.memory import GuestMemory

from .chain import DeviceError
from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .queue import SplitQueue

log = logging.getLogger("hypyr.dev.virtio-console")

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 256

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

COLS = 80
ROWS = 25
RX_BUFFER_SIZE = 64 * 1024
TX_CHUNK = 64 * 1024

_CONFIG = struct.pack("<HHII", COLS, ROWS, 0, 0)
_EMERG_WR = 8


class VirtioConsole(VirtioDevice):
    """virtio console, single port.  ``out`` receives the guest's output bytes."""

    device_id = VIRTIO_ID_CONSOLE
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-console"
    state_kind = "virtio-console"

    def __init__(self, out: Callable[[bytes], object]):
        super().__init__()
        self._out = out
        self._lock = threading.Lock()      # receive side, queues, lifecycle
        self._tx_lock = threading.Lock()   # serializes transmission (keeps output in order)
        self._rx = bytearray()
        self._rx_error: str | None = None  # a receive-queue violation found off the notify path
        self._overflow = OverflowLog(log, "virtio-console", RX_BUFFER_SIZE)
        self._rlog = RateLimitedLog(log)  # every line the driver can cause; fixed keys

    # ------------------------------------------------------------------ VirtioDevice interface
    def device_features(self) -> int:
        return (1 << VIRTIO_CONSOLE_F_SIZE) | (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)

    def config_read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset < 0:
            return bytes(size)
        return _CONFIG[offset:offset + size].ljust(size, b"\0")

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == _EMERG_WR and data:
            with self._tx_lock:
                self._emit(bytes(data[:1]))
        else:
            self._rlog.debug("config-write", "virtio-console: config write of %d bytes at %#x ignored",
                             len(data), offset)

    def activate(self, mem: GuestMemory, queues: list[SplitQueue], driver_features: int,
                 interrupt: Callable[[int], None]) -> None:
        if len(queues) != 2:
            raise DeviceError(f"virtio-console has two queues, activated with {len(queues)}")
        with self._lock:
            self._rx_error = None
            super().activate(mem, queues, driver_features, interrupt)

    def on_activate(self) -> None:
        self._deliver_locked()  # called from activate() with the lock held

    def reset(self) -> None:
        with self._tx_lock, self._lock:
            super().reset()
            self._rx_error = None

    def queue_notify(self, index: int) -> None:
        with self._lock:
            if self._quiesced:
                return  # the transport looks at every queue again on resume
            if self._rx_error is not None:  # report it now that we are on the transport's path
                raise DeviceError(self._rx_error)
        if index == RECEIVEQ:
            with self._lock:
                self._deliver_locked(raise_errors=True)
        elif index == TRANSMITQ:
            self._transmit()
        else:
            self._rlog.debug("notify", "virtio-console: notify for nonexistent queue %d ignored", index)

    # ------------------------------------------------------------------ host side
    def input_room(self) -> int:
        """How many bytes :meth:`enqueue_input` would accept right now."""
        with self._lock:
            return 0 if self._quiesced else RX_BUFFER_SIZE - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes from the host console for the guest; returns how many were accepted.
        Bytes beyond the buffer bound are dropped (logged once until the buffer drains).  While
        quiesced nothing is accepted (and nothing dropped): the caller keeps it."""
        data = bytes(data)
        if not data:
            return 0
        with self._lock:
            if self._quiesced:
                return 0
            take = min(RX_BUFFER_SIZE - len(self._rx), len(data))
            self._rx += data[:take]
            self._deliver_locked()
            verdict = self._overflow.note(len(data), take, len(self._rx))
        self._overflow.emit(*verdict)
        return take

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    def quiesce(self) -> None:
        """Deliver no input and take no new input until :meth:`resume`; the input not yet
        delivered is saved.  (Transmission runs only on notifications, which the transport has
        stopped and waited for.)"""
        with self._tx_lock, self._lock:
            self._quiesced = True

    def resume(self) -> None:
        with self._lock:
            self._quiesced = False
            self._deliver_locked()

    def pending_error(self) -> str | None:
        with self._lock:
            return self._rx_error

    def _state_fields(self) -> dict:
        """The config the guest sees (checked on load) and the input not yet delivered."""
        with self._lock:
            return {"cols": COLS, "rows": ROWS, "rx": bytes(self._rx)}

    def _parse_fields(self, r: StateReader) -> bytes:
        if (r.integer("cols", 0, 0xFFFF), r.integer("rows", 0, 0xFFFF)) != (COLS, ROWS):
            raise StateError("virtio-console: the saved console has another size")
        return r.blob("rx", RX_BUFFER_SIZE)

    def apply_state(self, parsed: object) -> None:
        with self._lock:
            self._quiesced = True
            self._rx = bytearray(cast(bytes, parsed))  # what _parse_fields returned

    # ------------------------------------------------------------------ internals
    def _signal(self, index: int) -> None:
        try:
            self.signal_used(index)
        except Exception:
            log.exception("virtio-console: interrupt callback failed")

    def _deliver_locked(self, raise_errors: bool = False) -> None:
        """Copy pending input into available receive buffers.  Lock held."""
        if (not self._rx or len(self.queues) != 2 or self.mem is None or self._rx_error is not None
                or self._quiesced):
            return
        queue, mem = self.queues[RECEIVEQ], self.mem
        used = False
        try:
            while self._rx:
                chain = queue.pop()
                if chain is None:
                    break
                n = min(chain.writable_len, len(self._rx))
                if chain.writable_len == 0:
                    self._rlog.warning("rx-readonly", "virtio-console: receive buffer with no device-writable "
                                       "space (head %d); returned unused", chain.head)
                if n:
                    chain.write(mem, self._rx[:n])
                    del self._rx[:n]
                queue.add_used(chain.head, n)
                used = True
        except DeviceError as e:
            if raise_errors:
                raise
            self._rx_error = f"receive queue: {e}"
            self._rlog(logging.ERROR, "rx-broken", "virtio-console: receive queue broken (%s); input held "
                       "until the device is reset", e)
        finally:
            if used:
                self._signal(RECEIVEQ)

    def _emit(self, data: bytes) -> None:
        """Hand bytes to ``out``.  Transmit lock held."""
        try:
            self._out(data)
        except Exception:
            # as often as the guest writes: rate-limited too
            self._rlog.exception("out-failed", "virtio-console: output callback failed; %d bytes dropped",
                       len(data))

    def _transmit(self) -> None:
        with self._tx_lock:
            with self._lock:
                if len(self.queues) != 2 or self.mem is None:
                    return
                queue, mem = self.queues[TRANSMITQ], self.mem
            used = False
            try:
                while True:
                    chain = queue.pop()  # QueueError propagates to the transport
                    if chain is None:
                        break
                    if chain.writable:
                        self._rlog.warning("tx-writable", "virtio-console: transmit chain (head %d) has "
                                           "device-writable buffers; they are ignored", chain.head)
                    total = chain.readable_len
                    pos = 0
                    while pos < total:
                        n = min(TX_CHUNK, total - pos)
                        self._emit(chain.read(mem, n, pos))
                        pos += n
                    queue.add_used(chain.head, 0)
                    used = True
            finally:
                if used:
                    self._signal(TRANSMITQ)
