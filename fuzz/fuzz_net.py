"""virtio-net's userspace data path, as a hostile driver drives it.  The TAP is played by a
SOCK_SEQPACKET socket pair, as in tests/unit/test_virtio_net.py (one read or write per frame);
the host side sends fuzzed frames (received on the I/O thread's path, ``_rx_ready``) and drains
what the guest transmits.  Two NICs: one plain, one under a transmit rate limit with a fake
clock.  See _harness.py for the oracles."""

import socket

from _harness import DeviceRig, fuzz

from hypyr.devices.virtio import net as N
from hypyr.devices.virtio import net_rx

MAC = bytes.fromhex("00163e123456")
N.tap.set_offload = lambda fd, flags: None  # a socket pair takes no TUNSETOFFLOAD


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


class Nic:
    def __init__(self, rate):
        self.host, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self.clock = Clock()
        self.dev = N.VirtioNet(self.guest.fileno(), MAC, mtu=1500, ifname="fuzz0",
                               tx_rate=(20000, 0.01) if rate else None, clock=self.clock)
        self.rig = DeviceRig(self.dev, after_notify=self.drain)
        self.rig.extra_ops += [self.host_frame, self.tick, self.link]

    def drain(self):
        try:
            while self.host.recv(1 << 17):
                pass
        except BlockingIOError:
            pass

    def host_frame(self, fdp):
        """A frame from the TAP: a virtio_net_hdr (fuzzed or zero) and a fuzzed frame."""
        hdr = bytes(12) if fdp.ConsumeBool() else fdp.ConsumeBytes(12)
        size = fdp.ConsumeIntInRange(0, 64) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, net_rx.MAX_FRAME + 16)
        frame = fdp.ConsumeBytes(size).ljust(size, b"\xab")
        try:
            self.host.send(hdr + frame)
        except OSError:
            pass  # a full socket or a frame too big for it: the TAP would drop it too
        self.dev._rx_ready()
        self.drain()

    def tick(self, fdp):
        """Time passes; the rate-limit timer's wake-up (the I/O thread's path)."""
        self.clock.now += fdp.ConsumeIntInRange(0, 1000) / 1000
        self.dev._tx_resume()
        self.drain()

    def link(self, fdp):
        self.dev.set_link(fdp.ConsumeBool())


nics = [Nic(False), Nic(True)]


def one_input(data: bytes) -> None:
    if not data:
        return
    nic = nics[data[0] & 1]
    nic.drain()
    nic.rig.run(data[1:])
    # a frame the device read and could not deliver stays with it; drop it, as a reset does
    nic.dev.reset()
    try:
        while nic.guest.recv(1 << 17):
            pass
    except BlockingIOError:
        pass


if __name__ == "__main__":
    fuzz(one_input)
