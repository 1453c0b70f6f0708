"""A pytest plugin (``-p hypyr.lab.rerun``): a lab test that fails after one of its guests
triple-faulted, found its virtio-net receive ring corrupt, or hung without leaving guest mode,
runs again, up to RERUNS times.

The lab's emulated SVM crashes or wedges an L2 guest now and then, whatever the VMM (docs/lab.md,
"Guest triple faults", "Hung tests"). Such a failure is re-raised as :class:`L2GuestFault`, the
test's own failure chained, and pytest-rerunfailures runs the test again. A fault is seen when
one of FAULTS (hypyr's triple-fault stop reason, or the guest kernel's "input.0:id N is not a
head!", which QEMU's own L2 guests printed too) is in a `*.log` file under the test's
``tmp_path`` (domain and console logs) or in an output given to :func:`record_output` (`hypyr
run`'s stderr); a hang, when a `hypyr run` timed out while a vCPU thread ran guest code all the
time (``testguard.GuestNeverLeft``), or a domain's did and its guest ignored an NMI
(``testguard.GuestStuck``); a stall, when a `hypyr run` timed out with its output cut mid-line
(``testguard.OutputStalled``). The evidence is printed, so the CI log keeps a count. A test's
waits call :func:`raise_if_faulted`, so a test whose guest died fails at once instead of waiting
out its timeout.
"""

from __future__ import annotations

import pytest

from hypyr.lab.testguard import GuestNeverLeft, GuestStuck, OutputStalled, as_text

TRIPLE_FAULT = "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"   # hypyr.vmm.machine's stop reason
RING_NOT_A_HEAD = "is not a head!"   # Linux's virtio_net: a used receive buffer it never gave
FAULTS = {TRIPLE_FAULT: "triple-faulted", RING_NOT_A_HEAD: "found a used virtio-net buffer it never gave"}
RERUNS = 2   # the faults come in runs (docs/lab.md): the 2-vCPU system image's guest faulted twice in a row
_OUTPUTS = pytest.StashKey[list]()
_running: list[pytest.Item] = []   # the test being called now, if any


class L2GuestFault(Exception):
    """A lab test failed after one of its guests faulted or hung in guest mode; the test's failure
    is chained."""


def record_output(item: pytest.Item, text: str) -> None:
    """Remember a guest's VMM output for this attempt of ``item`` (set up again by a rerun)."""
    item.stash.setdefault(_OUTPUTS, []).append(text)


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.flaky(reruns=RERUNS, only_rerun=[L2GuestFault.__name__]))


class GuestFaulted(Exception):
    """Raised by :func:`raise_if_faulted` in the test that is running (not an AssertionError, which
    a test's wait may catch to show more)."""


def raise_if_faulted() -> None:
    """Fail the running test now if one of its guests has faulted (:func:`fault_seen`): its wait
    would only run out. Does nothing outside a test called under this plugin."""
    if _running and (seen := fault_seen(_running[-1])) is not None:
        raise GuestFaulted(f"a guest {seen[0]} ({seen[1]})")


def fault_seen(item: pytest.Item) -> tuple[str, str, str] | None:
    """What a guest of ``item`` did in this attempt (a FAULTS value), where it was seen and the
    lines that say so (the first with the fault and those after it: hypyr's register dump after
    a triple fault), or None."""
    def found(text: str) -> tuple[str, str] | None:
        for mark, what in FAULTS.items():
            if mark in text:
                return what, _excerpt(text, mark)
        return None
    for text in item.stash.get(_OUTPUTS, []):
        if hit := found(text):
            return hit[0], "a `hypyr run` guest's output", hit[1]
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    for log in sorted(tmp.rglob("*.log")) if tmp else ():
        try:
            text = log.read_text(errors="replace") if log.is_file() else ""
        except OSError:
            continue
        if hit := found(text):
            return hit[0], str(log), hit[1]
    return None


def _show(item: pytest.Item, text: str) -> None:
    """Write ``text`` to the terminal now, past pytest's output capture."""
    plugins = item.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


def _excerpt(text: str, mark: str, lines: int = 9) -> str:
    """The line with the first ``mark`` and the ``lines`` - 1 after it."""
    at = text.index(mark)
    start = text.rfind("\n", 0, at) + 1
    return "\n".join(text[start:].splitlines()[:lines])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_OUTPUTS] = []   # a rerun starts with nothing seen


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _running.append(item)
    try:
        return (yield)
    except Exception as failure:
        seen = fault_seen(item)
        if seen is not None:
            what, where, excerpt = seen
            _show(item, f"\n{item.nodeid}: a guest {what} ({where}):\n{excerpt}")
            raise L2GuestFault(f"the test failed after a guest {what} ({where})") from failure
        if isinstance(failure, GuestNeverLeft):
            _show(item, f"\n{item.nodeid}: a guest hung without leaving guest mode; the command's threads:\n"
                        f"{failure.threads}")
            raise L2GuestFault("the test failed after a guest hung without one exit to the VMM") from failure
        if isinstance(failure, OutputStalled):
            tail = as_text(failure.output)[-300:]
            _show(item, f"\n{item.nodeid}: a guest's output stopped mid-line until the timeout; it ends:\n{tail}")
            raise L2GuestFault("the test failed after a guest's output stalled mid-line") from failure
        if isinstance(failure, GuestStuck):
            _show(item, f"\n{item.nodeid}: a domain's guest hung in guest mode and did not answer an NMI:\n"
                        f"{failure}")
            raise L2GuestFault("the test failed after a domain's guest hung without one exit to the VMM") \
                from failure
        raise
    finally:
        _running.remove(item)
