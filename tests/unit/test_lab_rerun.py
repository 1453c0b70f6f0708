"""hypyr.lab.rerun: a lab test that failed after a guest triple-faulted, found its receive ring
corrupt or hung in guest mode runs again (RERUNS times at most), and only then; its waits end at
once when a guest faulted."""

from __future__ import annotations

import os
import subprocess
import sys

from hypyr.lab.rerun import RERUNS, TRIPLE_FAULT

TESTS = '''
import subprocess
import time
from pathlib import Path

from hypyr.lab.rerun import TRIPLE_FAULT, raise_if_faulted, record_output
from hypyr.lab.testguard import GuestNeverLeft, GuestStuck, OutputStalled


def attempt(name):
    p = Path(__file__).with_name("attempts." + name)
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    return n


def test_fault_in_a_domain_log_then_passes(tmp_path):
    time.sleep(6)   # both attempts together outlast the 10 s watchdog: each attempt gets the whole limit
    if attempt("log") == 1:
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "d.vmm.log").write_text("boot\\nmsg=stopping: vCPU 1: " + TRIPLE_FAULT
                                                      + "\\nrip=ffffffff81000000  rsp=0\\n")
        assert False, "timed out waiting for the console"


def test_fault_in_hypyr_run_output_then_passes(request):
    if attempt("out") == 1:
        record_output(request.node, "hypyr: vCPU 0: " + TRIPLE_FAULT)
        assert False, "exit 121"


def test_ring_fault_in_a_console_log_then_passes(tmp_path):
    if attempt("ring") == 1:
        (tmp_path / "console.log").write_text("hypyr: init started\\n"
                                              "[   63.498134] virtio_net virtio0: input.0:id 86 is not a head!\\n")
        assert False, "timed out waiting for 'sent-to-host'"


def test_guest_that_never_left_guest_mode_then_passes():
    if attempt("spin") == 1:
        raise GuestNeverLeft(["hypyr", "run"], 300, b"", b"", "  tid 7 R cpu 2.00 s (guest 1.98 s) of 2 s")


def test_output_stalled_mid_line_then_passes():
    if attempt("stall") == 1:
        raise OutputStalled(["hypyr", "run"], 300, b"hypyr: could not load module pvpanic.k", b"")


def test_domain_stuck_in_guest_mode_then_passes():
    if attempt("stuck") == 1:
        raise GuestStuck("timed out waiting for 'sent-to-host' on tx's console; tx ignored an NMI")


def test_wait_ends_at_once_after_a_fault_then_passes(tmp_path):
    if attempt("early") == 1:
        (tmp_path / "d.vmm.log").write_text("msg=stopping: vCPU 0: " + TRIPLE_FAULT)
        raise_if_faulted()
        Path(__file__).with_name("reached.early").write_text("raise_if_faulted did not raise")


def test_wait_goes_on_without_a_fault(tmp_path):
    attempt("calm")
    (tmp_path / "d.vmm.log").write_text("msg=domain d started")
    raise_if_faulted()


def test_plain_timeout_is_final():
    attempt("timeout")
    raise subprocess.TimeoutExpired(["hypyr", "run"], 300)


def test_failure_without_a_fault_is_final():
    attempt("plain")
    assert False, "a real failure"


def test_fault_twice_is_final(tmp_path):
    attempt("twice")
    (tmp_path / "x.log").write_text(TRIPLE_FAULT)
    assert False, "failed again"
'''


def test_only_failures_after_a_guest_fault_or_a_hang_in_guest_mode_run_again_and_only_rerun_times(tmp_path):
    (tmp_path / "test_lab_like.py").write_text(TESTS)
    env = dict(os.environ, HYPYR_LAB_TEST_TIMEOUT="10")
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hypyr.lab.testguard",
                        "-p", "hypyr.lab.rerun", "test_lab_like.py"], env=env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    print(r.stdout, r.stderr)
    names = ("log", "out", "ring", "spin", "stall", "stuck", "early", "calm", "timeout", "plain", "twice")
    runs = {name: int((tmp_path / f"attempts.{name}").read_text()) for name in names}
    assert RERUNS == 2
    assert runs == {"log": 2, "out": 2, "ring": 2, "spin": 2, "stall": 2, "stuck": 2, "early": 2, "calm": 1,
                    "timeout": 1, "plain": 1, "twice": 3}
    assert not (tmp_path / "reached.early").exists()
    assert r.returncode == 1
    assert "3 failed, 8 passed, 9 rerun" in r.stdout
    assert ("a guest found a used virtio-net buffer it never gave (" in r.stdout
            and "virtio_net virtio0: input.0:id 86 is not a head!" in r.stdout)
    assert "L2GuestFault: the test failed after a guest triple-faulted" in r.stdout
    assert "a guest hung without leaving guest mode; the command's threads:\n  tid 7 R cpu 2.00 s (guest 1.98 s)" \
        in r.stdout
    assert "a domain's guest hung in guest mode and did not answer an NMI:\ntimed out waiting for 'sent-to-host'" \
        in r.stdout
    assert "a guest's output stopped mid-line until the timeout; it ends:\nhypyr: could not load module pvpanic.k" \
        in r.stdout
    assert "still running" not in r.stderr
    # the evidence stays in the log: the stop reason and the register dump after it, not what came before
    assert "msg=stopping: vCPU 1: " + TRIPLE_FAULT + "\nrip=ffffffff81000000  rsp=0" in r.stdout
    assert "boot\nmsg=stopping" not in r.stdout
