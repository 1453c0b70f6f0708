"""hypyr.toolstack.spawn: a domain process forked from a single-threaded caller.

Each case runs in a fresh interpreter (one thread, as the CLI), with ``domain.main`` replaced by
a probe that reports what the child was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r'''
import json, os, sys
from hypyr.toolstack import domain, spawn

tmp, mode = sys.argv[1], sys.argv[2]
secret = open(os.path.join(tmp, "parent-only"), "w")   # a descriptor the child must not keep
ready_r, ready_w = os.pipe()
kept_r, kept_w = os.pipe()

def probe(argv):
    if mode == "raise":
        raise RuntimeError("the domain failed")
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
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
