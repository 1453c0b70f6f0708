"""Pieces every benchmark shares: child process groups that are always killed, and the
re-exec into the lab (benchmarks of real guests run there; see bench/README.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

live: set[int] = set()  # process-group ids of children still running (each child leads its own group)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all_live() -> None:
    for pid in list(live):
        kill_group(pid)


def on_signal(signum, _frame):
    """Signal handler: kill every child group, then die of the same signal."""
    kill_all_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def tail(data: bytes, n: int = 600) -> str:
    text = data[-n:].decode("utf-8", "replace").replace("\r", "")
    return " | ".join(line for line in text.splitlines() if line.strip())[-n:]


def ensure_image() -> int:
    """Build the default guest image on the host (its cache is read-only inside the lab)."""
    r = subprocess.run([sys.executable, "-m", "hypyr", "image", "build"], stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        print("bench: building the default guest image failed", file=sys.stderr)
    return r.returncode


def lab_command(script: Path, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "hypyr", "lab", "--", sys.executable, str(script), *argv]


def lab_guest(kernel: str | None, initrd: str | None) -> tuple[str, str, str] | None:
    """Inside the lab: (kernel, initrd, qemu) for a VMM comparison, defaulting to the default
    image; prints why and returns None when something is missing."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import shutil

    from hypyr.image import build as image
    if not kernel:
        d = image.image_dir()
        kernel, initrd = str(d / "vmlinuz"), initrd or str(d / "initrd.img")
    problem = None
    if not initrd:
        problem = "--initrd is required with --kernel"
    else:
        problem = next((f"{p} is missing (run `hypyr image build` on the host)"
                        for p in (kernel, initrd) if not os.path.isfile(p)), None)
    qemu = shutil.which("qemu-system-x86_64")
    if problem is None and qemu is None:
        problem = "qemu-system-x86_64 not found"
    if problem is None and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        problem = "/dev/kvm is not usable here"
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return None
    return kernel, initrd, qemu
