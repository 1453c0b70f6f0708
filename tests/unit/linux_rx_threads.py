"""The Linux-like receive model (linux_rx_model.LinuxRx) run by real threads, as in a VM: the
driver (NAPI on interrupts, its refill work, kicks straight into the transport as a vCPU's MMIO
exit does), the device's I/O thread (woken when the TAP gets a frame, as by an edge-triggered
epoll) and a sender on the TAP's far side.  Python switches threads every microsecond here, so
the device meets the driver halfway through its updates.  Checked: every used id is a buffer
outstanding (Linux's "id N is not a head!"), frames whole and in order, nothing written into a
page the driver freed, and no stall (every frame sent arrives)."""

from __future__ import annotations

import random
import sys
import threading
import time

from linux_rx_model import DATA, FRAG, POISON, RX_USED, LinuxRx, Violation, frame_len
from test_virtio_net import NEEDS_RESET, hdr
from test_virtio_net import rd as _rd

from hypyr.devices.virtio import mmio_regs as M


class ThreadedRx(LinuxRx):
    """LinuxRx whose driver, device and sender run in threads of their own; ``slow``: the chance
    that the driver is busy for up to 5 ms before a NAPI poll (so the ring runs dry)."""

    def __init__(self, seed: int, slow: float = 0.0, **kw):
        self.slow = slow
        self.irq = threading.Event()
        self.tap_edge = threading.Event()
        self.lock = threading.Lock()      # the driver's own state (NAPI vs refill work)
        self.sent_lock = threading.Lock()
        self.errors: list[str] = []
        self.stop = False
        super().__init__(seed, **kw)
        self.host.setblocking(True)

    def _irq(self):
        self.irqs += 1
        self.irq.set()

    def _poke(self, addr, data):
        self.mem.write(addr, data)

    def device(self, call):
        call()   # (whole-memory write checks need a still device: free pages are checked instead)

    def check_writes(self, outstanding):
        pass

    def _frag_refill(self, sz):
        before = set(self.free_frags)
        f = super()._frag_refill(sz)
        if f in before:   # a page taken from the free pool: nobody may have written it
            page = self.mem.read(DATA + f * FRAG, FRAG)
            if page != bytes([POISON]) * FRAG:
                i = next(j for j in range(FRAG) if page[j] != POISON)
                raise Violation(f"device wrote into free page {f} at offset {i}")
        return f

    def check_frames(self):
        with self.sent_lock:
            super().check_frames()

    # -- threads
    def driver(self, rng):
        try:
            while not self.stop:
                self.irq.wait(0.01)
                self.irq.clear()
                if rng.random() < self.slow:   # the guest busy elsewhere: the ring runs dry
                    time.sleep(rng.random() * 0.005)
                with self.lock:
                    while True:
                        self.napi()
                        # virtqueue_poll after re-arming: more used meanwhile? poll again
                        if self.mem.read_u16(RX_USED + 2) == self.last_used:
                            break
                if rng.random() < 0.02:
                    with self.lock:
                        self.try_fill_recv()   # the refill work
        except Exception as e:  # (reported by run())
            self.errors.append(f"driver: {type(e).__name__}: {e}")
            self.stop = True

    def io_thread(self):
        try:
            while not self.stop:
                if self.tap_edge.wait(0.01):
                    self.tap_edge.clear()
                    self.dev._rx_ready()
                if _rd(self.t, M.STATUS) & NEEDS_RESET or self.dev._pending_error:
                    raise Violation(f"device needs reset: {self.dev._pending_error}")
        except Exception as e:
            self.errors.append(f"io: {type(e).__name__}: {e}")
            self.stop = True

    def sender(self, rng, seconds):
        end = time.monotonic() + seconds
        try:
            while not self.stop and time.monotonic() < end:
                frame = hdr() + rng.randbytes(frame_len(rng))
                with self.sent_lock:
                    self.sent.append(frame)
                self.host.settimeout(0.5)
                try:
                    self.host.send(frame)
                except (TimeoutError, BlockingIOError):
                    with self.sent_lock:
                        self.sent.pop()
                    self.tap_edge.set()
                    continue
                self.tap_edge.set()
                if rng.random() < 0.3:
                    time.sleep(rng.random() * 0.001)
        except Exception as e:
            self.errors.append(f"sender: {type(e).__name__}: {e}")
            self.stop = True


def run_threads(seed: int, seconds: float = 2.0, **kw) -> ThreadedRx:
    """Send for ``seconds``, then wait up to 10 s for every frame; raises Violation."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        return _run(seed, seconds, **kw)
    finally:
        sys.setswitchinterval(switch)


def _run(seed: int, seconds: float, **kw) -> ThreadedRx:
    g = ThreadedRx(seed, **kw)
    ts = [threading.Thread(target=g.driver, args=(random.Random(seed + 1),)),
          threading.Thread(target=g.io_thread),
          threading.Thread(target=g.sender, args=(random.Random(seed + 2), seconds))]
    for t in ts:
        t.start()
    ts[2].join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not g.stop:
        with g.sent_lock:
            if not g.sent:
                break
        time.sleep(0.05)
    g.stop = True
    for t in ts:
        t.join()
    left = len(g.sent)
    q = g.t.queues[0].indices()
    g.close()
    if g.errors:
        raise Violation("; ".join(g.errors))
    if left:
        raise Violation(f"{left} frames never arrived (stall): rx queue {q}, device {g.dev.report()}")
    return g
