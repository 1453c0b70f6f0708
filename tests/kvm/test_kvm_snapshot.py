"""Save/restore and live migration of a whole VM (hypyr.vmm.snapshot, hypyr.vmm.migration) on
this host's /dev/kvm.

The guest: two vCPUs in real mode, each counting in memory and reporting its count with an OUT
(an I/O exit every round); vCPU 0 also writes its count into 16 pages in turn, and a test device
on the reporting ports writes each count into one of 32 pages of guest RAM itself, as a disk or
NIC would (KVM's dirty log cannot see that).  The VM is built by the builder without a kernel
(serial, i8042, RTC, ACPI, virtio-blk on an image, virtio-rng), as a restore builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import payloads as P
import pytest

from hypyr.arch.x86.vcpu_state import VcpuState
from hypyr.devices.virtio.blk import VirtioBlk
from hypyr.errors import HypyrError, MigrationError, SnapshotError
from hypyr.kvm import B, KvmError
from hypyr.vmm import migration, snapshot, stream
from hypyr.vmm.builder import build_vm
from hypyr.vmm.config import DiskConfig, VmConfig
from hypyr.vmm.stop import StopKind, StopReason

MiB = 1 << 20
MEMORY = 16 * MiB
PAGE = 4096
AP_CODE = 0x1400
DMA_PORT, DMA_BASE, DMA_PAGES = 0x10, 0x40000, 32
ES_BASE = 0x10000           # vCPU 0 writes its count into the 16 pages from here
TIMEOUT = 20


class Dma:
    """Writes each count reported to it into guest RAM itself (page count % 32)."""

    def __init__(self, mem):
        self.mem = mem

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        v = int.from_bytes(data, "little")
        self.mem.write(DMA_BASE + (v % DMA_PAGES) * PAGE + 4 * offset, data)


def attach_dma(vm) -> None:
    vm.machine.pio.register(DMA_PORT, 8, Dma(vm.machine.memory))  # 32-bit OUTs to 0x10 and 0x11


def counts(vm) -> tuple[int, int]:
    mem = vm.machine.memory
    return mem.read_u32(0x2000), mem.read_u32(0x2800)


def wait_until(pred, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def counting_on(vm, c0: int, c1: int, by: int = 50) -> None:
    wait_until(lambda: counts(vm)[0] > c0 + by and counts(vm)[1] > c1 + by, "both vCPUs to count on")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ram_mappings() -> int:
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            n += hi - lo == MEMORY
    return n


class Guests:
    """Builds payload VMs and destroys whatever a test leaves running."""

    def __init__(self, kvm, tmp_path: Path):
        self.kvm = kvm
        self.disk = tmp_path / "disk.img"
        self.disk.write_bytes(bytes(MiB))
        self.out: list[bytes] = []
        self.vms: list = []

    def config(self) -> VmConfig:
        return VmConfig(kernel="", memory=MEMORY, vcpus=2, disks=[DiskConfig(str(self.disk))])

    def track(self, vm):
        self.vms.append(vm)
        return vm

    def running(self, *, fill: int = 0):
        """A started payload VM; ``fill`` bytes of RAM from 1 MiB get random data (a bigger stream)."""
        vm = self.track(build_vm(self.config(), self.out.append, kvm=self.kvm, boot=False))
        mem = vm.machine.memory
        attach_dma(vm)
        P.load(mem, P.DIRTY_COUNTER)
        P.load(mem, P.AP_COUNTER, AP_CODE)
        if fill:
            mem.write(MiB, os.urandom(fill))
        bsp, ap = vm.machine.vcpus[0].vcpu, vm.machine.vcpus[1].vcpu
        P.setup_real_mode(bsp)
        s = bsp.get_sregs()
        s.es.base, s.es.selector = ES_BASE, ES_BASE >> 4
        bsp.set_sregs(s)
        P.setup_real_mode(ap, rip=AP_CODE)
        ap.set_mp_state(B.KVM_MP_STATE_RUNNABLE)  # no INIT/SIPI needed
        vm.machine.start()
        counting_on(vm, 0, 0)
        assert any(mem.read(DMA_BASE, DMA_PAGES * PAGE)), "the test device wrote nothing"
        return vm

    def destroy(self, vm) -> None:
        vm.machine.stop(StopReason(StopKind.DESTROYED, "test"))
        if vm.machine.wait(10) is not None:
            vm.close()
        self.vms.remove(vm)

    def teardown(self) -> None:
        for vm in list(self.vms):
            self.destroy(vm)


@pytest.fixture
def guests(kvm, tmp_path):
    g = Guests(kvm, tmp_path)
    yield g
    g.teardown()


# -- a consistent pause ------------------------------------------------------------------------------
def test_a_paused_vcpu_has_no_io_left_to_complete(guests):
    """The guest exits to userspace for an OUT every round: a pause right after one must not
    park the vCPU before KVM has completed it (VcpuState.capture would refuse it)."""
    vm = guests.running()
    for _ in range(40):
        vm.machine.pause()
        assert not any(vt.vcpu.completion_pending for vt in vm.machine.vcpus)
        states = [VcpuState.capture(vt.vcpu) for vt in vm.machine.vcpus]
        c0, c1 = counts(vm)
        assert states[0].regs.rax & 0xFFFF_FFFF in (c0 - 1, c0)  # paused between two instructions
        assert states[1].regs.rax & 0xFFFF_FFFF in (c1 - 1, c1)
        vm.machine.resume()
        wait_until(lambda: counts(vm)[0] > c0, "the guest to run again")  # noqa: B023 (called at once)


# -- save and restore ------------------------------------------------------------------------------------
def test_save_then_restore_carries_on_where_it_was(guests, kvm, tmp_path):
    vm = guests.running()
    pio = vm.machine.pio
    pio.write(0x3FF, b"\x5a")                  # UART scratch register
    pio.write(0x70, b"\x40"), pio.write(0x71, b"\x77")  # a CMOS RAM byte
    path = tmp_path / "vm.save"
    with open(path, "wb") as f:
        stats = snapshot.save(vm, f, extra={"name": "web"})
    assert vm.machine.paused  # a plain save leaves the VM stopped for the caller to destroy
    ram, (c0, c1) = vm.machine.memory.read(0, MEMORY), counts(vm)
    time.sleep(0.05)
    assert counts(vm) == (c0, c1)
    assert stats.pages_zero > stats.pages_data > 16 and stats.bytes == path.stat().st_size < MEMORY // 10
    guests.destroy(vm)

    with open(path, "rb") as f:
        header = snapshot.read_header(f)
    assert (header.kind, header.extra, header.config.vcpus, header.memory) == ("save", {"name": "web"}, 2,
                                                                                 [(0, MEMORY)])
    assert header.devices == ["serial0", "i8042", "rtc", "acpi_pm", "pvexit", "pvpanic", "acpi_ged", "virtio0",
                              "virtio1"]
    with open(path, "rb") as f:
        vm2 = guests.track(snapshot.restore(f, guests.out.append, kvm=kvm))
    assert vm2.machine.memory.read(0, MEMORY) == ram
    assert counts(vm2) == (c0, c1) and not vm2.saved_paused
    pio = vm2.machine.pio
    pio.write(0x70, b"\x40")
    assert (pio.read(0x3FF, 1), pio.read(0x71, 1)) == (b"\x5a", b"\x77")
    attach_dma(vm2)
    vm2.machine.start()
    counting_on(vm2, c0, c1)


def test_save_keep_running_and_the_disk_lock(guests, kvm, tmp_path):
    vm = guests.running()
    path = tmp_path / "vm.save"
    with open(path, "wb") as f:
        snapshot.save(vm, f, keep_running=True)
    assert not vm.machine.paused
    with open(path, "rb") as f:
        saved = snapshot.restore  # the source runs on and holds the disk image: no second writer
        fds, maps = open_fds(), ram_mappings()
        with pytest.raises(SnapshotError, match="in use"):
            saved(f, guests.out.append, kvm=kvm)
        assert (open_fds(), ram_mappings()) == (fds, maps)
    c0, c1 = counts(vm)
    counting_on(vm, c0, c1)
    c0, c1 = counts(vm)   # where the source got to: 50 counts or more past the save
    guests.destroy(vm)
    with open(path, "rb") as f:
        vm2 = guests.track(snapshot.restore(f, guests.out.append, kvm=kvm))
    r0, r1 = counts(vm2)
    assert r0 < c0 and r1 < c1  # where it was saved, not where the source got to
    attach_dma(vm2)
    vm2.machine.start()
    counting_on(vm2, r0, r1)


RESTORE_CHILD = r"""
import sys, time
from hypyr.vmm import snapshot
class Dma:
    def __init__(self, mem): self.mem = mem
    def read(self, offset, size): return bytes(size)
    def write(self, offset, data):
        self.mem.write(0x40000 + (int.from_bytes(data, "little") % 32) * 4096 + 4 * offset, data)
