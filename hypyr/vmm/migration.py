"""Live migration, pre-copy, over a connected socket, in the record stream of save files:
:func:`migrate_send` on the source, :func:`migrate_receive` on the destination.  Until GO is
sent any failure undoes everything on the source (the domain runs on) and raises
:class:`~hypyr.errors.MigrationError`; after it the source never resumes the domain by itself.
The steps of both sides and the faults: docs/migration.md, "Live migration" and "Faults".
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from hypyr import procfs
from hypyr.devices.virtio.net import VirtioNet
from hypyr.errors import HypyrError, MigrationError, PeerClosed, SnapshotError, SnapshotTruncated, StateError
from hypyr.kvm import Kvm, KvmError

from .builder import LinuxVm
from .config import VmConfig
from .dirty import DirtyTracker, merge_dirty
from .header import SnapshotHeader
from .pages import PageSender
from .snapshot import (
    Progress,
    ProgressFn,
    _header_payload,
    capture_cpuid,
    capture_state,
    cpuid_payload,
    load_vm,
    quiesce_devices,
    reacquire_disks,
    read_checked_header,
    rehearse_load,
    release_disks,
    resume_devices,
)
from .stream import PAGE, Rec, StreamReader, StreamWriter, decode_json, encode_json

log = logging.getLogger("hypyr.migration")

__all__ = ["migrate_send", "migrate_receive", "MigrationStats"]

MIN_BANDWIDTH = 1 << 20  # bytes/s: a floor for the estimate (a pass of only zero pages says little)
FEW_PAGES = 64  # dirty pages not worth another pass (a quarter MiB)


@dataclass(frozen=True)
class MigrationStats:
    seconds: float            # from the start to the destination's RUNNING
    downtime_ms: float | None  # last source vCPU paused -> first destination vCPU running (None: was paused)
    downtime_clock: str       # "monotonic" (both on one host: one CLOCK_MONOTONIC) or "realtime" (wall clocks)
    iterations: int           # pre-copy passes, the full first one included
    pages_data: int           # pages sent with their data (all passes)
    pages_zero: int           # pages sent as ZERO runs
    final_pages: int          # pages sent while the guest was paused
    bytes: int                # bytes sent
    bandwidth: float          # bytes/s measured in the last pre-copy pass


# Bytes buffered on each side of the link: a dirty page is a ~4 KiB record, and with 8 KiB buffers
# (the default) every other page was a send and a wake-up of the reader.  1 MiB made a final pass of
# 330 scattered pages ~3x faster over a socketpair on the host (bench/README.md, "migrate.py").
LINK_BUFFER = 1 << 20


class _Link:
    """Records both ways on a connected socket."""

    def __init__(self, sock: socket.socket, what: str):
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # each write is a batch already (LINK_BUFFER); Nagle would hold a flush's last segment
            # until the peer's delayed ACK, up to 40 ms (e.g. STATE, after the final pages' flush)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.wf = cast(BinaryIO, sock.makefile("wb", buffering=LINK_BUFFER))
        self.rf = cast(BinaryIO, sock.makefile("rb", buffering=LINK_BUFFER))
        self.writer = StreamWriter(self.wf)
        self.reader = StreamReader(self.rf, what)

    def send(self, rtype: Rec, payload: bytes = b"") -> None:
        self.writer.record(rtype, payload)
        self.writer.flush()

    def close(self) -> None:
        for f in (self.wf, self.rf):
            try:
                f.close()
            except OSError:
                pass


# -- source --------------------------------------------------------------------------------------------
class _Source:
    """One outgoing migration and what to undo if it fails."""

    def __init__(self, vm: LinuxVm, link: _Link, progress: ProgressFn | None):
        self.vm, self.link, self.progress = vm, link, progress
        self.machine = vm.machine
        self.dirty = DirtyTracker(vm)
        self.was_paused = self.machine.paused
        self.paused = False           # we paused the vCPUs
        self.quiesced = False         # we quiesced the devices
        self.disks_released = False
        self.off_vhost: list = []     # (transport, device) moved off vhost-net
        self.committed = False        # GO sent: never resume after this
        self.sender: PageSender | None = None
        self.total = self.machine.memory.size // PAGE
        self.iteration = 0
        self.dirty_pages = 0
        self.dirty_rate = 0.0
        self._last_report = 0.0
        self._last_check = time.monotonic()

    # progress and the reverse channel, looked at while sending
    def tick(self, phase: str = "iteration", force: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_check > 0.2:
            self._last_check = now
            self.check_peer()
        if self.progress is not None and (force or now - self._last_report > 0.2):
            self._last_report = now
            s = self.sender
            pages = s.data_pages + s.zero_pages if s is not None else 0  # None: before the first page
            self.progress(Progress(phase, self.iteration, self.link.writer.bytes, pages,
                                   self.total, self.dirty_pages, self.dirty_rate))

    def check_peer(self) -> None:
        """The destination speaks only to reply, or to say it failed: if it has, stop."""
        readable, _, _ = select.select([self.link.sock], [], [], 0)
        if readable:
            self.expect_reply(Rec.READY)  # raises for FAILED or a closed link

    def expect_reply(self, want: Rec) -> dict:
        try:
            rtype, payload = self.link.reader.next(expect=(want, Rec.FAILED))
        except SnapshotTruncated:
            raise PeerClosed("the destination closed the connection") from None
        except SnapshotError as e:
            raise MigrationError(f"the destination's reply is garbled: {e}") from None
        if rtype is Rec.FAILED:
            raise MigrationError(f"the destination failed: {payload.decode('utf-8', 'replace')}")
        return decode_json(payload, "the destination's reply", rtype.name) if payload else {}

    def wait_caught_up(self) -> None:
        """SYNC, then wait for SYNCED: the destination has taken in everything sent so far, so
        what it still had to read is not part of the downtime (docs/migration.md)."""
        self.link.send(Rec.SYNC)
        self.expect_reply(Rec.SYNCED)

    def begin(self) -> list:
        """A brief pause: NICs off vhost-net, dirty logging on; returns every vCPU's CPUID (it
        cannot change from now on, so it travels before the guest stops)."""
        m = self.machine
        m.pause()
        try:
            if m.stop_reason is not None:
                raise MigrationError(f"the VM has stopped ({m.stop_reason.message})")
            for dev in self.vm.devices.values():
                net = getattr(dev, "device", None)
                if isinstance(net, VirtioNet) and net.vhost_running:
                    dev.quiesce()
                    net.vhost_allowed = False  # its writes would bypass the dirty log
                    dev.resume()
                    self.off_vhost.append((dev, net))
            cpuid = capture_cpuid(self.vm)
            self.dirty.start()
        finally:
            if not self.was_paused:
                m.resume()
        return cpuid

    def stop_and_copy(self) -> None:
        m = self.machine
        m.pause()
        self.paused = True
        if m.stop_reason is not None:
            raise MigrationError(f"the VM stopped ({m.stop_reason.message}) during the migration")
        quiesce_devices(self.vm)
        self.quiesced = True

    def rollback(self) -> None:
        """Everything back as it was before the migration; the domain runs on."""
        self.dirty.stop()
        if self.disks_released:
            reacquire_disks(self.vm)  # HypyrError: someone holds an image; the VM must stay paused
            self.disks_released = False
        if self.quiesced:
            for _, net in self.off_vhost:
                net.vhost_allowed = True
            resume_devices(self.vm)
        elif self.off_vhost:
            self.machine.pause()
            for dev, net in self.off_vhost:
                dev.quiesce()
                net.vhost_allowed = True
                dev.resume()
            if not self.paused and not self.was_paused:
                self.machine.resume()
        if self.paused and not self.was_paused:
            self.machine.resume()


def migrate_send(vm: LinuxVm, sock: socket.socket, *, downtime_ms: float = 300, max_iterations: int = 30,
                 progress: ProgressFn | None = None, extra: dict | None = None,
                 timeout: float = 60.0) -> MigrationStats:
    """Migrate ``vm`` live to the :func:`migrate_receive` at the other end of ``sock`` (connected
    by the caller, who also closes it).  On success the guest runs there and ``vm`` is left
    paused and quiesced for the caller to destroy.  MigrationError otherwise: before the
    switch-over the domain keeps running here as if nothing happened (the message says so if it
    could not); ``timeout`` bounds every wait for the other side, in seconds."""
    if not 1 <= max_iterations <= 10_000 or downtime_ms < 0:
        raise MigrationError("max_iterations must be 1..10000 and downtime_ms not negative")
    if vm.machine.stop_reason is not None:
        raise MigrationError(f"the VM has stopped ({vm.machine.stop_reason.message}): there is nothing to migrate")
    t0 = time.monotonic()
    old_timeout = sock.gettimeout()
    sock.settimeout(timeout)
    link = _Link(sock, "the destination's reply")
    src = _Source(vm, link, progress)
    try:
        stats = _send(src, vm, downtime_ms / 1000, max_iterations, extra, t0)
    except BaseException as e:
        reason = _describe(e, timeout)
        if reason is None:  # not ours to describe (e.g. KeyboardInterrupt): undo, and let it go on
            _abandon(src, sock)
            raise
        if isinstance(e, OSError) and not isinstance(e, KvmError) and not src.committed:
            reason = _peer_reason(src) or reason  # the destination may have said why before it went
        if src.committed:
            src.dirty.stop()
            raise MigrationError(reason) from None
        _abandon(src, sock)
        raise MigrationError(f"{reason}; the domain runs on here") from None
    finally:
        link.close()
        sock.settimeout(old_timeout)
    return stats


def _describe(e: BaseException, timeout: float) -> str | None:
    if isinstance(e, MigrationError):
        return str(e)
    if isinstance(e, (HypyrError, KvmError)):  # (a KvmError is an OSError too)
        return f"the migration failed: {e}"
    if isinstance(e, socket.timeout):
        return f"the destination did not answer within {timeout:g} s"
    if isinstance(e, OSError):
        return f"the connection to the destination was lost ({e.strerror or e})"
    return None


def _peer_reason(src: _Source) -> str | None:
    """The destination's FAILED sentence, if it sent one before the link broke."""
    try:
        if select.select([src.link.sock], [], [], 0.5)[0]:
            src.expect_reply(Rec.READY)
    except PeerClosed:
        pass
    except MigrationError as e:
        return str(e)
    except (OSError, SnapshotError, ValueError):
        pass
    return None


