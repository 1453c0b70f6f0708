"""hypyr.lab.rerun: a lab test that failed after a guest triple-faulted runs once more, and only then."""

from __future__ import annotations

import os
import subprocess
import sys

from hypyr.lab.rerun import TRIPLE_FAULT

TESTS = '''
import time
from pathlib import Path

from hypyr.lab.rerun import TRIPLE_FAULT, record_output


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


def test_failure_without_a_fault_is_final():
    attempt("plain")
    assert False, "a real failure"


def test_fault_twice_is_final(tmp_path):
    attempt("twice")
    (tmp_path / "x.log").write_text(TRIPLE_FAULT)
    assert False, "failed again"
'''


def test_only_failures_after_a_triple_fault_run_again_and_once(tmp_path):
    (tmp_path / "test_lab_like.py").write_text(TESTS)
    env = dict(os.environ, HYPYR_LAB_TEST_TIMEOUT="10")
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hypyr.lab.testguard",
                        "-p", "hypyr.lab.rerun", "test_lab_like.py"], env=env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    print(r.stdout, r.stderr)
    runs = {name: int((tmp_path / f"attempts.{name}").read_text()) for name in ("log", "out", "plain", "twice")}
    assert runs == {"log": 2, "out": 2, "plain": 1, "twice": 2}
    assert r.returncode == 1
    assert "2 failed, 2 passed, 3 rerun" in r.stdout
    assert "L2GuestTripleFault: the test failed after a guest triple-faulted" in r.stdout
    assert "still running" not in r.stderr
    # the evidence stays in the log: the stop reason and the register dump after it, not what came before
    assert "msg=stopping: vCPU 1: " + TRIPLE_FAULT + "\nrip=ffffffff81000000  rsp=0" in r.stdout
    assert "boot\nmsg=stopping" not in r.stdout
