"""The save/migration record stream (hypyr.vmm.stream), the header and guest RAM pieces of
hypyr.vmm.snapshot, and GuestMemory's dirty tracking for live migration; no /dev/kvm needed."""

from __future__ import annotations

import array
import io
import itertools
import json
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.errors import SnapshotError, SnapshotTruncated
from hypyr.kvm import CpuidEntry
from hypyr.memory import GuestMemory
from hypyr.vmm import snapshot, stream
from hypyr.vmm.config import DiskConfig, NetConfig, VmConfig, config_from_dict, config_to_dict
from hypyr.vmm.header import parse_header
from hypyr.vmm.pages import PageSender, page_runs, zero_pages
from hypyr.vmm.stream import PAGE, Rec, StreamReader, StreamWriter

MiB = 1 << 20


def write_stream(records, *, end: bool = True) -> bytes:
    out = io.BytesIO()
    w = StreamWriter(out)
    w.preamble()
    for rtype, payload in records:
        w.record(rtype, payload)
    if end:
        w.end()
    return out.getvalue()


def read_all(data: bytes) -> list[tuple[Rec, bytes]]:
    r = StreamReader(io.BytesIO(data))
    r.preamble()
    got = []
    while True:
        rtype, payload = r.next()
        got.append((rtype, payload))
        if rtype is Rec.END:
            assert r.ended
            return got


SAMPLE = [(Rec.HEADER, b'{"a":1}'), (Rec.PAGES, stream.pages_head(0x1000, 1) + os.urandom(PAGE)),
          (Rec.ZERO, stream.zero_payload([(0, 1), (0x2000, 3)])), (Rec.STATE, b"{}")]


# -- the record stream ------------------------------------------------------------------------------
def test_round_trip_and_end():
    data = write_stream(SAMPLE)
    got = read_all(data)
    assert got[:-1] == SAMPLE and got[-1][0] is Rec.END
    assert data[:8] == b"HYPYRSNP" and struct.unpack_from("<H", data, 8)[0] == stream.VERSION
    records, nbytes, _ = stream.END.unpack(got[-1][1])
    assert records == len(SAMPLE) and nbytes == len(data) - 32


def test_every_truncation_is_one_sentence():
    """...and of its own type: a migration's receiver waits for more data on it, and only on it."""
    data = write_stream(SAMPLE)
    for cut in range(len(data)):
        with pytest.raises(SnapshotTruncated, match="truncated") as e:
            read_all(data[:cut])
        assert "\n" not in str(e.value) and isinstance(e.value, SnapshotError)


def test_every_flipped_byte_is_caught():
    data = write_stream([(Rec.HEADER, b'{"a":1}'), (Rec.PAGES, stream.pages_head(0, 1) + bytes(range(256)) * 16),
                         (Rec.STATE, b"{}")])
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(SnapshotError):
            read_all(bytes(bad))


def test_magic_version_and_preamble_checksum():
    data = write_stream(SAMPLE)
    with pytest.raises(SnapshotError, match="not a hypyr save file"):
        read_all(b"GARBAGE!" + data[8:])
    head = stream.PREAMBLE.pack(stream.MAGIC, 7, 0, 0)[:12]
    with pytest.raises(SnapshotError, match=f"format version 7; this hypyr reads version {stream.VERSION}"):
        read_all(head + stream.CRC.pack(zlib.crc32(head)) + data[16:])
    with pytest.raises(SnapshotError, match="preamble"):
        read_all(head + data[12:])


class CountingReader(io.BytesIO):
    """Records the largest read asked of it."""
    largest = 0

    def read(self, n=-1):
        self.largest = max(self.largest, n)
        return super().read(n)


@pytest.mark.parametrize("rtype, length", [(Rec.PAGES, 0xFFFF_FFFF), (Rec.HEADER, 2 << 20), (Rec.END, 21),
                                           (Rec.ZERO, 1 << 30), (Rec.GO, 1)])