def _abandon(src: _Source, sock: socket.socket) -> None:
    """Undo everything before the switch-over: the domain runs on here."""
    try:
        sock.shutdown(socket.SHUT_RDWR)  # the destination sees the end at once and cleans up
    except OSError:
        pass
    try:
        src.rollback()
    except (HypyrError, KvmError, StateError) as e:
        raise MigrationError(f"the migration failed and the domain could not be resumed here: {e}; it is "
                             f"left paused") from None


def _send(src: _Source, vm: LinuxVm, downtime_s: float, max_iterations: int, extra: dict | None,
          t0: float) -> MigrationStats:
    machine, link = vm.machine, src.link
    w = link.writer
    cpuid = src.begin()
    w.preamble()
    w.record(Rec.HEADER, _header_payload(vm, "migration", cpuid[0] if cpuid else [], extra))
    w.record(Rec.CPUID, cpuid_payload(cpuid))
    src.sender = sender = PageSender(w, machine.memory, src.tick)

    # pass 1: all of RAM; then the pages dirtied meanwhile, until the rest fits the downtime
    src.iteration = 1
    elapsed, bandwidth = _timed_pass(w, sender.send_all)
    src.tick("memory", force=True)
    last_pass = machine.memory.size // PAGE
    dirty = src.dirty.harvest()
    caught_up = False
    while True:
        n = sum(len(p) for p in dirty)
        src.dirty_pages, src.dirty_rate = n, n / max(elapsed, 1e-6)
        if src.iteration < max_iterations and another_pass(n, last_pass, bandwidth, downtime_s):
            src.iteration += 1
            last_pass = n
            elapsed, bandwidth = _timed_pass(w, sender.send_dirty, dirty)
            src.tick(force=True)
            src.check_peer()
            dirty, caught_up = src.dirty.harvest(), False
            continue
        if caught_up:
            break
        # before the pause, let the destination take in what is still on its way (the socket
        # buffers hold megabytes); then look again at what the guest dirtied meanwhile
        src.wait_caught_up()
        caught_up = True
        dirty = merge_dirty(dirty, src.dirty.harvest())

    # stop and copy
    src.stop_and_copy()
    paused_ns, paused_wall = machine.paused_at_ns or time.monotonic_ns(), time.time_ns()
    marks = [("quiesced", time.monotonic_ns())]   # each phase: when it ended
    # the state first: the destination loads it while the last pages are found and sent
    w.record(Rec.STATE, encode_json(capture_state(vm, src.was_paused)))
    w.flush()
    marks.append(("state", time.monotonic_ns()))
    dirty = merge_dirty(dirty, src.dirty.harvest())
    final_pages = sender.send_dirty(dirty)
    src.dirty_pages = 0
    marks.append(("pages", time.monotonic_ns()))
    # switch-over: the disks' locks to the destination (which opens them once END is in), END,
    # READY, GO, RUNNING
    release_disks(vm)
    src.disks_released = True
    w.end()
    w.flush()
    marks.append(("sent", time.monotonic_ns()))
    src.tick("stop-and-copy", force=True)   # (not before: a progress report costs the downtime)
    src.expect_reply(Rec.READY)
    marks.append(("ready", time.monotonic_ns()))
    link.send(Rec.GO)
    src.committed = True
    try:
        running = src.expect_reply(Rec.RUNNING)
    except (MigrationError, OSError) as e:
        src.dirty.stop()
        raise MigrationError(f"the destination was told to run the domain but did not confirm it ({e}); it is "
                             f"left paused here: resume it only if it does not run there") from None
    marks.append(("running", time.monotonic_ns()))
    src.dirty.stop()   # once the domain runs there: each memslot change costs KVM a grace period
    log.debug("migration: stop-and-copy of %d pages; ms after the pause: %s", final_pages,
              ", ".join(f"{name} {(t - paused_ns) / 1e6:.1f}" for name, t in marks))
    downtime, clock = _downtime(running, paused_ns, paused_wall, src.was_paused)
    if src.progress is not None:
        src.progress(Progress("done", src.iteration, w.bytes, src.total, src.total))
    return MigrationStats(seconds=time.monotonic() - t0, downtime_ms=downtime, downtime_clock=clock,
                          iterations=src.iteration, pages_data=sender.data_pages, pages_zero=sender.zero_pages,
                          final_pages=final_pages, bytes=w.bytes, bandwidth=bandwidth)


