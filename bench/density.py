#!/usr/bin/env python3
"""Density benchmark: how many small idle domains fit, what each costs in host memory and CPU.

Starts up to --max domains (--memory MiB, default 96; 1 vCPU, the default image, a guest that prints "up" and then
sleeps forever) one after another with `python -m hypyr create FILE.cfg`, each after the previous
one has booted, and stops early, cleanly, when a create fails (e.g. the host is out of memory).
Then measures the host RSS of the domain processes (with and without the guest RAM they hold) and
the host CPU the idle domains use over --idle seconds. Every domain is destroyed at the end, on
errors and on Ctrl-C/SIGTERM too. Runs inside the lab (nested KVM); started on the host it
re-executes itself there:

    .venv/bin/python bench/density.py [--max N] [--idle S] [--boot-timeout S] [--lab-memory SIZE]

It prints figures and never asserts; see bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from _common import ensure_image, smaps_split, supervisor_of  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from hypyr import procfs  # noqa: E402

# 64 MiB is refused (the default kernel needs RAM up to 0x4378000, 67.5 MiB, plus the initrd); with
# 80 the guest now runs out of memory unpacking the default initrd (2026-12-07: "System is deadlocked
# on memory" in unpack_to_rootfs), so the guest gets 96
GUEST_MIB = 96
GUEST_CMD = "echo up; while true; do sleep 1000; done"
UP_RE = re.compile(rb"(?m)^up\r?$")
CLK_TCK = procfs.CLK_TCK
NAME_PREFIX = "dens-"


class Terminated(Exception):
    """SIGTERM/SIGHUP: unwind through the finally blocks so every domain is destroyed."""


def _on_term(signum, _frame):
    raise Terminated(signal.Signals(signum).name)


# -- /proc readers (hypyr.procfs; here only the figures this script prints) -------------------------
def meminfo_mib() -> dict[str, int]:
    return {k: v // 1024 for k, v in procfs.meminfo().items()}


def cpu_ticks(pid: int) -> int | None:
    """utime + stime (clock ticks) of process pid, all threads."""
    st = procfs.stat(pid)
    return st.utime + st.stime if st else None


def host_busy_ticks() -> tuple[int, int]:
    return procfs.host_cpu_ticks() or (0, 0)


def guest_ram_rss_mib(pid: int, guest_mib: int) -> tuple[float | None, str]:
    """Resident part of the guest-RAM mapping: the anonymous mapping of exactly guest_mib MiB.

    Returns (MiB, how): how is "exact" when a mapping of exactly that size was found, "largest" when
    the largest anonymous mapping of at least that size was used (the kernel may have merged it with
    a neighbour), or "none".
    """
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None, "none"
    maps = []  # (size kB, rss kB, anonymous)
    cur = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", parts[0]):
            anon = len(parts) < 6  # no path name
            cur = [0, 0, anon]
            maps.append(cur)
        elif cur is not None and parts[0] == "Size:":
            cur[0] = int(parts[1])
        elif cur is not None and parts[0] == "Rss:":
            cur[1] = int(parts[1])
    want = guest_mib * 1024
    exact = [m for m in maps if m[2] and m[0] == want]
    if exact:
        return max(m[1] for m in exact) / 1024, "exact"
    big = [m for m in maps if m[2] and m[0] >= want]
    if big:
        return max(big, key=lambda m: m[0])[1] / 1024, "largest"
    return None, "none"


def _stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"median {statistics.median(xs):.1f}  min {min(xs):.1f}  max {max(xs):.1f}"


# -- domains ----------------------------------------------------------------------------------------
@dataclass
class Dom:
    index: int
    name: str
    cfg: Path
    domid: int | None = None
    pid: int | None = None
    create_s: float | None = None    # `hypyr create` wall time
    up_s: float | None = None        # from the start of `create` to "up" in the console log
    avail_before: int | None = None  # host MemAvailable (MiB) just before this create
    rss: float | None = None
    guest_rss: float | None = None
    guest_how: str = ""
    private: float | None = None     # MiB outside guest RAM no other process shares
    pss: float | None = None         # MiB outside guest RAM, shared pages divided among their sharers
    sup_pss: float | None = None     # the same for its supervisor (a jailed domain's parent process)
    idle_ticks: int | None = None
    notes: list[str] = field(default_factory=list)


def measure_memory(x: Dom, guest_mib: int) -> None:
    """Fill in the domain's RSS, guest RAM resident, private and PSS figures."""
    x.rss = procfs.rss_mib(x.pid)
    x.guest_rss, x.guest_how = guest_ram_rss_mib(x.pid, guest_mib)
    split = smaps_split(x.pid, guest_mib * 1024)
    if split is not None:
        x.private, x.pss = split.private / 1024, split.pss / 1024
    sup = supervisor_of(x.pid)
    sup_split = None if sup is None else smaps_split(sup, guest_mib * 1024)
    x.sup_pss = None if sup_split is None else sup_split.pss / 1024


