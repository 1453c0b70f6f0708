"""Domains with real guests: xl-style create/list/console/pause/shutdown/reboot/destroy, the
on_* actions, a killed domain process, and credit-scheduler weights and caps."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_virtio import make_disk  # tests/lab is on sys.path (pytest rootdir-less import)

from hypyr.lab.rerun import raise_if_faulted
from hypyr.lab.testguard import run_bounded
from hypyr.toolstack import paths
from hypyr.toolstack.errors import DomainNotFound
from hypyr.toolstack.registry import Registry


@pytest.fixture
def xl(guest_image, tmp_path, monkeypatch):
    """Run `hypyr ARGS` with a private state directory; destroys leftover domains afterwards."""
    state = tmp_path / "state"
    monkeypatch.setenv("HYPYR_STATE_DIR", str(state))

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        p = run_bounded([sys.executable, "-m", "hypyr", *args], timeout, text=True)
        print(f"$ hypyr {' '.join(args)} -> {p.returncode}\n{p.stdout}{p.stderr}")
        if check:
            assert p.returncode == 0, p.stderr
        return p
    run.state = state
    yield run
    p = run("list", "--json", check=False)
    if p.returncode == 0:
        for d in json.loads(p.stdout):
            run("destroy", d["name"], check=False)
    # Shown only when the test failed: how each domain that went away ended (its VMM's own log).
    for log in sorted((state / "logs").glob("*.vmm.log")):
        lines = log.read_text(errors="replace").splitlines()
        print(f"--- {log.name} (last 30 of {len(lines)} lines)\n" + "\n".join(lines[-30:]))


# Guest kernel options with which `hypyr trigger NAME nmi` makes a guest print where it is: the NMI
# panics it, and without pvpanic (which would stop the VM first: printk defers output from NMI
# context until after the panic notifiers) it prints its backtrace, then stays.
SHOW_WHERE_ON_NMI = "unknown_nmi_panic module_blacklist=pvpanic_mmio"


def write_cfg(tmp_path: Path, image, name: str, *, memory=128, vcpus=1, command=None, disks=(), extra_keys="",
              options="") -> Path:
    """An xl.cfg for the image's kernel; ``command`` runs as the guest's init (hypyr.exec=),
    ``options`` go on its kernel command line."""
    extra = options
    if command is not None:
        extra += " hypyr.exec=" + base64.b64encode(command.encode()).decode()
    disk_list = ", ".join(f"'{d},raw,xvd{chr(ord('a') + i)},rw'" for i, d in enumerate(disks))
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f"""# hypyr domain {name}
name = "{name}"
type = "pvh"
memory = {memory}
vcpus = {vcpus}
kernel = "{image.kernel}"
ramdisk = "{image.initrd}"
extra = "{extra.strip()}"
disk = [ {disk_list} ]
{extra_keys}
""")
    return cfg


def console_log(xl, name: str) -> str:
    """The console log of domain ``name`` ('' while it has none, or there is no such domain).
    Its id comes from the registry, read in this process: a `hypyr list` per look would take
    seconds of L1's CPU from the guests under test at every poll."""
    try:
        with Registry(paths.registry_path(xl.state)) as reg:
            domid = reg.get(name).domid
    except DomainNotFound:
        return ""
    path = xl.state / "domains" / str(domid) / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


FAULT_CHECK_S = 5