def _timed_pass(w: StreamWriter, send: Callable[..., object], *args: object) -> tuple[float, float]:
    """One pre-copy pass: ``send(*args)``, then flush; its seconds and its bandwidth (bytes/s, at
    least MIN_BANDWIDTH: a pass of only zero pages says little)."""
    start, sent_before = time.monotonic(), w.bytes
    send(*args)
    w.flush()
    elapsed = time.monotonic() - start
    return elapsed, max((w.bytes - sent_before) / max(elapsed, 1e-6), MIN_BANDWIDTH)


def another_pass(dirty: int, last_pass: int, bandwidth: float, downtime_s: float) -> bool:
    """Whether to send the ``dirty`` pages in another pass (``last_pass`` pages went in the last
    one) rather than stop the guest and copy them: while they would not fit the downtime at
    ``bandwidth`` (bytes/s), and after that while passes still halve them (what is left is
    copied with the guest stopped), unless they are a few pages."""
    if dirty * (PAGE + 16) / bandwidth > downtime_s:
        return True
    return dirty > FEW_PAGES and 2 * dirty <= last_pass


def _downtime(running: dict, paused_ns: int, paused_wall: int, was_paused: bool) -> tuple[float | None, str]:
    mono, wall = running.get("monotonic_ns"), running.get("time_ns")
    same_host = running.get("boot_id") == procfs.boot_id() and procfs.boot_id() != ""
    if was_paused or not isinstance(mono, int) or not isinstance(wall, int):
        return None, "monotonic" if same_host else "realtime"
    if same_host:  # one host: both sides read the same CLOCK_MONOTONIC
        return (mono - paused_ns) / 1e6, "monotonic"
    return (wall - paused_wall) / 1e6, "realtime"


