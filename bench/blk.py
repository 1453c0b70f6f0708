#!/usr/bin/env python3
"""Block I/O benchmark: hypyr's virtio-blk against QEMU/KVM's, on the same guest and disk image.

Boots the default image's kernel and initrd with a raw disk image (in /tmp, a tmpfs in the lab)
as /dev/vda under hypyr and under QEMU (-M microvm, virtio-blk-device, i.e. virtio-mmio like
hypyr, cache=writeback, aio=threads: the host page cache, like hypyr's pread/pwrite), and runs a
busybox script in the guest that times sequential write/read, 4 KiB reads at queue depth 1 and
4 KiB random reads. Runs inside the lab (nested KVM); started on the host it re-executes itself
there:

    .venv/bin/python bench/blk.py [--rounds N] [--mib M] [--seq4k N] [--rand N] [--timeout S] [--hypyr-tree DIR]

It prints every sample, medians and hypyr/QEMU ratios, and exits 0 whether or not the goal
(hypyr >= 0.9 x QEMU for sequential throughput) is met; non-zero only when it could not run.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
from _common import ensure_image, install_signal_handlers, kill_all_live, lab_command, lab_guest, run_until_marker  # noqa: E402

GUEST_MEMORY = "512M"
SEQ_GOAL = 0.9                 # hypyr / QEMU, sequential throughput
CMDLINE_MAX = 2047             # x86 COMMAND_LINE_SIZE - 1
DONE = b"BLK done"
CONFIGS = ("hypyr", "qemu-microvm")

# The guest script (busybox ash). It travels base64-encoded on the kernel command line
# (hypyr.exec=), which x86 limits to 2 KiB: keep it terse.  t() is CLOCK_REALTIME in µs from
# `adjtimex` (busybox `date` has no %N); the guest clock is kvm-clock under both VMMs.
# Every dd is O_DIRECT on /dev/vda, so the guest page cache is not involved.
GUEST_SCRIPT = r"""D=/dev/vda;M={mib};S={seq4k};R={rand}
n=0;while [ ! -b $D ]&&[ $n -lt 100 ];do sleep .1;n=$((n+1));done
o(){{ echo "BLK $1=$2";}}
[ -b $D ]||{{ o error no-vda;exit 1;}}
t(){{ adjtimex|awk '/tv_sec/{{s=$2}}/tv_usec/{{u=$2}}END{{printf "%d%06d",s,u}}';}}
o sectors $(cat /sys/block/vda/size)
o maxkb $(cat /sys/block/vda/queue/max_sectors_kb)
e=0
a=$(t);dd if=/dev/zero of=$D bs=1M count=$M oflag=direct conv=fsync 2>/dev/null||e=1;b=$(t);o seqwrite_us $((b-a))
echo 3 >/proc/sys/vm/drop_caches
a=$(t);dd if=$D of=/dev/null bs=1M count=$M iflag=direct 2>/dev/null||e=2;b=$(t);o seqread_us $((b-a))
a=$(t);dd if=$D of=/dev/null bs=4k count=$S iflag=direct 2>/dev/null||e=3;b=$(t);o seq4k_us $((b-a))
B=$((M*256));i=0;a=$(t)
while [ $i -lt $R ];do dd if=$D of=/dev/null bs=4k count=1 skip=$(((RANDOM*32768+RANDOM)%B)) iflag=direct 2>/dev/null||e=4;i=$((i+1));done
b=$(t);o rand4k_us $((b-a))
i=0;a=$(t)
while [ $i -lt $R ];do dd if=/dev/zero of=/dev/null bs=4k count=1 skip=$(((RANDOM*32768+RANDOM)%B)) 2>/dev/null;i=$((i+1));done
b=$(t);o forkbase_us $((b-a))
o dd_error $e
echo BLK done
exit $e"""  # noqa: E501 (a guest shell script, kept compact)


def guest_script(mib: int, seq4k: int, rand: int) -> str:
    return GUEST_SCRIPT.format(mib=mib, seq4k=seq4k, rand=rand)


def guest_cmdline(script: str) -> str:
    """Exactly the kernel command line `hypyr run --exec SCRIPT` gives the guest."""
    from hypyr.vmm.config import VmConfig
    return VmConfig(kernel="-", exec_cmd=script).full_cmdline()


# -- child process handling: bench/_common.py ---------------------------------------------------


def run_boot(cmd: list[str], timeout: float, wait_for_exit: bool) -> tuple[bool, float, int | None, str, bytes]:
    """Run CMD until the guest prints DONE (and, if wait_for_exit, until the VMM exits).

    Returns (done_seen, wall_s, exit_status, note, output); the child is always gone afterwards.
    """
    done_s, wall, status, note, out = run_until_marker(cmd, DONE, timeout, wait_for_exit,
                                                       what="the guest finished", tail_len=800)
    return done_s is not None, wall, status, note, out


# -- commands -------------------------------------------------------------------------------------
def commands(kernel: str, initrd: str, qemu: str, disk: str, script: str,
             tree: str | None = None) -> dict[str, list[str]]:
    """The two VMMs' command lines; ``tree``: run hypyr from that checkout (an older commit, for a
    before/after comparison) instead of this one."""
    python = ["env", "-C", tree, f"PYTHONPATH={tree}", sys.executable] if tree else [sys.executable]
    return {
        "hypyr": [*python, "-m", "hypyr", "run", "--kernel", kernel, "--initrd", initrd,
                  "--memory", GUEST_MEMORY, "--vcpus", "1", "--disk", disk, "--exec", script, "--no-input"],
        # -M pc cannot be used: the guest command line has pci=off and the initrd has no virtio_pci.
        # microvm announces its virtio-mmio transports in ACPI (LNRO0005), as hypyr does.
        "qemu-microvm": [qemu, "-M", "microvm,x-option-roms=off,isa-serial=on", "-accel", "kvm", "-cpu", "host",
                         "-m", GUEST_MEMORY, "-smp", "1", "-nodefaults", "-no-user-config", "-no-reboot",
                         "-display", "none", "-serial", "stdio",
                         "-kernel", kernel, "-initrd", initrd, "-append", guest_cmdline(script),
                         "-drive", f"file={disk},format=raw,if=none,id=d0,cache=writeback,aio=threads",
                         "-device", "virtio-blk-device,drive=d0"],
    }


# -- metrics ------------------------------------------------------------------------------------
@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    goal: bool = False  # the >= SEQ_GOAL x QEMU goal applies


METRICS = (
    Metric("seqwrite_MBps", "sequential write, 1 MiB O_DIRECT + fsync", "MB/s", True, True),
    Metric("seqread_MBps", "sequential read, 1 MiB O_DIRECT", "MB/s", True, True),
    Metric("seq4k_IOPS", "4 KiB reads, QD1, one dd (no fork)", "IOPS", True),
    Metric("seq4k_lat_us", "  = latency per 4 KiB request", "us", False),
    Metric("rand4k_IOPS", "4 KiB random reads, one dd each (incl. fork)", "IOPS", True),
    Metric("rand4k_net_us", "  random read minus fork baseline, per op", "us", False),
    Metric("forkbase_us", "  fork baseline (dd /dev/zero), per op", "us", False),
)


@dataclass
class Sample:
    config: str
    round: int
    ok: bool
    wall_s: float
    exit_status: int | None
    values: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    note: str = ""


def parse_guest(out: bytes, mib: int, seq4k: int, rand: int) -> tuple[dict, dict]:
    raw: dict[str, str] = {}
    for m in re.finditer(rb"BLK (\w+)=(\S*)", out):
        raw[m.group(1).decode()] = m.group(2).decode()
    vals: dict[str, float] = {}

    def us(k: str) -> float | None:
        try:
            v = int(raw[k])
        except (KeyError, ValueError):
            return None
        return v if v > 0 else None

    nbytes = mib << 20
    if (v := us("seqwrite_us")) is not None:
        vals["seqwrite_MBps"] = nbytes / v  # bytes/µs == MB/s
    if (v := us("seqread_us")) is not None:
        vals["seqread_MBps"] = nbytes / v
    if (v := us("seq4k_us")) is not None and seq4k:
        vals["seq4k_IOPS"] = seq4k / (v / 1e6)
        vals["seq4k_lat_us"] = v / seq4k
    r, f = us("rand4k_us"), us("forkbase_us")
    if r is not None and rand:
        vals["rand4k_IOPS"] = rand / (r / 1e6)
        if f is not None:
            vals["rand4k_net_us"] = (r - f) / rand
            vals["forkbase_us"] = f / rand
    return vals, raw


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def paired_ratios(samples: list[Sample]) -> dict[str, list[float]]:
    """Per metric, hypyr/QEMU for every round in which both boots succeeded (higher-is-better
    metrics as they are, lower-is-better ones inverted, so > 1 always means hypyr is better)."""
    out: dict[str, list[float]] = {}
    rounds = sorted({s.round for s in samples})
    for m in METRICS:
        for r in rounds:
            h = next((s for s in samples if s.round == r and s.config == "hypyr" and s.ok), None)
            q = next((s for s in samples if s.round == r and s.config == "qemu-microvm" and s.ok), None)
            if h is None or q is None or m.key not in h.values or m.key not in q.values:
                continue
            hv, qv = h.values[m.key], q.values[m.key]
            if hv > 0 and qv > 0:
                out.setdefault(m.key, []).append(hv / qv if m.higher_better else qv / hv)
    return out


def report(samples: list[Sample]) -> None:
    med: dict[str, dict[str, float | None]] = {}
    for c in CONFIGS:
        med[c] = {}
        for m in METRICS:
            xs = [s.values[m.key] for s in samples if s.config == c and s.ok and m.key in s.values]
            med[c][m.key] = statistics.median(xs) if xs else None
    print()
    print("Medians (MB = 10^6 bytes; higher is better for MB/s and IOPS, lower for us):")
    print(f"  {'metric':<46} {'unit':>5} {'hypyr':>9} {'qemu':>9} {'hypyr/qemu':>11}")
    for m in METRICS:
        h, q = med["hypyr"][m.key], med["qemu-microvm"][m.key]
        ratio = f"{h / q:.2f}" if h is not None and q not in (None, 0) else "-"
        print(f"  {m.label:<46} {m.unit:>5} {fmt(h):>9} {fmt(q):>9} {ratio:>11}")
    for c in CONFIGS:
        n = sum(1 for s in samples if s.config == c)
        ok = sum(1 for s in samples if s.config == c and s.ok)
        print(f"  {c}: {ok}/{n} boots completed")
    print()
    paired = paired_ratios(samples)
    print("Per-round ratios (hypyr/QEMU of the two boots of one round, which run back to back; their median")
    print("is the goal figure: it cancels the slow and fast phases of a shared host that hit both VMMs alike):")
    for m in METRICS:
        if m.goal:
            rs = paired.get(m.key, [])
            print(f"  {m.key:<14} " + " ".join(f"{r:.2f}" for r in rs)
                  + (f"   median {statistics.median(rs):.2f}" if rs else "   n/a"))
    print()
    for m in METRICS:
        if not m.goal:
            continue
        rs = paired.get(m.key, [])
        if not rs:
            print(f"goal {m.key}: hypyr >= {SEQ_GOAL} x QEMU: n/a (no round with both boots successful)")
        else:
            r = statistics.median(rs)
            print(f"goal {m.key}: hypyr/QEMU = {r:.2f} (median of {len(rs)} per-round ratios; "
                  f"goal >= {SEQ_GOAL}: {'met' if r >= SEQ_GOAL else 'NOT met'})")
    print("note: the random-read loop forks one dd per read; that overhead is the same for both VMMs and is\n"
          "      measured separately (fork baseline: the same loop on /dev/zero); 'minus fork baseline' is the\n"
          "      difference of two loops and is noisy. The 4 KiB QD1 single-dd figure has no fork in it.")


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="boots per VMM (default 5)")
    p.add_argument("--mib", type=int, default=128,
                   help="disk size and sequential transfer in MiB (default 128, max 512)")
    p.add_argument("--seq4k", type=int, default=1024, help="4 KiB QD1 reads in one dd (default 1024)")
    p.add_argument("--rand", type=int, default=300, help="4 KiB random reads, one dd each (default 300)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-boot limit in seconds (default 300)")
    p.add_argument("--kernel", help="guest kernel (default: the default image's)")
    p.add_argument("--initrd", help="guest initrd (default: the default image's)")
    p.add_argument("--hypyr-tree", metavar="DIR",
                   help="run hypyr from this checkout (e.g. `git worktree add --detach DIR COMMIT`) for a "
                        "before/after comparison; default: this one")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 1 <= a.mib <= 512:
        p.error("--mib must be between 1 and 512")
    if a.seq4k < 1 or a.rand < 1:
        p.error("--seq4k and --rand must be at least 1")
    if a.seq4k > a.mib * 256:
        p.error("--seq4k must fit on the disk (at most 256 per MiB)")
    return a


def host_side(argv: list[str], args: argparse.Namespace) -> int:
    """Outside the lab: make sure the image exists (the cache is read-only in the lab), then re-exec."""
    if args.kernel is None and (rc := ensure_image()) != 0:
        return rc
    inner = lab_command(HERE, argv)
    print(f"bench: running inside the lab: {' '.join(inner)}", flush=True)
    return subprocess.call(inner, cwd=str(REPO))


def make_disk(path: str, mib: int) -> None:
    """A fully allocated raw image (zeros), so no boot pays for tmpfs allocation."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)


