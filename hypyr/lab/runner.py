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
from hypyr.lab import job, monitor
from hypyr.lab.parts import ensure_parts, lab_dir

log = logging.getLogger("hypyr.lab")

PRUNE_AFTER_S = 7 * 24 * 3600
# L1's init touches <job>/heartbeat every 5 s; a lab whose heartbeat (or, before it starts, boot)
# has not moved for this long is wedged. Generous: a loaded L1 still runs a shell loop in seconds.
DEFAULT_STALL_S = 240.0
WATCH_PERIOD_S = 1.0


class Watchdog:
    """Decides when a running lab must be killed: past its timeout, or when L1 stopped moving.

    Liveness is the mtime of <job>/heartbeat (or of <job>/started, or the launch, before it
    exists), judged on our own monotonic clock: we note when we saw it change, never compare
    L1's clock with ours.
    """

    def __init__(self, jobdir: Path, t0: float, timeout: float | None, stall: float | None):
        self.files = (jobdir / "heartbeat", jobdir / "started")
        self.t0, self.timeout, self.stall = t0, timeout, stall
        self.last_mark: int | None = None
        self.last_move = t0

    def _mark(self) -> int | None:
        for f in self.files:
            try:
                return f.stat().st_mtime_ns
            except OSError:
                continue
        return None

    def check(self, now: float) -> str | None:
        """None while the lab may go on, else why it must be killed."""
        if self.timeout is not None and now - self.t0 >= self.timeout:
            return f"it was still running after {self.timeout:.0f} s and was killed"
        if not self.stall:
            return None
        mark = self._mark()
        if mark != self.last_mark:
            self.last_mark, self.last_move = mark, now
        elif now - self.last_move >= self.stall:
            what = "heartbeat" if mark is not None else "boot"
            return f"L1 showed no sign of life ({what}) for {self.stall:g} s and was killed as wedged"
        return None


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


def _report_cpus(sock: Path, kallsyms: Path) -> None:
    """Say where L1's CPUs are (QEMU's monitor) before a wedged lab is killed."""
    text = monitor.query(sock, ["info registers -a"])
    if text is None:
        print("hypyr lab: QEMU's monitor did not answer; no CPU state for this wedge", file=sys.stderr)
        return
    lines = monitor.describe(monitor.parse_registers(text), monitor.Symbols.load(kallsyms))
    print("hypyr lab: L1's CPUs when it was found wedged:\n  " + "\n  ".join(lines or ["(none parsed)"]),
          file=sys.stderr, flush=True)


def _keep_kallsyms(found: Path, kept: Path) -> None:
    if found.is_file() and not kept.exists():
        try:
            shutil.move(str(found), kept)
        except OSError:
            pass


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
        timeout: float | None = None, stall: float | None = DEFAULT_STALL_S,
        share: str | Path | None = None) -> int:
    """Run CMD in the host's current directory inside the L1 VM; return its exit status.

    Returns 125 (after saying so on stderr) when the lab itself failed rather than the command,
    including when the L1 VM is still running after ``timeout`` seconds, or its heartbeat has
    not moved for ``stall`` seconds (it is then killed). ``share`` is a host directory L1 may
    write to, at the same path.
    """
    if isinstance(cmd, str):
        raise HypyrError("The lab command must be a list of arguments, not a string.")
    share = job.share_path(share) if share is not None else None
    parts = ensure_parts()
    jobs = lab_dir() / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    _prune_jobs(jobs)
    jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=jobs))
    # QEMU's monitor socket lives outside the job directory (which L1 sees), under a short path.
    mondir = Path(tempfile.mkdtemp(prefix="hypyr-lab-"))
    try:
        return _run_in(jobdir, parts, list(cmd), cpus, memory, extra_env, timeout, stall, share,
                       mondir / "monitor.sock")
    finally:
        shutil.rmtree(mondir, ignore_errors=True)
        _cleanup(jobdir)


def _run_in(jobdir: Path, parts, cmd: list[str], cpus: int, memory: str, extra_env,
            timeout: float | None = None, stall: float | None = None, share: Path | None = None,
            monitor_sock: Path | None = None) -> int:
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
    kallsyms = lab_dir() / f"kallsyms-{parts.kernel_release}"
    (jobdir / "lab.conf").write_text(job.lab_conf(stdin_tty, stdout_tty, job.keep_paths(cwd, env), share,
                                                  want_kallsyms=not kallsyms.exists()))
    tcg = os.environ.get("HYPYR_LAB_TCG", "multi")
    if tcg not in ("multi", "single"):
        raise HypyrError("HYPYR_LAB_TCG must be 'multi' or 'single'.")
    args = job.qemu_args(job.QemuConfig(parts.qemu, parts.kernel, parts.initrd, jobdir, cpus, memory, tcg,
                                        os.environ.get("HYPYR_LAB_9P_OPTS", ""), share, monitor_sock))
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
    watch = Watchdog(jobdir, t0, timeout, stall)
    why_killed = None
    try:
        while (qrc := proc.poll()) is None:
            # e.g. L1 wedged (soft lockups, or silent, under QEMU TCG): never hang the caller
            why_killed = watch.check(time.monotonic())
            if why_killed:
                if monitor_sock is not None:
                    _report_cpus(monitor_sock, kallsyms if kallsyms.exists() else jobdir / "kallsyms")
                proc.kill()
                qrc = proc.wait()
                break
            time.sleep(WATCH_PERIOD_S)
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
        _keep_kallsyms(jobdir / "kallsyms", kallsyms)
    log.info("L1 session took %.1f s (QEMU exit status %s)", time.monotonic() - t0, qrc)

    rc = None if why_killed else job.read_exit_status(jobdir)
    if rc is None:
        why = (why_killed if why_killed
               else f"QEMU exited with status {qrc}" if qrc else "the L1 VM stopped without an exit status")
        print(f"hypyr lab: the lab VM failed before the command finished ({why}); "
              f"this is a failure of the lab, not of the command.", file=sys.stderr, flush=True)
        return job.EXIT_LAB_FAILED
    return rc