# -- destination --------------------------------------------------------------------------------------------
def migrate_receive(sock: socket.socket, console_out: Callable[[bytes], None], *, tap_fds: Sequence[int] = (),
                    configure: Callable[[SnapshotHeader], VmConfig] | None = None, kvm: Kvm | None = None,
                    progress: ProgressFn | None = None, timeout: float = 60.0,
                    before_run: Callable[[LinuxVm], None] | None = None) -> LinuxVm:
    """Receive a live migration from the :func:`migrate_send` at the other end of ``sock`` and
    return the VM, running (or paused, as it was on the source).  Its vCPU threads start, parked,
    as soon as it is built, and its state's load is rehearsed, so that neither is part of the
    downtime; ``before_run(vm)`` runs with the state loaded, just before READY (e.g. to pin
    them).  NICs: ``tap_fds`` or ``configure(header)``, as for :func:`~hypyr.vmm.snapshot.restore`.
    MigrationError, with nothing left behind, if the stream fails, is refused or the source
    gives up before GO."""
    old_timeout = sock.gettimeout()
    sock.settimeout(timeout)
    link = _Link(sock, "the migration stream")
    vm = None
    started = False
    try:
        header = read_checked_header(link.reader, kvm)
        vm = load_vm(link.reader, header, console_out, tap_fds=tap_fds, configure=configure, kvm=kvm,
                     progress=progress, advance_clock=True, lock_disks_at_end=True, on_built=_prepare,
                     on_sync=lambda: link.send(Rec.SYNCED))
        if before_run is not None:
            before_run(vm)
        ready_ns = time.monotonic_ns()
        link.send(Rec.READY, encode_json({"ok": True}))
        try:
            link.reader.next(expect=(Rec.GO,))
        except SnapshotError:
            raise MigrationError("the source gave up before the switch-over") from None
        go_ns = time.monotonic_ns()
        if not vm.saved_paused:
            vm.machine.resume()
        started = True
        mono = None if vm.saved_paused else vm.machine.wait_running(5.0)
        log.debug("migration: received; CLOCK_MONOTONIC ns: loaded %d, GO %d, first vCPU running %s",
                  ready_ns, go_ns, mono)
        wall = None if mono is None else time.time_ns() - (time.monotonic_ns() - mono)
        try:
            link.send(Rec.RUNNING, encode_json({"monotonic_ns": mono, "time_ns": wall, "boot_id": procfs.boot_id()}))
        except OSError as e:  # the source committed with GO: we run regardless
            log.warning("migration: the source did not get the running acknowledgement: %s", e)
        return vm
    except BaseException as e:
        if vm is not None and not started:
            vm.close()
        if started:
            raise
        _tell_failure(link, e)
        if isinstance(e, MigrationError):
            raise
        if isinstance(e, KvmError):
            raise MigrationError(f"the migration failed here: {e}") from None
        if isinstance(e, socket.timeout):
            raise MigrationError(f"the source sent nothing for {timeout:g} s") from None
        if isinstance(e, OSError):
            raise MigrationError(f"the connection to the source was lost ({e.strerror or e})") from None
        if isinstance(e, SnapshotTruncated):
            raise MigrationError("the migration stream broke off (the source gave up or the link dropped)") from None
        if isinstance(e, HypyrError):
            raise MigrationError(str(e)) from None
        raise
    finally:
        link.close()
        sock.settimeout(old_timeout)


def _prepare(vm: LinuxVm) -> None:
    """The built VM's vCPU threads started, parked; its state's load rehearsed (both off the downtime)."""
    vm.machine.pause()
    vm.machine.start()
    rehearse_load(vm)


def _tell_failure(link: _Link, e: BaseException) -> None:
    """Best effort: one FAILED record with the sentence, so that the source can say why."""
    text = str(e) if isinstance(e, HypyrError) else f"{type(e).__name__}: {e}"
    try:
        link.writer.record(Rec.FAILED, text.encode()[:60_000])
        link.writer.flush()
        link.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
