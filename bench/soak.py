"""Soak: many create/destroy cycles of a small domain and many reboots of one domain, with the
host-side resources counted before and after.  It prints figures and flags growth; it never
asserts (exit status 0 unless the arguments are wrong).

    .venv/bin/python bench/soak.py [--cycles 100] [--reboots 100] [--memory 128] [--boot-timeout 300]
    .venv/bin/python bench/soak.py --lab ...     # the same inside the lab (hypyr lab -- ...)

Everything goes through the toolstack CLI (``python -m hypyr create|destroy|reboot|list``) with a
generated xl.cfg (the default guest image's kernel and initrd, ``--memory`` MiB, 1 vCPU) under a
private ``HYPYR_STATE_DIR``.  The guest's init prints ``soak-up-<boot_id>`` on the serial console
and idles, so each boot is told apart in the domain's console.log.

Phase 1, ``--cycles`` times: create, destroy (no wait for the guest: this phase runs on a host
whose /dev/kvm cannot boot Linux too).  Phase 2: create one domain, wait for its first boot, then
``--reboots`` times: ``hypyr reboot``, wait for the next boot's line; then destroy.

Counted before and after each phase: the processes of this soak's toolstack (those whose
environment has its HYPYR_STATE_DIR: VMMs, CLI children, anything they left behind) and the
zombies among them; open fds/threads/RSS of this process (the toolstack's own side: the CLI runs
in short-lived children, counted as processes); cgroups under hypyr's cgroup root; TAP devices; files under the
state directory; and in phase 2 the domain's VMM (fds, threads, /proc/PID/maps mappings, RSS),
measured after the first boot, the first reboot and the last reboot.  Any count that grew from
the warm state (after the first cycle; after the first reboot) to the end is flagged ``GROWTH``
(the first cycle creates the registry and the kept logs); RSS only when it grew by more than
10 % and 8 MiB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, ensure_image, lab_command

MARK = re.compile(rb"soak-up-([0-9a-f-]{36})")
GUEST = "echo soak-up-$(cat /proc/sys/kernel/random/boot_id); while true; do sleep 5; done"
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the CLI -----------------------------------------------------------------------------------------
class Cli:
    def __init__(self, state: Path, timeout: float):
        self.env = dict(os.environ, HYPYR_STATE_DIR=str(state))
        self.state, self.timeout = state, timeout
        self.failures: list[str] = []

    def __call__(self, *args: str) -> subprocess.CompletedProcess | None:
        try:
            p = subprocess.run([sys.executable, "-m", "hypyr", *args], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, env=self.env, timeout=self.timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            self.failures.append(f"hypyr {' '.join(args)}: no answer in {self.timeout:.0f} s")
            return None
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
            self.failures.append(f"hypyr {' '.join(args)}: exit {p.returncode}: {err}")
        return p

    def domains(self) -> list[dict]:
        p = self("list", "--json")
        try:
            return json.loads(p.stdout) if p is not None and p.returncode == 0 else []
        except ValueError:
            return []

    def vmm_pid(self, name: str) -> int | None:
        """The domain's VMM process: the registry row's owner."""
        code = ("import sys; from hypyr.toolstack.registry import Registry\n"
                "with Registry() as r: print(r.get(sys.argv[1]).pid or '')")
        try:
            p = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                               env=self.env, timeout=60, cwd=REPO)
        except subprocess.TimeoutExpired:
            return None
        out = p.stdout.strip()
        return int(out) if p.returncode == 0 and out.isdigit() else None


# -- what is counted ---------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def proc_figures(pid: int) -> dict:
    """Open fds, threads, mappings and RSS (MiB) of one process (empty if it is gone)."""
    status = _read(f"/proc/{pid}/status")
    if not status:
        return {}
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1)) if "Threads:" in status else -1
    rss = int(_read(f"/proc/{pid}/statm").split()[1]) * PAGE / 2**20 if _read(f"/proc/{pid}/statm") else -1
    maps = _read(f"/proc/{pid}/maps").count("\n")
    return {"fds": fds, "threads": threads, "maps": maps, "rss_mib": round(rss, 1)}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    m = re.search(r"^State:\s+(\S)", _read(f"/proc/{pid}/status"), re.M)
    return m is not None and m.group(1) not in "ZXx"


def hypyr_processes(state: Path) -> tuple[list[int], int]:
    """(pids of the processes of this soak's toolstack: every process but this one whose
    environment has our HYPYR_STATE_DIR, i.e. the CLI's children and the domains' VMMs; zombies
    among them)."""
    pids, zombies = [], 0
    me = os.getpid()
    tag = f"HYPYR_STATE_DIR={state}\0".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if tag not in f.read():
                    continue
        except OSError:
            continue
        pids.append(int(d))
        if not alive(int(d)):
            zombies += 1
    return pids, zombies


def cgroups() -> int | str:
    try:
        from hypyr.toolstack import sched
        parent = sched.cgroup_root().parent
    except Exception as e:  # noqa: BLE001 - no cgroups here is a figure, not an error
        return f"n/a ({type(e).__name__})"
    if not parent.is_dir():
        return 0
    return sum(1 for _root, dirs, _files in os.walk(parent) for _ in dirs)


def taps() -> int:
    try:
        return sum(1 for n in os.listdir("/sys/class/net") if os.path.exists(f"/sys/class/net/{n}/tun_flags"))
    except OSError:
        return -1


def state_files(state: Path) -> tuple[frozenset[str], float]:
    """(the files under the state directory, relative to it; their size in MiB)."""
    names, size = set(), 0
    for root, _dirs, files in os.walk(state):
        for f in files:
            path = os.path.join(root, f)
            names.add(os.path.relpath(path, state))
            try:
                size += os.lstat(path).st_size
            except OSError:
                pass
    return frozenset(names), round(size / 2**20, 2)


def snapshot(state: Path) -> dict:
    pids, zombies = hypyr_processes(state)
    me = proc_figures(os.getpid())
    files, mib = state_files(state)
    return {"hypyr processes": len(pids), "zombies": zombies, "toolstack fds": me["fds"],
            "toolstack threads": me["threads"], "toolstack rss_mib": me["rss_mib"], "cgroups": cgroups(),
            "taps": taps(), "state files": len(files), "state MiB": mib, "_files": files}


def grew(key: str, a, b) -> bool:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    if "rss" in key or "MiB" in key:
        return b - a > max(8, 0.1 * a)
    return b > a


def report(title: str, columns: dict[str, dict]) -> int:
    """A table of snapshots, one column each; growth is flagged between the last two, and new
    state files are named."""
    names = list(columns)
    print(f"\n{title}")
    print(f"  {'':<22}" + "".join(f" {n:>14}" for n in names))
    flagged = 0
    first = columns[names[0]]
    for k in (k for k in first if not k.startswith("_")):
        vals = [columns[n].get(k, "-") for n in names]
        mark = "  GROWTH" if len(vals) > 1 and grew(k, vals[-2], vals[-1]) else ""
        flagged += bool(mark)
        print(f"  {k:<22}" + "".join(f" {v!s:>14}" for v in vals) + mark)
    if len(names) > 1 and "_files" in first:
        new = sorted(columns[names[-1]]["_files"] - columns[names[-2]]["_files"])
        if new:
            print(f"  new state files: {', '.join(new[:10])}" + (" ..." if len(new) > 10 else ""))
    return flagged


# Both phases use one domain name: the toolstack keeps the logs of a domain that is gone, one
# pair per name (as xl keeps its logs), so a second name would add two files that are no leak.
NAME = "soak"


# -- the phases --------------------------------------------------------------------------------------
def write_cfg(path: Path, name: str, image, memory: int) -> None:
    extra = "hypyr.exec=" + base64.b64encode(GUEST.encode()).decode()
    path.write_text(f'name = "{name}"\ntype = "pvh"\nmemory = {memory}\nvcpus = 1\n'
                    f'kernel = "{image.kernel}"\nramdisk = "{image.initrd}"\nextra = "{extra}"\n'
                    f"on_reboot = 'restart'\n")


def boots(state: Path, domid: int) -> set[bytes]:
    """The boot ids the guest has printed (console.log and any rotated pieces of it)."""
    seen: set[bytes] = set()
    d = state / "domains" / str(domid)
    for p in d.glob("console.log*") if d.is_dir() else ():
        try:
            seen.update(MARK.findall(p.read_bytes()))
        except OSError:
            pass
    return seen


def wait_boot(state: Path, domid: int, known: set[bytes], timeout: float) -> set[bytes] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = boots(state, domid)
        if b - known:
            return b
        time.sleep(0.5)
    return None


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"median {statistics.median(xs):.2f} s, min {min(xs):.2f}, max {max(xs):.2f}"


def cycles(cli: Cli, args, image, work: Path) -> int:
    cfg = work / "cycle.cfg"
    write_cfg(cfg, NAME, image, args.memory)
    before = snapshot(cli.state)
    t_create, t_destroy, leftover, failed = [], [], [], 0
    for i in range(args.cycles):
        t0 = time.monotonic()
        p = cli("create", str(cfg))
        t_create.append(time.monotonic() - t0)
        pid = cli.vmm_pid(NAME) if p is not None and p.returncode == 0 else None
        if p is None or p.returncode != 0:
            failed += 1
        t0 = time.monotonic()
        cli("destroy", NAME)
        t_destroy.append(time.monotonic() - t0)
        if pid is not None and alive(pid):
            leftover.append(pid)
        if i == 0:
            time.sleep(1)
            warm = snapshot(cli.state)
        if (i + 1) % 10 == 0 or i + 1 == args.cycles:
            print(f"  cycle {i + 1}/{args.cycles}: create {t_create[-1]:.2f} s, destroy {t_destroy[-1]:.2f} s",
                  flush=True)
    time.sleep(1)
    after = snapshot(cli.state)
    print(f"\nphase 1: {args.cycles} create/destroy cycles, {failed} creates failed")
    print(f"  create:  {spread(t_create)}\n  destroy: {spread(t_destroy)}")
    print(f"  VMMs still alive after their destroy: {len(leftover)}"
          + (f" (pids {leftover[:10]})" if leftover else ""))
    still = [pid for pid in leftover if alive(pid)]
    if still:
        print(f"  ... and still alive 1 s later: {len(still)}  GROWTH")
    return report("phase 1, host side (growth: from after the first cycle to after the last)",
                  {"before": before, "after cycle 1": warm, "after the last": after}) + len(still)


def reboots(cli: Cli, args, image, work: Path) -> int:
    cfg = work / "reboot.cfg"
    write_cfg(cfg, NAME, image, args.memory)
    before = snapshot(cli.state)
    p = cli("create", str(cfg))
    if p is None or p.returncode != 0:
        print("\nphase 2: the domain could not be created; skipped")
        return 0
    doms = {d["name"]: d for d in cli.domains()}
    domid = doms.get(NAME, {}).get("domid")
    pid = cli.vmm_pid(NAME)
    flagged = 0
    try:
        known = wait_boot(cli.state, domid, set(), args.boot_timeout) if domid is not None else None
        if known is None:
            print(f"\nphase 2: the guest printed no boot line in {args.boot_timeout:.0f} s (is /dev/kvm able to "
                  f"boot Linux here? see `hypyr doctor`); skipped")
            return 0
        vmm_first = proc_figures(pid) if pid else {}
        mid = snapshot(cli.state)
        times, lost = [], 0
        vmm_after_first: dict = {}
        vmm_half: dict = {}   # after half of the reboots: growth is flagged over the second half
        for i in range(args.reboots):
            t0 = time.monotonic()
            r = cli("reboot", NAME)
            if r is None or r.returncode != 0:
                lost += 1
                continue
            nxt = wait_boot(cli.state, domid, known, args.boot_timeout)
            if nxt is None:
                lost += 1
                print(f"  reboot {i + 1}: no new boot line in {args.boot_timeout:.0f} s; stopping")
                break
            known = nxt
            times.append(time.monotonic() - t0)
            if i == 0:
                vmm_after_first = proc_figures(pid) if pid else {}
            if i + 1 == args.reboots // 2 and i > 0:
                vmm_half = proc_figures(pid) if pid else {}
            if (i + 1) % 10 == 0 or i + 1 == args.reboots:
                print(f"  reboot {i + 1}/{args.reboots}: up again in {times[-1]:.1f} s", flush=True)
        new_pid = cli.vmm_pid(NAME)
        vmm_last = proc_figures(pid) if pid else {}
        last = snapshot(cli.state)
        print(f"\nphase 2: {len(times)} of {args.reboots} reboots came back ({lost} failed); "
              f"reboot to the boot line: {spread(times)}")
        print(f"  VMM pid {pid}" + (f", now {new_pid} (a new process)" if new_pid != pid else ", the same process"))
        if vmm_first:
            cols = {"first boot": vmm_first}
            if vmm_after_first:
                cols["first reboot"] = vmm_after_first
            if vmm_half:
                cols[f"reboot {args.reboots // 2}"] = vmm_half
            cols["last reboot"] = vmm_last or {k: "gone" for k in vmm_first}
            flagged += report("phase 2, the domain's VMM (growth: over the second half of the reboots)", cols)
        flagged += report("phase 2, host side with the domain up (first boot / last reboot)",
                          {"first boot": mid, "last reboot": last})
    finally:
        cli("destroy", NAME)
    time.sleep(1)
    flagged += report("phase 2, host side (before the create / after the destroy)",
                      {"before": before, "after": snapshot(cli.state)})
    return flagged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=100, help="create/destroy cycles (default 100)")
    p.add_argument("--reboots", type=int, default=100, help="reboots of one domain (default 100; 0: skip)")
    p.add_argument("--memory", type=int, default=128, help="MiB per domain (default 128)")
    p.add_argument("--boot-timeout", type=float, default=300, help="seconds to wait for a boot (default 300)")
    p.add_argument("--cli-timeout", type=float, default=300, help="seconds one hypyr command may take")
    p.add_argument("--kernel", help="guest kernel (default: the default image's)")
    p.add_argument("--initrd", help="guest initrd (default: the default image's)")
    p.add_argument("--keep", action="store_true", help="keep the state directory (logs) afterwards")
    p.add_argument("--lab", action="store_true", help="run inside the lab (hypyr lab -- ...)")
    args = p.parse_args(argv)
    if args.cycles < 0 or args.reboots < 0:
        p.error("--cycles and --reboots must be at least 0")
    if args.lab:
        if ensure_image():
            return 1
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--lab"]
        os.execvp(sys.executable, lab_command(Path(__file__).resolve(), rest))

    from hypyr.image import default as image
    paths = image.paths()

    class Image:
        kernel = Path(args.kernel) if args.kernel else paths.kernel
        initrd = Path(args.initrd) if args.initrd else paths.initrd
    if not Image.kernel.exists() or not Image.initrd.exists():
        p.error(f"no guest kernel/initrd at {Image.kernel} / {Image.initrd}: run `hypyr image build` or give "
                f"--kernel/--initrd")

    work = Path(tempfile.mkdtemp(prefix="hypyr-soak-"))
    state = work / "state"
    cli = Cli(state, args.cli_timeout)
    print(f"soak: {args.cycles} create/destroy cycles, {args.reboots} reboots, {args.memory} MiB domains; "
          f"HYPYR_STATE_DIR={state}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    flagged = 0
    try:
        if args.cycles:
            flagged += cycles(cli, args, Image, work)
        if args.reboots:
            flagged += reboots(cli, args, Image, work)
    finally:
        for d in cli.domains():  # never leave a domain behind
            cli("destroy", d["name"])
        if cli.failures:
            print(f"\n{len(cli.failures)} hypyr commands failed; the first ones:")
            for f in cli.failures[:5]:
                print(f"  {f}")
        print(f"\nsoak: {flagged} figure(s) flagged GROWTH")
        if args.keep:
            print(f"soak: state kept in {state}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
