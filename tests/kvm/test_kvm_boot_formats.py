"""Multiboot and PVH kernels booted for real by `hypyr run` on this host's /dev/kvm.

The kernels are the tiny ones of ``bootkernels.py``: they check their entry state and the
boot structures in the guest, print over the UART and report through the exit-status port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import bootkernels as K
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 120


def hypyr_run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "hypyr", "run", "--no-input", "--memory", "32M", *args],
                       cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    print(f"rc={p.returncode}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}")
    return p


@pytest.fixture
def files(tmp_path):
    (tmp_path / "mb.elf").write_bytes(K.multiboot_elf())
    (tmp_path / "mb.aout").write_bytes(K.multiboot_aout())
    (tmp_path / "pvh.elf").write_bytes(K.pvh_elf())
    (tmp_path / "first.mod").write_bytes(b"FIRSTMODULE-and-more")
    (tmp_path / "second.mod").write_bytes(b"2nd")
    return tmp_path


def test_multiboot_elf_with_two_modules(files):
    k, m1, m2 = files / "mb.elf", files / "first.mod", files / "second.mod"
    p = hypyr_run("--kernel", str(k), "--cmdline", "hello world", "--module", str(m1),
                  "--module", f"{m2},arg1 arg2")
    assert p.stdout.splitlines() == [
        "mb: hello from a multiboot kernel",
        f"cmdline={k} hello world",          # the kernel's path first, as QEMU and GRUB legacy give it
        "loader=hypyr",
        "mods=2",
        f"mod {m1}: FIRSTMOD",               # 8 bytes of the module, read by the guest
        f"mod {m2} arg1 arg2: 2nd",          # a 3-byte module: the guest stops at mod_end
    ]
    assert p.returncode == 0x42, p.stderr    # 0x40 + 2 modules, after every check in the guest passed
    assert p.stderr == ""


def test_multiboot_aout_kludge_with_initrd_list(files):
    k, m1, m2 = files / "mb.aout", files / "first.mod", files / "second.mod"
    p = hypyr_run("--kernel", str(k), "--initrd", f"{m1},{m2}")
    assert p.stdout.splitlines() == ["mb: hello from a multiboot kernel", f"cmdline={k}", "loader=hypyr",
                                     "mods=2", f"mod {m1}: FIRSTMOD", f"mod {m2}: 2nd"]
    assert p.returncode == 0x42, p.stderr


def test_multiboot_without_modules_gets_no_linux_cmdline(files):
    k = files / "mb.elf"
    p = hypyr_run("--kernel", str(k), "--append", "only-this")
    assert f"cmdline={k} only-this\n" in p.stdout      # none of hypyr's Linux defaults (console=ttyS0 ...)
    assert "mods=0" in p.stdout
    assert p.returncode == 0x40, p.stderr


def test_pvh_entry_with_initrd(files):
    p = hypyr_run("--kernel", str(files / "pvh.elf"), "--initrd", str(files / "first.mod"),
                  "--cmdline", "console=ttyS0 pvh")
    assert p.stdout.splitlines() == ["pvh: hello from a PVH kernel", "cmdline=console=ttyS0 pvh",
                                     "mods=1 FIRSTMODULE-and-more"]
    assert p.returncode == 0x51, p.stderr    # 0x50 + 1 module, hvm_start_info checked in the guest


@pytest.mark.parametrize("args,why", [
    (["--exec", "true"], "--exec needs"),
    (["--console", "virtio"], "--console virtio needs"),
])
def test_multiboot_refuses_linux_only_options(files, args, why):
    p = hypyr_run("--kernel", str(files / "mb.elf"), *args)
    assert p.returncode == 1 and why in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_module_for_a_linux_kernel_is_one_sentence(files):
    p = hypyr_run("--kernel", str(files / "pvh.elf"), "--module", str(files / "first.mod"))
    assert p.returncode == 1 and "--module is only for multiboot kernels" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_hostile_multiboot_image_is_one_sentence(files):
    bad = bytearray(K.multiboot_aout())
    bad[0x18:0x1C] = (0xFFFFFFF0).to_bytes(4, "little")   # bss_end_addr near 4 GiB
    k = files / "bad.mb"
    k.write_bytes(bytes(bad))
    p = hypyr_run("--kernel", str(k))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(k) in lines[0], lines


@pytest.mark.no_kvm
@pytest.mark.parametrize("name", ["MULTIBOOT", "PVH"])
def test_boot_kernel_bytes_match_their_assembly(tmp_path, name):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU as/ld not installed")
    (tmp_path / "k.s").write_text(getattr(K, f"{name}_ASM"))
    subprocess.run(["as", "--32", "-o", str(tmp_path / "k.o"), str(tmp_path / "k.s")], check=True,
                   capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={K.BASE:#x}", "-e", f"{K.BASE:#x}", "--oformat", "binary",
                    "-o", str(tmp_path / "k.bin"), str(tmp_path / "k.o")], check=True, capture_output=True)
    assert (tmp_path / "k.bin").read_bytes().hex() == getattr(K, f"{name}_BODY").hex()
