"""The `hypyr` command line: sizes, and user errors reported as one line with exit code 1.

Tests that get as far as opening /dev/kvm (hypyr validates a VM's configuration against
the host's KVM) are skipped where /dev/kvm is not usable.
"""

from __future__ import annotations

import argparse
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import uuid

import pytest

from hypyr import cli
from hypyr.cli.common import parse_size
from hypyr.cli.run import run_exit_code
from hypyr.errors import HypyrError
from hypyr.kvm import Kvm, KvmUnavailable
from hypyr.toolstack import client, paths, sched
from hypyr.toolstack.registry import Registry

MiB, GiB = 1 << 20, 1 << 30


def _kvm_usable() -> bool:
    try:
        Kvm().close()
        return True
    except KvmUnavailable:
        return False


KVM = _kvm_usable()
needs_kvm = pytest.mark.skipif(not KVM, reason="/dev/kvm is not usable here")


# -- parse_size -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("256M", 256 * MiB),
    ("1G", GiB),
    ("512", 512 * MiB),          # bare numbers are MiB, as in xl.cfg
    ("65536K", 64 * MiB),
    ("1T", 1 << 40),
    ("2g", 2 * GiB),
    ("2GiB", 2 * GiB),
    ("2GB", 2 * GiB),
    ("16mib", 16 * MiB),
    (" 4G ", 4 * GiB),
    ("0", 0),
    ("007M", 7 * MiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_default_unit():
    assert parse_size("4", default_unit="G") == 4 * GiB
    assert parse_size("4", default_unit="K") == 4096
    assert parse_size("4M", default_unit="G") == 4 * MiB


@pytest.mark.parametrize("text", ["", " ", "M", "-1M", "1.5G", "1e3", "10X", "1P", "0x10M", "1 G B", "1GiBs",
                                  "½G", "256 M M"])
def test_parse_size_rejects(text):
    with pytest.raises(HypyrError) as e:
        parse_size(text)
    assert "is not a size" in str(e.value)
    assert "\n" not in str(e.value)


# -- exit codes -------------------------------------------------------------------------------------
def test_run_exit_codes_cover_every_stop_kind():
    from hypyr.vmm.stop import StopKind, StopReason
    expected = {StopKind.POWEROFF: 0, StopKind.HALT: 0, StopKind.REBOOT: 120, StopKind.TRIPLE_FAULT: 121,
                StopKind.CRASH: 124, StopKind.INTERNAL_ERROR: 122, StopKind.FAIL_ENTRY: 123,
                StopKind.DESTROYED: 130}   # docs/exit-codes.md
    assert {k: run_exit_code(StopReason(k, "")) for k in expected} == expected
    assert set(expected) | {StopKind.EXIT_STATUS} == set(StopKind)
    assert run_exit_code(StopReason(StopKind.EXIT_STATUS, "", status=7)) == 7


# -- one-line errors --------------------------------------------------------------------------------
def _one_error_line(capfd) -> str:
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hypyr: error: "), lines[0]
    return lines[0]


@pytest.fixture
def garbage_kernel(tmp_path):
    p = tmp_path / "garbage-kernel"
    p.write_bytes(bytes(range(256)) * 64)
    return p


def test_run_with_missing_kernel(capfd, tmp_path):
    path = str(tmp_path / "no-such-kernel")
    assert cli.main(["run", "--no-input", "--kernel", path]) == 1
    line = _one_error_line(capfd)
    if KVM:  # without KVM, hypyr may complain about /dev/kvm first
        assert path in line


def test_run_with_bad_size_needs_no_kvm(capfd, garbage_kernel):
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--memory", "lots"]) == 1
    assert "'lots' is not a size" in _one_error_line(capfd)


@needs_kvm
def test_run_with_garbage_kernel(capfd, garbage_kernel):
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--memory", "64M"]) == 1
    _one_error_line(capfd)


@needs_kvm
def test_run_with_directory_as_kernel(capfd, tmp_path):
    assert cli.main(["run", "--no-input", "--kernel", str(tmp_path)]) == 1
    assert str(tmp_path) in _one_error_line(capfd)


@needs_kvm
@pytest.mark.parametrize("vcpus", ["0", "-3"])
def test_run_with_no_vcpus(capfd, garbage_kernel, vcpus):
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--vcpus", vcpus]) == 1
    assert "vcpus" in _one_error_line(capfd)


@needs_kvm
def test_run_with_too_many_vcpus(capfd, garbage_kernel):
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--vcpus", "100000"]) == 1
    assert "vcpus" in _one_error_line(capfd)


@needs_kvm
def test_run_with_more_memory_than_the_host(capfd, garbage_kernel):
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--memory", "100T"]) == 1
    assert "memory" in _one_error_line(capfd).lower()


@needs_kvm
def test_run_with_tiny_memory(capfd, garbage_kernel):
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--memory", "1M"]) == 1
    assert "memory" in _one_error_line(capfd).lower()


@needs_kvm
def test_run_with_missing_initrd(capfd, garbage_kernel, tmp_path):
    path = str(tmp_path / "no-such-initrd")
    assert cli.main(["run", "--no-input", "--kernel", str(garbage_kernel), "--initrd", path]) == 1
    assert path in _one_error_line(capfd)


# -- doctor ---------------------------------------------------------------------------------------
@needs_kvm
def test_doctor_gives_a_verdict(capfd):
    assert cli.main(["doctor"]) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    verdicts = [line for line in out.splitlines() if line.startswith("verdict:")]
    assert len(verdicts) == 1 and len(verdicts[0]) > len("verdict:") + 10
    assert "usable" in out


def test_doctor_on_a_device_that_is_not_kvm(capfd):
    assert cli.main(["doctor", "--device", "/dev/null"]) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    assert "NOT usable" in out
    assert any(line.startswith("verdict:") for line in out.splitlines())


def test_doctor_on_a_missing_device(capfd, tmp_path):
    assert cli.main(["doctor", "--device", str(tmp_path / "kvm")]) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    assert "does not exist" in out


def test_help_is_as_wide_as_the_terminal_and_the_parser_needs_no_shutil():
    env = dict(os.environ, COLUMNS="60")
    out = subprocess.run([sys.executable, "-c", "import sys; from hypyr import cli; "
                          "cli.build_parser('run').parse_args(['run', '--memory', '128']); "
                          "print('shutil' in sys.modules); cli.build_parser('run').parse_args(['run', '-h'])"],
                         capture_output=True, text=True, env=env).stdout
    first, *lines = out.splitlines()
    assert first == "False" and "--kernel KERNEL" in out
    assert max(map(len, lines)) <= 58 < max(map(len, lines)) + 10   # argparse fills to COLUMNS - 2


def test_unknown_command_is_a_usage_error(capfd):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    assert "usage:" in capfd.readouterr().err


# -- bad input to the toolstack commands (issue #13) ------------------------------------------------
def _hypyr(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`hypyr ARGS` in a process of its own (a hang is a TimeoutExpired, not a stuck test run)."""
    return subprocess.run([sys.executable, "-m", "hypyr", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("op", ["pause", "destroy", "console"])
def test_huge_domain_id_is_one_sentence(state, capfd, op):
    assert cli.main([op, "99999999999999999999"]) == 1
    assert _one_error_line(capfd) == "hypyr: error: no domain with id 99999999999999999999"


@pytest.mark.parametrize("delay", ["inf", "1e308", "nan", "0", "-1"])
def test_top_refuses_a_bad_delay(state, delay):
    p = _hypyr("top", "-b", "-n", "2", "-d", delay)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [f"hypyr: error: -d must be a number of seconds more than 0 and at most "
                                     f"86400, not {float(delay)}"]


def test_top_refuses_zero_iterations(state, capfd):
    assert cli.main(["top", "-b", "-n", "0"]) == 1
    assert _one_error_line(capfd) == "hypyr: error: -n must be at least 1, not 0"


def test_control_operation_without_an_answer_is_one_sentence(state, capfd, monkeypatch):
    monkeypatch.setattr(client, "CONTROL_TIMEOUT", 0.3)
    with Registry() as reg:
        rec = reg.reserve("web", {"memory": 64})
        silent = socket.socket(socket.AF_UNIX)      # a domain process that never answers
        silent.bind(str(paths.control_socket(rec.domid)))
        silent.listen(1)
        reg.set_running(rec.domid, os.getpid(), paths.control_socket(rec.domid), uuid=rec.uuid)
        try:
            assert cli.main(["pause", "web"]) == 1
        finally:
            silent.close()
    assert _one_error_line(capfd) == "hypyr: error: domain web did not answer pause within 0.3 s"


def test_create_refuses_a_fifo_without_waiting(state, tmp_path):
    fifo = tmp_path / "web.cfg"
    os.mkfifo(fifo)
    p = _hypyr("create", str(fifo))
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"hypyr: error: domain config file {fifo} is not a regular file"]
    assert not (state / "domains.sqlite").exists()   # nothing left behind


def test_run_checks_vcpus_before_any_work(capfd, monkeypatch):
    from hypyr.image import default as image
    monkeypatch.setattr(image, "ensure", lambda: pytest.fail("the default image was built before --vcpus was checked"))
    for vcpus in ("0", "255", "99999999999999999999"):
        assert cli.main(["run", "--no-input", "--vcpus", vcpus]) == 1
        assert _one_error_line(capfd) == f"hypyr: error: --vcpus must be a number from 1 to 254, not {vcpus}"


def test_sched_credit_ignores_a_stale_group_of_the_same_domid(state, tmp_path, monkeypatch, capfd):
    """A group left by a gone domain with the same domid is not the new domain's: no success is
    reported for writing to it, and it is not listed as the new domain's."""
    root = tmp_path / "cg"
    (root / "hypyr").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu\n")
    monkeypatch.setenv(sched.ENV_ROOT, str(root))
    with Registry() as reg:
        rec = reg.reserve("web", {"memory": 64})
        reg.set_running(rec.domid, os.getpid(), None, uuid=rec.uuid)
    stale = root / "hypyr" / f"dom-{rec.domid}-{uuid.uuid4()}"
    stale.mkdir()
    (stale / "cpu.weight").write_text("100\n")
    (stale / "cpu.max").write_text("max 100000\n")
    assert cli.main(["sched-credit", "-d", "web", "-w", "512"]) == 1
    assert _one_error_line(capfd) == "hypyr: error: domain web has no scheduler group (is it running?)"
    assert (stale / "cpu.weight").read_text() == "100\n"
    assert cli.main(["sched-credit"]) == 0
    assert capfd.readouterr().out.splitlines()[1:] == []


# -- SIGTERM to `hypyr run` (issue #13, 12) ---------------------------------------------------------
SIGTERM_CHILD = r"""
import os, sys, threading
from types import SimpleNamespace
from hypyr import cli
from hypyr.cli.common import parse_size
from hypyr.cli.run import run_exit_code
from hypyr.vmm import builder

class Machine:  # a guest that runs until stopped
    def __init__(self):
        self.reason, self.done = None, threading.Event()
    def stop(self, reason):
        self.reason = self.reason or reason
        self.done.set()
    def run(self):
        os.write(1, b"ready\n")
        self.done.wait()
        return self.reason

vm = SimpleNamespace(machine=Machine(), close=lambda: None,
                     console=SimpleNamespace(enqueue_input=len, input_room=lambda: 4096))
builder.build_linux_vm = lambda config, out: vm
sys.exit(cli.main(["run", "--kernel", "/nonexistent/vmlinuz"]))
"""


def test_sigterm_to_run_restores_the_terminal_and_exits_130():
    master, slave = pty.openpty()
    saved = termios.tcgetattr(slave)
    p = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD], stdin=slave, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        assert termios.tcgetattr(slave) != saved          # raw while the guest runs
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 130, err
        assert termios.tcgetattr(slave) == saved
        assert err.decode().splitlines() == ["hypyr: stopped by SIGTERM"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        os.close(slave)


def _commands(parser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_a_parser_built_for_one_command_parses_as_the_whole_one():
    """main() builds only the parser of the command on the command line: its usage, help and
    defaults are the whole parser's; a word that is no command gets the whole parser."""
    full = cli.build_parser()
    assert [n for names in cli.COMMAND_MODULES.values() for n in names] == list(_commands(full))
    for name, whole in _commands(full).items():
        only = cli.build_parser(name)
        assert list(_commands(only)) == [name]
        assert _commands(only)[name].format_help() == whole.format_help()
    assert cli._command_word(["-v", "run", "--kernel", "k"]) == "run"
    assert cli._command_word(["--help", "run"]) is None
    assert vars(cli.build_parser("run").parse_args(["run", "--vcpus", "2"])) == \
        vars(full.parse_args(["run", "--vcpus", "2"]))
    assert list(_commands(cli.build_parser("nonsense"))) == list(_commands(full))
