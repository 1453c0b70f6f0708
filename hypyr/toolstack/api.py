"""The toolstack's Python API: what `hypyr create/list/pause/...` and `hypyr serve` call (save,
restore and migration: hypyr.toolstack.transfer).

The toolstack never issues an ioctl: it talks to domain processes over their control sockets,
reads the registry, and uses ordinary OS interfaces (/proc, sched_setaffinity, cgroups).

``create`` opens each vif's tap and hands it to the domain process (docs/networking.md), with
the domain's UUID, by which that process updates only its own registry row (docs/toolstack.md).
A control operation that gets no answer within ``client.CONTROL_TIMEOUT`` seconds is a DomainTimeout.

Errors are typed (``hypyr.toolstack.errors``): DomainNotFound, DomainExists, DomainStateError (not
running, paused), InvalidConfig, DomainUnreachable, DomainTimeout, ...  A domain is named by its
name or its id wherever a ``name`` is taken.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from hypyr import procfs
from hypyr.errors import HypyrError, InvalidInput
from hypyr.toolstack import client, nics, spawn
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.domrecord import DOMAIN0_UUID, DomainRecord, DomainState, is_alive
from hypyr.toolstack.errors import (
    DomainNotFound,
    DomainStateError,
    DomainTimeout,
    InsufficientResources,
    InvalidConfig,
    VcpuNotFound,
)
from hypyr.toolstack.registry import DOMAIN0_NAME, Registry
from hypyr.toolstack.xlcfg import load


# -- create ---------------------------------------------------------------------------------
def host_free_memory_mib() -> int:
    return procfs.memory_mib()[1]


def host_max_vcpus() -> int | None:
    """The most vCPUs this host's KVM gives a VM, or None if /dev/kvm cannot be used here."""
    from hypyr.arch.x86.layout import MAX_VCPUS
    from hypyr.kvm import Kvm, KvmUnavailable
    try:
        kvm = Kvm()
    except (KvmUnavailable, OSError):
        return None
    try:
        return min(kvm.max_vcpus, MAX_VCPUS)
    finally:
        kvm.close()


def check_files(cfg: DomainConfig, disks_only: bool = False, where: str = "") -> None:
    """InvalidConfig unless the domain's kernel, ramdisk (unless ``disks_only``: a restore's) and
    disk images are regular files; ``where`` ends the sentence (" here": a restore, a migration)."""
    files = [] if disks_only else [(cfg.kernel, "kernel"), (cfg.ramdisk, "ramdisk")]
    for path, what in files + [(d.target, "disk") for d in cfg.disks]:
        if path and not os.path.isfile(path):
            problem = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise InvalidConfig(f"{what} file {path} of domain {cfg.name} {problem}{where}")


def check_config(cfg: DomainConfig) -> None:
    check_files(cfg)
    limit = host_max_vcpus()
    if limit is not None and cfg.vcpus > limit:
        raise InvalidConfig(f"vcpus = {cfg.vcpus} of domain {cfg.name} is more than this host's KVM allows ({limit})")
    free = host_free_memory_mib()
    if cfg.memory > free:
        raise InsufficientResources(f"domain {cfg.name} wants {cfg.memory} MiB but the host has only {free} MiB free")


def create(cfg_or_path: DomainConfig | str | os.PathLike) -> DomainRecord:
    """Start a domain in its own detached process; return its registry record once it runs."""
    cfg = cfg_or_path if isinstance(cfg_or_path, DomainConfig) else load(cfg_or_path)
    check_config(cfg)
    with Registry() as reg:
        cfg = prepare_vifs(cfg, reg)
        rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()))
        try:
            spawn.start(reg, cfg, rec)
        except BaseException:
            spawn.forget(reg, rec)   # its row, directory and cgroup
            raise
        return reg.get(str(rec.domid))


def prepare_vifs(cfg: DomainConfig, reg: Registry) -> DomainConfig:
    """Give every vif a MAC (unique among live domains) and a bridge that exists."""
    if not cfg.vifs:
        return cfg
    used: dict[str, str] = {}
    for r in reg.list():
        if r.state is DomainState.CREATING or is_alive(r):
            for v in r.config_dict().get("vifs", ()):
                if v.get("mac"):
                    used[v["mac"]] = f"domain {r.name} (vif {v.get('devid')})"
    return dataclasses.replace(cfg, vifs=nics.assign(cfg.vifs, used))


