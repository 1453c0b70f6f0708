"""A pytest plugin (``-p hypyr.lab.testguard``) that keeps a hung lab test from eating the lab's budget.

A lab test hangs either on our side (a guest or VMM stopped making progress: the test fails, with
what it printed so far) or in L1's kernel (a process that SIGKILL cannot end, as when nested KVM
under TCG goes wrong: exit 125, "the lab failed", so that `make test-lab` boots L1 again and
resumes). ``run_bounded`` is the subprocess call for the tests; the per-test watchdog
(HYPYR_LAB_TEST_TIMEOUT seconds, default 600) catches a hang anywhere else. Both print where
every process stood (state, wait channel, kernel stack) before giving up. See docs/lab.md.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from hypyr import procfs

LAB_FAILED = 125
KILL_GRACE_S = 60.0
TEST_TIMEOUT_ENV = "HYPYR_LAB_TEST_TIMEOUT"
DEFAULT_TEST_TIMEOUT_S = 600.0
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)

# The terminal, before pytest's capture takes fd 2 over (-p plugins are imported first).
_TERMINAL = os.dup(2)


def _say(text: str) -> None:
    os.write(_TERMINAL, text.encode(errors="replace") + b"\n")


def _kill_pending(fields: dict[str, str]) -> bool:
    return any(int(fields.get(k, "0"), 16) & _SIGKILL_BIT for k in ("SigPnd", "ShdPnd"))


def process_report() -> tuple[str, bool]:
    """Every process's state, wait channel and command line, with the kernel stacks of those
    asleep uninterruptibly or with a SIGKILL pending; and whether any is stuck with SIGKILL pending."""
    lines, stuck = [], False
    for pid in procfs.pids():
        fields = procfs.status(pid)
        wchan = procfs.wchan(pid)
        if not fields or wchan is None:
            continue  # gone meanwhile
        cmd = b" ".join(procfs.cmdline(pid)).decode(errors="replace").strip()[:150]
        pending = _kill_pending(fields)
        state = fields.get("State", "?")
        lines.append(f"{pid:>6} {fields.get('PPid', '?'):>6} {state[:1]} {wchan or '-':<28} "
                     f"{'SIGKILL-pending ' if pending else ''}{cmd or fields.get('Name', '')}")
        if pending and not state.startswith("Z"):
            stuck = True
        if pending or state.startswith("D"):
            for tid in procfs.threads(pid):
                stack = procfs.kernel_stack(pid, tid)
                lines.append(f"         task {tid}:\n           " + ("\n           ".join(stack) or "(no stack)"))
    return "   pid   ppid S wchan\n" + "\n".join(lines), stuck


# A thread on the CPU for ON_CPU_BOUND of the sample, GUEST_SHARE of it in guest mode, stayed inside
# KVM_RUN: the rest is L1's KVM handling the guest's exits in the kernel (docs/lab.md, "Hung tests").
ON_CPU_BOUND = 0.9
GUEST_SHARE = 0.5


class GuestNeverLeft(subprocess.TimeoutExpired):
    """A command timed out while a vCPU thread of it stayed inside KVM_RUN (:func:`session_threads`):
    the guest was stuck without one exit to the VMM (docs/lab.md, "Hung tests"). ``threads``: the evidence."""

    def __init__(self, cmd, timeout, output, stderr, threads: str):
        super().__init__(cmd, timeout, output, stderr)
        self.threads = threads


class OutputStalled(subprocess.TimeoutExpired):
    """A command timed out with its guest's output stopped in the middle of a line: the signature
    of the open "Serial output stall" (docs/guest-interface.md), a transmit interrupt that never
    came."""


class GuestStuck(AssertionError):
    """A test gave up waiting on a domain whose vCPU thread stayed inside KVM_RUN (see
    :func:`session_threads`) without one exit to the VMM, and whose guest did not answer an NMI
    (a guest that runs its own code takes one): stuck in guest mode, as :class:`GuestNeverLeft`
    (docs/lab.md, "Hung tests")."""


def session_threads(sid: int, sample_s: float = 2.0) -> tuple[str, list[int]]:
    """Every thread of the processes in session ``sid``: state, CPU and guest time used over
    ``sample_s`` seconds, wait channel and the top of its kernel stack; and the threads that stayed
    inside KVM_RUN (ON_CPU_BOUND of the sample on the CPU, GUEST_SHARE of it in guest mode)."""
    pids = []
    for pid in procfs.pids():
        try:
            if os.getsid(pid) == sid:
                pids.append(pid)
        except OSError:
            continue
    before = {(pid, tid): procfs.stat(pid, tid) for pid in pids for tid in procfs.threads(pid)}
    time.sleep(sample_s)
    lines, in_guest = [], []
    for pid in sorted(pids):
        lines.append(f"pid {pid}: {b' '.join(procfs.cmdline(pid)).decode(errors='replace')[:150]}")
        for tid in procfs.threads(pid):
            st, st0 = procfs.stat(pid, tid), before.get((pid, tid))
            if st is None:
                continue
            cpu = guest = "?"
            if st0 is not None:
                cpu_s = st.cpu_seconds - st0.cpu_seconds
                cpu = f"{cpu_s:.2f}"
                if st.guest is not None and st0.guest is not None:
                    guest_s = (st.guest - st0.guest) / procfs.CLK_TCK
                    guest = f"{guest_s:.2f}"
                    if cpu_s >= ON_CPU_BOUND * sample_s and guest_s >= GUEST_SHARE * sample_s:
                        in_guest.append(tid)
            frames = procfs.kernel_stack(pid, tid)[:6]
            lines.append(f"  tid {tid} {st.state} cpu {cpu} s (guest {guest} s) of {sample_s:g} s, "
                         f"wchan {procfs.wchan(pid, tid) or '-'}: {' < '.join(frames) or '(no stack)'}")
    return "\n".join(lines) or "(no process left in the session)", in_guest


def lab_failed(reason: str) -> None:
    """End the session with exit 125: L1's kernel, not the test, failed."""
    report, _ = process_report()
    _say(f"\nhypyr lab: {reason}; this is L1's kernel failing, not a test result. Processes:\n{report}")
    pytest.exit(reason, returncode=LAB_FAILED)