def write_cfg(d: Path, i: int, kernel: str, initrd: str, mib: int) -> Dom:
    name = f"{NAME_PREFIX}{i:02d}"
    extra = "hypyr.exec=" + base64.b64encode(GUEST_CMD.encode()).decode()
    cfg = d / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\ntype = "pvh"\nmemory = {mib}\nvcpus = 1\n'
                   f'kernel = "{kernel}"\nramdisk = "{initrd}"\nextra = "{extra}"\n')
    return Dom(i, name, cfg)


def hypyr_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hypyr", *args]


def _one_line(text: str) -> str:
    lines = [l.strip() for l in text.replace("\r", "").splitlines() if l.strip()]
    return " | ".join(lines[-3:]) if lines else "(no output)"


def create(dom: Dom, state: Path, timeout: float) -> str | None:
    """Run `hypyr create`; fill create_s, domid, pid. Returns None on success, else why it failed."""
    from hypyr.toolstack.registry import Registry
    t0 = time.monotonic()
    try:
        r = subprocess.run(hypyr_cmd("create", str(dom.cfg)), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        dom.create_s = time.monotonic() - t0
        return f"`hypyr create` did not return within {timeout:.0f} s"
    dom.create_s = time.monotonic() - t0
    if r.returncode != 0:
        return f"`hypyr create` exited {r.returncode}: {_one_line(r.stderr + r.stdout)}"
    reg = Registry()
    try:
        rec = reg.get(dom.name)
    finally:
        reg.close()
    dom.domid, dom.pid = rec.domid, rec.pid
    return None


def wait_up(dom: Dom, state: Path, t0: float, timeout: float) -> str | None:
    """Wait for the "up" line in the domain's console log; fill up_s (from t0, the start of create)."""
    from hypyr.toolstack.domrecord import is_alive
    from hypyr.toolstack.registry import Registry
    log = state / "domains" / str(dom.domid) / "console.log"
    reg = Registry()
    try:
        while True:
            try:
                if UP_RE.search(log.read_bytes()):
                    dom.up_s = time.monotonic() - t0
                    return None
            except FileNotFoundError:
                pass
            if time.monotonic() - t0 > timeout:
                return f"no 'up' in its console log within {timeout:.0f} s"
            if not is_alive(reg.get(dom.name)):
                return "its domain process exited before the guest was up"
            time.sleep(0.25)
    finally:
        reg.close()


def destroy_all(doms: list[Dom], state: Path) -> list[str]:
    """Destroy every domain of our private state dir (registry rows and any stray domain process)."""
    from hypyr.errors import HypyrError
    from hypyr.toolstack import api
    from hypyr.toolstack.registry import Registry
    problems = []
    try:
        reg = Registry()
        recs = reg.list()
        reg.close()
    except Exception as e:  # noqa: BLE001 - still kill what we know of below
        problems.append(f"could not read the registry: {e}")
        recs = []
    for rec in recs:
        try:
            api.destroy(str(rec.domid))
        except (HypyrError, OSError) as e:
            problems.append(f"destroy {rec.name}: {e}")
    # Anything left that we started: domain processes whose environment names our state dir.
    needle = f"HYPYR_STATE_DIR={state}".encode()
    pids = {d.pid for d in doms if d.pid} | {r.pid for r in recs if r.pid}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "environ").read_bytes().split(b"\0") and \
                        b"hypyr" in (p / "cmdline").read_bytes():
                    pids.add(int(p.name))
            except OSError:
                pass
    for pid in sorted(pids):
        if pid == os.getpid() or cpu_ticks(pid) is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            problems.append(f"killed leftover domain process {pid}")
        except ProcessLookupError:
            pass
    return problems