def lab_side(args: argparse.Namespace) -> int:
    guest = lab_guest(args.kernel, args.initrd)
    if guest is None:
        return 2
    kernel, initrd, qemu = guest

    script = guest_script(args.mib, args.seq4k, args.rand)
    cmdline = guest_cmdline(script)
    if len(cmdline) > CMDLINE_MAX:
        print(f"bench: the kernel command line would be {len(cmdline)} bytes (> {CMDLINE_MAX})", file=sys.stderr)
        return 2
    tmpdir = tempfile.mkdtemp(prefix="hypyr-blk-", dir="/tmp")
    disk = os.path.join(tmpdir, "disk.img")
    try:
        make_disk(disk, args.mib)
        cmds = commands(kernel, initrd, qemu, disk, script, args.hypyr_tree)
        print(f"hypyr block I/O benchmark: {args.rounds} round(s), {GUEST_MEMORY} guest RAM, 1 vCPU, "
              f"per-boot limit {args.timeout:.0f} s")
        print(f"  kernel  {kernel}\n  initrd  {initrd}\n  hypyr   from {args.hypyr_tree or REPO}")
        print(f"  disk    {disk} ({args.mib} MiB raw, on {'tmpfs' if _is_tmpfs(tmpdir) else 'disk'}), /dev/vda")
        print(f"  guest   sequential {args.mib} MiB write+read (bs=1M, O_DIRECT), {args.seq4k} x 4 KiB QD1 reads, "
              f"{args.rand} x 4 KiB random reads (+ the same loop on /dev/zero as fork baseline)")
        print(f"  cmdline {len(cmdline)} bytes (hypyr's, incl. hypyr.exec=<base64 of the guest script>)")
        for c in CONFIGS:
            shown = ["<guest script>" if a == script else
                     repr(a[:a.find("hypyr.exec=")] + "hypyr.exec=<base64 of the guest script>")
                     if "hypyr.exec=" in a else a for a in cmds[c]]
            print(f"  {c:<13} {' '.join(shown)}")
        print("  guest script:")
        for line in script.splitlines():
            print(f"    | {line}")
        print(flush=True)

        samples: list[Sample] = []
        for rnd in range(1, args.rounds + 1):
            order = CONFIGS if rnd % 2 else CONFIGS[::-1]  # alternate which VMM goes first
            for c in order:
                done, wall, status, note, out = run_boot(cmds[c], args.timeout, wait_for_exit=(c == "hypyr"))
                vals, raw = parse_guest(out, args.mib, args.seq4k, args.rand)
                ok = done and raw.get("dd_error") == "0" and bool(vals)
                if done and raw.get("dd_error") != "0":
                    note = (note + "; " if note else "") + f"a dd failed in the guest (code {raw.get('dd_error')})"
                if c == "hypyr" and done and status != 0:
                    note = (note + "; " if note else "") + f"hypyr exit status {status}"
                s = Sample(c, rnd, ok, wall, status, vals, raw, note)
                samples.append(s)
                parts = [f"{m.key}={fmt(vals[m.key])}" for m in METRICS if m.key in vals]
                head = f"round {rnd}  {c:<13} {'ok    ' if ok else 'FAILED'} {wall:6.1f} s"
                print(f"{head}  {' '.join(parts)}" + (f"  [{s.note}]" if s.note else ""), flush=True)
            # this round's ratios at once: a lab that wedges later (nested KVM under TCG can)
            # still leaves them on record
            rs = {k: v[-1] for k, v in paired_ratios([s for s in samples if s.round == rnd]).items()}
            goal = [f"{m.key}={rs[m.key]:.2f}" for m in METRICS if m.goal and m.key in rs]
            if goal:
                print(f"round {rnd}  hypyr/QEMU     {' '.join(goal)}", flush=True)
        report(samples)
    finally:
        kill_all_live()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


def _is_tmpfs(path: str) -> bool:
    try:
        best = ("", "")
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, parts[2])
        return best[1] == "tmpfs"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.environ.get("HYPYR_IN_LAB") != "1":
        return host_side(argv, args)
    install_signal_handlers()
    try:
        return lab_side(args)
    finally:
        kill_all_live()


if __name__ == "__main__":
    sys.exit(main())
