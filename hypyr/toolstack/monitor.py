"""Host and domain monitoring: `hypyr info` (as ``xl info``) and `hypyr top` (as ``xentop``).

Everything here is read from the registry and ordinary OS interfaces (/proc, /sys, uname); nothing
talks to a domain's control socket or opens a VM, so both commands are cheap and safe to run while
domains are busy.

* ``host_info()`` -> a dict (hostname, kernel, CPUs, memory, KVM backend, domains, version);
  ``info_lines(d)`` formats it as ``key : value`` lines.
* ``sample()`` -> one ``Row`` per domain (cumulative process CPU time, RSS, ...);
  ``top_rows(prev, cur, dt)`` turns two samples ``dt`` seconds apart into ``TopRow``s with CPU %
  (the last one is the total over all domains).
* ``run_top()`` redraws the table in place (ANSI: alternate screen, clear, home) or, in batch
  mode, prints plain tables one after another like ``top -b -n N``.  ``q`` quits.

CPU % is the domain process's CPU time (utime + stime of all its threads, vCPU threads included:
guest time is counted as user time) over wall time, x 100: 100 % is one host CPU fully busy, so a
domain with several busy vCPUs can exceed 100 %.  On the first frame, where there is no earlier
sample, it is the average since the domain process started (as top's first frame).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from hypyr import procfs
from hypyr.errors import HypyrError

QUIT_KEYS = frozenset("qQ")
MAX_INTERVAL = 86400.0   # seconds between refreshes: at most a day


def _kvm_usable(device: str = "/dev/kvm") -> bool:
    """Can /dev/kvm be opened read-write?  (A cheap check: no VM is created.)"""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _live_records() -> list:
    """The registry's domains, minus gone ones (dead rows are reported once by list(); skip them)."""
    from hypyr.toolstack.domrecord import DomainState
    from hypyr.toolstack.registry import Registry
    with Registry() as reg:
        return [r for r in reg.list() if r.state is not DomainState.DEAD]


# -- info ------------------------------------------------------------------------------------------
def host_info() -> dict[str, Any]:
    """Facts about the host and its domains, cheap to gather (no KVM probe)."""
    import hypyr

    u = os.uname()
    total, available = procfs.memory_mib()
    recs = _live_records()
    kvm_present = os.path.exists("/dev/kvm")
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "host": socket.gethostname() or u.nodename,
        "release": u.release,
        "version": u.version,
        "machine": u.machine,
        "nr_cpus": os.cpu_count() or 1,
        "cpu_model": procfs.cpu_model(),
        "total_memory": total,        # MiB
        "free_memory": available,     # MiB
        "loadavg": [round(x, 2) for x in load],
        "kvm_backend": procfs.kvm_backend() if kvm_present else "none",
        "kvm_usable": _kvm_usable() if kvm_present else False,
        "in_lab": os.environ.get("HYPYR_IN_LAB") == "1",
        "nr_domains": len(recs),
        "domain_memory": sum(int(r.config_dict().get("memory", 0)) for r in recs),  # MiB, configured
        "domain_vcpus": sum(int(r.config_dict().get("vcpus", 1)) for r in recs),
        "state_dir": str(_state_dir()),
        "hypyr_version": hypyr.__version__,
        "python_version": platform.python_version(),
    }


def _state_dir():
    from hypyr.toolstack import paths
    return paths.state_dir()


_INFO_LABELS = [
    ("host", "host", None),
    ("release", "release", None),
    ("version", "version", None),
    ("machine", "machine", None),
    ("nr_cpus", "nr_cpus", None),
    ("cpu_model", "cpu_model", None),
    ("total_memory", "total_memory", "{} MiB"),
    ("free_memory", "free_memory", "{} MiB"),
    ("loadavg", "loadavg", None),
    ("kvm_backend", "kvm_backend", None),
    ("kvm_usable", "kvm_usable", None),
    ("in_lab", "nested_lab", None),
    ("nr_domains", "nr_domains", None),
    ("domain_memory", "domain_memory", "{} MiB"),
    ("domain_vcpus", "domain_vcpus", None),
    ("state_dir", "state_dir", None),
    ("hypyr_version", "hypyr_version", None),
    ("python_version", "python_version", None),
]