with open(sys.argv[1], "rb") as f:
    vm = snapshot.restore(f, lambda b: None)
mem = vm.machine.memory
before = mem.read_u32(0x2000), mem.read_u32(0x2800)
vm.machine.pio.register(0x10, 8, Dma(mem))
vm.machine.start()
deadline = time.monotonic() + 15
while min(mem.read_u32(0x2000) - before[0], mem.read_u32(0x2800) - before[1]) < 50 and time.monotonic() < deadline:
    time.sleep(0.01)
vm.machine.pause()
print(*before, mem.read_u32(0x2000), mem.read_u32(0x2800))
"""


def test_restore_in_another_process(guests, tmp_path):
    vm = guests.running()
    path = tmp_path / "vm.save"
    with open(path, "wb") as f:
        snapshot.save(vm, f)
    c0, c1 = counts(vm)
    guests.destroy(vm)
    out = subprocess.run([sys.executable, "-c", RESTORE_CHILD, str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    b0, b1, a0, a1 = map(int, out.stdout.split())
    assert (b0, b1) == (c0, c1) and a0 >= c0 + 50 and a1 >= c1 + 50


def _rewrite(data: bytes, *, header=None, cpuid=None, state=None, version: int | None = None) -> bytes:
    """``data`` re-encoded record by record (so every checksum holds), the HEADER's, CPUID's or
    STATE's JSON changed by ``header(dict)``/``cpuid(dict)``/``state(dict)``, or the preamble's
    version replaced."""
    reader = stream.StreamReader(io.BytesIO(data))
    reader.preamble()
    out = io.BytesIO()
    w = stream.StreamWriter(out)
    w.preamble()
    while True:
        rtype, payload = reader.next()
        if rtype is stream.Rec.END:
            break
        change = {stream.Rec.HEADER: header, stream.Rec.CPUID: cpuid, stream.Rec.STATE: state}.get(rtype)
        if change is not None:
            d = stream.decode_json(payload, "", "")
            change(d)
            payload = stream.encode_json(d)
        w.record(rtype, payload)
    w.end()
    raw = out.getvalue()
    if version is not None:
        head = stream.PREAMBLE.pack(stream.MAGIC, version, 0, 0)[:12]
        raw = head + stream.CRC.pack(zlib.crc32(head)) + raw[16:]
    return raw


def _records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, total size) of each record of a stream."""
    out, off = [], stream.PREAMBLE.size
    while off < len(data):
        rtype, length = stream.RECORD.unpack_from(data, off)
        size = stream.RECORD.size + length + stream.CRC.size
        out.append((off, rtype, size))
        off += size
    return out


