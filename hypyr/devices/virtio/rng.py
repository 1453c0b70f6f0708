"""virtio-rng, the entropy device (virtio 1.2 §5.4): device id 4, one request queue.

Each request is a chain of device-writable buffers; the device fills them with bytes from the
host's ``os.urandom`` (at most :data:`MAX_REQUEST` bytes a request) and returns the chain with
the count written.  No feature bits, no config space.

Requests are served synchronously on the notifying thread (a vCPU on an MMIO exit, or the
VMM's ioeventfd thread); the queue's own lock makes concurrent notifications safe.

Save/restore: nothing in flight once a notification returns, and no state of its own (the saved
state is just kind and version); the transport saves the queue.
"""

from __future__ import annotations

import logging
import os

from hypyr.devices.ratelog import RateLimitedLog

from .device import VIRTIO_ID_RNG, VirtioDevice

log = logging.getLogger("hypyr.dev.virtio_rng")

MAX_REQUEST = 64 * 1024
QUEUE_SIZE = 256


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    queue_max_sizes = (QUEUE_SIZE,)
    name = "rng"
    state_kind = "virtio-rng"

    def __init__(self) -> None:
        super().__init__()
        self._rlog = RateLimitedLog(log)  # every line the driver can cause; fixed keys

    def queue_notify(self, index: int) -> None:
        if index != 0:
            self._rlog.debug("notify", "virtio-rng: notify of queue %d ignored", index)
            return
        queues, mem = self.queues, self.mem  # a concurrent reset swaps these out
        if not queues or mem is None or self._quiesced:
            return
        q = queues[0]
        completed = 0
        try:
            while (chain := q.pop()) is not None:
                n = min(chain.writable_len, MAX_REQUEST)
                if n:
                    chain.write(mem, os.urandom(n))
                else:
                    self._rlog.debug("no-room", "virtio-rng: request %d has no writable buffer", chain.head)
                q.add_used(chain.head, n)
                completed += 1
        finally:  # even if a later chain was bad, the good ones are returned and signalled
            if completed:
                self.signal_used(0)
