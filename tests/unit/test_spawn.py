"""hypyr.toolstack.spawn: a domain process forked from a single-threaded caller."""

from __future__ import annotations

import json
import os
import threading

import pytest

from hypyr.toolstack import domain, spawn


def _descriptors() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def test_a_forked_domain_process_is_detached_and_holds_only_what_it_was_given(tmp_path, monkeypatch):
    if threading.active_count() > 1:
        pytest.skip("another thread runs in this test process: start_domain would not fork")
    secret = open(tmp_path / "parent-only", "w")   # noqa: SIM115 - a descriptor the child must not keep
    ready_r, ready_w = os.pipe()
    kept_r, kept_w = os.pipe()
    log = tmp_path / "vmm.log"

    def fake_main(argv: list[str]) -> int:
        report = {"argv": argv, "leader": os.getsid(0) == os.getpid(), "fds": _descriptors(),
                  "env": os.environ.get("HYPYR_TEST_SPAWN")}
        os.write(int(argv[1]), json.dumps(report).encode() + b"\n")
        print("on the log")
        return 3

    monkeypatch.setattr(domain, "main", fake_main)
    with open(log, "ab") as logf:
        proc = spawn.start_domain(7, ready_w, logf.fileno(), (kept_w,), {"HYPYR_TEST_SPAWN": "yes"})
    os.close(ready_w)
    os.close(kept_w)
    try:
        assert isinstance(proc, spawn.ForkedProcess)
        assert proc.wait() == 3
        with os.fdopen(ready_r) as f:
            report = json.loads(f.readline())
        assert report["argv"] == ["7", str(ready_w)] and report["leader"] and report["env"] == "yes"
        fds = {int(k): v for k, v in report["fds"].items()}
        assert fds[0] == os.devnull and fds[1] == fds[2] == str(log)
        assert fds[ready_w].startswith("pipe:") and fds[kept_w].startswith("pipe:")
        assert not any(v == str(tmp_path / "parent-only") for v in fds.values())
        assert log.read_text() == "on the log\n"
        assert "HYPYR_TEST_SPAWN" not in os.environ     # the parent's environment is untouched
    finally:
        secret.close()
        os.close(kept_r)


def test_a_child_that_raises_exits_1_with_its_traceback_on_the_log(tmp_path, monkeypatch):
    if threading.active_count() > 1:
        pytest.skip("another thread runs in this test process: start_domain would not fork")
    r, w = os.pipe()

    def boom(argv: list[str]) -> int:
        raise RuntimeError("the domain failed")

    monkeypatch.setattr(domain, "main", boom)
    with open(tmp_path / "vmm.log", "ab") as logf:
        proc = spawn.start_domain(1, w, logf.fileno(), (), {})
    os.close(w)
    os.close(r)
    assert proc.wait() == 1
    assert "RuntimeError: the domain failed" in (tmp_path / "vmm.log").read_text()
