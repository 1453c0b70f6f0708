"""A real Debian system (`hypyr image build --system`) run as a user runs it: a domain from an
xl.cfg with `bootloader = "pygrub"` and a vif on a `--dhcp` network; hypyr reads the image's own
grub.cfg, boots its kernel and initramfs, which mounts root from /dev/vda (virtio-blk over
virtio-mmio), and systemd starts a serial getty on ttyS0.  The test then logs in on that console
through `hypyr console` (root and the password the image was built with), runs one command, and
shuts it down with `hypyr shutdown -w`.

What it proves: the image's grub.cfg, kernel and initramfs boot under hypyr (pygrub path); the
initramfs finds its root disk; systemd reaches `running` (no failed unit); the serial console
takes a login; systemd-networkd got a DHCP lease in the network's subnet from hypyr's DHCP server;
the root filesystem is /dev/vda mounted read-write; `hypyr shutdown -w` (the ACPI power button)
powers systemd off cleanly.

The image is built on the host beforehand by `make system-image` (mmdebstrap: it downloads
~150 MB and needs root), which `make test-lab` does; it then sets HYPYR_LAB_SYSTEM=1, which this
test needs (run by hand without it, it is skipped; with it and no image, it fails).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_net import console_log, lan, wait_console  # noqa: F401 (lan is a fixture)
from test_toolstack import wait_for, xl  # noqa: F401 (xl is a fixture)

PASSWORD = "hypyr"       # what `make system-image` gives --root-password
HOSTNAME = "hypyr"


def system_image() -> Path:
    return Path(os.environ.get("HYPYR_SYSTEM_IMAGE")
                or Path.home() / ".cache" / "hypyr" / "system" / "system.img")


@pytest.fixture
def system_disk(guest_image, tmp_path) -> Path:
    """A private, writable copy of the system image (sparse: ~400 MB of its 1 GB are data)."""
    img = system_image()
    if os.environ.get("HYPYR_LAB_SYSTEM") != "1":
        pytest.skip("runs when asked (HYPYR_LAB_SYSTEM=1, as `make test-lab` does after `make system-image`)")
    assert img.is_file(), (f"no system image at {img}: build it on the host with `make system-image` "
                           "(needs root and mmdebstrap, downloads ~150 MB)")
    copy = tmp_path / "system.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(copy)], check=True)
    return copy


def journal_of(disk: Path, out: Path) -> tuple[str, str]:
    """The guest's persistent journal, read from its disk image without mounting it (debugfs,
    read-only): (journalctl --header, the messages)."""
    out.mkdir()
    r = subprocess.run(["debugfs", "-c", "-R", f"rdump /var/log/journal {out}", str(disk)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    journal = out / "journal"
    header = subprocess.run(["journalctl", "-D", str(journal), "--header"], capture_output=True, text=True)
    messages = subprocess.run(["journalctl", "-D", str(journal), "-o", "cat", "--no-pager"],
                              capture_output=True, text=True)
    return header.stdout + header.stderr, messages.stdout


class Console:
    """`hypyr console NAME` with its input from this test (what a person types); the output is
    read from the domain's console.log, which holds everything the guest printed."""

    def __init__(self, name: str):
        self.p = subprocess.Popen([sys.executable, "-m", "hypyr", "console", name], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def type(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
        self.p.wait(timeout=30)


def login_prompt(xl) -> str:  # noqa: F811
    """The console once it shows the login prompt ('' before); fails at once if the domain is gone."""
    if "sys" not in {d["name"] for d in json.loads(xl("list", "--json").stdout)}:
        raise AssertionError("the domain went away before its login prompt")
    t = console_log(xl, "sys")
    return t if "login:" in t else ""


def after(log: str, start: int, marker: str) -> bool:
    return marker in log[start:]


def test_system_image_boots_logs_in_gets_dhcp_and_powers_off(xl, lan, system_disk, tmp_path):  # noqa: F811
    lan("sys0", "10.86.0.1/24", "--dhcp")
    cfg = tmp_path / "sys.cfg"
    cfg.write_text(f"""name = "sys"
memory = 512
vcpus = 2
bootloader = "pygrub"
disk = [ '{system_disk},raw,xvda,rw' ]
vif = [ 'bridge=sys0' ]
""")
    t0 = time.monotonic()
    xl("create", str(cfg))
    try:   # the prompt ends with no newline, so no wait_console here
        log = wait_for(lambda: login_prompt(xl), timeout=600, what="the login prompt on the serial console")
    except AssertionError as e:
        kept = xl.state / "logs" / "sys.console.log"
        text = console_log(xl, "sys") or (kept.read_text(errors="replace") if kept.exists() else "")
        raise AssertionError(f"{e}; the console ends with:\n{text[-3000:]}") from None
    booted = time.monotonic() - t0
    print(f"login prompt after {booted:.1f} s")
    assert "Linux version" in log                         # the image's own kernel ran
    assert f"{HOSTNAME} login:" in log                    # agetty on ttyS0, the image's host name
    con = Console("sys")
    try:
        start = len(log)
        con.type("root\r")      # Enter on a terminal sends CR
        wait_for(lambda: after(console_log(xl, "sys"), start, "Password:"), timeout=60, what="the password prompt")
        start = len(console_log(xl, "sys"))
        con.type(PASSWORD + "\r")
        wait_for(lambda: after(console_log(xl, "sys"), start, f"root@{HOSTNAME}:"), timeout=120,
                 what="a root shell after logging in")
        # the guest waits (at most 120 s) for boot to finish and for a DHCP address; the echoed
        # command line does not match the RESULT pattern (it reads "RES""ULT")
        con.type("s=$(timeout 120 systemctl is-system-running --wait); "
                 "for i in $(seq 120); do a=$(ip -4 -o addr show scope global | awk '{print $4}' | head -n1); "
                 "[ -n \"$a\" ] && break; sleep 1; done; "
                 "echo \"RES\"\"ULT state=$s addr=$a root=$(findmnt -no SOURCE /) opts=$(findmnt -no OPTIONS /) "
                 "failed=$(systemctl --failed --no-legend --plain | awk '{print $1}' | paste -sd, -)\"\r")
        text = wait_console(xl, "sys", "RESULT state=", timeout=300)
        m = re.search(r"RESULT state=(\S*) addr=(\S*) root=(\S*) opts=(\S*) failed=(\S*)", text)
        assert m, text[-3000:]
        state, addr, root_dev, root_opts, failed = m.groups()
        print(f"state {state}, address {addr}, root {root_dev} {root_opts}, failed units [{failed}]")
        assert root_dev == "/dev/vda" and root_opts.startswith("rw"), m.group(0)
        assert re.fullmatch(r"10\.86\.0\.\d+/24", addr) and not addr.startswith("10.86.0.1/"), m.group(0)
        assert state == "running" and failed == "", m.group(0)
    finally:
        con.close()
    # `hypyr shutdown -w`: the ACPI power button, which systemd-logind takes as "power off";
    # systemd stops every unit, the kernel powers down, the domain goes away
    xl("shutdown", "-w", "sys", timeout=240)
    assert "sys" not in {d["name"] for d in json.loads(xl("list", "--json").stdout)}
    text = (xl.state / "logs" / "sys.console.log").read_text(errors="replace")
    assert "reboot: Power down" in text, text[-3000:]
    # the guest's own record: logind took the power key, and journald closed its files cleanly
    # (a journal left ONLINE means it was cut off, as by a crash or a hard power-off)
    header, messages = journal_of(system_disk, tmp_path / "journal")
    assert "Power key pressed" in messages and "System is powering down" in messages, messages[-3000:]
    states = re.findall(r"^State: (\w+)", header, re.M)
    assert states and set(states) == {"OFFLINE"}, header
