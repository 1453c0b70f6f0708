"""What every fuzz target shares: atheris set-up with hypyr instrumented, the oracles, and a
hostile-guest interpreter that turns fuzz bytes into virtqueue traffic.

The fakes are the unit tests' own: ``tests/virtio_mock.py`` (a split-queue driver in ordinary
GuestMemory), ``tests/unit/test_dev_fuzz.py`` (the legacy devices wired to sinks) and
``tests/unit/test_server.py`` (a toolstack that keeps domains in a dict).

Oracles (any breach raises :class:`Failure`, which atheris reports as a crash with the input):

* no exception escapes a device but the typed, documented ones its caller handles (a virtio
  device's :class:`DeviceError`, which the transport turns into NEEDS_RESET);
* hypyr logs no traceback (devices log their internal exceptions instead of raising them;
  an ERROR line without one, e.g. virtio-console's "receive queue broken", is a documented
  reaction to a driver error, rate-limited);
* guest memory changes, across a device call, only inside the device-writable buffers of the
  chains the device popped and inside the queues' used rings (:class:`WriteWatch`);
* RSS stays bounded (:func:`check_rss`, every few thousand inputs; libFuzzer's -rss_limit_mb as
  a backstop).

Run a target directly (``.venv/bin/python fuzz/fuzz_blk.py -runs=1000``) or all of them with
``make fuzz`` (``fuzz/run.py``).
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tests", ROOT / "tests" / "unit", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

with atheris.instrument_imports(include=["hypyr"]):
    import hypyr.devices.legacy.acpi_pm
    import hypyr.devices.legacy.i8042
    import hypyr.devices.legacy.rtc
    import hypyr.devices.legacy.serial
    import hypyr.devices.virtio.blk
    import hypyr.devices.virtio.chain
    import hypyr.devices.virtio.console
    import hypyr.devices.virtio.mmio
    import hypyr.devices.virtio.net
    import hypyr.devices.virtio.queue
    import hypyr.devices.virtio.rng
    import hypyr.memory  # noqa: F401

from virtio_mock import MEM_SIZE, Buf, MockDriver  # noqa: E402

from hypyr.devices.virtio.chain import (  # noqa: E402
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
)
from hypyr.devices.virtio.queue import SplitQueue  # noqa: E402
from hypyr.memory import GuestMemory  # noqa: E402

__all__ = ["MEM_SIZE", "Buf", "Failure", "FDP", "instrumented", "scratch", "GuestOps", "MockDriver", "WriteWatch",
           "check", "check_rss", "errors_logged", "fuzz", "GuestMemory", "SplitQueue", "DeviceRig", "legacy"]

FDP = atheris.FuzzedDataProvider


def instrumented():
    """``with instrumented(): import ...``: hypyr modules first imported there get coverage
    (the device models are imported, instrumented, above)."""
    return atheris.instrument_imports(include=["hypyr"])


class Failure(AssertionError):
    """An oracle found a bug."""


def scratch(name: str) -> str:
    """A private directory for this target process, ``$TMPDIR/hypyr-fuzz/NAME-PID``; those of
    processes that are gone are removed first (libFuzzer's exit skips Python's atexit)."""
    import shutil
    import tempfile
    top = os.path.join(tempfile.gettempdir(), "hypyr-fuzz")
    os.makedirs(top, exist_ok=True)
    for d in os.listdir(top):
        pid = d.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(top, d), ignore_errors=True)
    path = os.path.join(top, f"{name}-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


# -- logging: tracebacks are failures; nothing is printed --------------------------------------
class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_ERRORS = _Errors()
_hlog = logging.getLogger("hypyr")
_hlog.addHandler(_ERRORS)
_hlog.setLevel(logging.ERROR)  # warnings and debug lines cost nothing (RateLimitedLog checks the level)
_hlog.propagate = False


def errors_logged(strict: bool = False) -> None:
    """Fail if hypyr logged a traceback (``strict``: any ERROR line) since the last call (then
    forget them)."""
    recs, _ERRORS.records = _ERRORS.records, []
    recs = [r for r in recs if strict or r.exc_info]
    if recs:
        r = recs[0]
        detail = r.getMessage()
        if r.exc_info and r.exc_info[1] is not None:
            detail += f" ({type(r.exc_info[1]).__name__}: {r.exc_info[1]})"
        raise Failure(f"{len(recs)} ERROR log record(s); first from {r.name}: {detail}")


# -- process memory --------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")
_rss_state = {"n": 0, "base": 0}
RSS_GROWTH_LIMIT = int(os.environ.get("FUZZ_RSS_GROWTH_MB", "256")) << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def check_rss(every: int = 5000) -> None:
    """Every ``every`` inputs: RSS must stay within RSS_GROWTH_LIMIT of what it was after the
    first ``every`` inputs (when caches have filled)."""
    s = _rss_state
    s["n"] += 1
    if s["n"] % every:
        return
    now = rss()
    if not s["base"]:
        s["base"] = now
    elif now - s["base"] > RSS_GROWTH_LIMIT:
        raise Failure(f"RSS grew from {s['base'] >> 20} MiB to {now >> 20} MiB")


# -- which chains did the device pop? ---------------------------------------------------------------
_popped: list[DescriptorChain] = []


def _recording(name: str) -> None:
    orig = getattr(SplitQueue, name)

    def wrapper(self, *a, **kw):
        out = orig(self, *a, **kw)
        if isinstance(out, DescriptorChain):
            _popped.append(out)
        elif isinstance(out, tuple):
            _popped.extend(out[0])
        return out
    wrapper.__name__ = name
    setattr(SplitQueue, name, wrapper)


for _name in ("pop", "pop_all", "pop_many"):
    _recording(_name)


class WriteWatch:
    """Guest memory must change, across a device call, only inside the device-writable buffers
    of chains popped (since :meth:`forget`) and inside the used rings of ``queues``."""

    STEPS = (1 << 16, 1 << 12, 1 << 8)   # how :func:`_differing` narrows down a change

    def __init__(self, mem: GuestMemory, size: int = MEM_SIZE):
        self.mem, self.size = mem, size
        self.before = b""
        self.queues: list[SplitQueue] = []
        self.extra: list[tuple[int, int]] = []  # other ranges the device may write (per target)

    def forget(self) -> None:
        _popped.clear()

    def __enter__(self) -> WriteWatch:
        self.rebase()
        return self

    def rebase(self) -> None:
        """Take the snapshot again (after the harness itself wrote guest memory)."""
        self.before = self.mem.read(0, self.size)
        self._rings = self._used_rings()

    def _used_rings(self) -> list[tuple[int, int]]:
        return [(q.used_ring, 6 + 8 * q.size) for q in self.queues if q.mem is not None]

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            return
        after = self.mem.read(0, self.size)
        if after == self.before:
            return
        allowed = self._rings + self._used_rings() + self.extra
        for c in _popped:
            allowed.extend(c.writable)
        b, a = self.before, after
        for lo, hi in _differing(b, a, 0, self.size, self.STEPS):
            if any(s <= lo and hi <= s + n for s, n in allowed):
                continue
            for i in range(lo, hi):
                if b[i] != a[i] and not any(s <= i < s + n for s, n in allowed):
                    raise Failure(f"guest byte {i:#x} changed ({b[i]:#04x} -> {a[i]:#04x}) outside every "
                                  f"device-writable buffer and used ring")


def _differing(b: bytes, a: bytes, lo: int, hi: int, steps: tuple[int, ...]):
    """Yield the (start, end) pieces of ``steps[-1]`` bytes in [lo, hi) where ``a`` and ``b``
    differ, narrowing down by ``steps`` (big pieces first: few slices compared)."""
    step, finer = steps[0], steps[1:]
    for base in range(lo, hi, step):
        end = min(base + step, hi)
        if b[base:end] != a[base:end]:
            if finer:
                yield from _differing(b, a, base, end, finer)
            else:
                yield base, end


# -- a hostile guest ---------------------------------------------------------------------------------
DATA_BASE = 0x40000  # buffers live above the rings


def guest_addr(fdp, length: int) -> int:
    """An address for a buffer of ``length``: mostly in the data area, sometimes at the edge of
    RAM, in the rings, or anywhere at all."""
    mode = fdp.ConsumeIntInRange(0, 7)
    if mode <= 3:
        return DATA_BASE + fdp.ConsumeIntInRange(0, MEM_SIZE - DATA_BASE - 1)
    if mode == 4:
        return max(0, MEM_SIZE - length + fdp.ConsumeIntInRange(-16, 16))
    if mode == 5:
        return fdp.ConsumeIntInRange(0, DATA_BASE)
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def buf_len(fdp) -> int:
    mode = fdp.ConsumeIntInRange(0, 7)
    if mode <= 4:
        return fdp.ConsumeIntInRange(0, 64)
    if mode == 5:
        return fdp.ConsumeIntInRange(0, 8192)
    if mode == 6:
        return fdp.ConsumeIntInRange(0, MEM_SIZE)
    return fdp.ConsumeIntInRange(0, 0xFFFFFFFF)


class GuestOps:
    """Interprets fuzz bytes as a driver's actions on the queues of ``drivers`` (MockDrivers in
    one guest memory): well-formed chains with fuzzed contents, raw descriptors, raw ring
    indices and flags, raw bytes anywhere.  ``device_op(fdp, index)`` runs the target's own
    operations (notify, host input, reset...) under the :class:`WriteWatch`."""

    def __init__(self, mem: GuestMemory, drivers: list[MockDriver], watch: WriteWatch,
                 device_op: Callable[[FDP, int], None], device_ops: int):
        self.mem, self.drivers, self.watch = mem, drivers, watch
        self.device_op, self.device_ops = device_op, device_ops
        self.data_next = DATA_BASE

    def reset(self) -> None:
        self.mem.write(0, bytes(MEM_SIZE))
        self.data_next = DATA_BASE
        for d in self.drivers:
            d.next_desc = d.avail_idx = d.used_seen = 0

    def alloc(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        if self.data_next + n > MEM_SIZE:
            self.data_next = DATA_BASE
        addr = self.data_next
        self.data_next = (addr + n + 15) & ~15
        if not isinstance(data, int) and n:
            self.mem.write(addr, data)
        return addr

    def run(self, fdp, max_ops: int = 64) -> None:
        for _ in range(max_ops):
            if fdp.remaining_bytes() == 0:
                return
            op = fdp.ConsumeIntInRange(0, 7 + self.device_ops)
            if op >= 8:
                with self.watch:
                    self.device_op(fdp, op - 8)
                continue
            d = self.drivers[fdp.ConsumeIntInRange(0, len(self.drivers) - 1)]
            if op <= 2:
                self._chain(fdp, d)
            elif op == 3:  # a raw descriptor
                d.write_desc(fdp.ConsumeIntInRange(0, d.size - 1), guest_addr(fdp, 16), buf_len(fdp),
                             fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, 0xFFFF))
            elif op == 4:  # publish a raw head
                d.publish(fdp.ConsumeIntInRange(0, 0xFFFF) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(
                    0, d.size - 1))
            elif op == 5:  # avail.idx or flags or used_event, raw
                which = fdp.ConsumeIntInRange(0, 2)
                v = fdp.ConsumeIntInRange(0, 0xFFFF)
                if which == 0:
                    d.avail_idx = v
                    self.mem.write_u16(d.avail + 2, v)
                elif which == 1:
                    d.set_avail_flags(v)
                else:
                    d.set_used_event(v)
            elif op == 6:  # raw bytes anywhere in RAM (rings included)
                addr = fdp.ConsumeIntInRange(0, MEM_SIZE - 1)
                data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                self.mem.write(addr, data[:MEM_SIZE - addr])
            else:  # the driver takes what the device used
                d.take_used()

    def _chain(self, fdp, d: MockDriver) -> None:
        """A chain the way a driver builds one (readable buffers first, with fuzzed contents,
        then writable ones), direct or indirect, sometimes with one buffer made hostile."""
        nread = fdp.ConsumeIntInRange(0, 4)
        nwrite = fdp.ConsumeIntInRange(0, 4)
        if nread + nwrite == 0:
            nwrite = 1
        bufs: list[Buf] = []
        for i in range(nread + nwrite):
            write = i >= nread
            if fdp.ConsumeIntInRange(0, 15) == 0:  # hostile: anywhere, any length
                n = buf_len(fdp)
                bufs.append(Buf(guest_addr(fdp, n), n, write))
                continue
            n = fdp.ConsumeIntInRange(0, 600) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 16)
            if write:
                bufs.append(Buf(self.alloc(n), n, True))
            else:
                data = fdp.ConsumeBytes(n)
                bufs.append(Buf(self.alloc(data), len(data), False))
        if fdp.ConsumeIntInRange(0, 7) == 0 and bufs:  # the order rule broken
            i, j = fdp.ConsumeIntInRange(0, len(bufs) - 1), fdp.ConsumeIntInRange(0, len(bufs) - 1)
            bufs[i], bufs[j] = bufs[j], bufs[i]
        indirect = fdp.ConsumeBool()
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, b in enumerate(bufs):
                nxt = i + 1 < len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (VIRTQ_DESC_F_NEXT if nxt else 0)
                d.write_desc(i, b.addr & 0xFFFFFFFFFFFFFFFF, b.length & 0xFFFFFFFF, flags, i + 1 if nxt else 0,
                             table=table)
            head = d.next_desc
            d.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            d.next_desc = (head + 1) % d.size
            d.publish(head)
        else:
            if len(bufs) > d.size:
                bufs = bufs[:d.size]
            d.add_chain([Buf(b.addr & 0xFFFFFFFFFFFFFFFF, b.length & 0xFFFFFFFF, b.write) for b in bufs])


class DeviceRig:
    """A virtio device driven directly (as the transport drives it, without the registers): one
    MockDriver per queue in one 1 MiB guest, a queue size and the driver's features fuzzed per
    input, and the device operations every device has (notify, driver reset, quiesce + save +
    resume).  A :class:`DeviceError` from a notification is what the transport turns into
    NEEDS_RESET: the rig then resets the device, as the driver would."""

    SIZES = (1, 2, 4, 8, 16, 256)

    def __init__(self, dev, *, after_notify: Callable[[], None] | None = None):
        from hypyr.devices.virtio.mmio_regs import TRANSPORT_FEATURES
        self.dev = dev
        self.mem = GuestMemory.anonymous([(0, MEM_SIZE)], hugepages=False)
        self.watch = WriteWatch(self.mem)
        self.nq = len(dev.queue_max_sizes)
        self.drivers = [MockDriver(size=16, mem=self.mem, base=0x1000 + 0x8000 * i) for i in range(self.nq)]
        self.queues = [SplitQueue(m) for m in dev.queue_max_sizes]
        self.offered = dev.device_features() | TRANSPORT_FEATURES
        self.features = self.offered
        self.interrupts = 0
        self.after_notify = after_notify
        self.extra_ops: list[Callable[[FDP], None]] = []
        self.ops = GuestOps(self.mem, self.drivers, self.watch, self._device_op, 0)

    def _interrupt(self, index: int) -> None:
        check(0 <= index < self.nq, f"interrupt for queue {index}")
        self.interrupts += 1

    def start(self, fdp) -> None:
        """A fresh input: guest RAM zeroed, queue sizes and features chosen, device activated."""
        from hypyr.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
        self.dev.reset()
        self.ops.reset()
        self.watch.forget()
        for d, q in zip(self.drivers, self.queues):
            sizes = [s for s in self.SIZES if s <= q.max_size]
            d.size = sizes[fdp.ConsumeIntInRange(0, len(sizes) - 1)]
            d.avail = d.desc + 16 * d.size
            d.used = (d.avail + 6 + 2 * d.size + 3) & ~3
        self.features = self.offered if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1) & self.offered
        self.event_idx = bool(self.features & VIRTIO_F_RING_EVENT_IDX)
        self.indirect = bool(self.features & VIRTIO_F_RING_INDIRECT_DESC)
        self.ops.device_ops = 3 + len(self.extra_ops)
        self.activate()

    def activate(self) -> None:
        self.dev.reset()
        self.watch.forget()
        for d, q in zip(self.drivers, self.queues):
            q.reset()
            q.size, q.desc_table, q.avail_ring, q.used_ring = d.size, d.desc, d.avail, d.used
            q.activate(self.mem, event_idx=self.event_idx, indirect=self.indirect)
            q.ready = True
        for d in self.drivers:  # the driver's view restarts too
            d.next_desc = d.avail_idx = d.used_seen = 0
            self.mem.write(d.desc, bytes(d.used + 6 + 8 * d.size - d.desc))
        self.watch.rebase()  # (a no-op outside a device operation)
        self.watch.queues = self.queues
        self.dev.activate(self.mem, list(self.queues), self.features, self._interrupt)

    def notify(self, index: int) -> None:
        from hypyr.devices.virtio.device import DeviceError
        try:
            self.dev.queue_notify(index)
        except DeviceError:
            self.needs_reset = True
        if self.after_notify is not None:
            self.after_notify()

    def _device_op(self, fdp, op: int) -> None:
        self.needs_reset = False
        if op == 0:
            self.notify(fdp.ConsumeIntInRange(-1, self.nq))
        elif op == 1:  # the driver resets the device and sets it up again
            self.activate()
        elif op == 2:  # save/restore's first half: quiesce, save, check the state, resume
            self.dev.quiesce()
            if self.dev.pending_error() is not None:
                # a driver error found off the notify path: the transport enters NEEDS_RESET now
                # (and does not hold the device to "nothing in flight"); the driver resets it
                self.dev.resume()
                self.activate()
                return
            for i, q in enumerate(self.queues):
                check(q.in_flight == 0, f"queue {i} has {q.in_flight} chains in flight after quiesce")
            self.dev.parse_state(self.dev.save_state())
            self.dev.resume()
        else:
            self.extra_ops[op - 3](fdp)
        if self.needs_reset:
            self.activate()

    def run(self, data: bytes, max_ops: int = 48) -> None:
        fdp = FDP(data)
        self.start(fdp)
        self.ops.run(fdp, max_ops)
        errors_logged()
        check_rss()


def legacy(name: str) -> Callable[[bytes], None]:
    """A fuzz function for one of the legacy devices of tests/unit/test_dev_fuzz.py (built as
    there, fresh per input): fuzzed reads and writes at any offset (a little outside the device's
    ports too) and width, host input (serial), Ctrl-Alt-Del (i8042), the power button (acpi_ged),
    state save/restore round trips.  Oracles: nothing raises, reads return exactly the bytes
    asked for, no ERROR line at all, a restored state reads back equal; the serial port's IRQ
    calls alternate, starting high."""
    from test_dev_fuzz import _devices

    def one_input(data: bytes) -> None:
        fdp = FDP(data)
        devs, serial, i8042 = _devices()
        if name == "serial":  # record the line (test_dev_fuzz's sink records nothing we can see)
            from hypyr.devices.legacy.serial import Serial
            calls: list[bool] = []
            serial = Serial(calls.append, lambda b: None)
            devs["serial"] = (serial, 8)
        ports = [k for k in devs if k == name or k.startswith(name + ".")]
        restored = False
        owner = devs[name][0] if name in devs else i8042
        for _ in range(96):
            if fdp.remaining_bytes() == 0:
                break
            dev, length = devs[ports[fdp.ConsumeIntInRange(0, len(ports) - 1)]]
            op = fdp.ConsumeIntInRange(0, 5)
            off = fdp.ConsumeIntInRange(0, length - 1) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(-4, 16)
            size = (1, 1, 1, 2, 4, 8, 0)[fdp.ConsumeIntInRange(0, 6)]
            if op <= 1:
                v = dev.read(off, size)
                check(len(v) == size, f"{name}: a {size}-byte read at {off} returned {len(v)} bytes")
            elif op <= 3:
                dev.write(off, fdp.ConsumeBytes(size).ljust(size, b"\0"))
            elif op == 4:
                if name == "serial":
                    serial.enqueue_input(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
                elif name == "i8042":
                    i8042.inject_ctrl_alt_del()
                elif name == "acpi_ged":
                    owner.press_power_button()
            else:
                st = owner.save_state()
                if name == "serial":  # restore drives the line to the saved level, whatever it was
                    check(all(a != b for a, b in itertools.pairwise(calls)), "serial: the IRQ line was "
                          "driven twice alike")
                    calls.clear()
                    restored = True
                owner.load_state(st)
                check(owner.save_state() == st, f"{name}: a restored state reads back different")
        if name == "serial":
            check(all(a != b for a, b in itertools.pairwise(calls)), "serial: the IRQ line was driven twice alike")
            check(not calls or restored or calls[0] is True, "serial: the IRQ line was first driven low")
        errors_logged(strict=True)
        check_rss()
    return one_input


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def fuzz(one_input: Callable[[bytes], None]) -> None:
    """Hand ``one_input`` to libFuzzer (argv: libFuzzer's options, corpus directories)."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
