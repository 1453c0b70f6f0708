"""The toolstack's Python API: what `hypyr create/list/pause/...` and `hypyr serve` call.

The toolstack never issues an ioctl: it talks to domain processes over their control sockets,
reads the registry, and uses ordinary OS interfaces (/proc, sched_setaffinity, cgroups).

Networking at ``create``: each vif gets a MAC (random in Xen's OUI unless given; stored in the
registry's config so the domain keeps it across reboots; refused if another live domain uses
it) and its bridge (``xenbr0`` unless given; see ``network.ensure_bridge``).  ``create`` opens
the taps (``network.open_tap``, named ``vifname`` or ``vif<domid>.<devid>``) and hands them to
the domain process: their fds are inherited (``pass_fds``) and listed, in vif order, in the
environment variable ``HYPYR_TAP_FDS`` (e.g. ``"5,6"``); ``create`` then closes its copies, so a
tap lives exactly as long as its domain process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.toolstack import nics, paths
from hypyr.toolstack.registry import DOMAIN0_NAME, DomainRecord, Registry
from hypyr.toolstack.xlcfg import DomainConfig, load

CREATE_TIMEOUT = 120.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Control:
    """A connection to one domain process's control socket."""

    def __init__(self, rec: DomainRecord, timeout: float = 30.0):
        self.rec = rec
        if not rec.socket:
            raise HypyrError(f"domain {rec.name} has no control socket (state {rec.state})")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(rec.socket)
        except OSError:
            self.sock.close()
            raise HypyrError(f"domain {rec.name} is not answering on its control socket") from None
        self.file = self.sock.makefile("rb")

    def call(self, op: str, **args) -> dict:
        self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line = self.file.readline()
        if not line:
            raise HypyrError(f"domain {self.rec.name} closed its control socket")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise HypyrError(reply.get("error") or f"{op} failed")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _call(name: str, op: str, **args) -> dict:
    reg = Registry()
    rec = reg.get(name)
    if not reg.is_alive(rec):
        raise HypyrError(f"domain {rec.name} is not running (state {rec.state})")
    c = Control(rec)
    try:
        return c.call(op, **args)
    finally:
        c.close()


# -- create ---------------------------------------------------------------------------------
def host_free_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def check_config(cfg: DomainConfig) -> None:
    for path, what in [(cfg.kernel, "kernel"), (cfg.ramdisk, "ramdisk")] + [(d.target, "disk") for d in cfg.disks]:
        if path and not os.path.isfile(path):
            raise HypyrError(f"{what} file {path} of domain {cfg.name} does not exist")
    free = host_free_memory_mib()
    if cfg.memory > free:
        raise HypyrError(f"domain {cfg.name} wants {cfg.memory} MiB but the host has only {free} MiB free")


def create(cfg_or_path: DomainConfig | str | os.PathLike) -> DomainRecord:
    """Start a domain in its own detached process; return its registry record once it runs."""
    cfg = cfg_or_path if isinstance(cfg_or_path, DomainConfig) else load(cfg_or_path)
    check_config(cfg)
    reg = Registry()
    cfg = _prepare_vifs(cfg, reg)
    rec = reg.reserve(cfg.name, json.dumps(cfg.to_dict()))
    d = paths.domain_dir(rec.domid)
    d.mkdir(parents=True, exist_ok=True)
    try:
        taps = _open_taps(cfg, rec.domid)
    except BaseException:
        reg.remove(rec.domid)
        raise
    r, w = os.pipe()
    try:
        env = dict(os.environ, HYPYR_TAP_FDS=",".join(str(fd) for fd in taps))
        try:
            with open(d / "vmm.log", "ab") as logf:
                proc = subprocess.Popen([sys.executable, "-m", "hypyr.toolstack.domain", str(rec.domid), str(w)],
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w, *taps),
                                        start_new_session=True, close_fds=True, env=env)
        except BaseException:
            reg.remove(rec.domid)
            raise
        for fd in taps:
            os.close(fd)
        taps = []
        os.close(w)
        w = -1
        msg = _read_ready(r, proc)
    finally:
        for fd in taps:
            os.close(fd)
        os.close(r)
        if w >= 0:
            os.close(w)
    if msg != "ok":
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reg.remove(rec.domid)
        raise HypyrError(msg.removeprefix("error: ") if msg.startswith("error: ")
                         else f"domain {cfg.name} failed to start (see {paths.kept_log(cfg.name, 'vmm')})")
    return reg.get(str(rec.domid))


def _prepare_vifs(cfg: DomainConfig, reg: Registry) -> DomainConfig:
    """Give every vif a MAC (unique among live domains) and a bridge that exists."""
    if not cfg.vifs:
        return cfg
    used: dict[str, str] = {}
    for r in reg.list():
        if r.state == "creating" or reg.is_alive(r):
            for v in r.config_dict().get("vifs", ()):
                if v.get("mac"):
                    used[v["mac"]] = f"domain {r.name} (vif {v.get('devid')})"
    return dataclasses.replace(cfg, vifs=nics.assign(cfg.vifs, used))


def _open_taps(cfg: DomainConfig, domid: int) -> list[int]:
    """Open and attach one tap per vif; on failure close the ones opened and re-raise."""
    return nics.open_taps(cfg.vifs, [v.tap_name(domid) for v in cfg.vifs])


def _read_ready(fd: int, proc: subprocess.Popen) -> str:
    import select
    deadline = time.monotonic() + CREATE_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                break
        elif proc.poll() is not None:
            break
    return buf.decode(errors="replace").strip() or "error: the domain process exited without reporting"