def info_lines(d: dict[str, Any]) -> list[str]:
    """``xl info``-style lines: the key padded to 23 columns, ``: ``, the value."""
    lines = []
    known = set()
    for key, label, fmt in _INFO_LABELS:
        known.add(key)
        if key not in d:
            continue
        v = d[key]
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, (list, tuple)):
            v = " ".join(str(x) for x in v)
        lines.append(f"{label:<23}: {fmt.format(v) if fmt else v}")
    for key in d:  # anything added later still shows
        if key not in known:
            lines.append(f"{key:<23}: {d[key]}")
    return lines


# -- top: samples ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One domain at one instant."""

    name: str
    domid: int
    state: str               # xl letters, e.g. "-b----"
    pid: int | None
    cpu_time: float | None   # s, utime + stime of the whole domain process; None if not running
    memory: int              # MiB, configured
    rss: float | None        # MiB, VmRSS of the domain process
    vcpus: int
    started: float | None    # unix time the domain (last) started
    proc_age: float | None   # s since the domain process started (for the first frame's CPU %)
    t: float                 # time.monotonic() of the sample
    net_bytes: int | None = None  # bytes through the domain's taps, both ways; None: no NIC or not running


@dataclass
class TopRow:
    """One line of the top table: a domain, or the total (``domid`` None, ``name`` "Total")."""

    name: str
    domid: int | None
    state: str
    cpu_pct: float | None
    memory: int
    rss: float | None
    vcpus: int
    uptime: float | None     # s
    net_kbs: float | None = None  # KB/s through the domain's NICs, both ways

    @property
    def is_total(self) -> bool:
        return self.domid is None


def _row(rec, now: float) -> Row:
    from hypyr.toolstack.api import xl_state
    from hypyr.toolstack.domrecord import is_alive

    cfg = rec.config_dict()
    alive = bool(rec.pid) and is_alive(rec)
    cpu = rss = age = None
    running = False
    if alive:
        cpu = procfs.cpu_seconds(rec.pid)
        rss = procfs.rss_mib(rec.pid)
        age = procfs.age(rec.pid)
        running = procfs.any_thread_running(rec.pid)
    return Row(rec.name, rec.domid, xl_state(rec.state, running), rec.pid if alive else None, cpu,
               int(cfg.get("memory", 0)), rss, int(cfg.get("vcpus", 1)), rec.started, age, now,
               _net_bytes(rec.domid, cfg) if alive else None)


def _net_bytes(domid: int, cfg: dict) -> int | None:
    """Bytes through the domain's taps (sysfs counters), or None if it has no NIC."""
    from hypyr.toolstack.network import guest_traffic
    from hypyr.toolstack.vif import VifSpec
    total, seen = 0, False
    for v in cfg.get("vifs", ()):
        try:
            traffic = guest_traffic(VifSpec.from_dict(v).tap_name(domid))
        except (HypyrError, ValueError, TypeError):  # a vif record this version cannot read
            continue
        if traffic is not None:
            total, seen = total + sum(traffic), True
    return total if seen else None


def net_rate(prev: Row | None, cur: Row, dt: float) -> float | None:
    """KB/s through ``cur``'s NICs since ``prev``."""
    if cur.net_bytes is None or prev is None or prev.net_bytes is None or prev.pid != cur.pid or dt <= 0:
        return None
    return max(0.0, (cur.net_bytes - prev.net_bytes) / dt / 1000.0)


def sample(records: Iterable | None = None) -> list[Row]:
    """One Row per domain (ordered by id); ``records`` defaults to the registry's live domains."""
    now = time.monotonic()
    recs = _live_records() if records is None else list(records)
    return sorted((_row(r, now) for r in recs), key=lambda r: r.domid)


def cpu_percent(prev: Row | None, cur: Row, dt: float) -> float | None:
    """CPU % of one host CPU used by ``cur``'s process since ``prev`` (``dt`` s of wall time earlier).

    Without a matching earlier sample (first frame, or the domain process changed), the average
    since the process started.
    """
    if cur.cpu_time is None:
        return None
    if prev is not None and prev.cpu_time is not None and prev.pid == cur.pid and dt > 0:
        return max(0.0, (cur.cpu_time - prev.cpu_time) / dt * 100.0)
    if cur.proc_age:
        return max(0.0, cur.cpu_time / cur.proc_age * 100.0)
    return None


