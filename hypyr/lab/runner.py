"""Run one command inside the L1 VM and return its exit status."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.lab import job
from hypyr.lab.parts import ensure_parts, lab_dir

log = logging.getLogger("hypyr.lab")

PRUNE_AFTER_S = 7 * 24 * 3600


def _prune_jobs(jobs: Path) -> None:
    now = time.time()
    for d in jobs.glob("job-*"):
        try:
            if now - d.stat().st_mtime > PRUNE_AFTER_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _filter_stderr(src, dst_fd: int) -> None:
    """Copy QEMU's stderr to ours, dropping its harmless TCG feature warnings."""
    for line in iter(src.readline, b""):
        if not job.is_qemu_noise(line):
            os.write(dst_fd, line)
    src.close()


def _pump_stdin(dst, started: Path, proc) -> None:
    """Feed our (non-tty) stdin to the console once L1 is ready for it, then send ^D (EOF)."""
    while not started.exists():
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    try:
        while True:
            try:
                chunk = os.read(0, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            dst.write(chunk)
            dst.flush()
        # ^D ends a line-buffered read; a second one gives EOF after a partial last line.
        dst.write(b"\x04\x04")
        dst.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def _watch_boot(started: Path, proc, t0: float, out: dict) -> None:
    while proc.poll() is None:
        if started.exists():
            out["boot_s"] = time.monotonic() - t0
            log.info("L1 booted to its job in %.1f s", out["boot_s"])
            return
        time.sleep(0.05)


def _cleanup(jobdir: Path) -> None:
    if os.environ.get("HYPYR_LAB_KEEP") == "1":
        print(f"hypyr lab: job directory kept at {jobdir}", file=sys.stderr)
        return
    scratch = jobdir / "scratch"
    if scratch.is_dir() and any(scratch.iterdir()):
        for p in jobdir.iterdir():
            if p.name != "scratch":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        print(f"hypyr lab: the command's scratch files are kept in {scratch}", file=sys.stderr)
    else:
        shutil.rmtree(jobdir, ignore_errors=True)


def run(cmd: list[str], cpus: int = 2, memory: str = "4G", extra_env: dict | None = None,
        timeout: float | None = None) -> int:
    """Run CMD in the host's current directory inside the L1 VM; return its exit status.

    Returns 125 (after saying so on stderr) when the lab itself failed rather than the command,
    including when the L1 VM is still running after ``timeout`` seconds (it is then killed).
    """
    if isinstance(cmd, str):
        raise HypyrError("The lab command must be a list of arguments, not a string.")
    parts = ensure_parts()
    jobs = lab_dir() / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    _prune_jobs(jobs)
    jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=jobs))
    try:
        return _run_in(jobdir, parts, list(cmd), cpus, memory, extra_env, timeout)
    finally:
        _cleanup(jobdir)


def _run_in(jobdir: Path, parts, cmd: list[str], cpus: int, memory: str, extra_env,
            timeout: float | None = None) -> int:
    import subprocess

    (jobdir / "scratch").mkdir()
    os.chmod(jobdir, 0o755)
    cwd = os.getcwd()
    env = job.job_env(os.environ, jobdir, extra_env)
    (jobdir / "job.sh").write_text(job.job_script(cmd, cwd, env))
    try:
        stdin_tty = os.isatty(0)
    except OSError:
        stdin_tty = False
    stdout_tty = os.isatty(1)
    (jobdir / "lab.conf").write_text(job.lab_conf(stdin_tty, stdout_tty, job.keep_paths(cwd, env)))

    tcg = os.environ.get("HYPYR_LAB_TCG", "multi")
    if tcg not in ("multi", "single"):
        raise HypyrError("HYPYR_LAB_TCG must be 'multi' or 'single'.")
    args = job.qemu_args(job.QemuConfig(parts.qemu, parts.kernel, parts.initrd, jobdir, cpus, memory, tcg,
                                        os.environ.get("HYPYR_LAB_9P_OPTS", "")))
    log.info("starting L1: %s", " ".join(args))

    saved_tty = termios.tcgetattr(0) if stdin_tty else None
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    started = jobdir / "started"
    timing: dict = {}
    proc = subprocess.Popen(args, stdin=None if stdin_tty else subprocess.PIPE,
                            stdout=None, stderr=subprocess.PIPE)
    threads = [threading.Thread(target=_filter_stderr, args=(proc.stderr, 2), daemon=True),
               threading.Thread(target=_watch_boot, args=(started, proc, t0, timing), daemon=True)]
    if not stdin_tty:
        threads.append(threading.Thread(target=_pump_stdin, args=(proc.stdin, started, proc), daemon=True))
    for t in threads:
        t.start()
    timed_out = False
    try:
        try:
            qrc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True  # e.g. L1 wedged (soft lockups under QEMU TCG): never hang the caller
            proc.kill()
            qrc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            qrc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            qrc = proc.wait()
        raise
    finally:
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        threads[0].join(5)
    log.info("L1 session took %.1f s (QEMU exit status %s)", time.monotonic() - t0, qrc)

    rc = None if timed_out else job.read_exit_status(jobdir)
    if rc is None:
        why = (f"it was still running after {timeout:.0f} s and was killed" if timed_out
               else f"QEMU exited with status {qrc}" if qrc else "the L1 VM stopped without an exit status")
        print(f"hypyr lab: the lab VM failed before the command finished ({why}); "
              f"this is a failure of the lab, not of the command.", file=sys.stderr, flush=True)
        return job.EXIT_LAB_FAILED
    return rc
