#!/usr/bin/env python3
"""VMM start-up: wall time from `hypyr run` process start to the first KVM_RUN, on this host.

No guest needs to boot: the host's /dev/kvm (even PVM-backed) is enough to reach KVM_RUN. Each
round starts `python -m hypyr run -vv` with the default image (or --kernel/--initrd), reads its
log until the debug line the VMM writes as the first vCPU enters the guest (CLOCK_MONOTONIC, the
same clock as this process), then kills it. Also printed, as medians over the rounds:
- the interpreter alone (`python -c pass`) and `import hypyr.vmm.builder` in a fresh interpreter,
  to tell Python's own start from hypyr's;
- the VMM's resident memory at that moment outside guest RAM (the process's Rss less the Rss of
  the anonymous mapping of guest-RAM size), and the private part of it (pages no other process
  shares: libpython's and libc's code are shared by every Python process on the host);
- the floors under both: the interpreter's own resident memory (`python -c pass`), and the
  VMM's work after its imports (the same `hypyr run` started by a prelude that imports hypyr.cli
  and hypyr.vmm.builder first: imports done -> first KVM_RUN);
each with Python's bytecode cached (as users run it) and with none written (every start compiles).

    .venv/bin/python bench/startup.py [--rounds N] [--memory SIZE] [--kernel K --initrd I]

It prints figures and never asserts; see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from _common import ensure_image, smaps_split  # noqa: E402

FIRST_RUN = re.compile(rb"first KVM_RUN at CLOCK_MONOTONIC (\d+) ns")
IMPORTED = re.compile(rb"imports done at (\d+) ns")
# `hypyr run` with its imports done first, the moment written on stderr (CLOCK_MONOTONIC)
PRELUDE = ("import runpy, sys, time; import hypyr.cli, hypyr.cli.run, hypyr.vmm.builder; "
           "sys.stderr.write(f'imports done at {time.monotonic_ns()} ns\\n'); sys.stderr.flush(); "
           "sys.argv[0] = 'hypyr'; runpy.run_module('hypyr', run_name='__main__', alter_sys=True)")


def interpreter_ms(code: str, env: dict[str, str]) -> float:
    """Wall time of a fresh interpreter running ``code`` (in the repository, as `hypyr run` is)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=env)
    return (time.perf_counter() - t0) * 1e3


def bytecode_env(prefix: str, write: bool) -> dict[str, str]:
    """This environment with Python's bytecode cache under ``prefix``: written there and loaded
    from there (as users run hypyr: compiled once), or, with ``write`` False and ``prefix`` empty,
    none at all (every start compiles)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["PYTHONPYCACHEPREFIX"] = prefix
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def interpreter_rss_mib(env: dict[str, str]) -> float:
    """VmRSS of a fresh interpreter that runs nothing (`python -c pass`, read by itself at its end)."""
    out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"], cwd=REPO, check=True,
                         env=env, capture_output=True, text=True).stdout
    return int(re.search(r"^VmRSS:\s+(\d+) kB", out, re.M).group(1)) / 1024  # type: ignore[union-attr]


def rss_outside_ram(pid: int, ram_bytes: int) -> tuple[float, float]:
    """MiB resident in ``pid`` outside the anonymous mapping of guest RAM, and of those the
    private ones (not shared with other processes: what one more domain costs the host)."""
    split = smaps_split(pid, ram_bytes // 1024)
    if split is None:
        raise SystemExit(f"bench: cannot read /proc/{pid}/smaps")
    total, ram, private = split.total, split.guest, split.private
    return (total - ram) / 1024, private / 1024


def one_start(cmd: list[str], ram_bytes: int, timeout: float, env: dict[str, str]) -> tuple[float, float, float]:
    """(ms from process start to the first KVM_RUN, (MiB resident, MiB private) outside guest RAM
    then, ms from the PRELUDE's "imports done" to the first KVM_RUN, or NaN without a prelude)."""
    t0 = time.monotonic_ns()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, env=env)
    assert proc.stderr is not None
    buf = b""
    try:
        deadline = time.monotonic() + timeout
        while (m := FIRST_RUN.search(buf)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or (proc.poll() is not None and not select.select([proc.stderr], [], [], 0)[0]):
                tail = buf.decode(errors="replace")[-800:]
                raise SystemExit(f"bench: no first KVM_RUN within {timeout:.0f} s; the VMM said:\n{tail}")
            if select.select([proc.stderr], [], [], left)[0]:
                buf += os.read(proc.stderr.fileno(), 65536)
        rss = rss_outside_ram(proc.pid, ram_bytes)
        run_ns = int(m.group(1))
        imported = IMPORTED.search(buf)
        return (run_ns - t0) / 1e6, rss, (run_ns - int(imported.group(1))) / 1e6 if imported else float("nan")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    ap.add_argument("--kernel")
    ap.add_argument("--initrd")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: /dev/kvm is not usable here", file=sys.stderr)
        return 1
    if args.kernel is None and ensure_image() != 0:
        return 1
    sys.path.insert(0, str(REPO))
    from hypyr.cli.common import parse_size
    ram = parse_size(args.memory)
    run_args = ["run", "-vv", "--no-input", "--memory", args.memory]
    if args.kernel:
        run_args += ["--kernel", args.kernel] + (["--initrd", args.initrd] if args.initrd else [])
    cmd = [sys.executable, "-m", "hypyr", *run_args]
    # the command users run: the venv's console script (it runs the tree the venv was installed
    # from, not necessarily this one, and skips runpy)
    script = Path(sys.executable).with_name("hypyr")
    installed = [str(script), *run_args] if script.exists() else None
    preluded = [sys.executable, "-c", PRELUDE, *run_args]
    med = statistics.median
    print(f"startup ({args.rounds} rounds, medians; min-max in brackets), python {sys.version.split()[0]}:")
    with tempfile.TemporaryDirectory(prefix="hypyr-startup-pyc-") as cache:
        for label, env in (("bytecode cached", bytecode_env(os.path.join(cache, "pyc"), True)),
                           ("no bytecode cache", bytecode_env(os.path.join(cache, "empty"), False))):
            bare, bare_rss, imports, starts, rss, private, work, script_starts = [], [], [], [], [], [], [], []
            one_start(cmd, ram, args.timeout, env)  # warm the page cache (and fill the bytecode cache)
            for _ in range(args.rounds):
                bare.append(interpreter_ms("pass", env))
                bare_rss.append(interpreter_rss_mib(env))
                imports.append(interpreter_ms("import hypyr.vmm.builder", env))
                ms, (mib, own), _ = one_start(cmd, ram, args.timeout, env)
                starts.append(ms)
                rss.append(mib)
                private.append(own)
                work.append(one_start(preluded, ram, args.timeout, env)[2])
                if installed:
                    script_starts.append(one_start(installed, ram, args.timeout, env)[0])
            print(f" {label}:")
            for what, xs, unit in (("python -c pass", bare, "ms"),
                                   ("python -c pass: resident", bare_rss, "MiB"),
                                   ("python -c 'import hypyr.vmm.builder'", imports, "ms"),
                                   ("hypyr run: process start -> first KVM_RUN", starts, "ms"),
                                   ("hypyr run: its imports done -> first KVM_RUN", work, "ms"),
                                   ("VMM resident outside guest RAM then", rss, "MiB"),
                                   ("  of it private (not shared)", private, "MiB"),
                                   (f"{script} run: start -> first KVM_RUN", script_starts, "ms")):
                if xs:
                    print(f"  {what:<46} {med(xs):7.1f} {unit} [{min(xs):.1f}-{max(xs):.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
