"""Micro-benchmark of virtio-blk's request path, on the host (no guest, no KVM).

A fake driver (tests/virtio_mock.py) keeps QUEUE requests of one layout ready in a 1 MiB guest:
a 16-byte header, one data buffer of --size bytes, a 1-byte status, as one indirect table each
(Linux's layout with VIRTIO_RING_F_INDIRECT_DESC) or as three chained descriptors (--direct).
Each request is published alone and notified, so the notifying thread runs it at once (queue
depth 1, the usual case); the image is a file in /dev/shm or the temp directory, so the page
cache serves it and the figure is the VMM's own cost per request.  Prints µs per request
(median of --repeat runs of --requests each) for reads and writes.

    .venv/bin/python bench/blk_micro.py [--requests N] [--repeat R] [--size BYTES] [--direct]

To compare two trees, run it with each on PYTHONPATH (the tree's hypyr is imported first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
sys.path.append(str(REPO / "tests"))

from virtio_mock import MockDriver  # noqa: E402

from hypyr.devices.virtio import blk as B  # noqa: E402
from hypyr.devices.virtio import blk_spec as spec  # noqa: E402
from hypyr.devices.virtio.chain import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402

QUEUE = 16
IMAGE_MIB = 64


def ready_requests(drv: MockDriver, size: int, direct: bool, rtype: int) -> list[int]:
    """Write QUEUE requests of type ``rtype`` into the driver's memory; return their heads."""
    heads = []
    for i in range(QUEUE):
        hdr = drv.alloc(struct.pack("<IIQ", rtype, 0, (i * size // 512) % (IMAGE_MIB * 2048 - size // 512)))
        data = drv.alloc(size)
        status = drv.alloc(1)
        data_flags = VIRTQ_DESC_F_WRITE if rtype == spec.VIRTIO_BLK_T_IN else 0
        descs = [(hdr, 16, VIRTQ_DESC_F_NEXT), (data, size, data_flags | VIRTQ_DESC_F_NEXT),
                 (status, 1, VIRTQ_DESC_F_WRITE)]
        if direct:
            first = 3 * i
            for k, (addr, n, flags) in enumerate(descs):
                drv.write_desc(first + k, addr, n, flags, first + k + 1 if k < 2 else 0)
            heads.append(first)
        else:
            table = drv.alloc(48)
            for k, (addr, n, flags) in enumerate(descs):
                drv.write_desc(k, addr, n, flags, k + 1 if k < 2 else 0, table=table)
            drv.write_desc(i, table, 48, VIRTQ_DESC_F_INDIRECT, 0)
            heads.append(i)
    return heads


def per_request_us(path: str, rtype: int, size: int, direct: bool, requests: int) -> float:
    drv = MockDriver(4 * QUEUE if direct else QUEUE)  # a power of two with room for 3 per request
    q = drv.queue()
    dev = B.VirtioBlk(path, serial="bench")
    try:
        dev.activate(drv.mem, [q], 0, lambda _i: None)
        heads = ready_requests(drv, size, direct, rtype)
        t0 = time.perf_counter()
        for n in range(requests):
            drv.publish(heads[n % QUEUE])
            dev.queue_notify(0)
            if len(drv.take_used()) != 1:
                raise SystemExit("bench: a request was not completed at once")
        return (time.perf_counter() - t0) / requests * 1e6
    finally:
        dev.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096, help="data bytes per request (a multiple of 512)")
    ap.add_argument("--direct", action="store_true", help="chained descriptors, not an indirect table")
    args = ap.parse_args()
    if args.size <= 0 or args.size % 512 or args.size > 32768:
        ap.error("--size must be a multiple of 512 up to 32768")
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=where, prefix="hypyr-blk-micro-") as f:
        f.truncate(IMAGE_MIB << 20)
        f.write(b"\x5a" * (IMAGE_MIB << 20))
        f.flush()
        layout = "direct" if args.direct else "indirect"
        print(f"virtio-blk request path, {args.size}-byte requests, {layout}, queue depth 1 "
              f"(hypyr from {Path(B.__file__).parents[3]}):")
        for name, rtype in (("read", spec.VIRTIO_BLK_T_IN), ("write", spec.VIRTIO_BLK_T_OUT)):
            runs = [per_request_us(f.name, rtype, args.size, args.direct, args.requests) for _ in range(args.repeat)]
            print(f"  {name:5} {statistics.median(runs):6.2f} µs per request "
                  f"(min {min(runs):.2f}, max {max(runs):.2f}; {args.repeat} runs of {args.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