def top_rows(prev: list[Row] | None, cur: list[Row], dt: float, now: float | None = None) -> list[TopRow]:
    """The table for ``cur``: one TopRow per domain, then the total over all of them (last)."""
    wall = time.time() if now is None else now
    before = {(r.domid, r.name): r for r in (prev or [])}
    out = []
    for r in cur:
        up = max(0.0, wall - r.started) if r.started else None
        old = before.get((r.domid, r.name))
        out.append(TopRow(r.name, r.domid, r.state, cpu_percent(old, r, dt), r.memory, r.rss, r.vcpus, up,
                          net_rate(old, r, dt)))
    cpus = [t.cpu_pct for t in out if t.cpu_pct is not None]
    rsss = [t.rss for t in out if t.rss is not None]
    nets = [t.net_kbs for t in out if t.net_kbs is not None]
    out.append(TopRow("Total", None, f"{len(cur)} dom", sum(cpus) if cpus else (0.0 if not cur else None),
                      sum(t.memory for t in out), sum(rsss) if rsss else None,
                      sum(t.vcpus for t in out), None, sum(nets) if nets else None))
    return out


# -- top: rendering --------------------------------------------------------------------------------
COLUMNS = ("NAME", "ID", "STATE", "CPU(%)", "MEM(MiB)", "RSS(MiB)", "VCPUS", "NET(KB/s)", "UPTIME")
_ALIGN = ("<", ">", "<", ">", ">", ">", ">", ">", ">")


def fmt_uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def _cells(t: TopRow) -> list[str]:
    return [t.name, "-" if t.domid is None else str(t.domid), t.state,
            "-" if t.cpu_pct is None else f"{t.cpu_pct:.1f}", str(t.memory),
            "-" if t.rss is None else f"{t.rss:.1f}", str(t.vcpus),
            "-" if t.net_kbs is None else f"{t.net_kbs:.1f}", fmt_uptime(t.uptime)]


def table_lines(rows: list[TopRow]) -> list[str]:
    """The table as plain text: a header line, one line per row; the total after a rule."""
    cells = [list(COLUMNS)] + [_cells(t) for t in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    widths[0] = max(widths[0], 16)

    def fmt(c: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(c, _ALIGN, widths)).rstrip()

    lines = [fmt(cells[0])]
    for t, c in zip(rows, cells[1:]):
        if t.is_total:
            lines.append("-" * len(fmt(cells[0])))
        lines.append(fmt(c))
    return lines


@dataclass
class HostSnapshot:
    t: float
    cpu_ticks: tuple[int, int] | None
    mem_total: int      # MiB
    mem_avail: int      # MiB


def host_snapshot() -> HostSnapshot:
    return HostSnapshot(time.monotonic(), procfs.host_cpu_ticks(), *procfs.memory_mib())


def header_lines(prev: HostSnapshot | None, cur: HostSnapshot, rows: list[TopRow]) -> list[str]:
    """top's summary lines: time, host CPU busy, load, memory, domain counts by state."""
    busy = "-"
    if prev and prev.cpu_ticks and cur.cpu_ticks and cur.cpu_ticks[1] > prev.cpu_ticks[1]:
        pct = (cur.cpu_ticks[0] - prev.cpu_ticks[0]) / (cur.cpu_ticks[1] - prev.cpu_ticks[1]) * 100
        busy = f"{pct:.1f}%"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "-"
    doms = [t for t in rows if not t.is_total]
    counts: dict[str, int] = {}
    for t in doms:
        letter = next((c for c in t.state if c != "-"), "-")
        counts[letter] = counts.get(letter, 0) + 1
    names = {"r": "running", "b": "blocked", "p": "paused", "s": "shutdown", "c": "crashed", "d": "dying",
             "-": "other"}
    by_state = ", ".join(f"{counts[k]} {v}" for k, v in names.items() if counts.get(k)) or "none"
    return [
        f"hypyr top - {time.strftime('%H:%M:%S')}  host {socket.gethostname()}: {os.cpu_count() or 1} CPUs, "
        f"busy {busy}, load {load}",
        f"Mem: {cur.mem_total} MiB total, {cur.mem_avail} MiB available   "
        f"Domains: {len(doms)} ({by_state})",
    ]


# -- top: keys -------------------------------------------------------------------------------------
class _NoKeys:
    """No key source: just wait."""

    def get(self, timeout: float) -> str | None:
        if timeout > 0:
            time.sleep(timeout)
        return None


class _TtyKeys:
    """Single key presses from a terminal, in cbreak mode while in use (restored on exit)."""

    def __init__(self, stream: TextIO):
        self.fd = stream.fileno()
        self._saved: list[Any] | None = None   # termios attributes to restore

    def __enter__(self) -> _TtyKeys:
        import termios
        import tty
        try:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        except termios.error:
            self._saved = None
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            import termios
            with contextlib.suppress(Exception):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def get(self, timeout: float) -> str | None:
        try:
            r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return None
        if not r:
            return None
        data = os.read(self.fd, 32)
        return data.decode("utf-8", "replace") if data else None


class _FuncKeys:
    """A key source given as a callable ``f(timeout) -> str | None``."""

    def __init__(self, f: Callable[[float], str | None]):
        self.get = f


@contextlib.contextmanager
def _key_source(keys) -> Iterator:
    """Adapt ``keys``: an object with ``get(timeout)``, a callable, a tty stream, or anything else (none)."""
    if keys is None:
        yield _NoKeys()
    elif hasattr(keys, "get") and callable(keys.get) and not hasattr(keys, "fileno"):
        yield keys
    elif callable(keys):
        yield _FuncKeys(keys)
    else:
        try:
            tty = keys.isatty()
        except (AttributeError, ValueError, OSError):
            tty = False
        if tty:
            with _TtyKeys(keys) as k:
                yield k
        else:
            yield _NoKeys()  # a pipe or file: not a keyboard; run `iterations` times or until interrupted


def _wait_for_quit(keys, interval: float) -> bool:
    """Wait ``interval`` s for keys; True if a quit key came."""
    deadline = time.monotonic() + interval
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        k = keys.get(left)
        if k and any(c in QUIT_KEYS for c in k):
            return True


# -- top: the loop ---------------------------------------------------------------------------------
def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError, OSError):
        return False