def test_a_huge_length_is_refused_before_reading(rtype, length):
    data = write_stream([])[:16] + stream.RECORD.pack(rtype, length) + b"x" * 100
    src = CountingReader(data)
    r = StreamReader(src)
    r.preamble()
    with pytest.raises(SnapshotError, match="claims"):
        r.next()
    assert src.largest <= 16


def test_a_long_but_allowed_length_reads_only_what_is_there():
    data = write_stream([])[:16] + stream.RECORD.pack(Rec.STATE, 64 << 20) + b"{}"
    r = StreamReader(CountingReader(data))
    r.preamble()
    with pytest.raises(SnapshotError, match="truncated"):
        r.next()


def test_unknown_type_records_in_the_wrong_place_and_end_mismatch():
    data = write_stream([])[:16]
    with pytest.raises(SnapshotError, match="unknown type 99"):
        read_all(data + stream.RECORD.pack(99, 0) + b"\0" * 4)
    r = StreamReader(io.BytesIO(write_stream(SAMPLE)))
    r.preamble()
    with pytest.raises(SnapshotError, match="a HEADER record where STATE belongs"):
        r.next(expect=(Rec.STATE,))
    # records swapped (each still intact): the END record says so
    parts = write_stream(SAMPLE)
    a = write_stream([SAMPLE[1], SAMPLE[2]], end=False)
    b = write_stream([SAMPLE[2], SAMPLE[1]], end=False)
    assert a != b and len(a) == len(b)
    spliced = parts.replace(a[16:], b[16:])
    with pytest.raises(SnapshotError, match="END record does not match"):
        read_all(spliced)


def test_json_payloads():
    state = {"a": b"\x00\xff" * 3, "n": [1, (1 << 64) - 1, {"b": b""}], "s": "x", "none": None}
    back = stream.decode_json(stream.encode_json(state), "w", "STATE")
    assert back == state
    for bad in (b"[" * 100_000 + b"]" * 100_000, b'{"$b64": "!!"}', b'{"$b64": "AA==", "x": 1}', b"NaN",
                b"\xff\xfe", b"{", b"1" * 5000):
        with pytest.raises(SnapshotError, match="STATE record is not valid"):
            stream.decode_json(bad, "the file", "STATE")
    with pytest.raises(TypeError):
        stream.encode_json({"x": object()})


def test_page_and_zero_payloads():
    run = stream.RUN.size
    assert stream.parse_pages_head(stream.pages_head(0x3000, 2), run + 2 * PAGE, "f") == (0x3000, 2)
    for bad, length in ((stream.pages_head(0x3000, 2), run + PAGE), (stream.pages_head(0x3001, 1), run + PAGE),
                        (stream.pages_head(0, 0), run), (stream.pages_head(0, 257), run + 257 * PAGE), (b"short", 5)):
        with pytest.raises(SnapshotError, match="corrupt"):
            stream.parse_pages_head(bad, length, "f")
    assert stream.parse_zero(stream.zero_payload([(0, 5), (PAGE * 9, 1)]), "f") == [(0, 5), (PAGE * 9, 1)]
    for bad in (b"123", stream.zero_payload([(0, 0)]), stream.zero_payload([(5, 1)])):
        with pytest.raises(SnapshotError, match="corrupt"):
            stream.parse_zero(bad, "f")


# -- configuration and header ----------------------------------------------------------------------------
CONFIG = VmConfig(kernel="/boot/vmlinuz", initrd=None, memory=64 * MiB, vcpus=2, exec_cmd="uname -r",
                  disks=[DiskConfig("/srv/a.img"), DiskConfig("/srv/b.img", read_only=True)], root_disk=True,
                  console="virtio", nets=[NetConfig(tap_fd=7, mac="00:16:3e:00:00:01", mtu=1400, vhost=False,
                                                    tx_rate=(1 << 20, 0.05), name="vif1.0")])


