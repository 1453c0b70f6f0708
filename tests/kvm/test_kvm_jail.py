"""The jail of a domain's VMM on this host's KVM (issue #13, docs/confinement.md).

A domain boots the idle ELF payload of test_kvm_seccomp.  Its VMM must run as its own uid and
gid with no capabilities and no_new_privs, under a supervisor that stays root; from inside, the
test hook (HYPYR_TEST_HOOKS=1) finds that files outside the jail cannot be opened while the
domain's own log can; save, restore and reboot keep working; `jail = "off"` runs it unconfined.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from test_kvm_seccomp import _wait, toolstack  # noqa: F401 - the fixture

import hypyr
from hypyr import memory
from hypyr.toolstack import api, jail, paths, transfer
from hypyr.toolstack.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a jail needs root")


def _create(tmp_path: Path, kernel: Path, name: str, extra: str = ""):
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\nmemory = 32\nkernel = "{kernel}"\n{extra}')
    return api.create(cfg)


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _hook(rec, **req) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(rec.socket)
    try:
        s.sendall(json.dumps(req).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())
    finally:
        s.close()


def test_the_vmm_runs_as_its_own_user_without_capabilities(toolstack):  # noqa: F811
    tmp_path, kernel = toolstack
    rec = _create(tmp_path, kernel, "jailed")
    uid = jail.uid_base() + rec.domid
    st = _status(rec.pid)
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert st["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == 0, (caps, st[caps])
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    # RLIMIT_AS leaves room for guest RAM's address-space reservation (its guard: the fast I/O path)
    assert int(st["VmSize"].split()[0]) << 10 >= memory.address_space(32 << 20, regions=1) - (32 << 20)
    supervisor = int(st["PPid"])
    assert _status(supervisor)["Uid"].split()[0] == "0"        # the supervisor keeps root
    # its own mount namespace
    assert os.readlink(f"/proc/{rec.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    [info] = api.list_domains(["jailed"])
    assert info.jail_uid == uid
    vmm = api.vmm_info("jailed")
    assert vmm["jail"]["uid"] == uid and vmm["jail"]["capabilities"] == "none"
    for log in (paths.console_log(rec.domid), paths.vmm_log(rec.domid)):   # private, like every state file
        assert log.stat().st_mode & 0o077 == 0, (log, oct(log.stat().st_mode))


def test_the_vmm_cannot_open_files_outside_its_jail(toolstack):  # noqa: F811
    tmp_path, kernel = toolstack
    secret = tmp_path / "secret"
    secret.write_text("not for guests\n")
    secret.chmod(0o644)
    rec = _create(tmp_path, kernel, "walled")
    state = paths.state_dir()
    for path in (str(secret), str(kernel), str(state / "domains.sqlite"), "/etc/shadow", "/etc/passwd",
                 "/proc/self/status", "/dev/sda", "/dev/net/tun",
                 str(Path(hypyr.__file__).parent.parent / "pyproject.toml")):   # the checkout beside the package
        r = _hook(rec, op="test-open", path=path)
        assert r["ok"] and not r["opened"], (path, r)
    # what it does need is there, read-only where it should be
    own_log = str(paths.domain_dir(rec.domid) / "console.log")
    assert _hook(rec, op="test-open", path=own_log, write=True)["opened"]
    assert _hook(rec, op="test-open", path="/dev/kvm", write=True)["opened"]
    r = _hook(rec, op="test-open", path="/etc/hosts", write=True)
    assert not r["opened"] and r["errno"] in ("EROFS", "EACCES")


def test_a_jailed_domain_saves_restores_and_reboots(toolstack):  # noqa: F811
    tmp_path, kernel = toolstack
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    disk.chmod(0o600)                   # root's alone: the supervisor opens it for the VMM
    rec = _create(tmp_path, kernel, "moving", f'disk = ["{disk},raw,xvda,rw"]\n')
    save = tmp_path / "moving.save"
    transfer.save("moving", str(save))
    assert save.stat().st_uid == 0 and save.stat().st_size > 0
    restored = transfer.restore(str(save))
    assert restored.name == "moving"
    with Registry() as reg:
        rec = reg.get("moving")
    old = rec.pid
    api.reboot("moving")
    assert _wait(lambda: _hook(rec, op="info")["state"] == "running")
    assert rec.pid == old and int(_status(rec.pid)["Uid"].split()[0]) == jail.uid_base() + rec.domid


def test_jail_off_runs_the_vmm_unconfined(toolstack):  # noqa: F811
    tmp_path, kernel = toolstack
    rec = _create(tmp_path, kernel, "free", 'jail = "off"\n')
    assert _status(rec.pid)["Uid"].split()[0] == "0"
    [info] = api.list_domains(["free"])
    assert info.jail_uid is None and api.vmm_info("free")["jail"] is None


def test_a_jailed_vmm_rotates_its_console_log(toolstack, monkeypatch):  # noqa: F811
    """The guest prints without end; the jailed VMM (its own uid) rotates console.log in the
    domain's directory as an unjailed one does, and goes on running."""
    from bootkernels import tiny_elf
    tmp_path, _ = toolstack
    monkeypatch.setenv("HYPYR_LOG_MAX_BYTES", "4096")
    kernel = tmp_path / "chatty.elf"
    # mov dx, 0x3f8; 1: mov al, "x"; out dx, al; jmp 1b
    kernel.write_bytes(tiny_elf(bytes.fromhex("66 ba f8 03 b0 78 ee eb fb")))
    rec = _create(tmp_path, kernel, "chatty")
    log = paths.console_log(rec.domid)
    old = paths.rotated_log(log)
    assert _wait(lambda: old.exists() and old.stat().st_size >= 4096), "console.log was never rotated"
    assert log.stat().st_size <= 4096 + 4096 and old.stat().st_size <= 4096 + 4096
    assert set(old.read_bytes()) == {ord("x")}
    assert int(_status(rec.pid)["Uid"].split()[0]) == jail.uid_base() + rec.domid
    assert _hook(rec, op="info")["state"] == "running"
