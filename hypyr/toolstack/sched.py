"""Credit-scheduler knobs (``xl sched-credit``): per-domain weight and cap through a cpu
cgroup per domain (``<parent>/dom-<domid>-<uuid>``, cgroup v2 or v1).  The mapping of xl's values
onto each version, and why the exact values are also kept in ``sched.json``: docs/toolstack.md,
"Scheduling".  Every function takes an optional ``root``: a cgroup mount (or a fake tree in
tests); without it ``HYPYR_CGROUP_ROOT``, else the host's (``cgroup_root``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from hypyr import procfs
from hypyr.errors import HypyrError, InvalidInput
from hypyr.toolstack.errors import DomainStateError, SchedulerUnavailable

DEFAULT_WEIGHT = 256
MIN_WEIGHT, MAX_WEIGHT = 1, 65535
V2_MAX_WEIGHT = 10000
PERIOD_US = 100000
GROUP = "hypyr"
UNIFIED = Path("/sys/fs/cgroup")
ENV_ROOT = "HYPYR_CGROUP_ROOT"

NO_CGROUPS = ("cgroups are not available: mount cgroup2 on /sys/fs/cgroup "
              "(or the v1 cpu controller)")


class Dom(NamedTuple):
    """A domain's identity, for callers without a registry record at hand."""

    domid: int
    name: str
    uuid: str


@dataclass(frozen=True)
class CgroupInfo:
    version: int   # 2 (unified hierarchy) or 1 (v1 cpu controller)
    root: Path     # mount point of the hierarchy holding the cpu controller

    @property
    def parent(self) -> Path:
        """hypyr's own group; domain groups live directly under it."""
        return self.root / GROUP


# -- value mapping ---------------------------------------------------------------------------------
def check_weight(weight) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise InvalidInput(f"the weight must be a whole number from {MIN_WEIGHT} to {MAX_WEIGHT}, not {weight!r}")
    return weight


def host_cpus() -> int:
    return os.cpu_count() or 1


def check_cap(cap, ncpus: int | None = None) -> int:
    n = ncpus or host_cpus()
    if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= 100 * n:
        raise InvalidInput(f"the cap must be 0 (no cap) or a percentage of one CPU from 1 to {100 * n} "
                           f"(this host has {n} CPU{'s' if n != 1 else ''}), not {cap!r}")
    return cap


def v2_weight(weight: int) -> int:
    """xl weight (1-65535, default 256) → cgroup v2 cpu.weight (1-10000, default 100)."""
    return max(1, min(V2_MAX_WEIGHT, round(weight * 100 / DEFAULT_WEIGHT)))


