#!/usr/bin/env python3
"""bench/blk.py's guest under hypyr from two source trees, alternating (prints figures, never asserts).

    .venv/bin/python bench/blk_ab.py OLD_TREE NEW_TREE [--rounds N] [--mib M]

Before/after for a change to the block path without QEMU: each round boots the same guest script
and disk under OLD_TREE's and NEW_TREE's `hypyr run` back to back (which goes first alternates) and
prints NEW/OLD per metric for the round (> 1: NEW is better), then the medians.  Runs in the lab
like blk.py (re-executes itself there).  Make OLD_TREE with `git worktree add --detach DIR COMMIT`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import blk  # noqa: E402
from _common import ensure_image, lab_command, lab_guest  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs=2, metavar="TREE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mib", type=int, default=128)
    args = p.parse_args(argv)
    trees = [os.path.abspath(t) for t in args.trees]
    if not os.environ.get("HYPYR_IN_LAB"):
        if ensure_image() != 0:
            return 1
        return subprocess.call(lab_command(HERE, [*trees, "--rounds", str(args.rounds), "--mib", str(args.mib)]))
    guest = lab_guest(None, None)
    if guest is None:
        return 2
    kernel, initrd, qemu = guest
    seq4k, rand = 1024, 300
    script = blk.guest_script(args.mib, seq4k, rand)
    tmpdir = tempfile.mkdtemp(prefix="hypyr-blk-ab-", dir="/tmp")
    disk = os.path.join(tmpdir, "disk.img")
    ratios: dict[str, list[float]] = {m.key: [] for m in blk.METRICS}
    try:
        blk.make_disk(disk, args.mib)
        cmds = {t: blk.commands(kernel, initrd, qemu, disk, script, t)["hypyr"] for t in trees}
        print(f"blk A/B: {args.rounds} round(s); old {trees[0]}, new {trees[1]}", flush=True)
        for rnd in range(1, args.rounds + 1):
            got: dict[str, dict] = {}
            for t in trees if rnd % 2 else trees[::-1]:
                done, wall, status, note, out = blk.run_boot(cmds[t], 300, wait_for_exit=True)
                vals, _ = blk.parse_guest(out, args.mib, seq4k, rand)
                got[t] = vals if done and status == 0 else {}
                print(f"round {rnd} {'new' if t == trees[1] else 'old'}: {'ok' if got[t] else 'FAILED ' + note} "
                      f"{wall:.1f} s " + " ".join(f"{k}={v:.4g}" for k, v in vals.items()), flush=True)
            old, new = got[trees[0]], got[trees[1]]
            for m in blk.METRICS:
                if m.key in old and m.key in new and old[m.key] and new[m.key]:
                    r = new[m.key] / old[m.key] if m.higher_better else old[m.key] / new[m.key]
                    ratios[m.key].append(r)
            print(f"round {rnd} new/old: " + " ".join(f"{k}={v[-1]:.2f}" for k, v in ratios.items() if v), flush=True)
        print("medians of the per-round new/old ratios (> 1: new is better):")
        for m in blk.METRICS:
            rs = ratios[m.key]
            if rs:
                print(f"  {m.key:<16} {statistics.median(rs):.2f}  {[round(r, 2) for r in rs]}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
