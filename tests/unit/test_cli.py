"""The `hypyr` command line: sizes, and user errors reported as one line with exit code 1.

Tests that get as far as opening /dev/kvm (hypyr validates a VM's configuration against
the host's KVM) are skipped where /dev/kvm is not usable.
"""

from __future__ import annotations

import pytest

from hypyr import cli
from hypyr.errors import HypyrError
from hypyr.kvm import Kvm, KvmUnavailable

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
    assert cli.parse_size(text) == expected


def test_parse_size_default_unit():
    assert cli.parse_size("4", default_unit="G") == 4 * GiB
    assert cli.parse_size("4", default_unit="K") == 4096
    assert cli.parse_size("4M", default_unit="G") == 4 * MiB


@pytest.mark.parametrize("text", ["", " ", "M", "-1M", "1.5G", "1e3", "10X", "1P", "0x10M", "1 G B", "1GiBs",
                                  "½G", "256 M M"])
def test_parse_size_rejects(text):
    with pytest.raises(HypyrError) as e:
        cli.parse_size(text)
    assert "is not a size" in str(e.value)
    assert "\n" not in str(e.value)


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


def test_unknown_command_is_a_usage_error(capfd):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    assert "usage:" in capfd.readouterr().err