# -- lifecycle ------------------------------------------------------------------------------------
def pause(name: str) -> None:
    client.call(client.find(name), "pause")


def unpause(name: str) -> None:
    client.call(client.find(name), "unpause")


def reboot(name: str) -> None:
    client.call(client.find(name), "reboot")


def trigger(name: str, what: str, vcpu: int = 0) -> None:
    """Send ``what`` (``nmi``) to one vCPU of the domain, as Xen's `xl trigger`."""
    client.call(client.find(name), "trigger", what=what, vcpu=vcpu)


def shutdown(name: str, wait: bool = False, timeout: float = 300.0) -> None:
    rec = client.find(name)
    client.call(rec, "shutdown")
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive(rec):
                return
            time.sleep(0.2)
        raise DomainTimeout(f"domain {rec.name} did not shut down within {timeout:.0f} s")


def destroy(name: str) -> None:
    """Stop the domain (politely, then SIGKILL) and remove its row, directory and cgroup."""
    rec = client.find(name)
    deadline = time.monotonic() + spawn.DESTROY_TIMEOUT
    if is_alive(rec):
        try:
            client.call(rec, "destroy", timeout=spawn.DESTROY_TIMEOUT)
        except HypyrError:
            pass
    spawn.reap(rec, max(0.0, deadline - time.monotonic()))


# -- information -----------------------------------------------------------------------------------
@dataclass
class DomainInfo:
    name: str
    domid: int
    memory: int   # MiB
    vcpus: int
    state: str    # xl letters, e.g. "-b----"
    cpu_time: float
    status: DomainState   # registry state (a str: "running", ...)
    uuid: str | None = None
    seccomp: str = "kill"   # the VMM's seccomp filter mode: kill, log or off (off for the host)
    jail_uid: int | None = None   # the uid of its jailed VMM (None: not jailed)


_XL_LETTER: dict[DomainState | str, str] = {DomainState.PAUSED: "p", DomainState.SHUTDOWN: "s",
                                            DomainState.CRASHED: "c", DomainState.DYING: "d",
                                            DomainState.CREATING: "b"}


def xl_state(status: DomainState | str, running: bool) -> str:
    """xl's state column, e.g. "-b----": one of the letters rbpscd set, the others dashes."""
    ch = ("r" if running else "b") if status == DomainState.RUNNING else _XL_LETTER.get(status, "-")
    return "".join(c if c == ch else "-" for c in "rbpscd")


def host_domain() -> DomainInfo:
    """The host as xl's Domain-0 row: its memory, CPUs and busy CPU time since boot."""
    ticks = procfs.host_cpu_ticks()
    busy = ticks[0] / procfs.CLK_TCK if ticks else 0.0
    return DomainInfo(DOMAIN0_NAME, 0, procfs.memory_mib()[0], os.cpu_count() or 1,
                      xl_state(DomainState.RUNNING, True), busy, DomainState.RUNNING, DOMAIN0_UUID, "off")


def describe(r: DomainRecord) -> DomainInfo:
    """The DomainInfo (as `hypyr list` shows it) of the registry record ``r``."""
    cfg = r.config_dict()
    pid = r.pid if is_alive(r) else None
    cpu = (procfs.cpu_seconds(pid) or 0.0) if pid else 0.0
    running = pid is not None and procfs.any_thread_running(pid)
    return DomainInfo(r.name, r.domid, int(cfg.get("memory", 0)), int(cfg.get("vcpus", 1)),
                      xl_state(r.state, running), cpu, r.state, r.uuid, str(cfg.get("seccomp", "kill")),
                      _jail_uid(pid) if pid else None)


def _jail_uid(pid: int) -> int | None:
    """The real uid of the VMM ``pid`` if it is not this toolstack's own (a jailed VMM's)."""
    try:
        uid = int(procfs.status(pid)["Uid"].split()[0])
    except (KeyError, IndexError, ValueError):
        return None
    return uid if uid != os.geteuid() else None


def vcpu_registers(name: str) -> list[str]:
    """Each vCPU's registers and pending events, read with the domain paused for the instant
    (`hypyr info DOMAIN --registers`, as Xen's xenctx)."""
    return [str(v) for v in client.call(client.find(name), "registers").get("vcpus", [])]