# -- the run ----------------------------------------------------------------------------------------
def lab_side(args: argparse.Namespace) -> int:
    from hypyr.image import default as image
    from hypyr.toolstack import monitor

    paths = image.paths()
    kernel, initrd = str(paths.kernel), str(paths.initrd)
    for path in (kernel, initrd):
        if not os.path.isfile(path):
            print(f"bench: {path} is missing (run `hypyr image build` on the host)", file=sys.stderr)
            return 2
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: /dev/kvm is not usable here", file=sys.stderr)
        return 2

    state = Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp"))  # short: control.sock paths are limited
    os.environ["HYPYR_STATE_DIR"] = str(state)
    cfgdir = state / "cfg"
    cfgdir.mkdir()

    print(f"hypyr density benchmark: up to {args.max} domains of {args.memory} MiB, 1 vCPU, default image, "
          f"guest: {GUEST_CMD!r}")
    print(f"  kernel {kernel}\n  initrd {initrd}\n  state  {state}")
    print("  host (L1):")
    for line in monitor.info_lines(monitor.host_info()):
        print("    " + line)
    print(flush=True)

    doms: list[Dom] = []
    stop_reason = f"reached --max {args.max}"
    mem0 = meminfo_mib()
    t_start = time.monotonic()
    try:
        print(f"{'#':>3}  {'name':<8} {'id':>3} {'pid':>6}  {'create s':>8}  {'up s':>7}  {'boot s':>7}  "
              f"{'MemAvail before':>15}", flush=True)
        for i in range(1, args.max + 1):
            dom = write_cfg(cfgdir, i, kernel, initrd, args.memory)
            dom.avail_before = meminfo_mib().get("MemAvailable")
            t0 = time.monotonic()
            why = create(dom, state, args.create_timeout)
            if why is None:
                doms.append(dom)
                why = wait_up(dom, state, t0, args.boot_timeout)
            if why is not None:
                stop_reason = f"domain {i} ({dom.name}) failed: {why}"
                print(f"{i:>3}  {dom.name:<8} {'-' if dom.domid is None else dom.domid:>3} "
                      f"{dom.pid or '-':>6}  "
                      f"{'-' if dom.create_s is None else f'{dom.create_s:.2f}':>8}  {'-':>7}  {'-':>7}  "
                      f"{dom.avail_before:>11} MiB   FAILED: {why}", flush=True)
                break
            print(f"{i:>3}  {dom.name:<8} {dom.domid:>3} {dom.pid:>6}  {dom.create_s:>8.2f}  {dom.up_s:>7.2f}  "
                  f"{dom.up_s - dom.create_s:>7.2f}  {dom.avail_before:>11} MiB", flush=True)
        up = [x for x in doms if x.up_s is not None]
        n = len(up)
        print(f"\nstopped: {stop_reason}; {n} domain(s) up after {time.monotonic() - t_start:.0f} s\n", flush=True)
        if not n:
            return 0

        # -- memory -------------------------------------------------------------------------------
        mem1 = meminfo_mib()
        for x in up:
            measure_memory(x, args.memory)

        # -- idle CPU -----------------------------------------------------------------------------
        print(f"measuring idle CPU over {args.idle:.0f} s ...", flush=True)
        before = {x.name: cpu_ticks(x.pid) for x in up}
        hb = host_busy_ticks()
        self_b = os.times()
        t0 = time.monotonic()
        time.sleep(args.idle)
        wall = time.monotonic() - t0
        ha = host_busy_ticks()
        self_a = os.times()
        for x in up:
            a = cpu_ticks(x.pid)
            if a is None or before[x.name] is None:
                x.notes.append("process gone during the idle window")
            else:
                x.idle_ticks = a - before[x.name]
        host_busy_pct = (ha[0] - hb[0]) / max(1, ha[1] - hb[1]) * 100
        ncpu = os.cpu_count() or 1
        bench_self = max(0.0, (self_a.user + self_a.system - self_b.user - self_b.system) / wall * 100)

        # -- a `hypyr top` frame, from the monitor, as a cross-check --------------------------------
        buf = io.StringIO()
        monitor.run_top(interval=2.0, iterations=2, out=buf, keys=None)
        frames = buf.getvalue().strip().split("\n\n")
        top_frame = "\n\n".join(frames[-2:]) if len(frames) >= 2 else buf.getvalue()

        # -- report -------------------------------------------------------------------------------
        print(f"\n{'name':<8} {'id':>3} {'pid':>6}  {'RSS MiB':>8}  {'guest RAM res.':>14}  "
              f"{'RSS - guest':>11}  {'idle CPU %':>10}")
        for x in up:
            idle_pct = None if x.idle_ticks is None else x.idle_ticks / CLK_TCK / wall * 100
            excl = None if x.rss is None or x.guest_rss is None else x.rss - x.guest_rss
            g = "-" if x.guest_rss is None else f"{x.guest_rss:.1f}" + ("" if x.guest_how == "exact" else "*")
            print(f"{x.name:<8} {x.domid:>3} {x.pid:>6}  {'-' if x.rss is None else f'{x.rss:.1f}':>8}  {g:>14}  "
                  f"{'-' if excl is None else f'{excl:.1f}':>11}  {'-' if idle_pct is None else f'{idle_pct:.2f}':>10}"
                  + (f"  ({'; '.join(x.notes)})" if x.notes else ""))
        if any(x.guest_how == "largest" for x in up):
            print("  * no anonymous mapping of exactly the guest's size: the largest anonymous mapping was used")

        rss = [x.rss for x in up if x.rss is not None]
        grss = [x.guest_rss for x in up if x.guest_rss is not None]
        excl = [x.rss - x.guest_rss for x in up if x.rss is not None and x.guest_rss is not None]
        idle = [x.idle_ticks for x in up if x.idle_ticks is not None]
        idle_total_pct = sum(idle) / CLK_TCK / wall * 100
        creates = [x.create_s for x in up]
        ups = [x.up_s for x in up]
        boots = [x.up_s - x.create_s for x in up]

        print("\nsummary")
        print(f"  domains up                 {n} of --max {args.max} ({stop_reason})")
        print(f"  guest memory configured    {n * args.memory} MiB ({n} x {args.memory} MiB)")
        print(f"  `hypyr create` time (s)    {_stats(creates)}")
        print(f"  create start -> 'up' (s)   {_stats(ups)}   (first {ups[0]:.1f}, last {ups[-1]:.1f})")
        print(f"  boot after create (s)      {_stats(boots)}")
        print(f"  host RSS, all domains      {sum(rss):.1f} MiB   (per domain: mean {statistics.mean(rss):.1f}, "
              f"{_stats(rss)})")
        if grss:
            print(f"  guest RAM resident         {sum(grss):.1f} MiB   "
                  f"(per domain: mean {statistics.mean(grss):.1f} of "
                  f"{args.memory} MiB, {_stats(grss)})")
            print(f"  RSS excluding guest RAM    {sum(excl):.1f} MiB   (per domain: mean {statistics.mean(excl):.1f}, "
                  f"{_stats(excl)})")
        own = [x.private for x in up if x.private is not None]
        if own:
            print(f"  of it private (not shared) {sum(own):.1f} MiB   (per domain: mean {statistics.mean(own):.1f}, "
                  f"{_stats(own)})")
        pss = [x.pss for x in up if x.pss is not None]
        if pss:
            print(f"  PSS excluding guest RAM    {sum(pss):.1f} MiB   (per domain: mean {statistics.mean(pss):.1f}, "
                  f"{_stats(pss)})")
        whole = [x.pss + x.sup_pss for x in up if x.pss is not None and x.sup_pss is not None]
        if whole:
            print(f"  PSS with the supervisor    {sum(whole):.1f} MiB   (per domain: mean "
                  f"{statistics.mean(whole):.1f}, {_stats(whole)})")
        print(f"  host MemAvailable          {mem0.get('MemAvailable')} MiB before, {mem1.get('MemAvailable')} MiB "
              f"with {n} domains up (-{mem0.get('MemAvailable', 0) - mem1.get('MemAvailable', 0)} MiB, "
              f"{(mem0.get('MemAvailable', 0) - mem1.get('MemAvailable', 0)) / n:.1f} MiB per domain); "
              f"MemTotal {mem0.get('MemTotal')} MiB")
        print(f"  idle CPU, all domains      {idle_total_pct:.1f} % of one CPU over {wall:.1f} s "
              f"(per domain: {idle_total_pct / n:.2f} %; {sum(idle) / CLK_TCK:.2f} CPU-s)")
        print(f"  host CPU busy (idle window) {host_busy_pct:.1f} % of {ncpu} CPUs "
              f"(= {host_busy_pct * ncpu:.1f} % of one CPU; this script itself {bench_self:.1f} %)")
        print("\nlast `hypyr top` frame (hypyr.toolstack.monitor, 2 s interval):\n")
        print(top_frame)
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", flush=True)
        return 130
    except Terminated as e:
        print(f"\nbench: {e}", flush=True)
        return 143
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the teardown finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        t0 = time.monotonic()
        problems = destroy_all(doms, state)
        print(f"\ndestroyed all domains in {time.monotonic() - t0:.1f} s" +
              (f" ({'; '.join(problems)})" if problems else ""), flush=True)
        shutil.rmtree(state, ignore_errors=True)


