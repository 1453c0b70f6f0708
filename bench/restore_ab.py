"""`hypyr restore` of one save file by two source trees, alternating (prints figures, never asserts).

    .venv/bin/python -m hypyr lab -- .venv/bin/python bench/restore_ab.py OLD_TREE NEW_TREE [ROUNDS]

Inside the lab (or wherever /dev/kvm boots Linux): boots a 256 MiB domain from the default image
with NEW_TREE, saves it, then times `hypyr restore` (to running) and destroys the domain, the
CLI and the domain process run from each tree in turn (cwd is first on sys.path), one warm-up
each, then ROUNDS rounds (default 4) alternating which tree goes first.  Prints each time and
the medians.  Make OLD_TREE with `git worktree add --detach DIR COMMIT`.
"""

from __future__ import annotations

import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GUEST = b"echo restore-ab-up; while :; do sleep 1; done"


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    trees = [os.path.abspath(t) for t in sys.argv[1:3]]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    work = Path(tempfile.mkdtemp(prefix="restore-ab-"))
    env = dict(os.environ, HYPYR_STATE_DIR=str(work / "state"))

    def hypyr(tree: str, *args: str) -> bool:
        p = subprocess.run([sys.executable, "-m", "hypyr", *args], cwd=tree, env=env, capture_output=True,
                           text=True, timeout=600)
        if p.returncode:
            print(f"hypyr {' '.join(args)} ({tree}) failed: {p.stderr.strip()[-300:]}", flush=True)
        return p.returncode == 0

    sys.path.insert(0, trees[1])
    from hypyr.image import default as image
    paths = image.paths()
    extra = "hypyr.exec=" + base64.b64encode(GUEST).decode()
    cfg = work / "d.cfg"
    cfg.write_text(f'name = "ab"\nmemory = 256\nvcpus = 1\nkernel = "{paths.kernel}"\n'
                   f'ramdisk = "{paths.initrd}"\nextra = "{extra}"\n')
    if not hypyr(trees[1], "create", str(cfg)):
        return 1
    deadline = time.monotonic() + 300
    while not any(b"restore-ab-up" in p.read_bytes() for p in (work / "state" / "domains").glob("*/console.log")):
        if time.monotonic() > deadline:
            print("the guest did not boot in 300 s")
            return 1
        time.sleep(1)
    save = work / "d.save"
    if not hypyr(trees[1], "save", "ab", str(save)):
        return 1
    times: dict[str, list[float]] = {t: [] for t in trees}
    for r in range(rounds + 1):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            t0 = time.monotonic()
            ok = hypyr(tree, "restore", str(save))
            dt = time.monotonic() - t0
            hypyr(tree, "destroy", "ab")
            print(f"round {r} {tree}: restore {dt:.2f} s{'' if ok else ' FAILED'}{' (warm-up)' if r == 0 else ''}",
                  flush=True)
            if r and ok:
                times[tree].append(dt)
    for tree, values in times.items():
        if values:
            print(f"{tree}: median {statistics.median(values):.2f} s {[round(v, 2) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