def vmm_info(name: str) -> dict:
    """What the domain's VMM says of itself (its `info` operation): state, pid, vCPUs, seccomp
    mode, jail (uid, gid, what it sees, rlimits); and what the kernel says of its threads'
    seccomp filters ("seccomp_filtered": [filtered, threads], from /proc)."""
    info = client.call(client.find(name), "info")
    if isinstance(info.get("pid"), int):
        info["seccomp_filtered"] = list(procfs.seccomp_filtered(info["pid"]))
    return info


def list_domains(names: list[str] | None = None) -> list[DomainInfo]:
    """The domains (by id), or those named (names or ids; DomainNotFound for an unknown one)."""
    with Registry() as reg:
        recs = reg.list()
        if names:
            wanted = [reg.get(n).domid for n in names]
            recs = [r for r in recs if r.domid in wanted]
    return [describe(r) for r in recs]


def domain_info(name: str) -> DomainInfo:
    """One domain, by name or id (DomainNotFound if there is none, or its process is gone)."""
    with Registry() as reg:
        reg.reap()
        rec = reg.get(name)
    if rec.state is DomainState.DEAD:
        raise DomainNotFound(f"domain {rec.name} is gone ({rec.exit_reason or 'its process exited'})")
    return describe(rec)


def vcpu_list(name: str | None = None) -> list[dict]:
    with Registry() as reg:
        recs = [reg.get(name)] if name else reg.list()
    rows = []
    for r in recs:
        if r.pid is None or not is_alive(r):
            continue
        info = client.call(r, "info")
        for v in info["vcpus"]:
            tid = v["tid"]
            st = procfs.stat(r.pid, tid) if tid else None
            try:
                affinity = sorted(os.sched_getaffinity(tid)) if st else []
            except OSError:
                affinity = []
            rows.append({"name": r.name, "domid": r.domid, "vcpu": v["vcpu"], "cpu": st.processor if st else None,
                         "tid": tid,
                         "state": "p" if info["state"] == DomainState.PAUSED else
                                  ("r" if st and st.state == "R" else "b"),
                         "time": st.cpu_seconds if st else 0.0,
                         "affinity": affinity})
    return rows


def vcpu_pin(name: str, vcpu: str, cpus: set[int]) -> None:
    """Set the host CPU affinity of one vCPU thread ('all' for every vCPU)."""
    rec = client.find(name)
    rows = vcpu_list(str(rec.domid))
    if not rows:
        raise DomainStateError(f"domain {rec.name} is not running")
    targets = rows if vcpu == "all" else [r for r in rows if str(r["vcpu"]) == str(vcpu)]
    if not targets:
        raise VcpuNotFound(f"domain {rec.name} has no vCPU {vcpu}")
    ncpu = os.cpu_count() or 1
    bad = [c for c in cpus if c >= ncpu]
    if bad or not cpus:
        raise InvalidInput(f"CPUs {sorted(cpus)} are not all on this host (it has CPUs 0-{ncpu - 1})")
    for r in targets:
        try:
            os.sched_setaffinity(r["tid"], cpus)
        except ProcessLookupError:
            raise DomainStateError(f"vCPU {r['vcpu']} of domain {rec.name} is gone (is it running?)") from None
        except OSError as e:
            raise InvalidInput(f"cannot pin vCPU {r['vcpu']} of domain {rec.name} to CPUs {sorted(cpus)}: "
                               f"{e.strerror or e}") from None


def network_list(name: str) -> list[dict]:
    """A domain's NICs as ``xl network-list``: devid, MAC, bridge, tap, and the bytes the guest
    received (rx) and transmitted (tx); None when its tap does not exist (the domain is not running)."""
    from hypyr.toolstack import network
    rec = client.find(name)
    cfg = DomainConfig.from_dict(rec.config_dict())
    alive = is_alive(rec)
    rows = []
    for v in cfg.vifs:
        tap = v.tap_name(rec.domid)
        rx, tx = (network.guest_traffic(tap) if alive else None) or (None, None)
        rows.append({"devid": v.devid, "mac": v.mac, "bridge": v.bridge, "tap": tap,
                     "rx_bytes": rx, "tx_bytes": tx})
    return rows
