"""hypyr's one reader of /proc (and of /sys/module, for the KVM backend), for every layer.

Host memory (``/proc/meminfo``), host CPU time (``/proc/stat``), the boot id, and a process's or thread's
state, CPU time, start time, host CPU, RSS and other status fields (``/proc/PID[/task/TID]/stat``,
``status``), its threads, command name and arguments.
Readers never raise for a process that is gone or a file that cannot be read: they return None
(or an empty dict / list) and the caller shows a dash.
"""

from __future__ import annotations

import os
from typing import NamedTuple, TypeGuard

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the host ---------------------------------------------------------------------------------------
def meminfo() -> dict[str, int]:
    """/proc/meminfo as {key: KiB} ({} if it cannot be read)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0])
    except OSError:
        pass
    return out


def memory_mib(info: dict[str, int] | None = None) -> tuple[int, int]:
    """(total, available) host memory in MiB; available is MemAvailable (MemFree on old kernels)."""
    m = meminfo() if info is None else info
    return m.get("MemTotal", 0) // 1024, m.get("MemAvailable", m.get("MemFree", 0)) // 1024


def host_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all host CPUs since boot, from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(vals) < 4:
        return None
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return total - idle, total


def boot_time() -> float | None:
    """The host's boot time (unix time), /proc/stat's btime."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def uptime() -> float | None:
    """Seconds since the host booted."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str:
    """This boot's id (/proc/sys/kernel/random/boot_id), or "" if it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def kvm_backend() -> str:
    """Which KVM module is loaded: "PVM", "VT-x", "AMD-V", or "unknown"."""
    mods = {m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.isdir(f"/sys/module/{m}")}
    if "kvm_pvm" in mods:
        return "PVM"
    if "kvm_intel" in mods:
        return "VT-x"
    if "kvm_amd" in mods:
        return "AMD-V"
    return "unknown"


# -- processes and threads --------------------------------------------------------------------------
class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) hypyr uses."""

    state: str              # field 3: R running, S sleeping, Z zombie, ...
    utime: int              # field 14, clock ticks (guest time is counted here)
    stime: int              # field 15, clock ticks
    start: str              # field 22, clock ticks after boot, as text (what the registry stores)
    processor: int | None   # field 39: the host CPU it last ran on
    guest: int | None = None  # field 43, clock ticks: of utime, those spent running guest code

    @property
    def cpu_seconds(self) -> float:
        return (self.utime + self.stime) / CLK_TCK

    @property
    def start_seconds(self) -> float:
        """Seconds after boot at which it started."""
        return int(self.start) / CLK_TCK


def _path(pid: int, tid: int | None, name: str) -> str:
    """/proc/PID/NAME, or its thread's /proc/PID/task/TID/NAME (ValueError for a non-number)."""
    return f"/proc/{int(pid)}/{name}" if tid is None else f"/proc/{int(pid)}/task/{int(tid)}/{name}"


def stat(pid: int, tid: int | None = None) -> ProcStat | None:
    """/proc/PID/stat (or the thread TID's), or None if there is no such process or thread."""
    try:
        path = _path(pid, tid, "stat")
        with open(path) as f:
            return parse_stat(f.read())
    except (OSError, ValueError, TypeError):
        return None


def parse_stat(text: str) -> ProcStat | None:
    """The text of a stat file as a ProcStat (None if it is not one)."""
    fields = _stat_fields(text)
    try:
        return ProcStat(fields[0], int(fields[11]), int(fields[12]), fields[19],
                        int(fields[36]) if len(fields) > 36 else None, int(fields[40]) if len(fields) > 40 else None)
    except (IndexError, ValueError):
        return None


def _stat_fields(text: str) -> list[str]:
    """A stat file's fields from field 3 (state) on: comm (field 2) may hold spaces and parentheses."""
    return text.rpartition(")")[2].split()


def ppid(pid: int) -> int | None:
    """The parent's pid (field 4 of /proc/PID/stat), or None if there is no such process."""
    try:
        with open(_path(pid, None, "stat")) as f:
            return int(_stat_fields(f.read())[1])
    except (OSError, ValueError, IndexError):
        return None


def alive(st: ProcStat | None) -> TypeGuard[ProcStat]:
    """A process that exists and is not a zombie."""
    return st is not None and st.state not in ("Z", "X", "x")


def pids() -> list[int]:
    """Every process id, in order."""
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def _task_text(pid: int, tid: int | None, name: str) -> str | None:
    try:
        with open(_path(pid, tid, name)) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def wchan(pid: int, tid: int | None = None) -> str | None:
    """Where the process (or its thread) sleeps in the kernel ("" when it runs; None if gone)."""
    return _task_text(pid, tid, "wchan")


def kernel_stack(pid: int, tid: int) -> list[str]:
    """Thread ``tid``'s kernel stack, innermost frame first, as function names (root only;
    [] if it cannot be read)."""
    text = _task_text(pid, tid, "stack") or ""
    return [line.split("]", 1)[-1].strip() for line in text.splitlines()]


def threads(pid: int) -> list[int]:
    """The thread ids of process ``pid`` ([] if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{int(pid)}/task"))
    except (OSError, ValueError):
        return []


def thread_running(pid: int, tid: int) -> bool:
    st = stat(pid, tid)
    return st is not None and st.state == "R"


def any_thread_running(pid: int) -> bool:
    """Is any thread of ``pid`` on a CPU right now (xl's r, rather than b)?"""
    return any(thread_running(pid, t) for t in threads(pid))


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of process ``pid`` (all its threads, live and exited) or of its thread ``tid``."""
    st = stat(pid, tid)
    return st.cpu_seconds if st else None


def age(pid: int) -> float | None:
    """Seconds since process ``pid`` started."""
    st, up = stat(pid), uptime()
    if st is None or up is None:
        return None
    return max(0.0, up - st.start_seconds)


def comm(pid: int) -> str | None:
    """The command name of process ``pid`` (/proc/PID/comm)."""
    try:
        with open(f"/proc/{int(pid)}/comm") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def cmdline(pid: int) -> list[bytes]:
    """The arguments of process ``pid`` ([] if it is gone)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except (OSError, ValueError):
        return []


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    """/proc/PID/status (or its thread TID's) as {field: value} (e.g. "VmRSS": "1234 kB"), or {}
    if it is gone."""
    try:
        with open(_path(pid, tid, "status")) as f:
            return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}
    except (OSError, ValueError):
        return {}


def seccomp_filtered(pid: int) -> tuple[int, int]:
    """(threads of ``pid`` the kernel shows under a seccomp filter, threads read): the filters in
    force, not the configured mode."""
    modes = [status(pid, tid).get("Seccomp") for tid in threads(pid)]
    read = [m for m in modes if m is not None]
    return sum(m == "2" for m in read), len(read)


def rss_mib(pid: int) -> float | None:
    """VmRSS of process ``pid`` in MiB, or None if it is gone."""
    try:
        return int(status(pid)["VmRSS"].split()[0]) / 1024
    except (KeyError, IndexError, ValueError):
        return None