# -- host side / main ------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max", type=int, default=20, help="most domains to start (default 20)")
    p.add_argument("--memory", type=int, default=GUEST_MIB,
                   help=f"MiB per domain (default {GUEST_MIB}; the default kernel needs more than 64)")
    p.add_argument("--idle", type=float, default=30.0, help="idle-CPU window in seconds (default 30)")
    p.add_argument("--boot-timeout", type=float, default=240.0,
                   help="per-domain limit from create to 'up' in seconds (default 240)")
    p.add_argument("--create-timeout", type=float, default=180.0,
                   help="limit for one `hypyr create` in seconds (default 180)")
    p.add_argument("--lab-memory", default=None, help="L1 memory for the lab (default: the lab's, 4G)")
    p.add_argument("--lab-cpus", type=int, default=None, help="L1 vCPUs for the lab (default: the lab's, 2)")
    a = p.parse_args(argv)
    if a.max < 1:
        p.error("--max must be at least 1")
    if a.idle <= 0:
        p.error("--idle must be positive")
    return a


def host_side(argv: list[str], args: argparse.Namespace) -> int:
    if (rc := ensure_image()) != 0:
        return rc
    lab = [sys.executable, "-m", "hypyr", "lab"]
    if args.lab_memory:
        lab += ["--memory", args.lab_memory]
    if args.lab_cpus:
        lab += ["--cpus", str(args.lab_cpus)]
    inner = lab + ["--", sys.executable, str(HERE), *argv]
    print(f"bench: running inside the lab: {' '.join(inner)}", flush=True)
    proc = subprocess.Popen(inner, stdin=subprocess.DEVNULL, cwd=str(REPO))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # the lab forwards it; L1 powers off and takes every domain with it
        proc.wait()
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.environ.get("HYPYR_IN_LAB") != "1":
        return host_side(argv, args)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    return lab_side(args)


if __name__ == "__main__":
    sys.exit(main())