def test_config_round_trip_keeps_everything_but_the_tap():
    d = json.loads(json.dumps(config_to_dict(CONFIG)))
    back = config_from_dict(d)
    assert back.nets[0].tap_fd == -1
    assert back == CONFIG._replace(nets=[CONFIG.nets[0]._replace(tap_fd=-1)])


def header_payload(**changes) -> bytes:
    d = {"format": stream.VERSION, "kind": "save", "created": 1.5, "config": config_to_dict(CONFIG),
         "memory": [[0, 64 * MiB]], "devices": ["serial0"],
         "cpu": {"vendor": "GenuineIntel", "family": 6, "model": 85, "stepping": 4, "features": {"0x1.0.ecx": 1}},
         "extra": {"name": "web"}}
    d.update(changes)
    return stream.encode_json(d)


def test_header_parse_and_vm_config():
    h = parse_header(header_payload(), "the file")
    assert (h.kind, h.memory, h.devices, h.extra) == ("save", [(0, 64 * MiB)], ["serial0"], {"name": "web"})
    assert h.vm_config([9]).nets[0].tap_fd == 9
    with pytest.raises(SnapshotError, match="1 NIC"):
        h.vm_config()


@pytest.mark.parametrize("changes", [{"format": stream.VERSION + 1}, {"kind": "other"}, {"memory": [[0, 32 * MiB]]},
                                     {"memory": [[0, 64 * MiB], [1 << 32, MiB]]}, {"extra": []},
                                     {"devices": [1]}, {"cpu": {"vendor": "x"}}, {"surprise": 1},
                                     {"config": {**config_to_dict(CONFIG), "vcpus": 0}},
                                     {"config": {**config_to_dict(CONFIG), "memory": 12345}}])
def test_bad_headers_are_one_sentence(changes):
    with pytest.raises(SnapshotError, match=r"^the file is corrupt \(its HEADER: ") as e:
        parse_header(header_payload(**changes), "the file")
    assert "\n" not in str(e.value)


class FakeKvm:
    def __init__(self, vendor: str, leaf7_ebx: int, eax1: int = 0x50654):
        ebx, edx, ecx = (int.from_bytes(vendor.encode()[i:i + 4], "little") for i in (0, 4, 8))
        self.entries = [CpuidEntry(0, 0, 0, 0xD, ebx, ecx, edx), CpuidEntry(1, 0, 0, eax1, 0, 0, 0),
                        CpuidEntry(7, 0, 1, 0, leaf7_ebx, 0, 0)]

    def supported_cpuid(self):
        return list(self.entries)

    def check_extension(self, cap: int) -> int:
        return 0  # (KVM_CAP_TSC_DEADLINE_TIMER: the guest CPUID is then KVM's alone)


def test_cpu_check():
    src = FakeKvm("GenuineIntel", 0b1011)
    sig = snapshot.cpu_signature(src, [CpuidEntry(7, 0, 1, 0, 0b0011, 0, 0)])
    assert (sig["vendor"], sig["family"], sig["model"], sig["stepping"]) == ("GenuineIntel", 6, 0x55, 4)
    snapshot.check_cpu(sig, FakeKvm("GenuineIntel", 0b0111, eax1=0x906EA), 2, "f")  # other model: fine
    with pytest.raises(SnapshotError, match="f was made on a GenuineIntel CPU; this host's is AuthenticAMD"):
        snapshot.check_cpu(sig, FakeKvm("AuthenticAMD", 0b1111), 2, "f")
    with pytest.raises(SnapshotError, match=r"needs CPU features this host lacks \(CPUID 0x7.0.ebx bit\(s\) 1\)"):
        snapshot.check_cpu(sig, FakeKvm("GenuineIntel", 0b1001), 2, "f")


# -- guest RAM through the stream -------------------------------------------------------------------------
def _memory():
    return GuestMemory.anonymous([(0, 2 * MiB), (4 * MiB, MiB)], hugepages=False)


