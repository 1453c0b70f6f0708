#!/usr/bin/env python3
"""Boot-time benchmark: hypyr against QEMU/KVM (-M microvm and -M pc) on the same guest.

Measures the wall time from launching the VMM to the guest's first userspace line
("hypyr: init started", printed first by the default image's /init) on the serial console; with
--system IMG, to the serial login prompt of a system image (`hypyr image build --system`) booted
from its own grub.cfg, against QEMU direct-booting that entry's kernel, initrd and command line.
Runs inside the lab (nested KVM); started on the host it re-executes itself there:

    .venv/bin/python bench/boot.py [--rounds N] [--warmup N] [--timeout S] [--json FILE]
                                   [--kernel K --initrd I | --system IMG]

It prints figures and exits 0 even when the goal (hypyr <= 1.5 x the faster QEMU) is not met;
it exits non-zero only when it could not run at all. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
from _common import (  # noqa: E402
    ensure_image,
    install_signal_handlers,
    kill_all_live,
    kill_group,
    lab_command,
    lab_guest,
    live,
    run_until_marker,
    smaps_split,
)

MARKER = b"hypyr: init started"
# the default image's /init prints the kernel's uptime ahead of the marker: "[1.23] hypyr: init started"
UPTIME = re.compile(rb"\[([0-9]+\.[0-9]+)\] hypyr: init started")
SYSTEM_MARKER = b" login: "      # agetty on ttyS0
GUEST_MEMORY = "256M"
GUEST_MEMORY_BYTES = 256 << 20
SYSTEM_MEMORY = "512M"           # systemd wants more than the default image
SYSTEM_COPY = "/tmp/bench-boot-system.img"  # a fresh copy per boot (L1's tmpfs), made untimed
EXEC_CMD = "true"
RATIO_GOAL = 1.5
PC_RATIO_GOAL = 0.75  # issue #14: hypyr <= 0.75 x QEMU -M pc
JSON_LINE_PREFIX = "@@hypyr-bench-json@@ "

CONFIGS = ("hypyr", "qemu-microvm", "qemu-pc")


# -- child process handling: bench/_common.py ---------------------------------------------------


@dataclass
class Sample:
    config: str
    round: int
    ok: bool
    marker_s: float | None = None      # launch -> first userspace line
    uptime_s: float | None = None      # the guest kernel's own uptime at that line (default image)
    total_s: float | None = None       # launch -> process gone (QEMU: killed right after the marker)
    exit_status: int | None = None
    note: str = ""


# -- the three command lines ------------------------------------------------------------------------
def guest_cmdline() -> str:
    """Exactly the kernel command line `hypyr run --exec true` gives the guest."""
    from hypyr.vmm.config import VmConfig
    return VmConfig(kernel="-", exec_cmd=EXEC_CMD).full_cmdline()


def _qemu_common(memory: str, kernel: str, initrd: str, cmdline: str) -> list[str]:
    return ["-accel", "kvm", "-cpu", "host", "-m", memory, "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]


def commands(kernel: str, initrd: str, qemu: str) -> dict[str, list[str]]:
    common_qemu = _qemu_common(GUEST_MEMORY, kernel, initrd, guest_cmdline())
    return {
        "hypyr": [sys.executable, "-m", "hypyr", "run", "--kernel", kernel, "--initrd", initrd,
                  "--memory", GUEST_MEMORY, "--vcpus", "1", "--exec", EXEC_CMD, "--no-input"],
        "qemu-microvm": [qemu, "-M", "microvm,x-option-roms=off,isa-serial=on"] + common_qemu,
        "qemu-pc": [qemu, "-M", "pc"] + common_qemu,
    }


def system_commands(kernel: str, initrd: str, cmdline: str, qemu: str) -> dict[str, list[str]]:
    """hypyr boots the disk copy through its own grub.cfg (pygrub); QEMU gets that entry's
    kernel, initrd and command line (as hypyr extracts them) and the same disk as virtio-blk."""
    common_qemu = _qemu_common(SYSTEM_MEMORY, kernel, initrd, cmdline)
    drive = ["-drive", f"file={SYSTEM_COPY},if=none,id=d0,format=raw"]
    return {
        "hypyr": [sys.executable, "-m", "hypyr", "run", "--disk", SYSTEM_COPY, "--boot", "disk",
                  "--memory", SYSTEM_MEMORY, "--vcpus", "1", "--no-input"],
        "qemu-microvm": [qemu, "-M", "microvm,x-option-roms=off,isa-serial=on"] + common_qemu + drive
        + ["-device", "virtio-blk-device,drive=d0"],
        "qemu-pc": [qemu, "-M", "pc"] + common_qemu + drive + ["-device", "virtio-blk-pci,drive=d0"],
    }


def fresh_system_copy(image: str) -> None:
    """A pristine copy of the system image for the next boot (each boot writes to its disk)."""
    subprocess.run(["cp", "--sparse=always", image, SYSTEM_COPY], check=True)


# -- memory probe (runs in its own process so RUSAGE_CHILDREN covers hypyr only) ---------------------
def rss_probe(cmd: list[str], timeout: float) -> dict:
    """Run CMD (hypyr) once; report its peak RSS (getrusage) and sampled RSS split from smaps."""
    import resource
    guest_kib = GUEST_MEMORY_BYTES // 1024
    t0 = time.monotonic()
    # same process group as this probe: whoever kills the probe's group kills hypyr too
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            bufsize=0)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    peak_total = peak_nonguest = guest_at_peak_nonguest = 0
    last = None
    samples = 0
    buf = bytearray()
    marker_s = None
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            split = smaps_split(proc.pid, guest_kib)
            if split is not None:
                samples += 1
                last = split
                total, guest = split.total, split.guest
                peak_total = max(peak_total, total)
                if total - guest > peak_nonguest:
                    peak_nonguest, guest_at_peak_nonguest = total - guest, guest
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    chunk = b""
                if chunk:
                    buf += chunk
                    if marker_s is None and MARKER in buf:
                        marker_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    maxrss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; hypyr is our only child
    return {
        "exit_status": proc.returncode, "marker_s": marker_s, "wall_s": time.monotonic() - t0,
        "peak_rss_kib": maxrss_kib,
        "smaps_samples": samples,
        "sampled_peak_rss_kib": peak_total,
        "sampled_peak_rss_excluding_guest_ram_kib": peak_nonguest,
        "guest_ram_resident_at_that_sample_kib": guest_at_peak_nonguest,
        "last_sample_rss_kib": last[0] if last else None,
        "last_sample_guest_ram_resident_kib": last[1] if last else None,
    }


def measure_memory(hypyr_cmd: list[str], timeout: float) -> dict:
    probe = [sys.executable, str(HERE), "--_rss-probe", "--timeout", str(timeout), "--", *hypyr_cmd]
    proc = subprocess.Popen(probe, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    live.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return {"error": "the memory probe timed out"}
    finally:
        kill_group(proc.pid)  # the probe and the hypyr it started, if either is still there
        proc.wait()
        live.discard(proc.pid)
    for line in out.splitlines():
        if line.startswith(JSON_LINE_PREFIX):
            return json.loads(line[len(JSON_LINE_PREFIX):])
    return {"error": f"the memory probe failed (status {proc.returncode}): {err.strip()[-400:]}"}


# -- reporting --------------------------------------------------------------------------------------
def fmt_s(x: float | None) -> str:
    return "   -  " if x is None else f"{x:6.2f}"


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def summarise(samples: list[Sample]) -> dict:
    out = {}
    for c in CONFIGS:
        ok = [s.marker_s for s in samples if s.config == c and s.ok]
        n = sum(1 for s in samples if s.config == c)
        up = [s.uptime_s for s in samples if s.config == c and s.ok and s.uptime_s is not None]
        out[c] = {"n": n, "ok": len(ok),
                  "median_s": statistics.median(ok) if ok else None,
                  "min_s": min(ok) if ok else None, "max_s": max(ok) if ok else None,
                  "median_uptime_s": statistics.median(up) if up else None}
    return out


def print_report(summary: dict, mem: dict | None) -> dict:
    print()
    print("Time from launch to the guest's first userspace line (s):")
    print(f"  {'VMM':<14} {'median':>7} {'min':>7} {'max':>7}   ok/runs   guest uptime then (median)")
    for c in CONFIGS:
        s = summary[c]
        if not s["n"]:
            continue  # left out with --only
        print(f"  {c:<14} {fmt_s(s['median_s']):>7} {fmt_s(s['min_s']):>7} {fmt_s(s['max_s']):>7}   "
              f"{s['ok']}/{s['n']:<6} {fmt_s(s['median_uptime_s'])}")
    qemu = [(summary[c]["median_s"], c) for c in ("qemu-microvm", "qemu-pc") if summary[c]["median_s"] is not None]
    ratio = None
    result = {"ratio": None, "fastest_qemu": None, "goal": RATIO_GOAL, "goal_met": None}
    h = summary["hypyr"]["median_s"]
    if qemu and h is not None:
        best, name = min(qemu)
        ratio = h / best
        result.update(ratio=ratio, fastest_qemu=name, goal_met=ratio <= RATIO_GOAL)
        print(f"\nRatio hypyr / fastest QEMU ({name}, median {best:.2f} s): {ratio:.2f}  "
              f"(goal <= {RATIO_GOAL}: {'met' if ratio <= RATIO_GOAL else 'NOT met'})")
        pc = summary["qemu-pc"]["median_s"]
        if pc is not None:
            result["ratio_pc"] = h / pc
            print(f"Ratio hypyr / QEMU -M pc (median {pc:.2f} s): {h / pc:.2f}  "
                  f"(issue #14's goal <= {PC_RATIO_GOAL}: {'met' if h / pc <= PC_RATIO_GOAL else 'NOT met'})")
    else:
        print("\nRatio hypyr / fastest QEMU: n/a (no successful samples to compare)")
    if mem is not None:
        print("\nhypyr memory (one extra `hypyr run`, 256 MiB guest):")
        if "error" in mem:
            print(f"  {mem['error']}")
        else:
            peak = mem["peak_rss_kib"]
            print(f"  peak RSS (getrusage ru_maxrss)              {mib(peak)}")
            print(f"  peak RSS - 256 MiB guest RAM (clamped at 0) {mib(max(0, peak - GUEST_MEMORY_BYTES // 1024))}")
            if mem.get("smaps_samples"):
                print("  peak RSS outside the guest-RAM mapping      "
                      f"{mib(mem['sampled_peak_rss_excluding_guest_ram_kib'])}"
                      f"  (smaps, {mem['smaps_samples']} samples, one per"
                      f" ~{mem['wall_s'] / mem['smaps_samples']:.2f} s;"
                      f" guest RAM resident then: {mib(mem['guest_ram_resident_at_that_sample_kib'])})")
                print(f"  sampled peak RSS                            {mib(mem['sampled_peak_rss_kib'])}")
            print(f"  (that run: exit status {mem['exit_status']}, marker at {fmt_s(mem['marker_s']).strip()} s, "
                  f"whole run {mem['wall_s']:.2f} s)")
    return result


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="samples per VMM (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed boots of each VMM first (default 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-boot limit in seconds (default 120)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--no-memory", action="store_true", help="skip the extra run that measures hypyr's RSS")
    p.add_argument("--only", help=f"comma-separated VMMs to run (default: all of {','.join(CONFIGS)})")
    p.add_argument("--kernel", help="guest kernel (default: the default image's)")
    p.add_argument("--initrd", help="guest initrd (default: the default image's)")
    p.add_argument("--system", metavar="IMG", help="boot this system image (hypyr image build --system) "
                   "to its login prompt instead (512 MiB; no memory probe)")
    p.add_argument("--_json-stdout", dest="json_stdout", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_rss-probe", dest="rss_probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("probe_cmd", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup not negative")
    a.configs = tuple(c for c in CONFIGS if a.only is None or c in a.only.split(","))
    if a.only is not None and (not a.configs or set(a.only.split(",")) - set(CONFIGS)):
        p.error(f"--only takes a comma-separated list of {', '.join(CONFIGS)}")
    if a.system and (a.kernel or a.initrd):
        p.error("--system boots the image's own kernel: not with --kernel/--initrd")
    if a.system:
        a.system = os.path.abspath(a.system)
        a.no_memory = True
    return a


def host_side(argv: list[str], args: argparse.Namespace) -> int:
    """Outside the lab: make sure the image exists (the cache is read-only in the lab), then re-exec."""
    if args.system and not os.path.isfile(args.system):
        print(f"bench: no system image at {args.system} (make system-image)", file=sys.stderr)
        return 2
    if args.kernel is None and not args.system and (rc := ensure_image()) != 0:
        return rc
    inner = lab_command(HERE, argv)
    if args.json:
        inner.append("--_json-stdout")  # the lab's file system is read-only: the JSON comes back on stdout
    print(f"bench: running inside the lab: {' '.join(inner)}", flush=True)
    proc = subprocess.Popen(inner, stdout=subprocess.PIPE, bufsize=0, cwd=str(REPO))
    payload = None
    try:
        for line in iter(proc.stdout.readline, b""):
            text = line.decode("utf-8", "replace")
            if text.startswith(JSON_LINE_PREFIX):
                payload = text[len(JSON_LINE_PREFIX):]
                continue
            sys.stdout.write(text)
            sys.stdout.flush()
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    if args.json:
        if payload is None:
            print(f"bench: no JSON came back from the lab; {args.json} not written", file=sys.stderr)
        else:
            Path(args.json).write_text(json.dumps(json.loads(payload), indent=2) + "\n")
            print(f"bench: wrote {args.json}")
    return rc


def lab_side(args: argparse.Namespace) -> int:
    guest = lab_guest(args.kernel, args.initrd)
    if guest is None:
        return 2
    kernel, initrd, qemu = guest
    marker, memory, cmdline, boot = MARKER, GUEST_MEMORY, guest_cmdline(), None
    if args.system:
        from hypyr.image import diskboot
        boot = diskboot.load(args.system)  # what hypyr's pygrub path picks, for QEMU's direct boot
        kernel, initrd, cmdline = boot.kernel, boot.initrd or "", boot.cmdline
        marker, memory = SYSTEM_MARKER, SYSTEM_MEMORY
        cmds = system_commands(kernel, initrd, cmdline, qemu)
    else:
        cmds = commands(kernel, initrd, qemu)
    try:
        return _rounds(args, cmds, kernel, initrd, cmdline, marker, memory)
    finally:
        if boot is not None:
            boot.close()


def _rounds(args: argparse.Namespace, cmds: dict[str, list[str]], kernel: str, initrd: str, cmdline: str,
            marker: bytes, memory: str) -> int:
    what = f"system image {args.system}" if args.system else "the default image's /init"
    print(f"hypyr boot benchmark: {args.rounds} round(s), {memory}, 1 vCPU, per-boot limit {args.timeout:.0f} s")
    print(f"  guest   {what}\n  kernel  {kernel}\n  initrd  {initrd}\n  cmdline {cmdline}")
    print(f"  marker  {marker.decode()!r} on the serial console (stdout pipe)")
    configs = args.configs
    for c in configs:
        print(f"  {c:<13} {' '.join(cmds[c])}")
    print(flush=True)

    for _ in range(args.warmup):   # untimed: bytecode compiled, files in the page cache, as installed
        for c in configs:
            if args.system:
                fresh_system_copy(args.system)
            wait = c == "hypyr" and not args.system
            marker_s = run_until_marker(cmds[c], marker, args.timeout, wait_for_exit=wait)[0]
            shown = "FAILED" if marker_s is None else f"{marker_s:6.2f} s"
            print(f"warm-up  {c:<13} {shown}  (not counted)", flush=True)

    samples: list[Sample] = []
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(configs)
        order = configs[k:] + configs[:k]  # rotate the start so no VMM always goes first
        for c in order:
            if args.system:
                fresh_system_copy(args.system)
            # hypyr powers the default image off by itself: let it, and record its exit status
            wait = c == "hypyr" and not args.system
            marker_s, total_s, status, note, out = run_until_marker(cmds[c], marker, args.timeout,
                                                                    wait_for_exit=wait)
            m = UPTIME.search(out)
            s = Sample(c, rnd, marker_s is not None, marker_s, float(m.group(1)) if m else None, total_s, status, note)
            if wait and s.ok and status != 0 and not note:
                s.note = f"exit status {status}"
            samples.append(s)
            extra = ""
            if s.ok and wait:
                extra = f"  (exited {status} after {total_s:.2f} s)"
            elif s.ok:
                extra = "  (killed at the marker)"
            if s.ok and s.uptime_s is not None:
                extra += f"  guest uptime {s.uptime_s:.2f} s: {s.marker_s - s.uptime_s:.2f} s before the kernel's clock"
            if s.note:
                extra += f"  [{s.note}]"
            print(f"round {rnd}  {c:<13} {'FAILED' if not s.ok else f'{marker_s:6.2f} s'}{extra}", flush=True)

    summary = summarise(samples)
    mem = None
    if not args.no_memory and "hypyr" in configs:
        print("\nmeasuring hypyr's peak RSS (one more run) ...", flush=True)
        mem = measure_memory(cmds["hypyr"], args.timeout)
    result = print_report(summary, mem)

    doc = {"rounds": args.rounds, "timeout_s": args.timeout, "kernel": kernel, "initrd": initrd,
           "system": args.system, "cmdline": cmdline, "commands": cmds, "marker": marker.decode(),
           "host": platform.node(), "samples": [asdict(s) for s in samples], "summary": summary,
           **result, "memory": mem}
    if args.json_stdout:
        print(JSON_LINE_PREFIX + json.dumps(doc), flush=True)
    elif args.json:
        try:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError:
            scratch = os.environ.get("HYPYR_LAB_SCRATCH")
            if not scratch:
                raise
            dest = Path(scratch) / Path(args.json).name
            dest.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"bench: {args.json} not writable here; wrote {dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rss_probe:
        print(JSON_LINE_PREFIX + json.dumps(rss_probe(args.probe_cmd, args.timeout)), flush=True)
        return 0
    if os.environ.get("HYPYR_IN_LAB") != "1":
        return host_side(argv, args)
    install_signal_handlers()
    try:
        return lab_side(args)
    finally:
        kill_all_live()


if __name__ == "__main__":
    sys.exit(main())