def _missing_feature(kvm) -> int:
    from hypyr.arch.x86 import cpuid as x86cpuid
    offered = snapshot._feature_words(x86cpuid.adjust_cpuid(kvm.supported_cpuid(), 0, 2)).get("0x7.0.ebx", 0)
    return next(1 << b for b in range(32) if not offered >> b & 1)


def test_bad_save_files_are_one_sentence_and_leave_nothing(guests, kvm, tmp_path):
    vm = guests.running()
    path = tmp_path / "vm.save"
    with open(path, "wb") as f:
        snapshot.save(vm, f)
    guests.destroy(vm)
    good = path.read_bytes()
    first_pages, _, pages_size = next(r for r in _records(good) if r[1] == stream.Rec.PAGES)
    vendor = "AuthenticAMD" if "Intel" in snapshot._signature(kvm.supported_cpuid())["vendor"] else "GenuineIntel"
    missing = _missing_feature(kvm)
    flipped = bytearray(good)
    flipped[first_pages + 100] ^= 0x01
    cases = {
        "empty": (b"", "truncated"),
        "in the preamble": (good[:10], "truncated"),
        "in the header": (good[:40], "truncated"),
        "in the memory": (good[:len(good) // 2], "truncated"),
        "before END": (good[:-32], "truncated"),
        "in END": (good[:-3], "truncated"),
        "a flipped bit": (bytes(flipped), "checksum"),
        "not a save file": (b"#!/bin/sh\n" + good[10:], "not a hypyr save file"),
        "another version": (_rewrite(good, version=stream.VERSION + 1), f"format version {stream.VERSION + 1}"),
        "another vendor": (_rewrite(good, header=lambda d: d["cpu"].update(vendor=vendor)), f"{vendor} CPU"),
        "a missing feature": (_rewrite(good, header=lambda d: d["cpu"]["features"].update(
            {"0x7.0.ebx": missing})), "features this host lacks"),
        "a huge memory": (_rewrite(good, header=lambda d: d["config"].update(memory=1 << 45)), "HEADER"),
        "more memory than the host has": (_rewrite(good, header=lambda d: (
            d["config"].update(memory=1 << 45),
            d.update(memory=[[0, 0xD000_0000], [1 << 32, (1 << 45) - 0xD000_0000]]))),
            "more than this host has available"),
        "a garbled CPUID": (_rewrite(good, cpuid=lambda d: d["vcpus"][0].insert(0, {"function": 7})),
                            "corrupt (the CPUID of vcpu[0][0]: field 'index' is missing)"),
        "a CPUID with a feature this host lacks": (_rewrite(good, cpuid=lambda d: d["vcpus"][0].insert(0, {
            "function": 7, "index": 0, "flags": 1, "eax": 0, "ebx": missing, "ecx": 0, "edx": 0})),
            "features this host lacks"),
        "a garbled STATE": (_rewrite(good, state=lambda d: d.pop("vcpus")),
                            "corrupt (its STATE: field 'vcpus' is missing)"),
        "a device state that does not fit": (_rewrite(good, state=lambda d: d["devices"][0][1].update(kind="x")),
                                             "does not fit this VM"),
        "a record twice": (good[:first_pages] + good[first_pages:first_pages + pages_size] * 2
                           + good[first_pages + pages_size:], "END record does not match"),
    }
    fds, maps = open_fds(), ram_mappings()
    for name, (data, words) in cases.items():
        bad = tmp_path / "bad.save"
        bad.write_bytes(data)
        with open(bad, "rb") as f, pytest.raises(SnapshotError) as e:
            snapshot.restore(f, guests.out.append, kvm=kvm)
        msg = str(e.value)
        assert words in msg and "\n" not in msg and len(msg) < 200, (name, msg)
        assert (open_fds(), ram_mappings()) == (fds, maps), name
    VirtioBlk(str(guests.disk)).close()  # nobody holds the image
    assert _rewrite(good) == good  # (the rewriting itself changes nothing)


# -- live migration ---------------------------------------------------------------------------------------
def _receive_in_thread(kvm, out, sock_or_server, result: dict, **kw) -> threading.Thread:
    def before_run(vm):
        result["ram"] = vm.machine.memory.read(0, MEMORY)  # as switched over, before it runs
        attach_dma(vm)

    def run():
        sock = sock_or_server
        try:
            if sock.family == socket.AF_INET:  # a listening socket
                sock, _ = sock_or_server.accept()
            result["vm"] = migration.migrate_receive(sock, out.append, kvm=kvm, before_run=before_run, **kw)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            result["error"] = e
        finally:
            sock.close()  # as a receiving domain process does when it is done, or exits
    t = threading.Thread(target=run, name="receiver")
    t.start()
    return t


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("manual_protect", [True, False], ids=["clear-dirty-log", "get-dirty-log-only"])
def test_live_migration_over_tcp_twice(guests, kvm, monkeypatch, manual_protect):
    if not manual_protect:  # KVM_GET_DIRTY_LOG clears the log itself (hosts without MANUAL_PROTECT2)
        monkeypatch.setattr("hypyr.kvm.Vm.manual_dirty_log_protect_flags", lambda self: 0)
    vm = guests.running(fill=2 * MiB)
    progress: list = []

    def slow_progress(p) -> None:  # (a slow front end): the guest and its device write meanwhile
        progress.append(p)
        time.sleep(0.02)
    hops = []
    for downtime_ms, max_iterations in ((300, 30), (0, 4)):  # converge; then iterate to the limit
        server = socket.create_server(("127.0.0.1", 0))
        result: dict = {}
        t = _receive_in_thread(kvm, guests.out, server, result)
        with socket.create_connection(server.getsockname()) as sock:
            stats = migration.migrate_send(vm, sock, downtime_ms=downtime_ms, max_iterations=max_iterations,
                                           progress=slow_progress)
        t.join(TIMEOUT)
        server.close()
        assert "error" not in result, result.get("error")
        dst = guests.track(result["vm"])
        assert vm.machine.paused
        ram = vm.machine.memory.read(0, MEMORY)
        assert _digest(result["ram"]) == _digest(ram)  # every page the guest and the VMM wrote arrived
        c0, c1 = counts(vm)
        guests.destroy(vm)
        counting_on(dst, c0, c1)
        hops.append(stats)
        vm = dst
    first, second = hops
    assert first.iterations >= 1 and second.iterations >= 2
    for s in hops:
        assert s.pages_zero > 3000 and s.pages_data >= 512 and s.bytes > 2 * MiB
        assert s.downtime_clock == "monotonic" and 0 < s.downtime_ms < 10_000
        assert s.seconds * 1000 > s.downtime_ms
    assert {"memory", "stop-and-copy", "done"} <= {p.phase for p in progress}


@pytest.mark.parametrize("how", ["closes mid-memory", "never catches up", "closes after END", "fails after END",
                                 "refuses"])
def test_the_source_runs_on_when_the_destination_goes(guests, kvm, how):
    vm = guests.running(fill=4 * MiB)
    a, b = socket.socketpair()
    result: dict = {}

    def destination():
        reader = stream.StreamReader(b.makefile("rb"), "the stream")
        w = stream.StreamWriter(b.makefile("wb"))
        if how == "closes mid-memory":
            reader.preamble()
            for _ in range(3):
                reader.next()
        elif how == "never catches up":  # it reads on, but never answers the SYNC before the pause
            reader.preamble()
            with contextlib.suppress(SnapshotError, OSError):
                while True:
                    reader.next()
        elif how != "refuses":
            reader.preamble()
            while (rtype := reader.next()[0]) is not stream.Rec.END:
                if rtype is stream.Rec.SYNC:
                    w.record(stream.Rec.SYNCED, b"")
                    w.flush()
            if how == "fails after END":
                VirtioBlk(str(guests.disk)).close()  # the source has let go of the disk image
                w.record(stream.Rec.FAILED, b"no room for it here")
                w.flush()
        b.close()

    if how == "refuses":
        def configure(header):
            raise SnapshotError("bridge xenbr9 does not exist here")
        t = _receive_in_thread(kvm, guests.out, b, result, configure=configure)
    else:
        t = threading.Thread(target=destination)
        t.start()
    fds_before = open_fds()
    with pytest.raises(MigrationError) as e:
        migration.migrate_send(vm, a, timeout=2 if how == "never catches up" else 10)
    t.join(TIMEOUT)
    a.close()
    msg = str(e.value)
    assert msg.endswith("the domain runs on here") and "\n" not in msg, msg
    if how == "fails after END":
        assert "no room for it here" in msg
    if how == "never catches up":
        assert "did not answer within 2 s" in msg
    if how == "refuses":
        assert "bridge xenbr9 does not exist here" in msg and "vm" not in result
    assert not vm.machine.paused
    c0, c1 = counts(vm)
    counting_on(vm, c0, c1)
    assert not vm.machine.memory.dirty_tracking
    with pytest.raises(KvmError):
        vm.machine.vm.get_dirty_log(vm.machine.ram_slots[0])  # dirty logging is off again
    with pytest.raises(HypyrError, match="in use"):
        VirtioBlk(str(guests.disk))  # the source holds its disk image again
    assert open_fds() <= fds_before
    if how == "fails after END":  # and it can migrate again, for real this time
        a, b = socket.socketpair()
        result = {}
        t = _receive_in_thread(kvm, guests.out, b, result)
        migration.migrate_send(vm, a)
        t.join(TIMEOUT)
        a.close()
        dst = guests.track(result["vm"])
        assert _digest(result["ram"]) == _digest(vm.machine.memory.read(0, MEMORY))
        counting_on(dst, *counts(vm))


def test_the_destination_leaves_nothing_when_the_stream_breaks(guests, kvm, tmp_path):
    vm = guests.running(fill=2 * MiB)
    path = tmp_path / "vm.save"
    with open(path, "wb") as f:
        snapshot.save(vm, f)
    guests.destroy(vm)
    data = path.read_bytes()
    fds, maps, threads = open_fds(), ram_mappings(), threading.active_count()
    for cut in (len(data) // 2, len(data) - 1):
        a, b = socket.socketpair()
        result: dict = {}
        t = _receive_in_thread(kvm, guests.out, b, result)
        a.sendall(data[:cut])
        a.shutdown(socket.SHUT_WR)
        t.join(TIMEOUT)
        a.close()
        b.close()
        assert isinstance(result.get("error"), MigrationError), result
        assert "broke off" in str(result["error"])
        assert (open_fds(), ram_mappings()) == (fds, maps)
        assert threading.active_count() == threads  # the parked vCPU threads were stopped too
    VirtioBlk(str(guests.disk)).close()
