"""A pytest plugin (``-p hypyr.lab.rerun``): a lab test that fails after one of its guests
triple-faulted runs once more.

The lab's emulated SVM crashes an L2 guest now and then, whatever the VMM (docs/lab.md, "Guest
triple faults"). Such a failure is re-raised as :class:`L2GuestTripleFault`, the test's own
failure chained, and pytest-rerunfailures runs the test once more; a second failure is final.
A guest triple-faulted if hypyr's stop reason for it is in a `*.log` file under the test's
``tmp_path`` (domain logs) or in an output given to :func:`record_output` (`hypyr run`'s stderr).
"""

from __future__ import annotations

import pytest

TRIPLE_FAULT = "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"   # hypyr.vmm.machine's stop reason
_OUTPUTS = pytest.StashKey[list]()


class L2GuestTripleFault(Exception):
    """A lab test failed after one of its guests triple-faulted; the test's failure is chained."""


def record_output(item: pytest.Item, text: str) -> None:
    """Remember a guest's VMM output for this attempt of ``item`` (set up again by a rerun)."""
    item.stash.setdefault(_OUTPUTS, []).append(text)


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[L2GuestTripleFault.__name__]))


def triple_fault_seen(item: pytest.Item) -> str | None:
    """Where a guest of ``item`` triple-faulted in this attempt, or None."""
    if any(TRIPLE_FAULT in text for text in item.stash.get(_OUTPUTS, [])):
        return "a `hypyr run` guest's output"
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    for log in sorted(tmp.rglob("*.log")) if tmp else ():
        try:
            if log.is_file() and TRIPLE_FAULT in log.read_text(errors="replace"):
                return str(log)
        except OSError:
            continue
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_OUTPUTS] = []   # a rerun starts with nothing seen


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as failure:
        where = triple_fault_seen(item)
        if where is None:
            raise
        raise L2GuestTripleFault(f"the test failed after a guest triple-faulted ({where})") from failure
