"""virtio-blk (virtio 1.2 §5.2): a raw disk image file as a block device, with one request queue.

Every chain is untrusted: a malformed request completes with IOERR or UNSUPP (one with no
device-writable byte raises :class:`DeviceError`), and the image is never read or written outside
``[0, capacity * 512)``.  I/O runs off the vCPU threads; every activation and reset starts a new
generation, and only a request of the current one completes.  Callers must :meth:`VirtioBlk.close`
the device when the VM is torn down.  Here: the queue, request groups, completion and each type's
checks; the guest interface's names and layouts are in blk_spec.py, the data path in blk_transfer.py.
Design notes (I/O path, FLUSH ordering, generations, image lock): docs/devices.md, "virtio-blk".
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import struct
import threading
from collections.abc import Callable

from hypyr.devices.diskimage import DiskImage
from hypyr.devices.ratelog import RateLimitedLog
from hypyr.devices.state import StateError, StateReader
from hypyr.memory import GuestMemory

from .blk_spec import (
    HEADER_SIZE,
    ID_BYTES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG,
    QUEUE_SIZE,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    STATUS_BYTE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    build_config,
    encode_serial,
    offered_features,
)
from .blk_transfer import Request, read_request_header, transfer
from .chain import DeviceError
from .device import VIRTIO_ID_BLOCK, VirtioDevice
from .queue import SplitQueue

log = logging.getLogger("hypyr.dev.virtio-blk")

RESET_WAIT = 5.0                         # seconds reset() waits for in-flight requests


class _Stale(Exception):
    """The request belongs to an earlier generation (the device was reset): abandon it."""


def _is_flush(req: Request) -> bool:
    return req.header is not None and req.header[0] == VIRTIO_BLK_T_FLUSH


class VirtioBlk(VirtioDevice):
    """A raw image file as a virtio block device."""

    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"
    state_kind = "virtio-blk"

    def __init__(self, path: str, *, read_only: bool = False, serial: str | None = None, workers: int = 4,
                 lock: bool = True):
        """``lock=False``: open the image without taking its lock; :meth:`relock_image` takes it
        (a live migration's destination, before the source has let go)."""
        super().__init__()
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.path = str(path)
        self.read_only = bool(read_only)
        self._serial = encode_serial(serial)
        self._image = DiskImage(self.path, read_only=self.read_only, lock=lock)
        size = self._image.size
        self.capacity = size // SECTOR_SIZE
        if size % SECTOR_SIZE:
            log.warning("virtio-blk: %s is %d bytes, not a multiple of %d; the last %d bytes are not "
                        "visible to the guest", self.path, size, SECTOR_SIZE, size % SECTOR_SIZE)
        if self.capacity == 0:
            log.warning("virtio-blk: %s is smaller than one sector; the guest sees an empty disk", self.path)
        self._features = offered_features(self.read_only)
        self._config = build_config(self.capacity, self.read_only)

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._gen = 0
        # tickets of the groups of requests running or waiting to run (see _submit_locked); each
        # holds a chain in flight, so there are at most a queue size of them per generation
        self._pending: set[int] = set()
        self._next_ticket = 0
        self._waiters = 0  # threads waiting on _idle (wait_idle, FLUSH)
        self._flush_error: OSError | None = None  # sticky (see _do_flush)
        self._notify_lock = threading.Lock()
        self._workers = workers
        self._closed = False
        self._rlog = RateLimitedLog(log)  # keys are fixed strings, never the guest's values
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                               thread_name_prefix="virtio-blk")
        log.info("virtio-blk: %s, %d sectors%s", self.path, self.capacity, " (read-only)" if self.read_only else "")

    # ------------------------------------------------------------------ setup helpers
    def unlock_image(self) -> None:
        """Release the image's lock, keeping it open: the hand-over to another VMM that opens
        the same image (live migration).  Quiesce first: this device must not write any more."""
        self._image.unlock()

    def relock_image(self) -> None:
        """Take the image's lock (again, if the hand-over failed); HypyrError if someone holds it."""
        self._image.lock()

    # ------------------------------------------------------------------ VirtioDevice interface
    def device_features(self) -> int:
        return self._features

    def config_read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset < 0:
            return bytes(size)
        return self._config[offset:offset + size].ljust(size, b"\0")

    def config_write(self, offset: int, data: bytes) -> None:
        self._rlog.debug("config-write", "virtio-blk: config write of %d bytes at %#x ignored", len(data), offset)

    def activate(self, mem: GuestMemory, queues: list[SplitQueue], driver_features: int,
                 interrupt: Callable[[int], None]) -> None:
        if len(queues) != 1:
            raise DeviceError(f"virtio-blk has one queue, activated with {len(queues)}")
        with self._lock:
            self._gen += 1
            super().activate(mem, queues, driver_features, interrupt)

    def reset(self) -> None:
        with self._lock:
            self._gen += 1
            super().reset()
        if not self.wait_idle(RESET_WAIT):
            self._rlog.warning("reset-wait", "virtio-blk: %s: requests still in flight %.0f s after reset; "
                               "their results will be dropped", self.path, RESET_WAIT)

    def queue_notify(self, index: int) -> None:
        if index != 0:
            self._rlog.debug("notify", "virtio-blk: notify for nonexistent queue %d ignored", index)
            return
        # One notification at a time (normally they all come from one I/O thread anyway): a
        # FLUSH popped by a later notification then always finds the requests run inline by an
        # earlier one finished.
        with self._notify_lock:
            reqs: list[Request] = []
            error: DeviceError | None = None
            # Pop and submit under the device lock, so each request is tagged with the generation
            # of the activation it was popped in, even if a reset races with this notify.
            with self._lock:
                if not self.queues or self.mem is None or self._quiesced:
                    return  # (quiesced: the transport looks at the queue again on resume)
                queue, mem, gen = self.queues[0], self.mem, self._gen
                # a QueueError (a DeviceError) goes to the transport, after what came before it
                chains, error = queue.pop_all()
                for chain in chains:
                    if chain.writable_len == 0:  # nowhere to put a status: the driver is broken
                        error = DeviceError(f"virtio-blk request (head {chain.head}) has no device-writable "
                                            f"status byte")
                        break
                    reqs.append(Request(gen, queue, mem, chain, read_request_header(mem, chain)))
                closed = self._closed
                inline = self._submit_locked(reqs) if reqs and not closed else None
            if closed and reqs:
                self._rlog.warning("closed", "virtio-blk: %s: request after close(); failing it", self.path)
                self._complete_many(reqs)  # status IOERR
            elif inline is not None:
                self._run(*inline)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ host interface
    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` seconds passed first."""
        return self._wait_locked_for(lambda: not self._pending, timeout)

    def _wait_locked_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait (on ``_idle``, taking the lock) until ``predicate`` holds; False on timeout."""
        with self._idle:
            self._waiters += 1
            try:
                return self._idle.wait_for(predicate, timeout)
            finally:
                self._waiters -= 1

    def close(self) -> None:
        """Fence off the requests in flight (a new generation: they start no more I/O), wait for
        them, whichever thread runs them, stop the workers and close the image (idempotent).
        Waits as long as a request's syscall takes: the descriptor must not be reused under it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._gen += 1
        self.wait_idle()
        self._executor.shutdown(wait=True)
        self._image.close()

    # ------------------------------------------------------------------ save/restore (devices/state.py)
    def quiesce(self) -> None:
        """Pop no more requests; wait for every request in flight to complete (status byte
        written, on the used ring, interrupt raised: none is lost, none is left to be redone),
        then ``fdatasync`` the image, so that whoever opens it next sees every acknowledged
        write.  Waits as long as the host's I/O takes.  A failed ``fdatasync`` is the sticky
        flush error (saved with the state)."""
        with self._lock:
            self._quiesced = True
        self.wait_idle()
        if self.read_only or self._image.fd < 0 or self._flush_error is not None:
            return
        try:
            self._image.sync()
        except OSError as e:
            with self._lock:
                self._flush_error = e
            log.warning("virtio-blk: %s: flush before saving failed: %s (every later flush fails too)",
                        self.path, e)

    def resume(self) -> None:
        with self._lock:
            self._quiesced = False

    def _state_fields(self) -> dict:
        """What the guest sees of the disk (checked on load: the image itself is the data) and
        the sticky flush error; the path only for the record (a destination may mount it elsewhere)."""
        with self._lock:
            return {"capacity": self.capacity, "read_only": self.read_only, "features": self._features,
                    "serial": self._serial, "flush_error": self._flush_error is not None, "path": self.path}

    def _parse_fields(self, r: StateReader) -> bool:
        saved = {"capacity": r.integer("capacity", 0, (1 << 64) - 1), "read_only": r.flag("read_only"),
                 "features": r.integer("features", 0, (1 << 64) - 1),
                 "serial": r.blob("serial", ID_BYTES, ID_BYTES)}
        r.text("path", 4096)
        flush_error = r.flag("flush_error")
        mine = {"capacity": self.capacity, "read_only": self.read_only, "features": self._features,
                "serial": self._serial}
        for name, value in saved.items():
            if value != mine[name]:
                raise StateError(f"virtio-blk: the saved disk's {name} differs from that of {self.path} "
                                 f"(not the same disk configuration)")
        return flush_error

    def apply_state(self, parsed: object) -> None:
        """A saved flush error stays (sticky); a disk that has one of its own keeps it too."""
        with self._lock:
            self._quiesced = True
            if parsed:
                self._flush_error = OSError(errno.EIO, "a flush failed before the device state was saved")

    # ------------------------------------------------------------------ request handling
    def _ticket_locked(self) -> int:
        """A new group's ticket (increasing), pending until the group completes."""
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        self._pending.add(ticket)
        return ticket

    def _submit_locked(self, reqs: list[Request]) -> tuple[list[Request], int] | None:
        """Split a batch into groups (lock held), each with a ticket; return the group the
        caller runs itself, with its ticket, or None.  Between two FLUSHes, at most one contiguous
        run per worker; each FLUSH alone, waiting for the smaller tickets; the last group, unless a
        FLUSH, is not submitted but run by the notifying thread (docs/devices.md, "The I/O path")."""
        if len(reqs) == 1 and not _is_flush(reqs[0]):
            return reqs, self._ticket_locked()  # the usual case: one request, run by the caller
        groups: list[list[Request]] = []
        run: list[Request] = []

        def split_run() -> None:
            n = len(run)
            k = min(self._workers, n)
            groups.extend(run[i * n // k:(i + 1) * n // k] for i in range(k))
            run.clear()

        for req in reqs:
            if _is_flush(req):
                split_run()
                groups.append([req])
            else:
                run.append(req)
        split_run()
        inline = None
        last = groups[-1]
        if len(last) > 1 or not _is_flush(last[0]):
            inline = groups.pop()
        for group in groups:
            self._executor.submit(self._run, group, self._ticket_locked())
        return None if inline is None else (inline, self._ticket_locked())

    def _run(self, group: list[Request], ticket: int) -> None:
        """Run the requests of a group in order, then complete them (and the ticket)."""
        finished = []
        try:
            for req in group:
                try:
                    if req.gen != self._gen:
                        break
                    req.status = self._execute(req, ticket)
                except _Stale:
                    break
                except DeviceError as e:  # a malformed request that got past the checks
                    self._rlog.warning("malformed", "virtio-blk: %s: request (head %d): %s; failing it",
                                       self.path, req.chain.head, e)
                    req.status = VIRTIO_BLK_S_IOERR
                except Exception:  # a bug: never let it kill the request silently
                    self._rlog.exception("bug", "virtio-blk: %s: request (head %d) failed",
                               self.path, req.chain.head)
                    req.status = VIRTIO_BLK_S_IOERR
                finished.append(req)
        finally:
            self._complete_many(finished, ticket)

    def _complete_many(self, reqs: list[Request], ticket: int | None = None) -> None:
        """Write the status bytes, put the chains on the used ring (one index update) and signal
        one interrupt; requests of an earlier generation are dropped.  ``ticket``: the group's,
        no longer pending (FLUSH and :meth:`wait_idle` wait for that).  The interrupt comes last."""
        with self._lock:
            if ticket is not None:
                self._pending.discard(ticket)
                if self._waiters:
                    self._idle.notify_all()
            gen = self._gen
            entries = []
            queue = None
            for req in reqs:
                if req.gen != gen:
                    continue
                chain = req.chain
                try:
                    addr, length = chain.table_buffer(-1)
                    if length:  # the last buffer is writable (writable_len > 0) and ends with the status byte
                        req.mem.write(addr + length - 1, STATUS_BYTE[req.status])
                    else:
                        chain.write(req.mem, STATUS_BYTE[req.status], chain.writable_len - 1)
                except Exception as e:  # guest memory gone (VM torn down): nothing to complete
                    self._rlog(logging.ERROR, "complete", "virtio-blk: cannot complete request (head %d): %s",
                               chain.head, e)
                    continue
                entries.append((chain.head, req.written + 1))
                queue = req.queue
            if queue is None:
                return
            try:
                queue.add_used_many(entries)
            except Exception as e:
                self._rlog(logging.ERROR, "complete", "virtio-blk: cannot complete %d requests: %s",
                           len(entries), e)
                return
            try:
                self.signal_used(0)
            except Exception:
                log.exception("virtio-blk: interrupt callback failed")

    def _guest_write(self, req: Request, data: bytes, offset: int) -> None:
        with self._lock:
            self._check_current(req)
            req.chain.write(req.mem, data, offset)
            req.written = max(req.written, offset + len(data))

    def _in_range(self, sector: int, nbytes: int) -> bool:
        nsectors = nbytes // SECTOR_SIZE
        return 0 <= sector <= self.capacity and nsectors <= self.capacity - sector

    def _execute(self, req: Request, ticket: int) -> int:
        """The one request path: the header was read once when the chain was popped; each type
        is checked, then done, and its status returned (errors logged once, here or below)."""
        if req.header is None:
            self._rlog.warning("header", "virtio-blk: %s: request with a %d-byte header; failing it",
                               self.path, req.chain.readable_len)
            return VIRTIO_BLK_S_IOERR
        rtype, _reserved, sector = req.header
        if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            return self._do_rw(req, sector, rtype == VIRTIO_BLK_T_IN)
        if rtype == VIRTIO_BLK_T_FLUSH:
            return self._do_flush(req, ticket)
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(ID_BYTES, req.chain.writable_len - 1)
            self._guest_write(req, self._serial[:n], 0)
            return VIRTIO_BLK_S_OK
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._do_discard_or_zero(req, rtype, req.chain.readable_len - HEADER_SIZE)
        self._rlog.warning("type", "virtio-blk: %s: unsupported request type %d", self.path, rtype)
        return VIRTIO_BLK_S_UNSUPP

    def _check_rw(self, kind: str, sector: int, nbytes: int) -> bool:
        if not nbytes % SECTOR_SIZE and 0 <= sector <= self.capacity - nbytes // SECTOR_SIZE:
            return True  # the usual case, in one test
        if nbytes % SECTOR_SIZE:
            self._rlog.warning(f"{kind}-len", "virtio-blk: %s: %s of %d bytes, not a multiple of %d; failing it",
                               self.path, kind, nbytes, SECTOR_SIZE)
            return False
        if not self._in_range(sector, nbytes):
            self._rlog.warning(f"{kind}-range", "virtio-blk: %s: %s of %d bytes at sector %d is beyond the "
                               "disk's %d sectors; failing it", self.path, kind, nbytes, sector, self.capacity)
            return False
        return True

    def _do_rw(self, req: Request, sector: int, into_guest: bool) -> int:
        """IN (``into_guest``: the device-writable bytes before the status byte, read from the
        image) or OUT (the device-readable bytes after the header, written to it)."""
        chain = req.chain
        if into_guest:
            kind, nbytes = "read", chain.writable_len - 1
        else:
            if self.read_only:
                self._rlog.warning("ro-write", "virtio-blk: %s: write to a read-only disk; failing it", self.path)
                return VIRTIO_BLK_S_IOERR
            kind, nbytes = "write", chain.readable_len - HEADER_SIZE
        if not self._check_rw(kind, sector, nbytes):
            return VIRTIO_BLK_S_IOERR
        base = sector * SECTOR_SIZE
        try:
            done = transfer(req, self._image.fd, base, nbytes, into_guest, self._check_current)
        except OSError as e:
            self._rlog.warning(f"{kind}-error", "virtio-blk: %s: %s error: %s", self.path, kind, e)
            return VIRTIO_BLK_S_IOERR
        if done < nbytes:
            self._rlog.warning("eof", "virtio-blk: %s: unexpected end of file at %d (image shrunk?)",
                               self.path, base + done)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _do_flush(self, req: Request, ticket: int) -> int:
        """Wait for every group submitted before this one (smaller tickets), then ``fdatasync``.
        A failed ``fdatasync`` may have lost data already acknowledged, so the error is sticky
        for the device's life (as QEMU until the image is reopened): a driver reset keeps it."""
        self._wait_locked_for(lambda: min(self._pending) == ticket)
        self._check_current(req)
        if self.read_only:
            return VIRTIO_BLK_S_OK
        if self._flush_error is None:
            try:
                self._image.sync()
                return VIRTIO_BLK_S_OK
            except OSError as e:
                self._flush_error = e
        self._rlog.warning("flush-error", "virtio-blk: %s: flush error: %s (every later flush fails too)",
                           self.path, self._flush_error)
        return VIRTIO_BLK_S_IOERR

    def _do_discard_or_zero(self, req: Request, rtype: int, nbytes: int) -> int:
        discard = rtype == VIRTIO_BLK_T_DISCARD
        kind = "discard" if discard else "write-zeroes"
        if self.read_only:
            self._rlog.warning("ro-write", "virtio-blk: %s: write to a read-only disk; failing it", self.path)
            return VIRTIO_BLK_S_IOERR
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.driver_features & (1 << feature):
            self._rlog.warning(f"{kind}-feature", "virtio-blk: %s: %s without the feature negotiated",
                               self.path, kind)
            return VIRTIO_BLK_S_UNSUPP
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if nbytes == 0 or nbytes % SEGMENT_SIZE or nbytes // SEGMENT_SIZE > max_seg:
            self._rlog.warning(f"{kind}-segs", "virtio-blk: %s: %s with %d bytes of segments (max %d segments)",
                               self.path, kind, nbytes, max_seg)
            return VIRTIO_BLK_S_IOERR
        raw = req.chain.read(req.mem, nbytes, HEADER_SIZE)
        segments = [struct.unpack_from("<QII", raw, i) for i in range(0, nbytes, SEGMENT_SIZE)]
        for sector, count, flags in segments:  # validate everything before touching the file
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                self._rlog.warning(f"{kind}-flags", "virtio-blk: %s: %s with flags %#x", self.path, kind, flags)
                return VIRTIO_BLK_S_UNSUPP
            if count > max_sectors or not self._in_range(sector, count * SECTOR_SIZE):
                self._rlog.warning(f"{kind}-range", "virtio-blk: %s: %s of %d sectors at %d is beyond the disk "
                                   "or the limit", self.path, kind, count, sector)
                return VIRTIO_BLK_S_IOERR
        try:
            for sector, count, flags in segments:
                self._check_current(req)
                off, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
                if not length:
                    continue
                self._image.zero(off, length, unmap=discard or bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                                 check=lambda: self._check_current(req))
        except OSError as e:
            self._rlog.warning(f"{kind}-error", "virtio-blk: %s: %s error: %s", self.path, kind, e)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _check_current(self, req: Request) -> None:
        """Raise _Stale if the device was reset (or closed) since ``req`` was popped."""
        if req.gen != self._gen:
            raise _Stale()