def test_pages_round_trip_with_zero_runs():
    src, dst = _memory(), _memory()
    try:
        for addr in (0x1000, 0x2000, 0x5000, 0x1F_F000, 4 * MiB, 5 * MiB - PAGE):
            src.write(addr + 7, os.urandom(100))
        out = io.BytesIO()
        w = StreamWriter(out)
        w.preamble()
        sender = PageSender(w, src)
        sender.send_all()
        assert (sender.data_pages, sender.zero_pages) == (6, 768 - 6)
        assert out.tell() < 7 * (PAGE + 32) + 200  # the zero pages cost no data
        # a second pass: one page zeroed, one changed, as a migration's next iteration sends them
        src.fill(0x5000, PAGE)
        src.write(0x6000, b"new")
        sender.send_dirty([[5, 6], []])
        w.record(Rec.STATE, stream.encode_json({"x": 1}))
        w.end()
        r = StreamReader(io.BytesIO(out.getvalue()))
        r.preamble()
        assert snapshot.load_records(r, dst) == {"x": 1}
        for start, size in ((0, 2 * MiB), (4 * MiB, MiB)):
            assert dst.read(start, size) == src.read(start, size)
    finally:
        src.close()
        dst.close()


def test_the_state_is_handed_over_as_it_comes_and_pages_after_it_still_load():
    """A migration sends STATE before its last pages: on_state gets it at once (the pages
    after it not yet in RAM), and those pages load before END."""
    src, dst = _memory(), _memory()
    try:
        src.write(0x3000, b"late page")
        out = io.BytesIO()
        w = StreamWriter(out)
        w.preamble()
        w.record(Rec.STATE, stream.encode_json({"x": 1}))
        PageSender(w, src).send_dirty([[3], []])
        w.end()
        seen = []
        r = StreamReader(io.BytesIO(out.getvalue()))
        r.preamble()
        state = snapshot.load_records(r, dst, on_state=lambda s: seen.append((s, dst.read(0x3000, 9))))
        assert state == {"x": 1} and seen == [({"x": 1}, bytes(9))]
        assert dst.read(0x3000, 9) == b"late page"
        r = StreamReader(io.BytesIO(write_stream([(Rec.STATE, b"{}"), (Rec.SYNC, b"")])))
        r.preamble()
        with pytest.raises(SnapshotError, match="SYNC"):   # a SYNC only before STATE
            snapshot.load_records(r, dst, on_sync=lambda: None)
    finally:
        src.close()
        dst.close()


def test_a_sync_is_answered_in_a_migration_and_refused_in_a_save_file():
    mem = _memory()
    try:
        data = write_stream([(Rec.SYNC, b""), (Rec.STATE, b"{}"), (Rec.SYNC, b""), (Rec.SYNC, b"")])
        answered: list[int] = []
        r = StreamReader(io.BytesIO(data))
        r.preamble()
        with pytest.raises(SnapshotError, match="SYNC"):   # none after the STATE either
            snapshot.load_records(r, mem, on_sync=lambda: answered.append(1))
        assert answered == [1]
        r = StreamReader(io.BytesIO(data))
        r.preamble()
        with pytest.raises(SnapshotError, match="SYNC"):
            snapshot.load_records(r, mem)
    finally:
        mem.close()


@pytest.mark.parametrize("record", [
    (Rec.PAGES, stream.pages_head(2 * MiB, 1) + bytes(PAGE)),             # the hole between the regions
    (Rec.PAGES, stream.pages_head(2 * MiB - PAGE, 2) + bytes(2 * PAGE)),  # across the end of a region
    (Rec.ZERO, stream.zero_payload([(4 * MiB, 0xFFFF_FFFF)])),            # far past RAM
    (Rec.ZERO, stream.zero_payload([(1 << 60, 1)])),
])
def test_pages_outside_ram_are_refused(record):
    mem = _memory()
    try:
        r = StreamReader(io.BytesIO(write_stream([record, (Rec.STATE, b"{}")])))
        r.preamble()
        with pytest.raises(SnapshotError, match="not guest RAM"):
            snapshot.load_records(r, mem)
    finally:
        mem.close()