def v1_shares(weight: int) -> int:
    """xl weight → cgroup v1 cpu.shares (default 1024, minimum 2)."""
    return max(2, weight * 1024 // DEFAULT_WEIGHT)


def weight_from_v2(value: int) -> int:
    return max(MIN_WEIGHT, min(MAX_WEIGHT, round(value * DEFAULT_WEIGHT / 100)))


def weight_from_v1(shares: int) -> int:
    return max(MIN_WEIGHT, min(MAX_WEIGHT, round(shares * DEFAULT_WEIGHT / 1024)))


def v2_max(cap: int) -> str:
    """xl cap (% of one CPU, 0 = none) → cgroup v2 cpu.max."""
    return f"max {PERIOD_US}" if cap == 0 else f"{cap * PERIOD_US // 100} {PERIOD_US}"


def v1_quota(cap: int) -> int:
    """xl cap → cgroup v1 cpu.cfs_quota_us (with cpu.cfs_period_us = 100000)."""
    return -1 if cap == 0 else cap * PERIOD_US // 100


def cap_from_quota(quota: int, period: int) -> int:
    return 0 if quota < 0 or period <= 0 else round(quota * 100 / period)


# -- detection -------------------------------------------------------------------------------------
def _read(path: Path) -> str:
    return path.read_text().strip()


def _mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of every mount."""
    out: list[tuple[str, Path, set[str]]] = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        out.append((fields[sep + 1], Path(point), set(fields[sep + 3].split(","))))
    return out


def _v2_has_cpu(root: Path) -> bool:
    try:
        return "cpu" in _read(root / "cgroup.controllers").split()
    except OSError:
        return False


def _probe_dir(root: Path) -> CgroupInfo:
    """Detection for an explicit directory (HYPYR_CGROUP_ROOT or root=): judged by its files."""
    if (root / "cgroup.controllers").is_file():
        if _v2_has_cpu(root):
            return CgroupInfo(2, root)
        raise SchedulerUnavailable(f"the cgroup v2 hierarchy at {root} has no cpu controller "
                                   "(it may be bound to a v1 hierarchy)")
    if (root / "cpu.shares").is_file():
        return CgroupInfo(1, root)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / sub / "cpu.shares").is_file():
            return CgroupInfo(1, root / sub)
    raise SchedulerUnavailable(f"{root} is not a cgroup v2 hierarchy or a v1 cpu controller mount")


def cgroup_root(root: Path | str | None = None, mountinfo: Path = Path("/proc/self/mountinfo")) -> CgroupInfo:
    """Where hypyr's cpu cgroups go: cgroup v2 at /sys/fs/cgroup if it has the cpu controller, else
    the v1 cpu controller's mount, else another cgroup2 mount with cpu.  ``root`` (or the
    ``HYPYR_CGROUP_ROOT`` environment variable) points detection at one directory instead."""
    if root is None:
        root = os.environ.get(ENV_ROOT) or None
    if root is not None:
        return _probe_dir(Path(root))
    if _v2_has_cpu(UNIFIED):
        return CgroupInfo(2, UNIFIED)
    mounts = _mounts(mountinfo)
    for fstype, point, opts in mounts:
        if fstype == "cgroup" and "cpu" in opts and (point / "cpu.shares").is_file():
            return CgroupInfo(1, point)
    for fstype, point, _ in mounts:
        if fstype == "cgroup2" and _v2_has_cpu(point):
            return CgroupInfo(2, point)
    raise SchedulerUnavailable(NO_CGROUPS)


def _info(root) -> CgroupInfo:
    return root if isinstance(root, CgroupInfo) else cgroup_root(root)


# -- groups ----------------------------------------------------------------------------------------
_GROUP_RE = re.compile(r"dom-(\d+)-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def group_name(dom) -> str:
    """``dom-<domid>-<uuid>``."""
    try:
        u = uuidlib.UUID(str(dom.uuid))
    except ValueError:
        raise HypyrError(f"domain {dom.name} has no valid uuid ({dom.uuid!r})") from None
    return f"dom-{int(dom.domid)}-{u}"


def _write(path: Path, value, what: str) -> None:
    try:
        with open(path, "w") as f:   # one write(), as cgroupfs requires
            f.write(f"{value}\n")
    except OSError as e:
        hint = " (hypyr needs root to change cgroups)" if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise HypyrError(f"cannot {what} ({path}): {e.strerror or e}{hint}") from None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        hint = " (hypyr needs root to change cgroups)" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise HypyrError(f"cannot create the cgroup {path}: {e.strerror or e}{hint}") from None


def _enable_cpu(group: Path) -> None:
    """v2: let ``group``'s children use the cpu controller (+cpu in its cgroup.subtree_control)."""
    try:
        if "cpu" in _read(group / "cgroup.subtree_control").split():
            return
    except OSError:
        pass
    try:
        with open(group / "cgroup.subtree_control", "w") as f:
            f.write("+cpu\n")
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise HypyrError(f"cannot enable the cpu controller in {group}: processes live in that group "
                             "(cgroup v2 allows controllers only for groups without processes)") from None
        hint = " (hypyr needs root to change cgroups)" if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise HypyrError(f"cannot enable the cpu controller in {group}: {e.strerror or e}{hint}") from None


def _parent(info: CgroupInfo) -> Path:
    """Create hypyr's parent group (v2: with the cpu controller enabled on the way down)."""
    if info.version == 2:
        _enable_cpu(info.root)
        _mkdir(info.parent)
        _enable_cpu(info.parent)
    else:
        _mkdir(info.parent)
    return info.parent


def group_path(dom, root=None) -> Path:
    """The domain's group (existing or not)."""
    return _info(root).parent / group_name(dom)


def _existing(dom, info: CgroupInfo) -> Path:
    path = group_path(dom, info)
    if not path.is_dir():
        raise DomainStateError(f"domain {dom.name} has no scheduler group (is it running?)")
    return path


def place(dom, pid: int, root=None) -> Path:
    """Create the domain's group and move process ``pid`` (all its threads) into it."""
    info = _info(root)
    _parent(info)
    path = info.parent / group_name(dom)
    _mkdir(path)
    what = f"move domain {dom.name} into its cgroup"
    if info.version == 2 or (path / "cgroup.procs").exists() or not (path / "tasks").exists():
        _write(path / "cgroup.procs", int(pid), what)
    else:
        tids = procfs.threads(pid)
        if not tids:
            raise DomainStateError(f"the process {pid} of domain {dom.name} is gone")
        for tid in tids:
            _write(path / "tasks", tid, what)
    return path


# -- parameters ------------------------------------------------------------------------------------
def _state_file(domid: int) -> Path | None:
    """``<domain dir>/sched.json`` when hypyr.toolstack.paths is there, else None."""
    try:
        from hypyr.toolstack import paths
    except ImportError:
        return None
    try:
        return Path(paths.domain_dir(domid)) / "sched.json"
    except Exception:   # noqa: BLE001 - a missing state dir only costs precision
        return None


def _load_state(dom) -> dict:
    """The domain's sched.json, or {} when there is none or it is another domain's."""
    f = _state_file(dom.domid)
    if f is None:
        return {}
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("uuid") == str(dom.uuid) else {}


