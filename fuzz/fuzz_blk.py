"""virtio-blk on a small image, as a hostile driver drives it: fuzzed chains, well-formed
requests of every type with fuzzed sectors, lengths and DISCARD/WRITE_ZEROES segments,
notifications, resets, quiesce/save/resume.  Each input picks the read-write or the read-only
disk; the read-only image must stay byte for byte unchanged, the read-write one the same size
(see _harness.py for the other oracles)."""

import hashlib
import os
import struct

from _harness import Buf, DeviceRig, check, fuzz, scratch

from hypyr.devices.virtio import blk as B
from hypyr.devices.virtio import blk_spec as spec

SECTORS = 64
TYPES = (spec.VIRTIO_BLK_T_IN, spec.VIRTIO_BLK_T_OUT, spec.VIRTIO_BLK_T_FLUSH, spec.VIRTIO_BLK_T_GET_ID,
         spec.VIRTIO_BLK_T_DISCARD, spec.VIRTIO_BLK_T_WRITE_ZEROES)

_dir = scratch("blk")
_images = {}
for _ro in (False, True):
    _path = os.path.join(_dir, "ro.img" if _ro else "rw.img")
    with open(_path, "wb") as f:
        f.write(bytes((i * 7 + (i >> 9)) & 0xFF for i in range(SECTORS * 512)))
    _images[_ro] = _path
with open(_images[True], "rb") as f:
    RO_DIGEST = hashlib.sha256(f.read()).digest()


def _idle(dev):
    def wait():
        check(dev.wait_idle(10), "virtio-blk requests still in flight 10 s after a notification")
    return wait


rigs = {}
for _ro, _path in _images.items():
    _dev = B.VirtioBlk(_path, read_only=_ro, serial="fuzz", workers=2)
    rigs[_ro] = DeviceRig(_dev, after_notify=_idle(_dev))


def _request(rig):
    def op(fdp):
        """A request the way Linux builds it (header, data, status), with fuzzed fields."""
        ops, d = rig.ops, rig.drivers[0]
        rtype = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)] if fdp.ConsumeBool() else fdp.ConsumeInt(4) & 0xFFFFFFFF
        sector = fdp.ConsumeIntInRange(0, SECTORS + 2) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        bufs = [Buf(ops.alloc(struct.pack("<IIQ", rtype, fdp.ConsumeIntInRange(0, 1) * fdp.ConsumeInt(4) & 0xFFFFFFFF,
                                          sector)), 16)]
        nseg = fdp.ConsumeIntInRange(0, 3)
        if rtype in (spec.VIRTIO_BLK_T_DISCARD, spec.VIRTIO_BLK_T_WRITE_ZEROES):
            segs = b"".join(struct.pack("<QII", fdp.ConsumeIntInRange(0, SECTORS + 2), fdp.ConsumeIntInRange(0, 70),
                                        fdp.ConsumeIntInRange(0, 3)) for _ in range(nseg))
            if segs:
                bufs.append(Buf(ops.alloc(segs), len(segs)))
        elif rtype == spec.VIRTIO_BLK_T_OUT:
            for _ in range(nseg):
                n = 512 * fdp.ConsumeIntInRange(0, 3) + (fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeIntInRange(0, 7) == 0
                                                         else 0)
                bufs.append(Buf(ops.alloc(fdp.ConsumeBytes(n).ljust(n, b"\x5a")), n))
        else:
            for _ in range(nseg):
                odd = fdp.ConsumeIntInRange(0, 20) if fdp.ConsumeIntInRange(0, 7) == 0 else 0
                n = 512 * fdp.ConsumeIntInRange(0, 3) + odd
                bufs.append(Buf(ops.alloc(n), n, True))
        if fdp.ConsumeIntInRange(0, 7):
            bufs.append(Buf(ops.alloc(1), 1, True))  # the status byte
        if fdp.ConsumeBool() and rig.indirect:
            table = ops.alloc(16 * len(bufs))
            for i, b in enumerate(bufs):
                last = i + 1 == len(bufs)
                d.write_desc(i, b.addr, b.length, (2 if b.write else 0) | (0 if last else 1), 0 if last else i + 1,
                             table=table)
            head = d.next_desc
            d.write_desc(head, table, 16 * len(bufs), 4, 0)
            d.next_desc = (head + 1) % d.size
            d.publish(head)
        elif len(bufs) <= d.size:
            d.add_chain(bufs)
        rig.watch.rebase()  # the driver's writes above are not the device's
        rig.notify(0)
    return op


for _rig in rigs.values():
    _rig.extra_ops.append(_request(_rig))


def one_input(data: bytes) -> None:
    if not data:
        return
    ro = bool(data[0] & 1)
    rigs[ro].run(data[1:])
    if ro:
        with open(_images[True], "rb") as f:
            check(hashlib.sha256(f.read()).digest() == RO_DIGEST, "the read-only image changed")
    else:
        check(os.path.getsize(_images[False]) == SECTORS * 512, "the read-write image changed size")


if __name__ == "__main__":
    fuzz(one_input)