def test_page_runs():
    assert list(page_runs([1, 2, 3, 7, 8, 10])) == [(1, 3), (7, 2), (10, 1)]
    assert list(page_runs(list(range(600)), 256)) == [(0, 256), (256, 256), (512, 88)]
    assert list(page_runs([])) == []


@settings(max_examples=300)
@given(st.sets(st.integers(0, 2000)), st.integers(1, 300))
def test_page_runs_are_the_maximal_consecutive_runs(pages, limit):
    pages = sorted(pages)
    runs = list(page_runs(pages, limit))
    assert [p for first, count in runs for p in range(first, first + count)] == pages
    assert all(1 <= count <= limit for _, count in runs)
    for (a, n), (b, _) in itertools.pairwise(runs):   # a run ends at a gap or at the limit
        assert a + n < b or n == limit


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["zero", "data", "zero-but-last", "zero-first"]), min_size=1, max_size=256))
def test_zero_pages_flags_exactly_the_pages_of_zeros(kinds):
    pages = {"zero": bytes(PAGE), "data": b"\x01" * PAGE, "zero-but-last": bytes(PAGE - 1) + b"\x07",
             "zero-first": b"\x00" + b"\x05" * (PAGE - 1)}
    data = b"".join(pages[k] for k in kinds)
    assert list(zero_pages(data)) == [int(k == "zero") for k in kinds]


# -- GuestMemory's dirty tracking -----------------------------------------------------------------------------
def test_dirty_tracking_records_the_vmm_writes():
    mem = _memory()
    fd = os.memfd_create("img")
    try:
        os.write(fd, os.urandom(4 * PAGE))
        mem.write(0x1000, b"before")  # not tracked yet
        with pytest.raises(RuntimeError):
            mem.take_dirty()
        mem.start_dirty_tracking()
        assert mem.dirty_tracking
        mem.write(0x3FFE, b"abcd")                      # pages 3 and 4
        mem.write_u32(4 * MiB + 0x10, 5)                # region 1, page 0
        mem.fill(0x10000, 3 * PAGE)                     # pages 16..18
        mem.preadv(fd, [(0x20000, 10), (0x30000 + PAGE - 1, 2)], 0)   # pages 32, 48, 49
        descs = array.array("I", struct.pack("<QIHHQIHH", 0x40000, 100, 2, 1, 0x41000, 100, 2, 0))
        assert mem.preadv_descs(fd, descs, 0, 2, 0) == 200  # pages 64, 65
        mem.views([(0x50000, 1)])                        # the holder may write: page 80
        ring = mem.view(0x60000, 16)                     # a ring: dirty at every look while held
        assert mem.take_dirty() == [[3, 4, 16, 17, 18, 32, 48, 49, 64, 65, 80, 96], [0]]
        assert mem.take_dirty() == [[96], []]
        del ring
        assert mem.take_dirty() == [[], []]
        mem.read(0x1000, 100)
        assert mem.take_dirty() == [[], []]  # reads are not writes
        mem.stop_dirty_tracking()
        mem.write(0x1000, b"after")
        assert not mem.dirty_tracking
    finally:
        os.close(fd)
        mem.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2 * MiB - 1), st.integers(1, 3 * PAGE)), max_size=20))
def test_dirty_pages_are_exactly_the_pages_written(writes):
    mem = _memory()
    try:
        mem.start_dirty_tracking()
        expected = set()
        for addr, n in writes:
            n = min(n, 2 * MiB - addr)
            mem.write(addr, b"x" * n)
            expected |= set(range(addr // PAGE, (addr + n - 1) // PAGE + 1))
        assert mem.take_dirty() == [sorted(expected), []]
    finally:
        mem.close()
