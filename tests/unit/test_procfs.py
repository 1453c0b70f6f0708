"""hypyr.procfs: the one reader of /proc."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from hypyr import procfs
from hypyr.toolstack import domrecord


def _stat_line(comm: str, state: str = "S", utime: int = 150, stime: int = 50, start: int = 4242,
               cpu: int = 3, guest: int = 120) -> str:
    fields = ["1", "1", "1", "0", "-1", "4194560", "0", "0", "0", "0", str(utime), str(stime), "0", "0", "20",
              "0", "3", "0", str(start)] + ["0"] * 16 + [str(cpu)] + ["0"] * 3 + [str(guest)] + ["0"] * 8
    return f"4321 ({comm}) {state} " + " ".join(fields) + "\n"


def test_parse_stat_takes_fields_after_the_last_parenthesis():
    st = procfs.parse_stat(_stat_line("a) b (c) S 1"))    # comm may hold ") " and words
    assert st == procfs.ProcStat("S", 150, 50, "4242", 3, 120)
    assert st.cpu_seconds == 200 / procfs.CLK_TCK and st.start_seconds == 4242 / procfs.CLK_TCK
    assert procfs.parse_stat("4321 (x) R 1 2 3") is None
    assert procfs.parse_stat("") is None


def test_this_process():
    st = procfs.stat(os.getpid())
    assert st.state == "R" and st.start == domrecord.proc_start_time(os.getpid())
    assert procfs.alive(st) and procfs.cpu_seconds(os.getpid()) > 0
    assert 0 <= procfs.age(os.getpid()) < 86400 * 365
    assert procfs.rss_mib(os.getpid()) > 1
    assert procfs.status(os.getpid())["Pid"] == str(os.getpid())
    assert threading.get_native_id() in procfs.threads(os.getpid())
    assert procfs.thread_running(os.getpid(), threading.get_native_id())
    assert procfs.stat(os.getpid(), threading.get_native_id()).processor in range(os.cpu_count() or 1)


def test_gone_processes_are_none_not_errors():
    p = subprocess.Popen(["true"])
    p.wait()
    for reader in (procfs.stat, procfs.cpu_seconds, procfs.age, procfs.rss_mib):
        assert reader(p.pid) is None
    assert procfs.threads(p.pid) == [] and not procfs.any_thread_running(p.pid)
    assert procfs.status(p.pid) == {}
    assert procfs.stat(os.getpid(), 2 ** 22 + 1) is None
    assert not procfs.alive(None)


def test_a_zombie_is_not_alive():
    p = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while procfs.stat(p.pid).state != "Z" and time.monotonic() < deadline:   # exited, not waited for
            time.sleep(0.01)
        assert not procfs.alive(procfs.stat(p.pid))
    finally:
        p.wait()


def test_host():
    total, available = procfs.memory_mib()
    assert 0 < available <= total
    assert procfs.memory_mib({"MemTotal": 2048, "MemFree": 1024}) == (2, 1)     # no MemAvailable: old kernels
    busy, all_ticks = procfs.host_cpu_ticks()
    assert 0 <= busy <= all_ticks
    assert 0 < procfs.boot_time() < procfs.boot_time() + procfs.uptime()
    assert procfs.kvm_backend() in ("VT-x", "AMD-V", "PVM", "unknown")
    assert procfs.cpu_model()


def test_ppid_is_the_parent_and_none_for_a_process_that_is_gone():
    assert procfs.ppid(os.getpid()) == os.getppid()
    assert procfs.ppid(2**22 + 1) is None