def _save_state(dom, doc: dict) -> None:
    f = _state_file(dom.domid)
    if f is None or not f.parent.is_dir():   # the domain dir is the domain's own, not created here
        return
    try:
        tmp = f.with_name(f.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as out:
            out.write(json.dumps(dict(doc, uuid=str(dom.uuid))) + "\n")
        tmp.replace(f)
    except OSError:
        pass


def _read_int(path: Path) -> int:
    try:
        return int(_read(path))
    except (OSError, ValueError):
        raise HypyrError(f"cannot read {path}") from None


def _cgroup_values(path: Path, info: CgroupInfo) -> tuple[int, int, int, int]:
    """(raw weight value, weight, cap-quota-us or -1, period-us) read from the group."""
    if info.version == 2:
        raw = _read_int(path / "cpu.weight")
        try:
            quota, period = _read(path / "cpu.max").split()
        except (OSError, ValueError):
            raise HypyrError(f"cannot read {path / 'cpu.max'}") from None
        return raw, weight_from_v2(raw), (-1 if quota == "max" else int(quota)), int(period)
    raw = _read_int(path / "cpu.shares")
    return raw, weight_from_v1(raw), _read_int(path / "cpu.cfs_quota_us"), _read_int(path / "cpu.cfs_period_us")


def _params(path: Path, info: CgroupInfo, state: dict) -> tuple[int, int]:
    raw, weight, quota, period = _cgroup_values(path, info)
    cap = cap_from_quota(quota, period)
    w = state.get("weight")
    if (isinstance(w, int) and MIN_WEIGHT <= w <= MAX_WEIGHT
            and (v2_weight(w) if info.version == 2 else v1_shares(w)) == raw):
        weight = w   # the exact xl value, still what the cgroup holds
    return weight, cap


def set_params(dom, weight: int | None = None, cap: int | None = None, root=None) -> tuple[int, int]:
    """Set the domain's weight and/or cap (None leaves it); returns the (weight, cap) now in force.
    The group must exist (``place`` first)."""
    if weight is not None:
        check_weight(weight)
    if cap is not None:
        check_cap(cap)
    info = _info(root)
    path = _existing(dom, info)
    what = f"set the scheduler parameters of domain {dom.name}"
    if info.version == 2:
        if weight is not None:
            _write(path / "cpu.weight", v2_weight(weight), what)
        if cap is not None:
            _write(path / "cpu.max", v2_max(cap), what)
    else:
        if weight is not None:
            _write(path / "cpu.shares", v1_shares(weight), what)
        if cap is not None:
            if cap:   # the period first, so the quota is checked against the right one
                _write(path / "cpu.cfs_period_us", PERIOD_US, what)
            _write(path / "cpu.cfs_quota_us", v1_quota(cap), what)
            if not cap:
                _write(path / "cpu.cfs_period_us", PERIOD_US, what)
    state = _load_state(dom)
    if weight is not None:
        state["weight"] = weight
    if cap is not None:
        state["cap"] = cap
    _save_state(dom, state)
    return _params(path, info, _load_state(dom))   # what get_params will report


def get_params(dom, root=None) -> tuple[int, int]:
    """The domain's (weight, cap) in xl units."""
    info = _info(root)
    return _params(_existing(dom, info), info, _load_state(dom))


def list_params(root=None) -> list[tuple[int, str, int, int]]:
    """(domid, uuid, weight, cap) of every domain group hypyr has, by domid.  Callers match
    (domid, uuid) against the registry: a group of a domain that is gone matches nothing."""
    info = _info(root)
    out: list[tuple[int, str, int, int]] = []
    if not info.parent.is_dir():
        return out
    for d in info.parent.iterdir():
        m = _GROUP_RE.fullmatch(d.name)
        if not m or not d.is_dir():
            continue
        dom = Dom(int(m.group(1)), "", m.group(2))
        try:
            weight, cap = _params(d, info, _load_state(dom))
        except HypyrError:
            continue   # a group being removed
        out.append((dom.domid, dom.uuid, weight, cap))
    return sorted(out)


def remove(dom, root=None, evacuate: bool = False) -> None:
    """Remove the domain's group once its process has exited; a busy or absent group is left
    alone.  ``evacuate`` first moves any processes still in it to the root group (for the domain
    process itself, on its way out)."""
    try:
        info = _info(root)
    except HypyrError:
        return
    path = group_path(dom, info)
    if not path.is_dir():
        return
    if evacuate:
        try:
            pids = [int(p) for p in _read(path / "cgroup.procs").split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            try:
                with open(info.root / "cgroup.procs", "w") as f:
                    f.write(f"{pid}\n")
            except OSError:
                pass
    try:
        path.rmdir()
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise HypyrError(f"cannot remove the cgroup {path}: {e.strerror or e}") from None
        if e.errno != errno.ENOENT:
            return
    state = _state_file(dom.domid) if _load_state(dom) else None
    if state is not None:
        try:
            state.unlink()
        except OSError:
            pass
