"""The virtio-mmio transport with real devices behind it (rng, console, a read-only blk), as a
hostile driver drives the register window: fuzzed reads and writes at any offset and width
(biased to the registers and to values a driver writes: ring addresses, feature words, status
bits), Linux's bring-up sequence, notifications, interrupt acks, quiesce/save/load/resume,
and the guest's traffic on the rings.  Oracles besides _harness.py's: read() and write() never
raise and reads return exactly the bytes asked for; the level-triggered line is high exactly
while InterruptStatus is non-zero and is driven only on changes; the read-only register page
agrees with read() for every register it publishes and the config space."""

import os
import struct

from _harness import FDP, DeviceRig, GuestOps, check, check_rss, errors_logged, fuzz, scratch, u32

from hypyr.devices.virtio import mmio_regs as M
from hypyr.devices.virtio.blk import VirtioBlk
from hypyr.devices.virtio.console import VirtioConsole
from hypyr.devices.virtio.mmio import VirtioMmioTransport
from hypyr.devices.virtio.rng import VirtioRng

REGS = (M.MAGIC, M.VERSION, M.DEVICE_ID, M.VENDOR, M.DEVICE_FEATURES, M.DEVICE_FEATURES_SEL, M.DRIVER_FEATURES,
        M.DRIVER_FEATURES_SEL, M.QUEUE_SEL, M.QUEUE_NUM_MAX, M.QUEUE_NUM, M.QUEUE_READY, M.QUEUE_NOTIFY_OFFSET,
        M.INTERRUPT_STATUS, M.INTERRUPT_ACK, M.STATUS, M.QUEUE_DESC_LOW, M.QUEUE_DESC_HIGH, M.QUEUE_DRIVER_LOW,
        M.QUEUE_DRIVER_HIGH, M.QUEUE_DEVICE_LOW, M.QUEUE_DEVICE_HIGH, M.SHM_SEL, M.SHM_LEN_LOW, M.SHM_BASE_LOW,
        M.QUEUE_RESET, M.CONFIG_GENERATION, M.CONFIG, M.CONFIG + 4, M.CONFIG + 8)
PAGE_REGS = M.PAGE_REGISTERS + (M.INTERRUPT_STATUS, M.CONFIG_GENERATION)


class Line:
    def __init__(self):
        self.level = False
        self.loading = False  # load_state drives the line to the restored level unconditionally

    def __call__(self, level: bool):
        check(level != self.level or self.loading, f"the line was driven {'high' if level else 'low'} again")
        self.level = level


_img = os.path.join(scratch("mmio"), "ro.img")
with open(_img, "wb") as f:
    f.write(os.urandom(64 * 512))