def wait_for(pred, timeout=240, step=0.5, what="condition"):
    """``pred()``'s first true value within ``timeout``; fails at once (every FAULT_CHECK_S) if one
    of the test's guests faulted (hypyr.lab.rerun.raise_if_faulted): a dead guest prints nothing more."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + FAULT_CHECK_S
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if time.monotonic() >= next_check:
            raise_if_faulted()
            next_check = time.monotonic() + FAULT_CHECK_S
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


TICKER = "echo ready-$(hostname); i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"


def ticks(text: str) -> int:
    """The highest TICKER count among the console's whole lines: the log is read while the guest
    writes it, so its last line can be cut short ("tick-"), and a kernel message can split one."""
    return max(map(int, re.findall(r"^tick-(\d+)\r*\n", text, re.MULTILINE)), default=0)


def test_three_domains_run_at_once_and_destroy_is_isolated(xl, guest_image, tmp_path):
    disks = [make_disk(tmp_path / f"d{i}.img", files={"id": f"disk-of-vm{i}\n"}, tmp=tmp_path) for i in range(3)]
    for i, (mem, vcpus) in enumerate([(128, 1), (192, 2), (160, 1)]):
        cmd = f"mount /dev/vda /mnt && cat /mnt/id; echo vcpus=$(nproc); {TICKER}"
        xl("create", str(write_cfg(tmp_path, guest_image, f"vm{i}", memory=mem, vcpus=vcpus,
                                   command=cmd, disks=[disks[i]])))
    listing = xl("list").stdout
    for i in range(3):
        assert f"vm{i}" in listing
    for i, n in enumerate((1, 2, 1)):
        log = wait_for(lambda: (t := console_log(xl, f"vm{i}")) and "tick-" in t and t,  # noqa: B023 (called at once)
                       what=f"vm{i} to boot")
        assert f"disk-of-vm{i}" in log and f"vcpus={n}" in log
    doms = json.loads(xl("list", "--json").stdout)
    assert {d["name"]: (d["memory"], d["vcpus"]) for d in doms} == {"vm0": (128, 1), "vm1": (192, 2), "vm2": (160, 1)}
    # each VMM is jailed (the default): its own uid, and it cannot see the others' disks
    assert len({d["jail_uid"] for d in doms}) == 3 and None not in {d["jail_uid"] for d in doms}
    jail = json.loads(xl("info", "vm0", "--json").stdout)["jail"]
    assert jail["uid"] == doms[0]["jail_uid"] and str(disks[1]) not in " ".join(jail["read_only"] + jail["writable"])
    xl("destroy", "vm1")
    names = [d["name"] for d in json.loads(xl("list", "--json").stdout)]
    assert names == ["vm0", "vm2"]
    before = {n: ticks(console_log(xl, n)) for n in names}
    time.sleep(3)
    assert all(ticks(console_log(xl, n)) > before[n] for n in names)  # the others kept running


def test_pause_stops_guest_progress_and_unpause_resumes(xl, guest_image, tmp_path):
    xl("create", str(write_cfg(tmp_path, guest_image, "pz", command=TICKER)))
    wait_for(lambda: ticks(console_log(xl, "pz")) > 2, what="ticks")
    xl("pause", "pz")
    assert "p" in json.loads(xl("list", "--json", "pz").stdout)[0]["state"]
    a = ticks(console_log(xl, "pz"))
    time.sleep(3)
    b = ticks(console_log(xl, "pz"))
    assert b <= a + 1  # at most one line that was in flight
    xl("unpause", "pz")
    wait_for(lambda: ticks(console_log(xl, "pz")) > b + 2, timeout=60, what="ticks after unpause")


def test_shutdown_wait_returns_after_guest_powered_off(xl, guest_image, tmp_path):
    xl("create", str(write_cfg(tmp_path, guest_image, "sd", command=TICKER)))
    wait_for(lambda: ticks(console_log(xl, "sd")) > 1, what="boot")
    xl("shutdown", "-w", "sd", timeout=200)
    assert json.loads(xl("list", "--json").stdout) == []
    kept = xl.state / "logs" / "sd.console.log"  # a finished domain's console log is kept here
    # the ACPI power button (GED -> PNP0C0C -> the init's watcher), not the Ctrl-Alt-Del fallback
    assert "power button pressed, powering off" in kept.read_text(errors="replace")


def test_on_reboot_restart_keeps_id_and_name(xl, guest_image, tmp_path):
    disk = make_disk(tmp_path / "flag.img")
    cmd = ("mount /dev/vda /mnt; if [ -e /mnt/booted ]; then echo second-boot; " + TICKER +
           "; else touch /mnt/booted; umount /mnt; echo first-boot; reboot -f; fi")
    xl("create", str(write_cfg(tmp_path, guest_image, "rb", command=cmd, disks=[disk],
                               extra_keys="on_reboot = 'restart'")))
    first = json.loads(xl("list", "--json", "rb").stdout)[0]
    wait_for(lambda: "second-boot" in console_log(xl, "rb"), what="the second boot")
    again = json.loads(xl("list", "--json", "rb").stdout)[0]
    assert (again["domid"], again["name"]) == (first["domid"], "rb")
    assert "first-boot" in console_log(xl, "rb")


def test_on_crash_preserve_keeps_domain_listed_as_crashed(xl, guest_image, tmp_path):
    xl("create", str(write_cfg(tmp_path, guest_image, "cr", command="sleep 1; echo c > /proc/sysrq-trigger",
                               extra_keys="on_crash = 'preserve'")))
    wait_for(lambda: (d := json.loads(xl("list", "--json").stdout)) and d[0]["state"].find("c") >= 0,
             what="the crashed state")
    xl("destroy", "cr")
    assert json.loads(xl("list", "--json").stdout) == []


def test_trigger_nmi_makes_the_guest_show_where_it_is(xl, guest_image, tmp_path):
    """`hypyr trigger NAME nmi` (as xl trigger) reaches the guest kernel: booted with
    SHOW_WHERE_ON_NMI, it panics and prints its registers and backtrace (what the lab tests show
    of a guest that stopped making progress), then reboots (hypyr's panic=-1)."""
    xl("create", str(write_cfg(tmp_path, guest_image, "nm", command=TICKER, options=SHOW_WHERE_ON_NMI)))
    wait_for(lambda: ticks(console_log(xl, "nm")) > 1, what="boot")
    bad = xl("trigger", "nm", "nmi", "3", check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "hypyr: error: vCPU 3 does not exist (this domain has 1)"
    xl("trigger", "nm", "nmi")
    text = wait_for(lambda: (t := console_log(xl, "nm")) and "Kernel Offset:" in t and t, timeout=120,
                    what="the guest's panic")
    assert "Kernel panic - not syncing: NMI: Not continuing" in text and "Call Trace:" in text
    assert re.search(r"RIP: 00(10|33):\S+", text), text[-3000:]   # the kernel's or a user program's
    wait_for(lambda: console_log(xl, "nm").count("ready-") == 2, what="the reboot after the panic")


def test_killed_domain_process_is_never_listed_running(xl, guest_image, tmp_path):
    cfg = write_cfg(tmp_path, guest_image, "k9", command=TICKER)
    xl("create", str(cfg))
    rec = json.loads(xl("list", "--json", "k9").stdout)[0]
    rows = json.loads(xl("vcpu-list", "k9", "--json").stdout)
    tid = rows[0]["tid"]
    pid = int(Path(f"/proc/{tid}/status").read_text().split("Tgid:")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    states = [d["state"] for d in json.loads(xl("list", "--json").stdout) if d["name"] == "k9"]
    assert all("r" not in s and "b" not in s for s in states)
    xl("create", str(cfg))  # the name is free again
    assert [d["name"] for d in json.loads(xl("list", "--json").stdout)] == ["k9"]
    assert rec["name"] == "k9"


def test_bad_input_is_one_sentence(xl, guest_image, tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nmemory = "lots"\nkernel = "/nonexistent"\n')
    p = xl("create", str(bad), check=False)
    assert p.returncode != 0 and "bad.cfg:2" in p.stderr and "Traceback" not in p.stderr
    p = xl("create", str(write_cfg(tmp_path, guest_image, "huge", memory=10_000_000)), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    nok = write_cfg(tmp_path, guest_image, "nokernel")
    nok.write_text(nok.read_text().replace(str(guest_image.kernel), "/nonexistent/vmlinuz"))
    p = xl("create", str(nok), check=False)
    assert p.returncode != 0 and "/nonexistent/vmlinuz" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(xl("list", "--json").stdout) == []  # nothing left half-created
    p = xl("pause", "no-such-domain", check=False)
    assert p.returncode != 0 and "no-such-domain" in p.stderr
    cfg = write_cfg(tmp_path, guest_image, "dup", command=TICKER)
    xl("create", str(cfg))
    p = xl("create", str(cfg), check=False)
    assert p.returncode != 0 and "already exists" in p.stderr
    assert [d["name"] for d in json.loads(xl("list", "--json").stdout)] == ["dup"]


def vcpu_threads(xl, name: str) -> list[int]:
    return [r["tid"] for r in json.loads(xl("vcpu-list", name, "--json").stdout)]


def cpu_seconds(tids: list[int]) -> float:
    """utime + stime of these threads, read directly (no command in between to blur the window)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in tids:
        fields = Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


BUSY = "echo busy-start; while true; do :; done"


def test_weights_share_a_contended_cpu_about_2_to_1(xl, guest_image, tmp_path):
    for name, weight in (("heavy", 512), ("light", 256)):
        xl("create", str(write_cfg(tmp_path, guest_image, name, command=BUSY,
                                   extra_keys=f"cpus = '0'\ncpu_weight = {weight}")))
    for name in ("heavy", "light"):
        wait_for(lambda: "busy-start" in console_log(xl, name), what=f"{name} to start spinning")  # noqa: B023

    assert "512" in xl("sched-credit", "-d", "heavy").stdout
    tids = {n: vcpu_threads(xl, n) for n in ("heavy", "light")}
    a = {n: cpu_seconds(t) for n, t in tids.items()}
    time.sleep(20)
    b = {n: cpu_seconds(t) for n, t in tids.items()}
    used = {n: b[n] - a[n] for n in a}
    ratio = used["heavy"] / max(used["light"], 1e-6)
    print(f"CPU seconds over 20 s: heavy {used['heavy']:.2f}, light {used['light']:.2f}, ratio {ratio:.2f}")
    assert 1.5 <= ratio <= 2.6


def test_cap_holds_a_busy_domain_near_25_percent(xl, guest_image, tmp_path):
    xl("create", str(write_cfg(tmp_path, guest_image, "capped", command=BUSY, extra_keys="cap = 25")))
    wait_for(lambda: "busy-start" in console_log(xl, "capped"), what="the guest to start spinning")
    tids = vcpu_threads(xl, "capped")
    t0, a = time.monotonic(), cpu_seconds(tids)
    time.sleep(20)
    t1, b = time.monotonic(), cpu_seconds(tids)
    pct = (b - a) / (t1 - t0) * 100
    print(f"capped domain used {pct:.1f}% of a CPU")
    assert 15 <= pct <= 35
    xl("sched-credit", "-d", "capped", "-c", "50")
    assert xl("sched-credit", "-d", "capped").stdout.split()[-1] == "50"


def test_bootloader_pygrub_boots_the_disks_own_entry(xl, guest_image, tmp_path):
    """xl.cfg `bootloader = "pygrub"` with `bootloader_args = ["--entry=..."]`: the domain boots
    the named entry of its first disk's grub.cfg (no kernel= in the cfg); `extra` is appended."""
    from test_boot import _bare_boot_disk
    img = _bare_boot_disk(tmp_path, guest_image, "d4")
    command = "grep -o 'hypyr.marker=[^ ]*' /proc/cmdline; " + TICKER
    cfg = tmp_path / "pg.cfg"
    cfg.write_text(f"""name = "pg"
memory = 128
bootloader = "pygrub"
bootloader_args = [ "--entry=Second guest" ]
disk = [ '{img},raw,xvda,ro' ]
extra = "hypyr.exec={base64.b64encode(command.encode()).decode()}"
""")
    xl("create", str(cfg))
    wait_for(lambda: ticks(console_log(xl, "pg")) > 1, what="boot")
    assert "hypyr.marker=second-entry-d4" in console_log(xl, "pg")
    domdir = xl.state / "domains" / str(json.loads(xl("list", "--json", "pg").stdout)[0]["domid"])
    assert len(list(domdir.glob("hypyr-boot-*/kernel"))) == 1   # kept for reboots, private to the domain
    xl("destroy", "pg")
    assert json.loads(xl("list", "--json").stdout) == []
    assert not list(domdir.glob("hypyr-boot-*"))
