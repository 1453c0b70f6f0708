"""seccomp confinement of real VMMs on this host's KVM (issue #13, docs/confinement.md).

A domain boots a tiny ELF "kernel" (``cli; hlt``: it idles in KVM, costing no host CPU), every
thread of its process must run under a filter, and a syscall outside a thread's list (made
through the test-only hook, HYPYR_TEST_HOOKS=1) must kill the VMM, the domain then being
reported crashed.  ``hypyr run --seccomp kill`` of a payload that writes an exit status must
still work end to end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bootkernels import IDLE, TINY_LOAD, tiny_elf

from hypyr.toolstack import api, paths, sched, transfer
from hypyr.toolstack.domrecord import DomainState, is_alive
from hypyr.toolstack.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
# mov dx, 0x3f8; "Hi\n" to the UART (out dx, al); mov al, 42; out 0xf4, al; 1: hlt; jmp 1b
EXIT_42 = bytes.fromhex("66 ba f8 03 b0 48 ee b0 69 ee b0 0a ee b0 2a e6 f4 f4 eb fd")



@pytest.fixture
def toolstack(tmp_path, monkeypatch):
    """A private state directory and fake cgroup root; the test hooks on; the domains destroyed after."""
    monkeypatch.setenv("HYPYR_STATE_DIR", str(tmp_path / "state"))
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu\n")
    (root / "cgroup.subtree_control").write_text("\n")
    monkeypatch.setenv(sched.ENV_ROOT, str(root))
    monkeypatch.setenv("HYPYR_TEST_HOOKS", "1")
    kernel = tmp_path / "idle.elf"
    kernel.write_bytes(tiny_elf(IDLE))
    yield tmp_path, kernel
    with Registry() as reg:
        names = [r.name for r in reg.list()]
    for name in names:
        try:
            api.destroy(name)
        except Exception:  # noqa: BLE001 - best effort
            pass


def _create(tmp_path: Path, kernel: Path, name: str, mode: str = "kill"):
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\nmemory = 32\nkernel = "{kernel}"\non_crash = "preserve"\n'
                   f'seccomp = "{mode}"\n')
    return api.create(cfg)


def _thread_filters(pid: int) -> dict[str, int]:
    """Each thread's name and Seccomp mode (2: a filter) in /proc."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        mode = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Seccomp:"))
        out[f"{comm}/{tid}"] = mode
    return out


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _hook(rec, kind: str) -> dict | None:
    """Fire the test hook; the answer, or None when the connection ended without one."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(rec.socket)
    try:
        s.sendall(json.dumps({"op": "test-forbidden-syscall", "kind": kind}).encode() + b"\n")
        data = s.makefile("rb").readline()
    except OSError:
        return None
    finally:
        s.close()
    return json.loads(data) if data else None


def _state(name: str) -> DomainState:
    with Registry() as reg:
        return next(r.state for r in reg.list() if r.name == name)


def test_every_thread_of_a_domain_is_filtered_and_list_shows_the_mode(toolstack):
    tmp_path, kernel = toolstack
    rec = _create(tmp_path, kernel, "sc-all")
    assert _wait(lambda: len(_thread_filters(rec.pid)) >= 4 and set(_thread_filters(rec.pid).values()) == {2}), \
        _thread_filters(rec.pid)
    [info] = api.list_domains(["sc-all"])
    assert info.seccomp == "kill" and info.status == DomainState.RUNNING
    vmm = api.vmm_info("sc-all")           # `hypyr info`: the kernel's view of the filters too
    assert vmm["seccomp"] == "kill" and vmm["seccomp_filtered"][0] == vmm["seccomp_filtered"][1] >= 4
    text = subprocess.run([sys.executable, "-m", "hypyr", "info", "sc-all"], capture_output=True, text=True,
                          timeout=60).stdout
    assert f"VMM pid {rec.pid}, seccomp kill (a filter on " in text, text
    rng = vmm["virtio"]["virtio0"]  # `hypyr info --queues`: the entropy device, its driver not up
    assert rng["device"] == "rng" and rng["status"] == 0 and not rng["queues"][0]["ready"], rng
    text = subprocess.run([sys.executable, "-m", "hypyr", "info", "sc-all", "--queues"], capture_output=True,
                          text=True, timeout=60).stdout
    assert text.startswith("virtio0 rng: status 0x0") and "queue 0: size " in text, text
    # the domain works under its filters: pause, unpause, save -c, and a reboot, where the
    # confined main thread builds the VM again (its new threads stack their filters on main's)
    api.pause("sc-all")
    assert _state("sc-all") is DomainState.PAUSED
    api.unpause("sc-all")
    assert _state("sc-all") is DomainState.RUNNING
    transfer.save("sc-all", str(tmp_path / "sc-all.save"), keep_running=True)
    old = set(_thread_filters(rec.pid))
    api.reboot("sc-all")
    assert _wait(lambda: len(set(_thread_filters(rec.pid)) - old) >= 2), "no new vCPU and I/O threads"
    assert set(_thread_filters(rec.pid).values()) == {2}
    assert _state("sc-all") is DomainState.RUNNING and is_alive(rec)
    api.destroy("sc-all")
    assert not is_alive(rec)


@pytest.mark.parametrize("kind", ["vcpu", "io", "control", "main"])
def test_a_forbidden_syscall_kills_the_vmm_and_the_domain_is_crashed(toolstack, kind):
    tmp_path, kernel = toolstack
    name = f"sc-{kind}"
    rec = _create(tmp_path, kernel, name)
    assert _hook(rec, kind) in (None, {"ok": True, "kind": kind})
    assert _wait(lambda: not is_alive(rec)), "the VMM survived a forbidden syscall"
    assert _wait(lambda: _state(name) is DomainState.CRASHED), _state(name)


def test_a_guest_that_triple_faults_is_crashed_and_its_registers_are_logged(toolstack):
    """Not seccomp's doing, but the same report: the domain is crashed, and its vmm.log keeps the
    faulting vCPU's register dump on one line (the lab's CI log quotes it when a guest crashes)."""
    tmp_path, _ = toolstack
    kernel = tmp_path / "ud2.elf"
    kernel.write_bytes(tiny_elf(bytes.fromhex("0f 0b")))   # ud2 with no IDT: a triple fault
    rec = _create(tmp_path, kernel, "tf")
    assert _wait(lambda: _state("tf") is DomainState.CRASHED), _state("tf")
    log = paths.vmm_log(rec.domid).read_text()
    line = next(x for x in log.splitlines() if "registers of vCPU 0:" in x)
    assert "rip=" in line and " | cr0=" in line and "efer=" in line, line
    assert "the guest triple-faulted (KVM_EXIT_SHUTDOWN)" in log


def test_trigger_nmi_reaches_the_guest_and_bad_triggers_get_one_sentence(toolstack):
    """`hypyr trigger DOMAIN nmi` (as xl trigger): the idle guest (``cli; hlt``, no IDT) cannot
    mask an NMI and has no handler for it, so it triple-faults and the domain is crashed."""
    tmp_path, kernel = toolstack
    rec = _create(tmp_path, kernel, "nmi")

    def hypyr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hypyr", *args], capture_output=True, text=True, timeout=60)
    for args, sentence in ((("reset",), "trigger takes one of nmi, not 'reset'"),
                           (("nmi", "1"), "vCPU 1 does not exist (this domain has 1)")):
        p = hypyr("trigger", "nmi", *args)
        assert p.returncode != 0 and sentence in p.stderr and len(p.stderr.strip().splitlines()) == 1, p
    assert _state("nmi") is DomainState.RUNNING
    regs = hypyr("info", "nmi", "--registers")     # as xenctx: the idle guest sits on its hlt
    assert regs.returncode == 0 and regs.stdout.startswith("vCPU 0:\n"), regs
    rip = int(re.search(r"rip=([0-9a-f]{16})", regs.stdout).group(1), 16)
    assert TINY_LOAD <= rip <= TINY_LOAD + len(IDLE), regs.stdout
    assert "nmi: injected=0 pending=0 masked=0" in regs.stdout, regs.stdout
    assert _state("nmi") is DomainState.RUNNING
    p = hypyr("trigger", "nmi", "nmi")
    assert p.returncode == 0, p
    assert _wait(lambda: _state("nmi") is DomainState.CRASHED), _state("nmi")
    log = paths.vmm_log(rec.domid).read_text()
    assert "vCPU 0: NMI injected" in log and "the guest triple-faulted (KVM_EXIT_SHUTDOWN)" in log


def test_log_mode_lets_the_syscall_through(toolstack):
    tmp_path, kernel = toolstack
    rec = _create(tmp_path, kernel, "sc-log", mode="log")
    assert _hook(rec, "control") == {"ok": True, "kind": "control"}
    assert is_alive(rec) and _state("sc-log") is DomainState.RUNNING
    [info] = api.list_domains(["sc-log"])
    assert info.seccomp == "log"


def test_without_the_env_var_the_hook_does_not_exist(toolstack, monkeypatch):
    tmp_path, kernel = toolstack
    monkeypatch.delenv("HYPYR_TEST_HOOKS")
    rec = _create(tmp_path, kernel, "sc-nohook")
    reply = _hook(rec, "control")
    assert reply is not None and reply["ok"] is False and reply["type"] == "InvalidInput"
    assert is_alive(rec)


@pytest.mark.parametrize("mode", ["kill", "off"])
def test_hypyr_run_with_seccomp(tmp_path, mode):
    kernel = tmp_path / "exit42.elf"
    kernel.write_bytes(tiny_elf(EXIT_42))
    p = subprocess.run([sys.executable, "-m", "hypyr", "run", "--kernel", str(kernel), "--memory", "32M",
                        "--no-input", "--seccomp", mode], cwd=ROOT, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=120)
    assert p.returncode == 42, p.stderr.decode()
    assert b"Hi" in p.stdout and b"Traceback" not in p.stderr


def _migrate_here(tmp: Path) -> None:
    """Run by test_live_migration_under_the_filters in a private network namespace: a domain
    migrates to a `migrate-receive` on this namespace's loopback, both VMMs confined."""
    import threading
    k = tmp / "idle.elf"
    k.write_bytes(tiny_elf(IDLE))
    cfg = tmp / "m.cfg"
    cfg.write_text(f'name = "m"\nmemory = 32\nkernel = "{k}"\nseccomp = "kill"\n')
    src = api.create(cfg)
    got: dict = {}
    listening = threading.Event()

    def receive():
        try:
            got["r"] = transfer.migrate_receive("127.0.0.1", 8002, on_listening=lambda a: listening.set())
        finally:
            listening.set()
    t = threading.Thread(target=receive)
    t.start()
    assert listening.wait(20)
    transfer.migrate("m", "127.0.0.1", 8002)
    t.join(30)
    assert got["r"].renamed and not is_alive(src)
    [d] = api.list_domains()
    assert d.status == DomainState.RUNNING and d.seccomp == "kill"
    api.pause("m")
    api.unpause("m")
    api.destroy("m")


def test_live_migration_under_the_filters(toolstack):
    """The source's control thread connects and sends (socket, connect, the dirty log), the
    destination's control thread renames; in a network namespace of its own (unshare -n)."""
    tmp_path, _ = toolstack
    if os.geteuid() != 0 or not any(os.access(os.path.join(d, "unshare"), os.X_OK)
                                     for d in os.environ.get("PATH", "").split(":")):
        pytest.skip("needs root and unshare(1) for a private network namespace")
    p = subprocess.run(["unshare", "-n", "sh", "-c", f'ip link set lo up 2>/dev/null || true; '
                        f'exec "{sys.executable}" "{__file__}" migrate "{tmp_path / "mig"}"'],
                       cwd=ROOT, capture_output=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(  # this file as a script: its helpers
                           x for x in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if x)})
    assert p.returncode == 0, (p.stdout + p.stderr).decode()[-3000:]


if __name__ == "__main__" and sys.argv[1:2] == ["migrate"]:
    where = Path(sys.argv[2])
    where.mkdir(parents=True)
    _migrate_here(where)
