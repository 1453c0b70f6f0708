"""A pytest plugin (``-p hypyr.lab.resume``) that lets a lab test run pick up after a lab failure.

`make test-lab` boots the lab again when L1 itself died or wedged (exit 125, never a test result).
With HYPYR_LAB_PASSED naming a file (in a directory shared read-write with the lab), each test that
passed is recorded there as soon as it ends, and a later run deselects the tests recorded: they
passed in an earlier L1 boot of the same tree. Failed, skipped or unfinished tests run again.
Without HYPYR_LAB_PASSED the plugin does nothing.
"""

from __future__ import annotations

import os
import sys

import pytest

PASSED_ENV = "HYPYR_LAB_PASSED"

_ok_so_far: dict[str, bool] = {}
_state = {"all_done_before": False}


def _passed_file() -> str | None:
    return os.environ.get(PASSED_ENV) or None


def read_passed(path: str) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


@pytest.hookimpl(trylast=True)  # after -k/-m selection, so the counts below are what runs
def pytest_collection_modifyitems(config, items):
    path = _passed_file()
    if not path:
        return
    done = read_passed(path)
    gone = [i for i in items if i.nodeid in done]
    if not gone:
        return
    items[:] = [i for i in items if i.nodeid not in done]
    config.hook.pytest_deselected(items=gone)
    _state["all_done_before"] = not items
    print(f"\nlab resume: {len(gone)} tests passed in an earlier lab boot and are not run again; "
          f"{len(items)} to run", file=sys.stderr, flush=True)


def pytest_runtest_logreport(report):
    path = _passed_file()
    if not path:
        return
    ok = report.passed and not hasattr(report, "wasxfail")
    if report.when == "setup":
        _ok_so_far[report.nodeid] = ok
    elif report.when == "call":
        _ok_so_far[report.nodeid] = _ok_so_far.get(report.nodeid, False) and ok
    elif report.when == "teardown" and _ok_so_far.pop(report.nodeid, False) and ok:
        with open(path, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")
            f.flush()
            os.fsync(f.fileno())


def pytest_sessionfinish(session, exitstatus):
    # Every test had passed in earlier boots: "no tests ran" is then the suite's success.
    if _state["all_done_before"] and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