_STDIN = object()  # run_top's default key source: sys.stdin at call time


def run_top(interval: float = 1.0, iterations: int | None = None, out: TextIO | None = None,
            keys: Any = _STDIN, batch: bool | None = None,
            sampler: Callable[[], list[Row]] | None = None) -> int:
    """Show the domains' table every ``interval`` s until ``q``, Ctrl-C, or ``iterations`` frames.

    ``batch`` (default: when ``iterations`` is given or ``out`` is not a terminal) prints plain
    tables one after another, like ``top -b -n N``; otherwise the table is redrawn in place on the
    terminal's alternate screen.  ``keys`` is a key source: a terminal
    (read in cbreak mode), an object with ``get(timeout) -> str | None``, or a callable with that
    signature; None or anything else (a pipe) is not read.  ``out`` defaults to sys.stdout and
    ``keys`` to sys.stdin, both looked up at call time.  Returns 0.
    """
    out = sys.stdout if out is None else out
    keys = sys.stdin if keys is _STDIN else keys
    if not good_interval(interval):
        raise HypyrError(f"the refresh interval must be more than 0 and at most {MAX_INTERVAL:g} seconds, "
                         f"not {interval}")
    if iterations is not None and iterations < 1:
        raise HypyrError(f"the number of iterations must be at least 1, not {iterations}")
    if batch is None:
        batch = iterations is not None or not _isatty(out)
    take = sampler or sample
    frames = 0
    try:
        with _key_source(keys) as ks, contextlib.ExitStack() as stack:
            if not batch:
                out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
                stack.callback(lambda: (out.write("\x1b[?25h\x1b[?1049l"), out.flush()))
            prev, prev_host = None, None
            while True:
                cur, cur_host = take(), host_snapshot()
                dt = cur_host.t - prev_host.t if prev_host else 0.0
                rows = top_rows(prev, cur, dt)
                head = header_lines(prev_host, cur_host, rows)
                if batch:
                    out.write("\n".join(head + [""] + table_lines(rows)) + "\n\n")
                else:
                    out.write("\x1b[H\x1b[2J" + "\n".join(head + [""] + table_lines(rows) + ["", "press q to quit"]))
                out.flush()
                frames += 1
                prev, prev_host = cur, cur_host
                if iterations is not None and frames >= iterations:
                    break
                if _wait_for_quit(ks, interval):
                    break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `hypyr top -b | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


def good_interval(interval) -> bool:
    """A finite number of seconds in (0, MAX_INTERVAL] (nan, inf and 1e308 are not)."""
    return isinstance(interval, (int, float)) and math.isfinite(interval) and 0 < interval <= MAX_INTERVAL


__all__ = ["Row", "TopRow", "HostSnapshot", "host_info", "info_lines", "sample", "cpu_percent", "top_rows",
           "table_lines", "header_lines", "host_snapshot", "run_top", "good_interval", "MAX_INTERVAL"]
