"""The lab's hang guard: bounded subprocess runs, the per-test watchdog, and its process report."""

import os
import subprocess
import sys
import time

import pytest

from hypyr.lab import testguard


def test_run_bounded_returns_what_subprocess_run_would():
    script = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    r = testguard.run_bounded([sys.executable, "-c", script], timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = testguard.run_bounded([sys.executable, "-c", "print('text')"], timeout=60, text=True)
    assert r.stdout == "text\n"


def test_run_bounded_kills_the_whole_session_on_timeout_and_keeps_the_output(tmp_path, capsys):
    pidfile = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; c = subprocess.Popen(['sleep', '600']); "
              f"open({str(pidfile)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(600)")
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        testguard.run_bounded([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - t0 < 30
    assert e.value.stdout == b"started\n"
    out = capsys.readouterr().out
    assert "killed after 3 s; stdout so far:\nstarted\n" in out
    grandchild = int(pidfile.read_text())
    # before the kill, every thread of the session was shown, with where it waited
    assert "still running after 3 s; its threads:" in out
    assert f"pid {grandchild}: sleep 600" in out and f"  tid {grandchild} S cpu " in out
    for _ in range(100):  # the grandchild in the same session is gone too (reaped by init)
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                if f.read().split(")")[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the timed-out command's child survived")


def test_run_bounded_says_when_the_output_stopped_mid_line():
    script = ("import sys, time; sys.stdout.write('hypyr: could not load module pvpanic.k'); sys.stdout.flush(); "
              "time.sleep(600)")
    with pytest.raises(testguard.OutputStalled) as e:
        testguard.run_bounded([sys.executable, "-c", script], timeout=3)
    assert e.value.stdout == b"hypyr: could not load module pvpanic.k"
    with pytest.raises(subprocess.TimeoutExpired) as e:   # whole lines: a plain timeout
        testguard.run_bounded([sys.executable, "-c", "print('line', flush=True); import time; time.sleep(600)"],
                              timeout=3, text=True)
    assert type(e.value) is subprocess.TimeoutExpired and e.value.stdout == "line\n"


def test_session_threads_counts_a_thread_that_stayed_inside_kvm_run(monkeypatch):
    """Stuck inside KVM_RUN: on the CPU 90 % of the sample and in guest mode half of it or more
    (the rest is L1's KVM handling nested page faults, as in the official CI run of 4e69ecf). A VMM
    thread spinning in its own code (no guest time) or a guest that idles is not."""
    hz = testguard.procfs.CLK_TCK
    seen = {1: (0, 0), 2: (0, 0), 3: (0, 0), 4: (0, 0)}   # tid: (utime, guest) ticks so far
    after = {1: (5.0, 3.9), 2: (5.0, 0.0), 3: (1.0, 1.0), 4: (5.0, 5.0)}   # seconds over the sample
    sampled = set()

    def stat(pid, tid=None):
        utime, guest = (round(x * hz) for x in after[tid]) if tid in sampled else seen[tid]
        return testguard.procfs.ProcStat("R", utime, 0, "0", 0, guest)

    monkeypatch.setattr(testguard.procfs, "pids", lambda: [os.getpid()])
    monkeypatch.setattr(testguard.procfs, "threads", lambda pid: sorted(seen))
    monkeypatch.setattr(testguard.procfs, "stat", stat)
    monkeypatch.setattr(testguard.time, "sleep", lambda s: sampled.update(seen))
    _, in_kvm = testguard.session_threads(os.getsid(0), sample_s=5.0)
    assert in_kvm == [1, 4]


def test_kill_pending_reads_both_signal_masks():
    none = {"SigPnd": "0000000000000000", "ShdPnd": "0000000000000000"}
    assert not testguard._kill_pending(none)
    assert testguard._kill_pending(dict(none, ShdPnd="0000000000000100"))
    assert testguard._kill_pending(dict(none, SigPnd="0000000000004100"))
    assert not testguard._kill_pending(dict(none, SigPnd="0000000000004000"))  # SIGTERM only


def test_process_report_lists_this_process_and_no_stuck_one():
    report, stuck = testguard.process_report()
    mine = [line for line in report.splitlines()[1:] if line.split()[:1] == [str(os.getpid())]]
    assert len(mine) == 1 and "pytest" in mine[0]
    assert not stuck


def test_watchdog_ends_a_hung_test_with_status_1_and_says_where_it_was(tmp_path):
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                           "def test_hangs():\n    time.sleep(600)\n")
    env = dict(os.environ, HYPYR_LAB_TEST_TIMEOUT="3")
    env.pop("PYTEST_ADDOPTS", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hypyr.lab.testguard",
                        str(tmp_path / "test_hang.py")], env=env, capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert time.monotonic() - t0 < 60
    assert r.returncode == 1
    assert "test_hang.py::test_hangs still running after 3 s" in r.stderr
    assert "in test_hangs" in r.stderr  # the hung thread's Python stack
    assert "the test hung" in r.stderr


def test_lab_failed_ends_the_session_with_125_and_a_process_report(tmp_path):
    (tmp_path / "test_l1.py").write_text("from hypyr.lab import testguard\n\ndef test_a():\n"
                                         "    testguard.lab_failed('a process outlived SIGKILL')\n\n"
                                         "def test_b():\n    pass\n")
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hypyr.lab.testguard",
                        str(tmp_path / "test_l1.py")], env=env, capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == testguard.LAB_FAILED
    assert "a process outlived SIGKILL; this is L1's kernel failing" in r.stderr
    assert "   pid   ppid S wchan" in r.stderr
    assert "1 passed" not in r.stdout  # test_b never ran
