#!/usr/bin/env python3
"""What one more domain costs this host in memory outside guest RAM, on the host's /dev/kvm.

No guest needs to boot: by default each domain runs a 4-byte idle kernel (`cli; hlt`) with 32 MiB
of RAM and no disk or NIC, so the figures are the toolstack's and the VMM's own; --kernel and
--initrd (e.g. the default image's, with --memory 128) load a real one, which this host's
emulated KVM then runs slowly: only the VMM's side counts here. It creates --domains
domains with `hypyr create` (each a fork of that CLI process), measures them, destroys them, then
does the same through `hypyr serve`'s REST API (each a fork of its fork server). A domain is two
processes when jailed (the default as root): the VMM and its supervisor. For each it prints, in
MiB outside the guest-RAM mapping: RSS, private (pages no other process maps) and PSS (private
plus each shared page divided by the processes sharing it), and per domain the sum of the two
PSS figures, what the domain adds to the host. Private state directory and fake cgroup root under
/tmp; everything is destroyed at the end.

    .venv/bin/python bench/domain_mem.py [--domains N] [--settle S] [--kernel K [--initrd I] --memory MIB]

It prints figures and never asserts; see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from _common import smaps_split, supervisor_of  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "tests"))
from bootkernels import IDLE, tiny_elf  # noqa: E402

GUEST_MIB = 32  # --memory


def measure(pid: int, guest_mib: int) -> tuple[float, float, float] | None:
    """RSS, private and PSS outside guest RAM, MiB."""
    s = smaps_split(pid, guest_mib * 1024)
    if s is None:
        return None
    return (s.total - s.guest) / 1024, s.private / 1024, s.pss / 1024


def measure_domains(tag: str, settle: float, guest_mib: int) -> None:
    from hypyr.toolstack import api
    from hypyr.toolstack.registry import Registry
    time.sleep(settle)
    with Registry() as reg:
        recs = reg.list()
    vmms, sups, totals = [], [], []
    for r in recs:
        vmm = measure(r.pid, guest_mib)
        parent = supervisor_of(r.pid)
        sup = None if parent is None else measure(parent, guest_mib)
        if vmm is None:
            continue
        vmms.append(vmm)
        if sup is not None:
            sups.append(sup)
            totals.append(vmm[2] + sup[2])
    for who, rows in (("VMM", vmms), ("supervisor", sups)):
        if rows:
            rss, priv, pss = (statistics.median(col) for col in zip(*rows))
            print(f"{tag:<7} {who:<11} RSS {rss:5.1f}  private {priv:5.1f}  PSS {pss:5.1f} MiB   "
                  f"(medians of {len(rows)})")
    if totals:
        print(f"{tag:<7} {'per domain':<11} PSS of VMM + supervisor {statistics.median(totals):5.1f} MiB "
              f"{[round(t, 1) for t in totals]}")
    for r in recs:
        api.destroy(r.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=3, help="domains per way of creating them (default 3)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to let them settle before measuring")
    p.add_argument("--kernel", help="a kernel instead of the idle one")
    p.add_argument("--initrd", help="its initrd")
    p.add_argument("--memory", type=int, default=GUEST_MIB, help=f"guest MiB (default {GUEST_MIB})")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="hm", dir="/tmp"))  # short: the control socket's path limit
    os.environ["HYPYR_STATE_DIR"] = str(tmp / "s")
    cg = tmp / "cg"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("cpu\n")
    (cg / "cgroup.subtree_control").write_text("\n")
    from hypyr.toolstack import api, sched
    from hypyr.toolstack.registry import Registry
    from hypyr.toolstack.server import ApiClient
    os.environ[sched.ENV_ROOT] = str(cg)
    kernel = Path(args.kernel).resolve() if args.kernel else tmp / "idle.elf"
    if not args.kernel:
        kernel.write_bytes(tiny_elf(IDLE))
    initrd = f'ramdisk = "{Path(args.initrd).resolve()}"\n' if args.initrd else ""

    def cfg(name: str) -> Path:
        path = tmp / f"{name}.cfg"
        path.write_text(f'name = "{name}"\nmemory = {args.memory}\nkernel = "{kernel}"\n{initrd}')
        return path

    server = None
    try:
        for i in range(args.domains):
            subprocess.run([sys.executable, "-m", "hypyr", "create", str(cfg(f"c{i}"))], cwd=REPO, check=True,
                           capture_output=True)
        measure_domains("create", args.settle, args.memory)
        sock = tmp / "api.sock"
        server = subprocess.Popen([sys.executable, "-m", "hypyr.toolstack.server", "--socket", str(sock)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                print("bench: `hypyr serve` did not come up", file=sys.stderr)
                return 1
            time.sleep(0.05)
        client = ApiClient(str(sock))
        for i in range(args.domains):
            client.post("/domains", {"path": str(cfg(f"s{i}"))})
        measure_domains("serve", args.settle, args.memory)
        return 0
    finally:
        with Registry() as reg:
            names = [r.name for r in reg.list()]
        for name in names:
            try:
                api.destroy(name)
            except Exception as e:  # noqa: BLE001 - clean up all we can
                print(f"bench: destroy {name}: {e}", file=sys.stderr)
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
