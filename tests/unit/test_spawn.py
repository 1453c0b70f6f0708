"""hypyr.toolstack.spawn: a domain process forked from a single-threaded caller.

Each case runs in a fresh interpreter (one thread, as the CLI), with ``domain.main`` replaced by
a probe that reports what the child was given."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

# each script's domain.main probe reports what it holds with this
OPEN_FDS = r'''
import os

def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds
'''

CHILD = OPEN_FDS + r'''
import json, os, sys
from hypyr.toolstack import domain, spawn

tmp, mode = sys.argv[1], sys.argv[2]
secret = open(os.path.join(tmp, "parent-only"), "w")   # a descriptor the child must not keep
ready_r, ready_w = os.pipe()
kept_r, kept_w = os.pipe()

def probe(argv):
    if mode == "raise":
        raise RuntimeError("the domain failed")
    fds = open_fds()
    report = {"argv": argv, "leader": os.getsid(0) == os.getpid(), "fds": fds,
              "env": os.environ.get("HYPYR_TEST_SPAWN"), "ready_w": ready_w, "kept_w": kept_w}
    os.write(int(argv[1]), json.dumps(report).encode() + b"\n")
    print("on the log")
    return 3

domain.main = probe
with open(os.path.join(tmp, "vmm.log"), "ab") as logf:
    proc = spawn.start_domain(7, ready_w, logf.fileno(), (kept_w,), {"HYPYR_TEST_SPAWN": "yes"})
os.close(ready_w)
os.close(kept_w)
code = proc.wait()
with os.fdopen(ready_r) as f:
    line = f.readline()
print(json.dumps({"kind": type(proc).__name__, "code": code, "report": json.loads(line) if line else None,
                  "parent_env": os.environ.get("HYPYR_TEST_SPAWN")}))
'''


def _run(tmp_path, mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), mode], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_forked_domain_process_is_detached_and_holds_only_what_it_was_given(tmp_path):
    out = _run(tmp_path, "report")
    assert out["kind"] == "ForkedProcess" and out["code"] == 3
    report = out["report"]
    assert report["argv"] == ["7", str(report["ready_w"])] and report["leader"] and report["env"] == "yes"
    fds = {int(k): v for k, v in report["fds"].items()}
    log = str(tmp_path / "vmm.log")
    assert fds[0] == os.devnull and fds[1] == fds[2] == log
    assert fds[report["ready_w"]].startswith("pipe:") and fds[report["kept_w"]].startswith("pipe:")
    assert str(tmp_path / "parent-only") not in fds.values()
    assert len(fds) == 5, fds      # 0-2 and the two given
    assert (tmp_path / "vmm.log").read_text() == "on the log\n"
    assert out["parent_env"] is None     # the parent's environment is untouched


def test_a_child_that_raises_exits_1_with_its_traceback_on_the_log(tmp_path):
    out = _run(tmp_path, "raise")
    assert out["kind"] == "ForkedProcess" and out["code"] == 1 and out["report"] is None
    assert "RuntimeError: the domain failed" in (tmp_path / "vmm.log").read_text()


FORK_SERVER = OPEN_FDS + r'''
import json, os, signal, subprocess, sys, threading
from hypyr.toolstack import domain, spawn
from hypyr.toolstack.forkserver import ForkServer, PidfdProcess

tmp = sys.argv[1]

def probe(argv):
    fds = open_fds()
    kept = int(os.environ["HYPYR_TEST_KEPT"])
    os.write(kept, b"through the kept pipe")
    report = {"argv": argv, "ppid": os.getppid(), "leader": os.getsid(0) == os.getpid(), "fds": fds,
              "env": os.environ.get("HYPYR_TEST_SPAWN"), "sigint": str(signal.getsignal(signal.SIGINT))}
    os.write(int(argv[1]), json.dumps(report).encode() + b"\n")
    print("on the log")
    return 0

domain.main = probe                      # before the helper forks: it runs the probe
secret = open(os.path.join(tmp, "server-only"), "w")     # the helper must close it
forks = ForkServer.start()
spawn.use_fork_server(forks)
stop = threading.Event()
threading.Thread(target=stop.wait).start()    # a threaded server, as `hypyr serve`

def start(n):
    ready_r, ready_w = os.pipe()
    kept_r, kept_w = os.pipe()
    with open(os.path.join(tmp, f"vmm{n}.log"), "ab") as logf:
        proc = spawn.start_domain(n, ready_w, logf.fileno(), (kept_w,),
                                  {"HYPYR_TEST_SPAWN": "yes", "HYPYR_TEST_KEPT": str(kept_w)})
    os.close(ready_w)
    os.close(kept_w)
    with os.fdopen(ready_r) as f:
        line = f.readline()
    kept = os.read(kept_r, 100).decode()
    return proc, {"kind": type(proc).__name__, "report": json.loads(line) if line else None, "kept": kept,
                  "ready_w": ready_w, "kept_w": kept_w}

proc, first = start(7)
first["code"] = proc.wait()
first["helper"] = forks.pid
started = []
subprocess.Popen = lambda args, **kw: started.append(args) or PidfdProcess(os.getpid())
many = [os.pipe()[1] for _ in range(70)]   # more descriptors than one request takes
with open(os.path.join(tmp, "vmm9.log"), "ab") as logf:
    spawn.start_domain(9, many[0], logf.fileno(), many[1:], {})
refused = {"started": list(started), "kept": spawn.fork_server is forks}
os.kill(forks.pid, signal.SIGKILL)       # the helper dies: the next domain starts without it
os.waitpid(forks.pid, 0)
try:
    start(8)
except Exception:
    pass
stop.set()
print(json.dumps({"first": first, "refused": refused, "then": started[1:], "fork_server": spawn.fork_server is None}))
'''


def test_a_threaded_server_starts_domains_through_its_fork_server_and_without_it_when_it_cannot(tmp_path):
    p = subprocess.run([sys.executable, "-c", FORK_SERVER, str(tmp_path)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    first = out["first"]
    assert first["kind"] == "PidfdProcess" and first["code"] == -1
    report = first["report"]
    assert report["ppid"] == first["helper"] and report["leader"] and report["env"] == "yes"
    assert report["argv"] == ["7", str(first["ready_w"])]
    assert first["kept"] == "through the kept pipe"     # the passed descriptors keep their numbers
    fds = {int(k): v for k, v in report["fds"].items()}
    assert fds[0] == os.devnull and fds[1] == fds[2] == str(tmp_path / "vmm7.log")
    assert str(tmp_path / "server-only") not in fds.values()
    assert len(fds) == 5, fds                            # 0-2, the ready pipe and the kept one
    assert report["sigint"] == str(signal.default_int_handler)
    assert (tmp_path / "vmm7.log").read_text() == "on the log\n"
    refused = out["refused"]      # one request too big: that domain alone starts without the helper
    assert refused["kept"] and refused["started"][0][1:4] == ["-m", "hypyr.toolstack.domain", "9"]
    assert out["fork_server"] and out["then"][0][1:4] == ["-m", "hypyr.toolstack.domain", "8"]
