"""Pieces every benchmark shares: child process groups that are always killed, and the
re-exec into the lab (benchmarks of real guests run there; see bench/README.md)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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


def tail_of(data: bytes, n: int = 600) -> str:
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

    from hypyr.image import default as image
    if not kernel:
        paths = image.paths()
        kernel, initrd = str(paths.kernel), initrd or str(paths.initrd)
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


def run_until_marker(cmd: list[str], marker: bytes, timeout: float, wait_for_exit: bool, *, what: str = "the marker",
                     tail_len: int = 600) -> tuple[float | None, float, int | None, str, bytes]:
    """Start CMD with stdout on a pipe; return (marker_s, total_s, exit_status, note, output).

    The child runs in its own process group and is always gone when this returns: killed as soon
    as the marker appears (unless wait_for_exit), or at the deadline.
    """
    stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (open for the child's lifetime; closed below)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file,
                            bufsize=0, start_new_session=True)
    live.add(proc.pid)
    deadline = t0 + timeout
    fd = proc.stdout.fileno()
    buf = bytearray()
    marker_s = None
    note = ""
    eof = False
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                note = f"timed out after {timeout:.0f} s" + ("" if marker_s is None else f" (after {what})")
                break
            if eof:
                # stdout closed: wait for the process itself
                try:
                    proc.wait(timeout=min(0.2, deadline - now))
                except subprocess.TimeoutExpired:
                    continue
                break
            r, _, _ = select.select([fd], [], [], min(0.5, deadline - now))
            if not r:
                if proc.poll() is not None:
                    break  # exited, and nothing left on the pipe (a leftover holder of it is killed below)
                continue
            chunk = os.read(fd, 65536)
            t = time.monotonic()
            if not chunk:
                eof = True
                continue
            search_from = max(0, len(buf) - len(marker))
            buf += chunk
            if marker_s is None and marker in buf[search_from:]:
                marker_s = t - t0
                if not wait_for_exit:
                    break
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
        proc.wait()
        live.discard(proc.pid)
        total_s = time.monotonic() - t0
        proc.stdout.close()
        stderr_file.seek(0)
        err = stderr_file.read()
        stderr_file.close()
    status = proc.returncode
    if marker_s is None and not note:
        note = f"exited with status {status} before {what}"
    if marker_s is None:
        tail = tail_of(bytes(buf) + b"\n" + err, tail_len)
        if tail:
            note += f"; output tail: {tail}"
    return marker_s, total_s, status, note, bytes(buf)


class Smaps(NamedTuple):
    """A process's /proc/PID/smaps, in KiB (see :func:`smaps_split`)."""
    total: int    # all its Rss
    guest: int    # the Rss of the anonymous mapping(s) holding guest RAM
    private: int  # Private_Clean + Private_Dirty outside guest RAM: what this process alone holds
    pss: int      # Pss outside guest RAM: its own pages plus its share of those it shares


def smaps_split(pid: int, guest_kib: int) -> Smaps | None:
    """From /proc/PID/smaps: the total Rss, the Rss of the anonymous mapping(s) holding guest
    RAM, and outside them the private pages and the proportional set size (shared pages, such as
    libpython's and libc's, divided among the processes that map them)."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
    except OSError:
        return None
    total = guest = private = pss = 0
    is_guest = False
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            parts = line.split()
            lo, hi = (int(x, 16) for x in head.split("-"))
            anon = len(parts) < 6 or parts[5] == ""
            is_guest = anon and (hi - lo) == guest_kib * 1024
        elif line.startswith("Rss:"):
            kib = int(line.split()[1])
            total += kib
            if is_guest:
                guest += kib
        elif is_guest:
            continue
        elif line.startswith(("Private_Clean:", "Private_Dirty:")):
            private += int(line.split()[1])
        elif line.startswith("Pss:"):
            pss += int(line.split()[1])
    return Smaps(total, guest, private, pss)


def supervisor_of(pid: int) -> int | None:
    """A jailed domain's supervisor: the VMM's parent, a hypyr process (an unjailed domain's
    parent is init or a subreaper)."""
    from hypyr import procfs
    ppid = procfs.ppid(pid)
    if ppid is None or ppid <= 1 or ppid == os.getpid():
        return None
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            return ppid if b"hypyr" in f.read() else None
    except OSError:
        return None
