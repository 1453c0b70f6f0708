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

Each domain has a UUID (``DomainInfo.uuid``); ``create`` hands it to the domain process in
``HYPYR_DOMAIN_UUID`` so that process can only ever update its own registry row.  A control
operation that gets no answer within ``CONTROL_TIMEOUT`` seconds is a HypyrError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hypyr.errors import HypyrError
from hypyr.toolstack import nics, paths
from hypyr.toolstack.registry import DOMAIN0_NAME, DOMAIN0_UUID, DomainRecord, Registry, StaleDomainError
from hypyr.toolstack.xlcfg import DomainConfig, load

CREATE_TIMEOUT = 120.0
CONTROL_TIMEOUT = 30.0   # seconds a domain process may take to answer one control operation
DESTROY_TIMEOUT = 10.0   # seconds `destroy` gives a domain process to stop before SIGKILL
KILL_TIMEOUT = 5.0       # seconds `destroy` waits for a SIGKILLed domain process to be gone
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Control:
    """A connection to one domain process's control socket."""

    def __init__(self, rec: DomainRecord, timeout: float | None = None):
        self.rec = rec
        self.timeout = CONTROL_TIMEOUT if timeout is None else timeout
        if not rec.socket:
            raise HypyrError(f"domain {rec.name} has no control socket (state {rec.state})")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(rec.socket)
        except OSError:
            self.sock.close()
            raise HypyrError(f"domain {rec.name} is not answering on its control socket") from None
        self.file = self.sock.makefile("rb")

    def call(self, op: str, **args) -> dict:
        name = self.rec.name
        try:
            self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            line = self.file.readline()
        except TimeoutError:
            raise HypyrError(f"domain {name} did not answer {op} within {self.timeout:g} s") from None
        except OSError as e:
            raise HypyrError(f"lost the connection to domain {name} during {op} ({e.strerror or e})") from None
        if not line:
            raise HypyrError(f"domain {name} closed its control socket")
        try:
            reply = json.loads(line)
        except ValueError:
            raise HypyrError(f"domain {name} answered {op} with something that is not JSON") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else None
            raise HypyrError(error or f"{op} failed")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _call(name: str, op: str, *, timeout: float | None = None, **args) -> dict:
    reg = Registry()
    rec = reg.get(name)
    if not reg.is_alive(rec):
        raise HypyrError(f"domain {rec.name} is not running (state {rec.state})")
    c = Control(rec, timeout)
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


def host_max_vcpus() -> int | None:
    """The most vCPUs this host's KVM gives a VM, or None if /dev/kvm cannot be used here."""
    from hypyr.arch.x86.acpi import MAX_VCPUS
    from hypyr.kvm import Kvm, KvmUnavailable
    try:
        kvm = Kvm()
    except (KvmUnavailable, OSError):
        return None
    try:
        return min(kvm.max_vcpus, MAX_VCPUS)
    finally:
        kvm.close()


def check_config(cfg: DomainConfig) -> None:
    for path, what in [(cfg.kernel, "kernel"), (cfg.ramdisk, "ramdisk")] + [(d.target, "disk") for d in cfg.disks]:
        if path and not os.path.isfile(path):
            problem = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise HypyrError(f"{what} file {path} of domain {cfg.name} {problem}")
    limit = host_max_vcpus()
    if limit is not None and cfg.vcpus > limit:
        raise HypyrError(f"vcpus = {cfg.vcpus} of domain {cfg.name} is more than this host's KVM allows ({limit})")
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
        paths.create_private(paths.vmm_log(rec.domid))   # the domain's output: 0600, as every state file
        taps = _open_taps(cfg, rec.domid)
    except BaseException:
        _forget(reg, rec)
        raise
    r, w = os.pipe()
    try:
        env = dict(os.environ, HYPYR_TAP_FDS=",".join(str(fd) for fd in taps), HYPYR_DOMAIN_UUID=rec.uuid)
        try:
            # The domain process logs onto vmm.log itself, rotating it (domain.VmmLogHandler); its
            # stdout/stderr start there for what is written before that, or by a crash.
            with open(paths.vmm_log(rec.domid), "ab") as logf:
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
        _forget(reg, rec)   # its row, directory and cgroup
        raise HypyrError(msg.removeprefix("error: ") if msg.startswith("error: ")
                         else f"domain {cfg.name} failed to start (see {paths.kept_log(cfg.name, 'vmm')})")
    return reg.get(str(rec.domid))


def _forget(reg: Registry, rec: DomainRecord) -> None:
    """Remove the row of a domain that did not come up (only if it is still this domain's)."""
    try:
        reg.remove(rec.domid, uuid=rec.uuid)
    except StaleDomainError:
        pass


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


def _wait_gone(reg: Registry, rec: DomainRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while reg.is_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not reg.is_alive(rec)


def destroy(name: str) -> None:
    """Stop the domain (politely, then SIGKILL) and remove its row, directory and cgroup."""
    reg = Registry()
    rec = reg.get(name)
    if reg.is_alive(rec):
        deadline = time.monotonic() + DESTROY_TIMEOUT
        try:
            _call(str(rec.domid), "destroy", timeout=DESTROY_TIMEOUT)
        except HypyrError:
            pass
        if not _wait_gone(reg, rec, max(0.0, deadline - time.monotonic())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
            if not _wait_gone(reg, rec, KILL_TIMEOUT):   # its cgroup can go only once it has
                raise HypyrError(f"domain {rec.name} (pid {rec.pid}) is still running after SIGKILL")
    _forget(reg, rec)


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
    uuid: str | None = None


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
    return DomainInfo(DOMAIN0_NAME, 0, total, os.cpu_count() or 1, xl_state("running", True), busy, "running",
                      DOMAIN0_UUID)


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
                              xl_state(r.state, running), cpu, r.state, r.uuid))
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