def run_bounded(cmd: list[str], timeout: float, text: bool = False, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, timeout=...)``, with two differences. The output
    goes to files, not pipes: no reader in this process wakes for every write the guest's console
    makes (docs/lab.md: concurrent wake-ups in L1 make nested guests fail more often). And the
    wait after the timeout is bounded: the command's session is SIGKILLed, and a process still
    there KILL_GRACE_S later ends the lab run (``lab_failed``); otherwise TimeoutExpired is raised
    with the output so far (GuestNeverLeft if a vCPU thread of it stayed inside KVM_RUN,
    OutputStalled if its output stopped mid-line)."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, start_new_session=True, **popen_kwargs)
        threads, in_guest = "", list[int]()
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            threads, in_guest = session_threads(proc.pid)
            print(f"$ {' '.join(cmd)}\n--- still running after {timeout:g} s; its threads:\n{threads}")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                lab_failed(f"{' '.join(cmd[:6])} (pid {proc.pid}) outlived SIGKILL by {KILL_GRACE_S:g} s")
        outputs = []
        for f in (out_f, err_f):
            f.seek(0)
            data = f.read()
            outputs.append(data.decode(errors="replace") if text else data)
    if timed_out:
        _show_partial(cmd, timeout, *outputs)
        if in_guest:
            raise GuestNeverLeft(cmd, timeout, outputs[0], outputs[1], threads)
        if _mid_line(outputs[0]):
            raise OutputStalled(cmd, timeout, *outputs)
        raise subprocess.TimeoutExpired(cmd, timeout, *outputs)
    return subprocess.CompletedProcess(cmd, proc.returncode, *outputs)


def _mid_line(out: str | bytes) -> bool:
    """Whether ``out`` is not empty and its last line is cut short (no newline)."""
    return bool(out) and out[-1:] not in ("\n", b"\n")


def as_text(output: str | bytes | None) -> str:
    """A command's captured output (bytes, text or None) as text."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _show_partial(cmd: list[str], timeout: float, out, err) -> None:
    """Print (into the test's captured output) what a timed-out command printed before it was killed."""
    print(f"$ {' '.join(cmd)}\n--- killed after {timeout:g} s; stdout so far:\n{as_text(out)}\n"
          f"--- stderr so far:\n{as_text(err)}")


def _test_timeout() -> float:
    try:
        return float(os.environ.get(TEST_TIMEOUT_ENV, DEFAULT_TEST_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TEST_TIMEOUT_S


def _on_test_timeout(nodeid: str, limit: float) -> None:
    """Runs in the timer thread: say where everything stood, then end pytest (125 when a
    process is stuck with SIGKILL pending, else 1: the test hung)."""
    _say(f"\nhypyr lab: {nodeid} still running after {limit:g} s; pytest's threads:")
    faulthandler.dump_traceback(file=_TERMINAL, all_threads=True)
    report, stuck = process_report()
    _say("processes:\n" + report)
    code = LAB_FAILED if stuck else 1
    _say(f"hypyr lab: ending the test run with {code} "
         f"({'a process outlives SIGKILL: L1 failed' if stuck else 'the test hung'})")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_watchdog: list[threading.Timer] = []


def pytest_runtest_logstart(nodeid, location):
    """Arm the watchdog; each attempt of a test (pytest-rerunfailures starts it again) gets the whole limit."""
    _disarm()
    limit = _test_timeout()
    if limit > 0:
        timer = threading.Timer(limit, _on_test_timeout, args=(nodeid, limit))
        timer.daemon = True
        timer.start()
        _watchdog.append(timer)


def pytest_runtest_logfinish(nodeid, location):
    _disarm()


def _disarm() -> None:
    while _watchdog:
        _watchdog.pop().cancel()