class Rig:
    def __init__(self, dev, wait=None):
        self.dev, self.wait = dev, wait
        self.base = DeviceRig(dev)  # its guest memory, drivers and watch
        self.mem, self.drivers, self.watch = self.base.mem, self.base.drivers, self.base.watch
        self.line = Line()
        self.t = VirtioMmioTransport(dev, self.mem, self.line)
        self.page = memoryview(bytearray(M.MMIO_WINDOW))
        self.t.use_register_page(self.page)
        self.watch.queues = self.t.queues
        self.ops = GuestOps(self.mem, self.drivers, self.watch, self.op, 7)

    def rd(self, off, size=4):
        v = self.t.read(off, size)
        check(len(v) == size, f"a {size}-byte read at {off:#x} returned {len(v)} bytes")
        return v

    def wr(self, off, value):
        self.t.write(off, u32(value))

    def value(self, fdp):
        kind = fdp.ConsumeIntInRange(0, 7)
        if kind <= 2:
            return fdp.ConsumeIntInRange(0, 16)
        if kind == 3:
            d = self.drivers[fdp.ConsumeIntInRange(0, len(self.drivers) - 1)]
            return (d.desc, d.avail, d.used)[fdp.ConsumeIntInRange(0, 2)]
        if kind == 4:
            return 1 << fdp.ConsumeIntInRange(0, 31)
        return fdp.ConsumeIntInRange(0, 0xFFFFFFFF)

    def bring_up(self, fdp):
        """What Linux's virtio_mmio does, with the features and queue sizes fuzzed."""
        t = self
        t.wr(M.STATUS, 0)
        t.wr(M.STATUS, 1)
        t.wr(M.STATUS, 3)
        offered = self.t.offered_features
        feats = offered if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1) & (offered | 1 << 33)
        for sel in (1, 0):
            t.wr(M.DRIVER_FEATURES_SEL, sel)
            t.wr(M.DRIVER_FEATURES, feats >> (32 * sel))
        t.wr(M.STATUS, 11)
        for i, d in enumerate(self.drivers):
            if fdp.ConsumeIntInRange(0, 7) == 0:
                continue
            d.size = DeviceRig.SIZES[fdp.ConsumeIntInRange(0, len(DeviceRig.SIZES) - 1)]
            d.avail = d.desc + 16 * d.size
            d.used = (d.avail + 6 + 2 * d.size + 3) & ~3
            d.next_desc = d.avail_idx = d.used_seen = 0
            self.mem.write(d.desc, bytes(d.used + 6 + 8 * d.size - d.desc))
            self.watch.rebase()
            t.wr(M.QUEUE_SEL, i)
            t.wr(M.QUEUE_NUM, d.size)
            for lo, addr in ((M.QUEUE_DESC_LOW, d.desc), (M.QUEUE_DRIVER_LOW, d.avail), (M.QUEUE_DEVICE_LOW, d.used)):
                t.wr(lo, addr)
                t.wr(lo + 4, 0)
            t.wr(M.QUEUE_READY, 1)
        t.wr(M.STATUS, 15)

    def op(self, fdp, op):
        t = self.t
        if op == 0:  # a register write
            off = REGS[fdp.ConsumeIntInRange(0, len(REGS) - 1)] if fdp.ConsumeIntInRange(0, 3) else \
                fdp.ConsumeIntInRange(-8, M.MMIO_WINDOW + 8)
            if fdp.ConsumeIntInRange(0, 7):
                self.wr(off, self.value(fdp))
            else:
                t.write(off, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 9)))
        elif op == 1:  # a register read
            off = REGS[fdp.ConsumeIntInRange(0, len(REGS) - 1)] if fdp.ConsumeIntInRange(0, 3) else \
                fdp.ConsumeIntInRange(-8, M.MMIO_WINDOW + 8)
            self.rd(off, (1, 2, 4, 8, 0)[fdp.ConsumeIntInRange(0, 4)])
        elif op == 2:
            self.bring_up(fdp)
        elif op == 3:
            self.wr(M.QUEUE_NOTIFY_OFFSET, fdp.ConsumeIntInRange(0, len(self.drivers)))
        elif op == 4:
            self.wr(M.INTERRUPT_ACK, struct.unpack("<I", self.rd(M.INTERRUPT_STATUS))[0]
                    if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 3))
        elif op == 5:  # save, load into the same transport, resume (what a restore does)
            t.quiesce()
            state = t.save_state()
            self.line.loading = True
            try:
                t.load_state(state)
            finally:
                self.line.loading = False
            t.resume()
        else:
            t.notify(fdp.ConsumeIntInRange(-1, len(self.drivers)))
        if self.wait is not None:
            check(self.wait(10), "requests still in flight 10 s after a notification")
        isr = struct.unpack("<I", t.read(M.INTERRUPT_STATUS, 4))[0]
        check(self.line.level == bool(isr & 3), f"line {'high' if self.line.level else 'low'} with "
              f"InterruptStatus {isr:#x}")
        for off in PAGE_REGS:
            check(self.page[off:off + 4] == t.read(off, 4), f"the register page disagrees at {off:#x}")
        check(self.page[M.CONFIG:M.CONFIG + 64] == t.read(M.CONFIG, 64), "the register page's config space")

    def run(self, fdp):
        self.wr(M.STATUS, 0)
        self.ops.reset()
        self.watch.forget()
        self.ops.run(fdp, 48)
        errors_logged()
        check_rss()


console = VirtioConsole(lambda b: None)
blk = VirtioBlk(_img, read_only=True, workers=2)
rigs = [Rig(VirtioRng()), Rig(console), Rig(blk, blk.wait_idle)]


def one_input(data: bytes) -> None:
    fdp = FDP(data)
    rig = rigs[fdp.ConsumeIntInRange(0, len(rigs) - 1)]
    if rig.dev is console and fdp.ConsumeBool():
        console.enqueue_input(b"hello")
    rig.run(fdp)
    console.load_state({**console.save_state(), "rx": b""})  # drop the input left over
    console.resume()


if __name__ == "__main__":
    fuzz(one_input)