# -- lifecycle ------------------------------------------------------------------------------------
def pause(name: str) -> None:
    _call(name, "pause")


def unpause(name: str) -> None:
    _call(name, "unpause")


def reboot(name: str) -> None:
    _call(name, "reboot")


def shutdown(name: str, wait: bool = False, timeout: float = 300.0) -> None:
    reg = Registry()
    rec = reg.get(name)
    _call(name, "shutdown")
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not reg.is_alive(rec):
                return
            time.sleep(0.2)
        raise HypyrError(f"domain {rec.name} did not shut down within {timeout:.0f} s")


def destroy(name: str) -> None:
    reg = Registry()
    rec = reg.get(name)
    if reg.is_alive(rec):
        try:
            _call(name, "destroy")
        except HypyrError:
            pass
        deadline = time.monotonic() + 10
        while reg.is_alive(rec) and time.monotonic() < deadline:
            time.sleep(0.1)
        if reg.is_alive(rec):
            os.kill(rec.pid, 9)
    reg.remove(rec.domid)


# -- information -----------------------------------------------------------------------------------
@dataclass
class DomainInfo:
    name: str
    domid: int
    memory: int   # MiB
    vcpus: int
    state: str    # xl letters, e.g. "-b----"
    cpu_time: float
    status: str   # registry state


def _proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _thread_running(pid: int, tid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False


def xl_state(status: str, running: bool) -> str:
    letters = {"running": "r" if running else "b", "paused": "p", "shutdown": "s", "crashed": "c",
               "dying": "d", "creating": "b"}
    order = "rbpscd"
    ch = letters.get(status, "-")
    return "".join(c if c == ch else "-" for c in order)


def host_domain() -> DomainInfo:
    """The host as xl's Domain-0 row: its memory, CPUs and busy CPU time since boot."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024
    busy = 0.0
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
        if fields:
            ticks = [int(x) for x in fields]
            busy = (sum(ticks[:8]) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)) / _CLK_TCK
    return DomainInfo(DOMAIN0_NAME, 0, total, os.cpu_count() or 1, xl_state("running", True), busy, "running")


def list_domains(names: list[str] | None = None) -> list[DomainInfo]:
    reg = Registry()
    recs = reg.list()
    if names:
        wanted = [reg.get(n).domid for n in names]
        recs = [r for r in recs if r.domid in wanted]
    out = []
    for r in recs:
        cfg = json.loads(r.config) if r.config else {}
        running = False
        cpu = 0.0
        if r.pid and reg.is_alive(r):
            cpu = _proc_cpu_seconds(r.pid)
            try:
                running = any(_thread_running(r.pid, int(t)) for t in os.listdir(f"/proc/{r.pid}/task"))
            except OSError:
                pass
        out.append(DomainInfo(r.name, r.domid, int(cfg.get("memory", 0)), int(cfg.get("vcpus", 1)),
                              xl_state(r.state, running), cpu, r.state))
    return out


def vcpu_list(name: str | None = None) -> list[dict]:
    reg = Registry()
    recs = [reg.get(name)] if name else reg.list()
    rows = []
    for r in recs:
        if not reg.is_alive(r):
            continue
        info = _call(str(r.domid), "info")
        for v in info["vcpus"]:
            tid = v["tid"]
            cpu, affinity = None, set()
            if tid:
                try:
                    cpu = int(Path(f"/proc/{r.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[36])
                    affinity = os.sched_getaffinity(tid)
                except (OSError, IndexError, ValueError):
                    pass
            rows.append({"name": r.name, "domid": r.domid, "vcpu": v["vcpu"], "cpu": cpu, "tid": tid,
                         "state": "p" if info["state"] == "paused" else
                                  ("r" if tid and _thread_running(r.pid, tid) else "b"),
                         "time": _proc_cpu_seconds(r.pid, tid) if tid else 0.0,
                         "affinity": sorted(affinity)})
    return rows


def vcpu_pin(name: str, vcpu: str, cpus: set[int]) -> None:
    """Set the host CPU affinity of one vCPU thread ('all' for every vCPU)."""
    rows = vcpu_list(name)
    if not rows:
        raise HypyrError(f"domain {name} is not running")
    targets = rows if vcpu == "all" else [r for r in rows if str(r["vcpu"]) == str(vcpu)]
    if not targets:
        raise HypyrError(f"domain {name} has no vCPU {vcpu}")
    ncpu = os.cpu_count() or 1
    bad = [c for c in cpus if c >= ncpu]
    if bad or not cpus:
        raise HypyrError(f"CPUs {sorted(cpus)} are not all on this host (it has CPUs 0-{ncpu - 1})")
    for r in targets:
        os.sched_setaffinity(r["tid"], cpus)


def network_list(name: str) -> list[dict]:
    """A domain's NICs as ``xl network-list``: devid, MAC, bridge, tap, and the bytes the guest
    received (rx) and transmitted (tx); None when its tap does not exist (the domain is not running)."""
    from hypyr.toolstack import network
    reg = Registry()
    rec = reg.get(name)
    cfg = DomainConfig.from_dict(rec.config_dict())
    alive = reg.is_alive(rec)
    rows = []
    for v in cfg.vifs:
        tap = v.tap_name(rec.domid)
        rx, tx = (network.guest_traffic(tap) if alive else None) or (None, None)
        rows.append({"devid": v.devid, "mac": v.mac, "bridge": v.bridge, "tap": tap,
                     "rx_bytes": rx, "tx_bytes": tx})
    return rows
