"""Run the fuzz targets one after another (never two at once) and print one summary table.

    python fuzz/run.py                      # every target, FUZZ_SECONDS (60) each
    python fuzz/run.py --seconds 5 blk rng  # some targets
    python fuzz/run.py --runs 1000000 blk   # until that many inputs (or --seconds, if given, ends it first)
    python fuzz/run.py --smoke              # CI: a few seconds each, a fresh corpus, whole run < 60 s

Each target runs under ``nice -n 19`` as ``fuzz/fuzz_<name>.py`` with libFuzzer's options; its
corpus persists in ``--dir`` (default ``$FUZZ_DIR`` or ``~/.cache/hypyr/fuzz``: ``corpus/<name>``,
seeded from ``tests/unit/data`` where there are seeds) and a failing input is written to
``<dir>/artifacts/<name>-crash-…``; each target's full output is in ``<dir>/logs/<name>.log``.
The table has, per target: inputs tried, exec/s, libFuzzer's ``cov`` (coverage points) and ``ft``
(features), the corpus size, the peak RSS and the failures (0, or 1 and the input that failed:
libFuzzer stops at the first).  The exit status is 1 if any target failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("queue", "mmio", "blk", "console", "rng", "net", "serial", "i8042", "rtc", "acpi_pm", "acpi_ged",
           "xlcfg", "rest")
SEEDS = {"xlcfg": ROOT / "tests" / "unit" / "data" / "xlcfg"}
DICTS = {"xlcfg": HERE / "dicts" / "xlcfg.dict"}
STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?rss: (\d+)Mb")
STAT = re.compile(r"^stat::(\w+):\s*(\d+)")


def run_target(name: str, args, workdir: Path) -> dict:
    corpus = workdir / "corpus" / name
    artifacts = workdir / "artifacts"
    logs = workdir / "logs"
    for d in (corpus, artifacts, logs):
        d.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "19", sys.executable, str(HERE / f"fuzz_{name}.py"),
           f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={args.max_len}",
           "-print_final_stats=1", f"-artifact_prefix={artifacts}/{name}-"]
    if args.seconds:
        cmd.append(f"-max_total_time={args.seconds}")
    if args.runs:
        cmd.append(f"-runs={args.runs}")
    if name in DICTS:
        cmd.append(f"-dict={DICTS[name]}")
    cmd.append(str(corpus))
    if name in SEEDS and SEEDS[name].is_dir():
        cmd.append(str(SEEDS[name]))
    log_path = logs / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write((" ".join(cmd) + "\n").encode())
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir).returncode
    elapsed = time.monotonic() - start
    r = {"name": name, "rc": rc, "seconds": elapsed, "runs": 0, "cov": 0, "ft": 0, "corp": 0, "rss": 0,
         "failure": "", "log": str(log_path)}
    stats = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = STATUS.match(line)
        if m:
            r["runs"], r["cov"], r["ft"], r["corp"], r["rss"] = map(int, m.groups())
        m = STAT.match(line)
        if m:
            stats[m.group(1)] = int(m.group(2))
        if "Test unit written to" in line:
            r["failure"] = line.split("Test unit written to", 1)[1].strip()
        elif line.startswith(("Failure:", "=== Uncaught Python exception")) and not r.get("why"):
            r["why"] = line
    r["runs"] = stats.get("number_of_executed_units", r["runs"])
    r["rss"] = stats.get("peak_rss_mb", r["rss"])
    if rc != 0 and not r["failure"]:
        r["failure"] = f"exit status {rc} (see {log_path})"
    return r


def table(results: list[dict]) -> str:
    head = f"{'target':<9} {'inputs':>10} {'exec/s':>7} {'cov':>5} {'ft':>6} {'corpus':>6} {'rss MB':>6} " \
           f"{'secs':>5}  failures"
    lines = [head, "-" * len(head)]
    for r in results:
        eps = r["runs"] / r["seconds"] if r["seconds"] else 0
        fail = "0" if not r["failure"] else f"1  {r['failure']}"
        lines.append(f"{r['name']:<9} {r['runs']:>10} {eps:>7.0f} {r['cov']:>5} {r['ft']:>6} {r['corp']:>6} "
                     f"{r['rss']:>6} {r['seconds']:>5.0f}  {fail}")
        if r.get("why"):
            lines.append(f"{'':<9} {r['why']}")
    total = sum(r["runs"] for r in results)
    lines.append(f"{'total':<9} {total:>10}   failures: {sum(1 for r in results if r['failure'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", help=f"targets (default all: {' '.join(TARGETS)})")
    p.add_argument("--seconds", type=int, default=None, help="time per target (default $FUZZ_SECONDS or 60)")
    p.add_argument("--runs", type=int, default=0, help="inputs per target (libFuzzer -runs)")
    p.add_argument("--smoke", action="store_true", help="CI: $FUZZ_SMOKE_SECONDS (1) per target, fresh corpus")
    p.add_argument("--dir", default=os.environ.get("FUZZ_DIR", str(Path.home() / ".cache" / "hypyr" / "fuzz")))
    p.add_argument("--timeout", type=int, default=20, help="seconds one input may take (libFuzzer -timeout)")
    p.add_argument("--rss-limit-mb", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=4096)
    args = p.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"no such target: {' '.join(unknown)}")
    if args.seconds is None and not args.runs:
        args.seconds = int(os.environ.get("FUZZ_SMOKE_SECONDS", "1") if args.smoke
                           else os.environ.get("FUZZ_SECONDS", "60"))
    workdir = Path(tempfile.mkdtemp(prefix="hypyr-fuzz-smoke-")) if args.smoke else Path(args.dir)
    results = []
    try:
        for n in names:
            r = run_target(n, args, workdir)
            results.append(r)
            print(f"fuzz {n}: {r['runs']} inputs in {r['seconds']:.0f} s, cov {r['cov']}, "
                  f"{'FAILED: ' + r['failure'] if r['failure'] else 'no failure'}", flush=True)
        print(table(results))
    finally:
        if args.smoke:
            failed = any(r["failure"] for r in results)
            if failed:  # keep the failing input and the logs
                print(f"fuzz: logs and the failing input are in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r["failure"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
