import errno
import logging
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_mock import Buf, MockDriver

from hypyr.devices import diskimage
from hypyr.devices.virtio import blk as B
from hypyr.devices.virtio import blk_spec as spec
from hypyr.devices.virtio import blk_transfer
from hypyr.devices.virtio.blk import VirtioBlk
from hypyr.devices.virtio.chain import DeviceError, QueueError
from hypyr.errors import HypyrError, StateError
from hypyr.memory import GuestMemory

SECTORS = 64
ALL_FEATURES = (1 << spec.VIRTIO_BLK_F_DISCARD) | (1 << spec.VIRTIO_BLK_F_WRITE_ZEROES) | (1 << spec.VIRTIO_BLK_F_FLUSH)


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(n))


def make_image(path: Path, size: int = SECTORS * 512) -> bytes:
    data = pattern(size, 3)
    path.write_bytes(data)
    return data


class Rig:
    """A device activated on a MockDriver queue, plus helpers to build requests."""

    def __init__(self, path: Path, *, read_only=False, serial="hypyr-disk-0", workers=4, qsize=16,
                 features=ALL_FEATURES):
        self.dev = VirtioBlk(str(path), read_only=read_only, serial=serial, workers=workers)
        self.drv = MockDriver(qsize)
        self.q = self.drv.queue()
        self.irqs: list[int] = []
        self.dev.activate(self.drv.mem, [self.q], features, self.irqs.append)

    def request(self, rtype, sector, *, out=b"", in_len=0, pieces=1, indirect=False, status=True,
                reserved=0):
        """Publish a request; returns (head, [(addr, len)] of the IN data, status address)."""
        d = self.drv
        hdr = d.alloc(struct.pack("<IIQ", rtype, reserved, sector))
        bufs = [Buf(hdr, 16)]
        if out:
            step = max(1, -(-len(out) // pieces))
            for i in range(0, len(out), step):
                bufs.append(Buf(d.alloc(out[i:i + step]), len(out[i:i + step])))
        data = []
        if in_len:
            step = max(1, -(-in_len // pieces))
            for i in range(0, in_len, step):
                n = min(step, in_len - i)
                addr = d.alloc(n)
                data.append((addr, n))
                bufs.append(Buf(addr, n, write=True))
        st_addr = d.alloc(1)
        d.mem.write_u8(st_addr, 0xEE)
        if status:
            bufs.append(Buf(st_addr, 1, write=True))
        head = d.add_chain(bufs, indirect=indirect)
        return head, data, st_addr

    def run(self):
        self.dev.queue_notify(0)
        assert self.dev.wait_idle(10)
        return self.drv.take_used()

    def gather(self, data):
        return b"".join(self.drv.mem.read(a, n) for a, n in data)

    def close(self):
        self.dev.close()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    return p, make_image(p)


@pytest.fixture
def rig(image):
    r = Rig(image[0])
    yield r
    r.close()


def cfg_u32(dev, off):
    return struct.unpack("<I", dev.config_read(off, 4))[0]


# -- construction and config space ----------------------------------------------------------------

def test_config_space(rig):
    dev = rig.dev
    assert dev.device_id == 2 and list(dev.queue_max_sizes) == [256]
    assert struct.unpack("<Q", dev.config_read(0, 8))[0] == SECTORS
    assert cfg_u32(dev, 0) == SECTORS and cfg_u32(dev, 4) == 0
    assert dev.config_read(0, 1) == bytes([SECTORS])
    assert cfg_u32(dev, 12) == spec.SEG_MAX
    assert cfg_u32(dev, 20) == 512
    assert cfg_u32(dev, 36) == spec.MAX_DISCARD_SECTORS and cfg_u32(dev, 40) == spec.MAX_DISCARD_SEG
    assert cfg_u32(dev, 48) == spec.MAX_WRITE_ZEROES_SECTORS and cfg_u32(dev, 52) == spec.MAX_WRITE_ZEROES_SEG
    assert dev.config_read(56, 1) == b"\x01"
    assert dev.config_read(0x100, 4) == bytes(4)
    assert dev.config_read(58, 8) == bytes(8)
    assert dev.config_read(-4, 4) == bytes(4)
    f = dev.device_features()
    for bit in (spec.VIRTIO_BLK_F_SEG_MAX, spec.VIRTIO_BLK_F_BLK_SIZE, spec.VIRTIO_BLK_F_FLUSH,
                spec.VIRTIO_BLK_F_DISCARD, spec.VIRTIO_BLK_F_WRITE_ZEROES):
        assert f & (1 << bit)
    assert not f & (1 << spec.VIRTIO_BLK_F_RO)
    s = dev.save_state()
    assert (s["path"], s["read_only"], s["capacity"], s["features"]) == (str(rig.dev.path), False, SECTORS, f)
    dev.parse_state(s)   # this disk's own state fits it; another disk's does not
    with pytest.raises(StateError):
        dev.parse_state({**s, "capacity": SECTORS + 1})


def test_unaligned_file_size_hides_tail(tmp_path, caplog):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(512 * 3 + 100))
    with caplog.at_level(logging.WARNING, logger="hypyr.dev.virtio-blk"):
        dev = VirtioBlk(str(p))
    try:
        assert dev.capacity == 3
        assert "not a multiple" in caplog.text
    finally:
        dev.close()


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(HypyrError, match=r"nope.img"):
        VirtioBlk(str(tmp_path / "nope.img"))
    with pytest.raises(HypyrError, match=str(tmp_path)):
        VirtioBlk(str(tmp_path), read_only=True)  # a directory
    p = tmp_path / "x.img"
    p.write_bytes(bytes(512))
    with pytest.raises(HypyrError):
        VirtioBlk(str(p), serial="x" * 21)


def test_image_is_locked(image):
    dev = VirtioBlk(str(image[0]))
    try:
        with pytest.raises(HypyrError, match="in use"):
            VirtioBlk(str(image[0]))
    finally:
        dev.close()
    VirtioBlk(str(image[0])).close()  # released by close()


def test_an_image_opened_unlocked_is_locked_only_when_the_holder_lets_go(image):
    """A live migration's destination: it opens the image while the source still holds it."""
    source = VirtioBlk(str(image[0]))
    destination = VirtioBlk(str(image[0]), lock=False)
    try:
        with pytest.raises(HypyrError, match="in use"):
            destination.relock_image()
        source.unlock_image()
        destination.relock_image()
        with pytest.raises(HypyrError, match="in use"):
            source.relock_image()
    finally:
        source.close()
        destination.close()


# -- reads and writes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("sector,nsect,pieces", [(0, 1, 1), (5, 3, 3), (17, 8, 5), (SECTORS - 2, 2, 4)])
def test_in_out_round_trip(rig, image, sector, nsect, pieces, indirect):
    _, original = image
    n = nsect * 512
    head, data, st_addr = rig.request(spec.VIRTIO_BLK_T_IN, sector, in_len=n, pieces=pieces, indirect=indirect)
    assert rig.run() == [(head, n + 1)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
    assert rig.gather(data) == original[sector * 512:sector * 512 + n]

    new = pattern(n, 99)
    head, _, st_addr = rig.request(spec.VIRTIO_BLK_T_OUT, sector, out=new, pieces=pieces, indirect=indirect)
    assert rig.run() == [(head, 1)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
    on_disk = image[0].read_bytes()
    assert on_disk[sector * 512:sector * 512 + n] == new
    assert on_disk[:sector * 512] == original[:sector * 512]
    assert on_disk[sector * 512 + n:] == original[sector * 512 + n:]

    head, data, _ = rig.request(spec.VIRTIO_BLK_T_IN, sector, in_len=n, pieces=pieces + 1, indirect=indirect)
    rig.run()
    assert rig.gather(data) == new
    assert rig.irqs and set(rig.irqs) == {0}


def test_data_and_status_in_one_buffer(rig, image):
    """The status byte is the last writable byte, wherever the buffers split."""
    d = rig.drv
    hdr = d.alloc(struct.pack("<IIQ", spec.VIRTIO_BLK_T_IN, 0, 2))
    buf = d.alloc(513)
    head = d.add_chain([Buf(hdr, 16), Buf(buf, 513, write=True)])
    assert rig.run() == [(head, 513)]
    assert d.mem.read(buf, 512) == image[1][1024:1536]
    assert d.mem.read_u8(buf + 512) == 0


def test_zero_length_read_and_write(rig):
    head, _, st_addr = rig.request(spec.VIRTIO_BLK_T_IN, SECTORS, in_len=0)
    assert rig.run() == [(head, 1)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK


def test_large_request_spans_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(blk_transfer, "IO_CHUNK", 1024)
    p = tmp_path / "d.img"
    original = make_image(p)
    r = Rig(p)
    try:
        head, data, st_addr = r.request(spec.VIRTIO_BLK_T_IN, 3, in_len=8 * 512, pieces=3)
        r.run()
        assert r.gather(data) == original[3 * 512:11 * 512]
        new = pattern(8 * 512, 5)
        r.request(spec.VIRTIO_BLK_T_OUT, 3, out=new, pieces=3)
        r.run()
        assert p.read_bytes()[3 * 512:11 * 512] == new
    finally:
        r.close()


def _route(monkeypatch, name, fn):
    """Make GuestMemory.<name> (preadv/pwritev) call ``fn(fd, views, offset)``, os-style, on
    checked views of the ranges: the device's bulk I/O then goes through ``fn``."""
    monkeypatch.setattr(GuestMemory, name, lambda self, fd, ranges, off: fn(fd, self.views(ranges), off))
    monkeypatch.setattr(GuestMemory, name + "_descs",
                        lambda self, fd, descs, first, count, off:
                        fn(fd, self.views(_desc_ranges(descs, first, count)), off))


def _desc_ranges(descs, first, count):
    """(addr, len) of ``count`` virtqueue descriptors from ``first`` in an array('I') table."""
    return [(descs[i] | descs[i + 1] << 32, descs[i + 2]) for i in range(4 * first, 4 * (first + count), 4)]


def _spy(monkeypatch, name, limit=None):
    """Wrap os.<name> (preadv/pwritev): record (number of buffers, bytes offered, offset) per
    call and, with ``limit``, transfer at most that many bytes (a short transfer)."""
    real = getattr(os, name)
    calls = []

    def spy(fd, bufs, off):
        bufs = list(bufs)
        calls.append((len(bufs), sum(len(memoryview(b)) for b in bufs), off))
        if limit is not None:
            kept, left = [], limit
            for b in bufs:
                b = memoryview(b)
                if left <= 0:
                    break
                kept.append(b[:left])
                left -= len(kept[-1])
            bufs = kept
        return real(fd, bufs, off)

    _route(monkeypatch, name, spy)
    return calls


@pytest.mark.parametrize("indirect", [False, True])
def test_short_transfers_are_continued(image, monkeypatch, indirect):
    """preadv/pwritev moving fewer bytes than asked (here 700 at a time, splitting buffers) are
    continued where they stopped; the buffers handed to the kernel are exactly the data part."""
    path, original = image
    reads = _spy(monkeypatch, "preadv", 700)
    writes = _spy(monkeypatch, "pwritev", 700)
    r = Rig(path)
    try:
        n = 6 * 512
        head, data, st_addr = r.request(spec.VIRTIO_BLK_T_IN, 3, in_len=n, pieces=5, indirect=indirect)
        assert r.run() == [(head, n + 1)]
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
        assert r.gather(data) == original[3 * 512:9 * 512]
        assert reads[0] == (5, n, 3 * 512)  # five data buffers: not the header, not the status byte
        assert [off for _, _, off in reads] == [3 * 512 + i * 700 for i in range(-(-n // 700))]
        new = pattern(n, 42)
        head, _, st_addr = r.request(spec.VIRTIO_BLK_T_OUT, 3, out=new, pieces=4, indirect=indirect)
        assert r.run() == [(head, 1)]
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
        assert writes[0] == (4, n, 3 * 512)
        assert len(writes) == -(-n // 700)
        assert path.read_bytes() == original[:3 * 512] + new + original[9 * 512:]
    finally:
        r.close()


def test_syscalls_are_bounded(image, monkeypatch):
    """Each preadv/pwritev gets at most IOV_MAX buffers and IO_CHUNK bytes."""
    path, original = image
    monkeypatch.setattr(blk_transfer, "IO_CHUNK", 1536)
    monkeypatch.setattr(blk_transfer, "IOV_MAX", 3)
    reads = _spy(monkeypatch, "preadv")
    writes = _spy(monkeypatch, "pwritev")
    r = Rig(path)
    try:
        n = 16 * 512
        head, data, _ = r.request(spec.VIRTIO_BLK_T_IN, 10, in_len=n, pieces=11, indirect=True)
        assert r.run() == [(head, n + 1)]
        assert r.gather(data) == original[10 * 512:26 * 512]
        new = pattern(n, 7)
        r.request(spec.VIRTIO_BLK_T_OUT, 10, out=new, pieces=11, indirect=True)
        r.run()
        assert path.read_bytes()[10 * 512:26 * 512] == new
        for calls in (reads, writes):
            assert sum(b for _, b, _ in calls) == n
            assert all(k <= 3 and b <= 1536 for k, b, _ in calls)
            offs = [off for _, _, off in calls]
            assert offs == sorted(offs) and offs[0] == 10 * 512
    finally:
        r.close()


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("rtype", [spec.VIRTIO_BLK_T_IN, spec.VIRTIO_BLK_T_OUT])
def test_an_io_error_fails_the_request_once_without_redoing_it(image, monkeypatch, caplog, indirect, rtype):
    """A failing preadv/pwritev is IOERR with one log line: the request is tried once, in
    whichever layout (an indirect table goes straight from the table, a direct chain by ranges)."""
    path, original = image
    calls = []

    def fail(fd, views, off):
        calls.append(off)
        raise OSError(errno.EIO, "Input/output error")

    _route(monkeypatch, "preadv" if rtype == spec.VIRTIO_BLK_T_IN else "pwritev", fail)
    r = Rig(path)
    try:
        with caplog.at_level(logging.WARNING, logger="hypyr.dev.virtio-blk"):
            if rtype == spec.VIRTIO_BLK_T_IN:
                head, _, st_addr = r.request(rtype, 4, in_len=2 * 512, pieces=2, indirect=indirect)
            else:
                head, _, st_addr = r.request(rtype, 4, out=pattern(2 * 512, 3), pieces=2, indirect=indirect)
            assert [h for h, _ in r.run()] == [head]
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR
        assert calls == [4 * 512]
        kind = "read" if rtype == spec.VIRTIO_BLK_T_IN else "write"
        assert caplog.text.count(f"{kind} error: [Errno 5] Input/output error") == 1
        assert path.read_bytes() == original
    finally:
        r.close()


def test_end_of_file_during_a_read_is_ioerr(image):
    path, original = image
    r = Rig(path)
    try:
        with open(path, "r+b") as f:
            f.truncate(10 * 512)  # the image shrank under the device
        head, data, st_addr = r.request(spec.VIRTIO_BLK_T_IN, 8, in_len=4 * 512, pieces=2)
        used = r.run()
        assert [h for h, _ in used] == [head]
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR
        assert used[0][1] <= 4 * 512 + 1
    finally:
        r.close()


@pytest.mark.parametrize("workers", [1, 4])
def test_a_batch_gets_few_interrupts_and_keeps_flush_order(image, monkeypatch, workers):
    """Chains popped in one notify are completed in at most one group per worker (one interrupt
    each); a FLUSH in the batch still sees every write before it."""
    path, original = image
    seen = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: seen.append(path.read_bytes()))
    r = Rig(path, workers=workers, qsize=64)
    try:
        writes = {s: pattern(512, s) for s in (2, 4, 6, 8, 10)}
        heads = [r.request(spec.VIRTIO_BLK_T_OUT, s, out=d, indirect=True)[0] for s, d in writes.items()]
        reads = [r.request(spec.VIRTIO_BLK_T_IN, 30 + i, in_len=512, indirect=True) for i in range(3)]
        fh, _, fst = r.request(spec.VIRTIO_BLK_T_FLUSH, 0, indirect=True)
        later = r.request(spec.VIRTIO_BLK_T_IN, 40, in_len=512, indirect=True)
        used = r.run()
        assert sorted(h for h, _ in used) == sorted(heads + [h for h, _, _ in reads] + [fh, later[0]])
        assert r.drv.mem.read_u8(fst) == spec.VIRTIO_BLK_S_OK
        assert len(seen) == 1 and all(seen[0][s * 512:(s + 1) * 512] == d for s, d in writes.items())
        for i, (_, data, st_addr) in enumerate(reads + [later]):
            sector = 30 + i if i < 3 else 40
            assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
            assert r.gather(data) == original[sector * 512:(sector + 1) * 512]
        # 8 requests before the FLUSH in <= workers groups, the FLUSH alone, then 1 request
        assert 1 <= len(r.irqs) <= min(workers, 8) + 2
        if workers == 1:
            assert len(r.irqs) == 3
    finally:
        r.close()


def test_bad_chain_in_a_batch_does_not_lose_earlier_requests(image):
    path, original = image
    r = Rig(path)
    try:
        head, data, st_addr = r.request(spec.VIRTIO_BLK_T_IN, 1, in_len=512)
        r.request(spec.VIRTIO_BLK_T_IN, 2, status=False)  # no writable byte at all
        with pytest.raises(DeviceError):
            r.dev.queue_notify(0)
        assert r.dev.wait_idle(10)
        assert r.drv.take_used() == [(head, 513)]
        assert r.gather(data) == original[512:1024]
    finally:
        r.close()


# -- other request types --------------------------------------------------------------------------------

def test_flush_ok(rig):
    head, _, st_addr = rig.request(spec.VIRTIO_BLK_T_FLUSH, 0)
    assert rig.run() == [(head, 1)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK


def test_flush_waits_for_earlier_writes(image, monkeypatch):
    path, _ = image
    real_pwrite = os.pwrite
    calls = []

    real_pwritev = os.pwritev

    def slow_pwrite(fd, data, off):
        time.sleep(0.05)
        return real_pwrite(fd, data, off)

    def slow_pwritev(fd, bufs, off):
        time.sleep(0.05)
        return real_pwritev(fd, bufs, off)

    def fake_fdatasync(fd):
        calls.append(path.read_bytes())

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    _route(monkeypatch, "pwritev", slow_pwritev)
    monkeypatch.setattr(os, "fdatasync", fake_fdatasync)
    r = Rig(path, workers=4)
    try:
        writes = {s: pattern(512, s) for s in (1, 9, 20, 33)}
        heads = [r.request(spec.VIRTIO_BLK_T_OUT, s, out=d)[0] for s, d in writes.items()]
        fh, _, st_addr = r.request(spec.VIRTIO_BLK_T_FLUSH, 0)
        used = r.run()
        assert sorted(h for h, _ in used) == sorted(heads + [fh])
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
        assert len(calls) == 1
        for s, d in writes.items():  # every earlier write was in the file when fdatasync ran
            assert calls[0][s * 512:(s + 1) * 512] == d
    finally:
        r.close()


def test_flush_error_is_ioerr(rig, monkeypatch):
    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    _, _, st_addr = rig.request(spec.VIRTIO_BLK_T_FLUSH, 0)
    rig.run()
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR


def test_flush_error_is_sticky(rig, monkeypatch):
    """Once fdatasync failed, data acknowledged before may be lost: every later FLUSH fails,
    even after the driver resets the device (until the image is opened again)."""
    calls = []

    def fails_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", fails_once)
    statuses = []
    for _ in range(2):
        _, _, st_addr = rig.request(spec.VIRTIO_BLK_T_FLUSH, 0)
        rig.run()
        statuses.append(rig.drv.mem.read_u8(st_addr))
    rig.dev.reset()
    rig.drv = MockDriver(16)
    rig.q = rig.drv.queue()
    rig.dev.activate(rig.drv.mem, [rig.q], ALL_FEATURES, rig.irqs.append)
    head, _, st_addr = rig.request(spec.VIRTIO_BLK_T_FLUSH, 0)
    assert rig.run() == [(head, 1)]
    statuses.append(rig.drv.mem.read_u8(st_addr))
    assert statuses == [spec.VIRTIO_BLK_S_IOERR] * 3


def test_get_id(rig):
    head, data, st_addr = rig.request(spec.VIRTIO_BLK_T_GET_ID, 0, in_len=20, pieces=2)
    assert rig.run() == [(head, 21)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
    assert rig.gather(data) == b"hypyr-disk-0".ljust(20, b"\0")


def test_get_id_without_serial(image):
    r = Rig(image[0], serial=None)
    try:
        _, data, st_addr = r.request(spec.VIRTIO_BLK_T_GET_ID, 0, in_len=20)
        r.run()
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
        assert r.gather(data) == bytes(20)
    finally:
        r.close()


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 0xFFFFFFFF])
def test_unknown_type_unsupp(rig, rtype):
    head, _, st_addr = rig.request(rtype, 0, in_len=512)
    assert rig.run() == [(head, 1)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_UNSUPP


def seg(sector, count, flags=0):
    return struct.pack("<QII", sector, count, flags)


def test_write_zeroes_and_discard(rig, image):
    path, original = image
    _, _, st_addr = rig.request(spec.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg(2, 3) + seg(10, 1, 1))
    rig.run()
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
    now = path.read_bytes()
    assert now[1024:2560] == bytes(1536) and now[5120:5632] == bytes(512)
    assert now[:1024] == original[:1024] and now[2560:5120] == original[2560:5120]
    assert now[5632:] == original[5632:]

    _, _, st_addr = rig.request(spec.VIRTIO_BLK_T_DISCARD, 0, out=seg(20, 8))
    rig.run()
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
    after = path.read_bytes()
    assert len(after) == len(original)
    assert after[:20 * 512] == now[:20 * 512] and after[28 * 512:] == now[28 * 512:]


def test_write_zeroes_fallback_without_fallocate(image, monkeypatch):
    monkeypatch.setattr(diskimage, "_fallocate", None)
    r = Rig(image[0])
    try:
        _, _, st_addr = r.request(spec.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg(4, 2, 1) + seg(7, 1))
        r.run()
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_OK
        now = image[0].read_bytes()
        assert now[2048:3072] == bytes(1024) and now[3584:4096] == bytes(512)
        assert now[3072:3584] == image[1][3072:3584]
    finally:
        r.close()


@pytest.mark.parametrize("rtype,segs,expect", [
    (spec.VIRTIO_BLK_T_DISCARD, seg(0, 1, 1), spec.VIRTIO_BLK_S_UNSUPP),           # unmap flag on discard
    (spec.VIRTIO_BLK_T_WRITE_ZEROES, seg(0, 1, 2), spec.VIRTIO_BLK_S_UNSUPP),      # reserved flag
    (spec.VIRTIO_BLK_T_WRITE_ZEROES, seg(SECTORS, 1), spec.VIRTIO_BLK_S_IOERR),    # beyond the end
    (spec.VIRTIO_BLK_T_DISCARD, seg(2**63, 1), spec.VIRTIO_BLK_S_IOERR),
    (spec.VIRTIO_BLK_T_DISCARD, seg(0, 1) + seg(SECTORS - 1, 2), spec.VIRTIO_BLK_S_IOERR),  # 2nd segment bad
    (spec.VIRTIO_BLK_T_DISCARD, seg(0, 1)[:12], spec.VIRTIO_BLK_S_IOERR),          # truncated segment
    (spec.VIRTIO_BLK_T_DISCARD, seg(0, 1) * (spec.MAX_DISCARD_SEG + 1), spec.VIRTIO_BLK_S_IOERR),
])
def test_discard_write_zeroes_rejected(rig, image, rtype, segs, expect):
    _, _, st_addr = rig.request(rtype, 0, out=segs)
    rig.run()
    assert rig.drv.mem.read_u8(st_addr) == expect
    assert image[0].read_bytes() == image[1]


def test_discard_not_negotiated_unsupp(image):
    r = Rig(image[0], features=0)
    try:
        _, _, st_addr = r.request(spec.VIRTIO_BLK_T_DISCARD, 0, out=seg(0, 1))
        r.run()
        assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_UNSUPP
        assert image[0].read_bytes() == image[1]
    finally:
        r.close()


# -- malformed requests -----------------------------------------------------------------------------

@pytest.mark.parametrize("rtype,sector,n", [
    (spec.VIRTIO_BLK_T_IN, SECTORS, 512),         # just past the end
    (spec.VIRTIO_BLK_T_IN, SECTORS - 1, 1024),    # straddles the end
    (spec.VIRTIO_BLK_T_IN, 2**63, 512),           # overflow when multiplied by 512
    (spec.VIRTIO_BLK_T_IN, 2**64 - 1, 512),
    (spec.VIRTIO_BLK_T_IN, 0, 100),               # not a multiple of 512
    (spec.VIRTIO_BLK_T_OUT, SECTORS, 512),
    (spec.VIRTIO_BLK_T_OUT, SECTORS - 1, 1024),
    (spec.VIRTIO_BLK_T_OUT, 2**63, 512),
    (spec.VIRTIO_BLK_T_OUT, 2**64 - 1, 512),
    (spec.VIRTIO_BLK_T_OUT, 0, 513),
])
def test_bad_range_or_length_ioerr(rig, image, rtype, sector, n):
    if rtype == spec.VIRTIO_BLK_T_IN:
        head, data, st_addr = rig.request(rtype, sector, in_len=n)
    else:
        head, data, st_addr = rig.request(rtype, sector, out=pattern(n, 1))
    assert rig.run() == [(head, 1)]
    assert rig.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR
    assert rig.gather(data) == bytes(n if rtype == spec.VIRTIO_BLK_T_IN else 0)
    assert image[0].read_bytes() == image[1]


def test_short_header_ioerr(rig):
    d = rig.drv
    hdr = d.alloc(bytes(8))
    st_addr = d.alloc(1)
    head = d.add_chain([Buf(hdr, 8), Buf(st_addr, 1, write=True)])
    assert rig.run() == [(head, 1)]
    assert d.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("rtype", [spec.VIRTIO_BLK_T_IN, spec.VIRTIO_BLK_T_OUT, spec.VIRTIO_BLK_T_FLUSH,
                                   spec.VIRTIO_BLK_T_GET_ID, spec.VIRTIO_BLK_T_DISCARD, spec.VIRTIO_BLK_T_WRITE_ZEROES])
def test_header_in_a_device_writable_buffer_is_ioerr_without_traceback(rig, image, rtype, indirect, caplog):
    """A chain with only device-writable buffers (its "header" too: data length -16) is a
    malformed request: IOERR and a warning, never an exception inside the device."""
    d = rig.drv
    hdr = d.alloc(struct.pack("<IIQ", rtype, 0, 0))
    data = d.alloc(seg(0, 4))
    st_addr = d.alloc(1)
    head = d.add_chain([Buf(hdr, 16, write=True), Buf(data, 16, write=True), Buf(st_addr, 1, write=True)],
                       indirect=indirect)
    with caplog.at_level(logging.DEBUG, logger="hypyr.dev.virtio-blk"):
        assert rig.run() == [(head, 1)]
    assert d.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR
    assert d.mem.read(hdr, 16) == struct.pack("<IIQ", rtype, 0, 0) and d.mem.read(data, 16) == seg(0, 4)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert image[0].read_bytes() == image[1]


def test_no_status_byte_is_device_error(rig, image):
    rig.request(spec.VIRTIO_BLK_T_OUT, 0, out=pattern(512, 1), status=False)
    with pytest.raises(DeviceError):
        rig.dev.queue_notify(0)
    assert rig.dev.wait_idle(5)
    assert image[0].read_bytes() == image[1]


def test_rejected_requests_are_rate_limited(rig, caplog):
    """A flood of bad requests gives a few log lines, not one each; unknown request types share
    one key (the type is the guest's to choose, and each new key would log afresh)."""
    with caplog.at_level(logging.DEBUG, logger="hypyr.dev.virtio-blk"):
        for batch in range(4):
            for i in range(8):
                rig.request(spec.VIRTIO_BLK_T_IN, SECTORS, in_len=512, indirect=True)
                rig.request(1000 + 8 * batch + i, 0, in_len=512, indirect=True)
            assert len(rig.run()) == 16
    messages = [r.getMessage() for r in caplog.records]
    assert 1 <= len([m for m in messages if "beyond" in m]) <= 5
    assert 1 <= len([m for m in messages if "unsupported request type" in m]) <= 5


def test_read_only(tmp_path):
    p = tmp_path / "ro.img"
    original = make_image(p)
    os.utime(p, (1_000_000, 1_000_000))
    os.chmod(p, 0o444)
    r = Rig(p, read_only=True)
    try:
        f = r.dev.device_features()
        assert f & (1 << spec.VIRTIO_BLK_F_RO)
        assert not f & ((1 << spec.VIRTIO_BLK_F_DISCARD) | (1 << spec.VIRTIO_BLK_F_WRITE_ZEROES))
        assert r.dev.config_read(36, 24) == bytes(24)
        _, _, s1 = r.request(spec.VIRTIO_BLK_T_OUT, 0, out=pattern(1024, 8))
        _, _, s2 = r.request(spec.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg(0, 4))
        _, _, s3 = r.request(spec.VIRTIO_BLK_T_DISCARD, 0, out=seg(0, 4))
        _, data, s4 = r.request(spec.VIRTIO_BLK_T_IN, 1, in_len=512)
        _, _, s5 = r.request(spec.VIRTIO_BLK_T_FLUSH, 0)
        assert len(r.run()) == 5
        assert [r.drv.mem.read_u8(s) for s in (s1, s2, s3, s4, s5)] == [1, 1, 1, 0, 0]
        assert r.gather(data) == original[512:1024]
        assert p.read_bytes() == original
        assert p.stat().st_mtime == 1_000_000
    finally:
        r.close()


# -- concurrency and lifecycle ------------------------------------------------------------------------

def test_many_requests_in_flight(image):
    path, original = image
    r = Rig(path, qsize=64, workers=4)
    try:
        expected = {}
        for i in range(30):  # 15 direct chains of 3 + 15 indirect: 60 of 64 descriptors
            head, data, st_addr = r.request(spec.VIRTIO_BLK_T_IN, i, in_len=512, indirect=bool(i % 2))
            expected[head] = (data, st_addr, i)
        used = r.run()
        assert sorted(h for h, _ in used) == sorted(expected)
        assert all(n == 513 for _, n in used)
        for _head, (data, st_addr, i) in expected.items():
            assert r.drv.mem.read_u8(st_addr) == 0
            assert r.gather(data) == original[i * 512:(i + 1) * 512]
    finally:
        r.close()


def test_reset_with_requests_in_flight(image, monkeypatch):
    path, original = image
    gate = threading.Event()
    entered = threading.Semaphore(0)
    real_preadv = os.preadv

    calls = []

    def gated_preadv(fd, bufs, off):
        calls.append(off)
        entered.release()
        gate.wait(10)
        return real_preadv(fd, bufs, off)

    _route(monkeypatch, "preadv", gated_preadv)
    monkeypatch.setattr(B, "RESET_WAIT", 0.1)
    r = Rig(path, workers=2)
    try:
        reqs = [r.request(spec.VIRTIO_BLK_T_IN, i, in_len=512) for i in range(4)]
        # notified from an I/O thread, which runs the last group itself: a worker and it block
        notifier = threading.Thread(target=r.dev.queue_notify, args=(0,))
        notifier.start()
        assert entered.acquire(timeout=5) and entered.acquire(timeout=5)
        r.q.reset()
        r.dev.reset()                      # returns after RESET_WAIT with requests still in flight
        assert r.dev.queues == [] and r.dev.mem is None

        # The driver sets the queue up again (same memory, same SplitQueue) and activates.
        d = r.drv
        d.mem.fill(d.desc, d.used + 6 + 8 * d.size - d.desc)
        d2 = MockDriver(16, mem=d.mem)
        d2.data_next = 0x80000
        q2 = d2.queue()
        irqs2: list[int] = []
        r.dev.activate(d.mem, [q2], ALL_FEATURES, irqs2.append)

        gate.set()
        assert r.dev.wait_idle(10)
        notifier.join(5)
        assert d2.take_used() == []        # late completions did not touch the new queue
        assert irqs2 == []
        # The two reads that were already in the kernel at reset time land in their own guest
        # buffers (guest RAM the driver handed over: see the module docstring); no other read is
        # started after the reset, and no old request writes its status byte.
        assert len(calls) == 2
        started = {off // 512 for off in calls}
        for i, (_, data, st_addr) in enumerate(reqs):
            assert r.gather(data) == (original[i * 512:(i + 1) * 512] if i in started else bytes(512))
            assert d.mem.read_u8(st_addr) == 0xEE

        # The device still works on the new queue.
        r.drv, r.q = d2, q2
        head, data, st_addr = r.request(spec.VIRTIO_BLK_T_IN, 7, in_len=512)
        assert r.run() == [(head, 513)]
        assert r.gather(data) == original[7 * 512:8 * 512]
        assert irqs2 == [0]
    finally:
        gate.set()
        r.close()


def test_republished_heads_cannot_queue_unbounded_work(image, monkeypatch):
    """A driver that publishes heads still in flight again (here: all of them, while the first
    requests are stuck in their reads) is refused (DeviceError: NEEDS_RESET); the device never
    holds more requests than the queue size."""
    path, original = image
    gate = threading.Event()
    entered = threading.Semaphore(0)
    real_preadv = os.preadv

    def gated_preadv(fd, bufs, off):
        entered.release()
        gate.wait(10)
        return real_preadv(fd, bufs, off)

    _route(monkeypatch, "preadv", gated_preadv)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    r = Rig(path, qsize=16, workers=4)
    try:
        heads = [r.request(spec.VIRTIO_BLK_T_IN, i, in_len=512, indirect=True)[0] for i in range(15)]
        heads.append(r.request(spec.VIRTIO_BLK_T_FLUSH, 0, indirect=True)[0])
        r.dev.queue_notify(0)  # the batch ends with a FLUSH: every group goes to the workers
        for _ in range(4):
            assert entered.acquire(timeout=5)
        for h in heads:  # all of them again, while they are still the device's
            r.drv.publish(h)
        with pytest.raises(DeviceError, match="size exceeded"):
            r.dev.queue_notify(0)
        gate.set()
        assert r.dev.wait_idle(10)
        assert r.drv.used_idx() == 16  # the 16 real requests, nothing more was taken
    finally:
        gate.set()
        r.close()


@pytest.mark.parametrize("inline", [True, False])
def test_close_fences_and_waits_for_running_requests(image, monkeypatch, inline):
    """close() while a request is inside its pwritev (run by the notifying thread itself, or by
    a worker): close waits for it, and the request starts no more I/O (its next chunk would go
    to whatever file gets the descriptor number next)."""
    path, _ = image
    monkeypatch.setattr(blk_transfer, "IO_CHUNK", 512)  # a 4-sector write: four pwritev calls
    gate, entered, closed = threading.Event(), threading.Event(), threading.Event()
    after_close = []
    real_pwritev = os.pwritev

    def gated_pwritev(fd, bufs, off):
        after_close.append(closed.is_set())
        entered.set()
        gate.wait(10)
        return real_pwritev(fd, bufs, off)

    _route(monkeypatch, "pwritev", gated_pwritev)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    r = Rig(path, workers=2)
    try:
        r.request(spec.VIRTIO_BLK_T_OUT, 4, out=pattern(4 * 512, 5), pieces=4)
        if not inline:
            r.request(spec.VIRTIO_BLK_T_FLUSH, 0)  # ends the batch: both groups go to the workers
        notifier = threading.Thread(target=r.dev.queue_notify, args=(0,))
        notifier.start()
        assert entered.wait(5)

        def close():
            r.dev.close()
            closed.set()
        closer = threading.Thread(target=close)
        closer.start()
        closer.join(0.3)
        waited = closer.is_alive()
        gate.set()
        closer.join(10)
        notifier.join(10)
        assert waited and closed.is_set()
        assert after_close == [False]  # the one chunk already in the kernel, no other
    finally:
        gate.set()
        r.close()


def test_close_then_notify_fails_requests(image):
    r = Rig(image[0])
    r.close()
    r.close()  # idempotent
    head, _, st_addr = r.request(spec.VIRTIO_BLK_T_IN, 0, in_len=512)
    r.dev.queue_notify(0)
    assert r.drv.take_used() == [(head, 1)]
    assert r.drv.mem.read_u8(st_addr) == spec.VIRTIO_BLK_S_IOERR


def test_io_error_is_ioerr(rig, monkeypatch):
    def failing(*a):
        raise OSError(5, "Input/output error")
    _route(monkeypatch, "preadv", failing)
    monkeypatch.setattr(os, "pwrite", failing)
    _route(monkeypatch, "pwritev", failing)
    _, _, s1 = rig.request(spec.VIRTIO_BLK_T_IN, 0, in_len=512)
    _, _, s2 = rig.request(spec.VIRTIO_BLK_T_OUT, 0, out=bytes(512))
    assert len(rig.run()) == 2
    assert rig.drv.mem.read_u8(s1) == rig.drv.mem.read_u8(s2) == spec.VIRTIO_BLK_S_IOERR


def test_reset_and_notify_without_activation(image):
    dev = VirtioBlk(str(image[0]))
    try:
        dev.queue_notify(0)
        dev.queue_notify(5)
        dev.reset()
        with pytest.raises(DeviceError):
            dev.activate(MockDriver().mem, [], 0, lambda i: None)
    finally:
        dev.close()


# -- hostile chains (property) -------------------------------------------------------------------------

PROP_SECTORS = 8
TAIL = 100  # bytes past the last whole sector: never visible, never written

interesting_sectors = st.one_of(st.integers(0, PROP_SECTORS + 1),
                                st.sampled_from([2**55, 2**63, 2**64 - 1, 2**64 - 2]),
                                st.integers(0, 2**64 - 1))
types = st.one_of(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 2**32 - 1))
segments = st.lists(st.tuples(interesting_sectors, st.one_of(st.integers(0, 9), st.integers(0, 2**32 - 1)),
                              st.sampled_from([0, 0, 1, 2, 0x80000000])), max_size=3)
lengths = st.one_of(st.sampled_from([0, 1, 16, 32, 511, 512, 512, 512, 513, 1024, 1025]), st.integers(0, 2048))
# Mostly well-formed chains (header, readable data, writable data, status) so that requests get
# deep into the device; sometimes truncated headers, no status byte, or readable-after-writable.
readables = st.tuples(st.sampled_from([16, 16, 16, 8, 20, 528]), st.lists(lengths, max_size=3))
writables = st.one_of(st.lists(lengths, max_size=3).map(lambda w: w + [1]), st.lists(lengths, max_size=3))


class _Errors(logging.Handler):
    """Records of level ERROR and above, and any with a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rtype=types, sector=interesting_sectors, segs=segments, junk=st.binary(max_size=64),
       readable=readables, writable=writables, shuffle=st.one_of(st.just(None), st.randoms()),
       read_only=st.booleans(), indirect=st.booleans(), extra_reqs=st.integers(0, 2),
       all_writable=st.integers(0, 4).map(lambda i: i == 0))
def test_hostile_requests(rtype, sector, segs, junk, readable, writable, shuffle, read_only, indirect,
                          extra_reqs, all_writable):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.img"
        original = pattern(PROP_SECTORS * 512 + TAIL, 11)
        path.write_bytes(original)
        os.utime(path, (1_000_000, 1_000_000))
        errors = _Errors()
        logger = logging.getLogger("hypyr.dev.virtio-blk")
        logger.addHandler(errors)
        r = Rig(path, read_only=read_only, workers=2)
        try:
            payload = struct.pack("<IIQ", rtype, 0, sector) + b"".join(seg(*s) for s in segs) + junk
            d = r.drv
            published = []
            # (length, device-writable, holds the payload): header and data, then the rest
            layout = [(n, False, True) for n in [readable[0], *readable[1]]] + [(n, True, False) for n in writable]
            if shuffle is not None and shuffle.random() < 0.3:
                shuffle.shuffle(layout)
            if all_writable:  # the header too: "data length" -16
                layout = [(n, True, payload_part) for n, _, payload_part in layout]
            for _ in range(1 + extra_reqs):
                bufs, pos, writable_total, status_addr = [], 0, 0, None
                for n, write, carries in layout:
                    addr = d.alloc(max(n, 1))
                    if carries:
                        d.mem.write(addr, payload[pos:pos + n].ljust(n, b"\xA5"))
                        pos += n
                    if write:
                        writable_total += n
                        if n:
                            status_addr = addr + n - 1
                    bufs.append(Buf(addr, n, write))
                published.append((d.add_chain(bufs, indirect=indirect), writable_total, status_addr))
            try:
                r.dev.queue_notify(0)
            except (DeviceError, QueueError) as e:
                event(f"notify raised {type(e).__name__}")
            assert r.dev.wait_idle(10)
            for head, n in d.take_used():
                matches = [(wt, sa) for h, wt, sa in published if h == head]
                assert matches and n <= matches[0][0]
                event(f"type {rtype if rtype in (0, 1, 4, 8, 11, 13) else 'other'}: "
                      f"status {d.mem.read_u8(matches[0][1])}")
            now = path.read_bytes()
            assert len(now) == len(original)
            assert now[PROP_SECTORS * 512:] == original[PROP_SECTORS * 512:]
            if read_only:
                assert now == original
                assert path.stat().st_mtime == 1_000_000
            assert not errors.records, [rec.getMessage() for rec in errors.records]
        finally:
            r.close()
            logger.removeHandler(errors)
