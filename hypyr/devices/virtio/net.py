"""virtio-net (virtio 1.2 §5.1) over a TAP device: device id 1, queues receiveq (0) and transmitq (1).

The TAP carries the guest's own 12-byte ``virtio_net_hdr_v1`` (IFF_VNET_HDR), so offloads pass
through.  The userspace data path runs on the I/O thread (``writev`` out; the receive side,
:mod:`.net_rx`, one ``readv`` into the receive chains held, spilling what they cannot hold);
with a
:class:`~hypyr.devices.virtio.vhost.VhostNet` the host kernel runs it and this class keeps the
config space and lifecycle.  docs/networking.md, "The device", has the data path and save/restore.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import cast

from hypyr.devices.ratelimit import TokenBucket
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import StateError, StateReader

from . import tap
from .chain import DescriptorChain, DeviceError, QueueError
from .device import VIRTIO_ID_NET, VirtioDevice
from .net_rx import HDR_LEN, MAX_PACKET, Receiver
from .vhost import QueueRing, VhostError, VhostNet

log = logging.getLogger("hypyr.dev.virtio_net")
_rlog = RateLimitedLog(log)

# feature bits (virtio 1.2 §5.1.3)
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16

S_LINK_UP = 1
RXQ, TXQ = 0, 1
QUEUE_SIZE = 256
_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 00:16:3e:12:34:56")
    return bytes(int(p, 16) for p in parts)


class NetCounters:
    """Packets and bytes through the NIC (saved with its state)."""

    FIELDS = ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_dropped")
    __slots__ = FIELDS

    def __init__(self, rx_packets: int = 0, rx_bytes: int = 0, rx_dropped: int = 0,
                 tx_packets: int = 0, tx_bytes: int = 0, tx_dropped: int = 0):
        self.rx_packets, self.rx_bytes, self.rx_dropped = rx_packets, rx_bytes, rx_dropped
        self.tx_packets, self.tx_bytes, self.tx_dropped = tx_packets, tx_bytes, tx_dropped

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in self.FIELDS}

    def __repr__(self) -> str:
        return "NetCounters(" + ", ".join(f"{n}={v}" for n, v in self.as_dict().items()) + ")"


class VirtioNet(VirtioDevice):
    """One NIC.  ``tap_fd`` is an open TAP (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) the device never
    closes; ``want_vhost``: the VMM should :meth:`attach_vhost` (a rate limit needs the userspace
    path, so it wins); ``tx_rate`` is (bytes/s, interval s)."""

    device_id = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "net"
    state_kind = "virtio-net"

    def __init__(self, tap_fd: int, mac: bytes, *, mtu: int | None = None, want_vhost: bool = False,
                 tx_rate: tuple[int, float] | None = None, ifname: str = "",
                 clock: Callable[[], float] | None = None):
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is not in 68..65535")
        self.tap_fd, self.mac, self.mtu = tap_fd, bytes(mac), mtu
        self.want_vhost = want_vhost and tx_rate is None
        self.vhost: VhostNet | None = None
        # False: the data path stays in userspace even with vhost attached (while a live
        # migration tracks the pages the VMM writes: vhost's writes are invisible to it)
        self.vhost_allowed = True
        self.ifname = ifname or f"fd{tap_fd}"
        self.name = f"net({self.ifname})"
        os.set_blocking(tap_fd, False)
        self.link_up = True
        self.offloads = 0  # what the TAP was told at the last activation (TUNSETOFFLOAD)
        self.counters = NetCounters()
        self.external_used_interrupts = False  # True while vhost signals the guest directly
        self._bucket = (TokenBucket(tx_rate[0], tx_rate[1], MAX_PACKET, **({"clock": clock} if clock else {}))
                        if tx_rate else None)
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self.rx = Receiver(tap_fd, self.name, self.counters)  # the userspace receive path's state
        self._tx_held: DescriptorChain | None = None      # waiting for rate credit
        self._tx_timer: threading.Timer | None = None
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # rate-limit timer → I/O thread
        self.on_config_change: Callable[[], None] | None = None         # set by the transport
        self._pending_error: str | None = None  # a driver error found off the notification path

    # ------------------------------------------------------------------ device model
    def device_features(self) -> int:
        f = (F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_HOST_TSO4 | F_HOST_TSO6
             | F_HOST_ECN | F_MRG_RXBUF | F_MAC | F_STATUS)
        return f | (F_MTU if self.mtu is not None else 0)

    def config_read(self, offset: int, size: int) -> bytes:
        cfg = _CONFIG.pack(self.mac, S_LINK_UP if self.link_up else 0, 1, self.mtu or 0)
        if size <= 0 or offset < 0:
            return bytes(max(size, 0))
        return cfg[offset:offset + size].ljust(size, b"\0")

    def event_sources(self) -> list[tuple[int, Callable[[], None]]]:
        """The descriptors the I/O thread must watch for the userspace data path."""
        return [(self.tap_fd, self._rx_ready), (self.wake_fd, self._tx_resume)]

    def attach_vhost(self, vhost: VhostNet) -> None:
        """Use ``vhost`` for the data path from the next DRIVER_OK on."""
        self.vhost = vhost

    def set_link(self, up: bool) -> None:
        """Carrier up or down, as the guest sees it (STATUS), with a config-change interrupt."""
        if self.link_up != up:
            self.link_up = up
            if self.on_config_change is not None:
                self.on_config_change()

    def on_activate(self) -> None:
        f = self.driver_features
        offload = 0
        if f & F_GUEST_CSUM:
            offload |= tap.TUN_F_CSUM
            if f & F_GUEST_TSO4:
                offload |= tap.TUN_F_TSO4
            if f & F_GUEST_TSO6:
                offload |= tap.TUN_F_TSO6
            if f & F_GUEST_ECN and offload & (tap.TUN_F_TSO4 | tap.TUN_F_TSO6):
                offload |= tap.TUN_F_TSO_ECN
        try:
            tap.set_offload(self.tap_fd, offload)
        except OSError as e:
            raise DeviceError(f"TAP {self.ifname} refused offloads {offload:#x}: {e.strerror}") from None
        self.offloads = offload
        if not self._quiesced:  # (restored: resume() starts it)
            self._start_data_path()

    def _start_data_path(self) -> None:
        """vhost-net from the queues' ring progress if it is attached and works, else the
        userspace path.  The hand-over holds both locks: a receive or transmit the I/O thread
        has begun ends first (its progress is then in the rings vhost gets), and any later one
        sees vhost running.  Receive chains the userspace path kept go back to the ring first."""
        with self._tx_lock, self._rx_lock:
            if self.vhost is not None and self.vhost_allowed and self._start_vhost(self.vhost):
                return
            self.external_used_interrupts = False
        self._rx_ready()  # frames may have arrived before the driver was up

    def _start_vhost(self, vhost: VhostNet) -> bool:  # with both locks held
        self._release_rx_chains()
        if self.rx.waiting:  # vhost-net reads the TAP itself from now on
            self.counters.rx_dropped += 1
            _rlog.debug("vhost", "%s: a frame waiting for receive buffers dropped: vhost-net takes over", self.name)
            self.rx.reset()
        # the rings as the queues have them: at DRIVER_OK, after a resume, or as restored
        rings = [QueueRing(q.size, q.desc_table, q.avail_ring, q.used_ring, q.last_avail)
                 for q in self.queues if q.ready]
        if len(rings) != 2:
            return False
        assert self.mem is not None  # the queues are ready: activate() gave the memory
        try:
            vhost.start(self.mem, rings, self.driver_features)
        except VhostError as e:
            _rlog.warning("vhost", "%s: %s; using the userspace data path", self.name, e)
            return False
        self.external_used_interrupts = True
        _rlog(logging.INFO, "vhost", "%s: data path in the host kernel (vhost-net)", self.name)
        return True

    def reset(self) -> None:
        with self._tx_lock, self._rx_lock:
            if self.vhost is not None:
                self.vhost.stop()
            self.external_used_interrupts = False
            if self._tx_timer is not None:
                self._tx_timer.cancel()
                self._tx_timer = None
            self._tx_held = None
            self.rx.reset()
            self._pending_error = None
            super().reset()

    def close(self) -> None:
        """Stop everything; the TAP descriptor belongs to whoever handed it over."""
        self.reset()
        try:
            os.close(self.wake_fd)
        except OSError:
            pass

    @property
    def vhost_running(self) -> bool:
        return self.vhost is not None and self.vhost.running

    def report(self) -> dict:
        return {"vhost": self.vhost_running, "quiesced": self._quiesced, "tx_held": self._tx_held is not None,
                "rx": self.rx.report(), "counters": self.counters.as_dict()}

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    def quiesce(self) -> None:
        """Stop both data paths and hand back every chain the device holds: the transmit chain
        waiting for rate credit and the receive chains held go back to the ring unused (taken
        again, as new, after resume or restore: the frame is sent once, the buffers filled
        once); see :meth:`_release_rx_chains`.  A frame read from the TAP and not yet delivered
        stays, whole, in the spill buffer (and is saved).  With vhost-net: fetch each ring's
        progress from the kernel; a failure there is a driver-visible error (NEEDS_RESET), not
        a lost or repeated packet."""
        with self._tx_lock, self._rx_lock:
            self._quiesced = True
            if self.vhost_running:
                self._take_back_from_vhost()
            if self._tx_timer is not None:
                self._tx_timer.cancel()
                self._tx_timer = None
            if self._tx_held is not None:
                self._tx_held = None
                self.queues[TXQ].unpop(1)  # the last transmit chain taken: nothing after it is
            self._release_rx_chains()

    def _take_back_from_vhost(self) -> None:
        self.external_used_interrupts = False
        try:
            assert self.vhost is not None  # only while vhost-net runs the queues
            bases = self.vhost.suspend()
            for q, base in zip(self.queues, bases):
                q.resync(base)
                if q.in_flight:  # vhost-net uses all it takes once its backend is gone; just in case
                    _rlog.warning("vhost", "%s: vhost-net left %d chains in flight; handed back", self.name,
                                  q.in_flight)
                    q.unpop(q.in_flight)
        except (VhostError, QueueError) as e:
            _rlog.error("vhost", "%s: cannot take the rings back from vhost-net: %s", self.name, e)
            self._pending_error = f"cannot take the rings back from vhost-net: {e}"

    def _release_rx_chains(self) -> None:  # with the receive lock held
        """Hand back the receive chains held (see :meth:`Receiver.release`)."""
        if self.rx.chains and self.rx.release(self.queues[RXQ], self.mem):
            self.signal_used(RXQ)

    def resume(self) -> None:
        """Start the data path again from the queues' state (not if it runs, or if the device
        is headed for NEEDS_RESET: the queues' state is then not to be trusted)."""
        with self._tx_lock, self._rx_lock:
            self._quiesced = False
            start = (self.mem is not None and len(self.queues) == 2 and not self.vhost_running
                     and self._pending_error is None)
        if start:
            self._start_data_path()

    def pending_error(self) -> str | None:
        return self._pending_error

    def _state_fields(self) -> dict:
        """MAC and MTU (checked on load), link status, the offloads the TAP was told (for the
        record: reactivation derives them from the negotiated features again), the frame waiting
        for receive buffers and the counters."""
        with self._rx_lock:
            frame = self.rx.frame()
        return {"mac": self.mac, "mtu": self.mtu, "link_up": self.link_up, "offloads": self.offloads,
                "rx_frame": frame, "counters": self.counters.as_dict()}

    def _parse_fields(self, r: StateReader) -> tuple:
        if r.blob("mac", 6, 6) != self.mac or r.integer("mtu", 68, 65535, optional=True) != self.mtu:
            raise StateError(f"{self.name}: the saved NIC has another MAC address or MTU")
        link_up = r.flag("link_up")
        r.integer("offloads", 0, tap.TUN_F_CSUM | tap.TUN_F_TSO4 | tap.TUN_F_TSO6 | tap.TUN_F_TSO_ECN)
        frame = r.blob("rx_frame", MAX_PACKET)
        if 0 < len(frame) < HDR_LEN:
            raise StateError(f"{self.name}: the saved receive frame is shorter than its header")
        cr = r.nested("counters")
        counters = NetCounters(**{name: cr.integer(name, 0, (1 << 64) - 1)
                                  for name in NetCounters.FIELDS})
        cr.done()
        return link_up, frame, counters

    def apply_state(self, parsed: object) -> None:
        link_up, frame, counters = cast(tuple[bool, bytes, NetCounters], parsed)  # from _parse_fields
        with self._tx_lock, self._rx_lock:
            self._quiesced = True
            self.link_up = link_up
            for name in NetCounters.FIELDS:  # one object, which the receive path holds too
                setattr(self.counters, name, getattr(counters, name))
            self.rx.load_frame(frame)

    def queue_notify(self, index: int) -> None:
        if self.vhost_running:
            return  # the kernel serves the rings (a stray notify from before the hand-over)
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise DeviceError(error)
        if index == TXQ:
            self._transmit()
        elif index == RXQ:
            self._receive()
        else:
            _rlog.debug("queue", "%s: notify of nonexistent queue %d ignored", self.name, index)

    # ------------------------------------------------------------------ transmit
    def _off_path(self, work: Callable[[], None], queue: str) -> None:
        """Run ``work`` for the I/O thread (a TAP or timer event, not a notification): a driver
        error found there is kept and raised at the next notification, so the transport then
        puts the device in NEEDS_RESET."""
        try:
            work()
        except DeviceError as e:
            _rlog.warning("offpath", "%s: %s queue: %s", self.name, queue, e)
            self._pending_error = f"{queue} queue: {e}"

    def _tx_resume(self) -> None:
        self._tx_timer = None
        self._off_path(self._transmit, "transmit")

    def _transmit(self) -> None:
        with self._tx_lock:
            queues, mem = self.queues, self.mem
            if len(queues) < 2 or mem is None or self.vhost_running or self._quiesced:
                return
            q = queues[TXQ]
            done: list[tuple[int, int]] = []
            try:
                while True:
                    chain = self._tx_held
                    self._tx_held = None
                    if chain is None:
                        if self._bucket is None:
                            chains, err = q.pop_all()
                            for c in chains:
                                self._send(mem, c)
                                done.append((c.head, 0))
                            if err is not None:
                                raise err
                            if not chains:
                                break
                            continue
                        chain = q.pop()
                        if chain is None:
                            break
                    bucket = self._bucket
                    assert bucket is not None  # a chain is held only under a rate limit
                    if not bucket.take(chain.readable_len):
                        self._hold(chain)
                        break
                    self._send(mem, chain)
                    done.append((chain.head, 0))
            finally:
                if done:
                    q.add_used_many(done)
                    self.signal_used(TXQ)

    def _hold(self, chain: DescriptorChain) -> None:
        """Keep ``chain`` until the rate limit allows it; a timer wakes the I/O thread then."""
        self._tx_held = chain
        assert self._bucket is not None  # only _transmit() under a rate limit holds chains
        delay = self._bucket.wait_time(chain.readable_len)
        t = threading.Timer(delay, os.eventfd_write, (self.wake_fd, 1))
        t.daemon = True
        self._tx_timer = t
        t.start()

    def _send(self, mem, chain: DescriptorChain) -> None:
        """Write one transmit chain (header + frame) to the TAP, or drop it with a counted reason."""
        n = chain.readable_len
        c = self.counters
        if n <= HDR_LEN or n > MAX_PACKET:
            c.tx_dropped += 1
            _rlog.warning("txlen", "%s: transmit chain %d has %d bytes (want %d..%d); dropped",
                          self.name, chain.head, n, HDR_LEN + 1, MAX_PACKET)
            return
        try:
            os.writev(self.tap_fd, mem.views(chain.readable))
        except OSError as e:  # EINVAL: the TAP refused the header (bad gso/csum fields); EAGAIN: full
            c.tx_dropped += 1
            _rlog.warning("txerr", "%s: TAP refused a %d-byte frame (%s); dropped", self.name, n, e.strerror)
            return
        c.tx_packets += 1
        c.tx_bytes += n - HDR_LEN

    # ------------------------------------------------------------------ receive
    def _rx_ready(self) -> None:
        """The TAP has frames (I/O thread); deliver what the guest has room for."""
        self._off_path(self._receive, "receive")

    def _receive(self) -> None:
        with self._rx_lock:
            queues, mem = self.queues, self.mem
            if len(queues) < 1 or mem is None or self.vhost_running or self._quiesced:
                return
            q = queues[RXQ]
            done: list[tuple[int, int]] = []
            try:
                self.rx.receive(q, mem, bool(self.driver_features & F_MRG_RXBUF), done)
            finally:
                if done:
                    q.add_used_many(done)
                    self.signal_used(RXQ)
