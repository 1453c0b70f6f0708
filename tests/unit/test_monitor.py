"""hypyr info / hypyr top: host facts, CPU % arithmetic, batch tables and key handling (no KVM needed)."""

from __future__ import annotations

import io
import json
import os
import pty
import termios
import time

import pytest

from hypyr import cli
from hypyr.errors import HypyrError
from hypyr.toolstack import monitor
from hypyr.toolstack.monitor import Row
from hypyr.toolstack.registry import Registry

INFO_KEYS = {"host", "release", "machine", "nr_cpus", "cpu_model", "total_memory", "free_memory",
             "kvm_backend", "kvm_usable", "nr_domains", "domain_memory", "hypyr_version"}


def _row(name="web", domid=1, cpu=1.0, t=100.0, pid=4242, memory=64, rss=80.0, vcpus=1,
         started=None, age=None, state="-b----") -> Row:
    return Row(name, domid, state, pid, cpu, memory, rss, vcpus, started, age, t)


# -- info ------------------------------------------------------------------------------------------
def test_host_info_keys(state):
    d = monitor.host_info()
    assert d.keys() >= INFO_KEYS
    assert d["nr_cpus"] == os.cpu_count()
    assert d["total_memory"] >= d["free_memory"] > 0
    assert d["nr_domains"] == 0 and d["domain_memory"] == 0
    assert isinstance(d["kvm_usable"], bool)
    assert d["kvm_backend"] in ("PVM", "VT-x", "AMD-V", "unknown", "none")
    import hypyr
    assert d["hypyr_version"] == hypyr.__version__


def test_host_info_counts_domains(state):
    reg = Registry()
    reg.reserve("a", {"memory": 64, "vcpus": 1})   # owned by this (live) process
    reg.reserve("b", {"memory": 128, "vcpus": 2})
    reg.close()
    d = monitor.host_info()
    assert d["nr_domains"] == 2
    assert d["domain_memory"] == 192
    assert d["domain_vcpus"] == 3


def test_info_lines_are_xl_style(state):
    d = monitor.host_info()
    lines = monitor.info_lines(d)
    assert len(lines) >= len(INFO_KEYS)
    for line in lines:
        assert line[23:25] == ": ", line   # `key` padded to 23 columns, as xl info
    byk = {line[:23].strip(): line[25:] for line in lines}
    assert byk["nr_cpus"] == str(os.cpu_count())
    assert byk["total_memory"].endswith(" MiB")
    assert byk["kvm_usable"] in ("yes", "no")


def test_cli_info_json(state, capsys):
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out).keys() >= INFO_KEYS
    assert cli.main(["info"]) == 0
    assert "hypyr_version" in capsys.readouterr().out


# -- CPU % -----------------------------------------------------------------------------------------
def test_cpu_percent_from_two_samples():
    prev = [_row("a", 1, cpu=10.0, t=100.0), _row("b", 2, cpu=5.0, t=100.0, pid=99, vcpus=2, memory=128)]
    cur = [_row("a", 1, cpu=10.5, t=102.0), _row("b", 2, cpu=8.0, t=102.0, pid=99, vcpus=2, memory=128)]
    rows = monitor.top_rows(prev, cur, 2.0)
    assert [r.name for r in rows] == ["a", "b", "Total"]
    assert rows[0].cpu_pct == pytest.approx(25.0)    # 0.5 s in 2 s
    assert rows[1].cpu_pct == pytest.approx(150.0)   # two busy vCPUs can exceed 100 %
    total = rows[-1]
    assert total.is_total and total.domid is None
    assert total.cpu_pct == pytest.approx(175.0)
    assert total.memory == 192 and total.vcpus == 3 and total.rss == pytest.approx(160.0)


def test_cpu_percent_without_matching_sample_is_lifetime_average():
    cur = _row(cpu=3.0, age=12.0)
    assert monitor.cpu_percent(None, cur, 1.0) == pytest.approx(25.0)
    # the domain process changed (restart): the old sample does not count
    assert monitor.cpu_percent(_row(cpu=100.0, pid=1), cur, 1.0) == pytest.approx(25.0)
    assert monitor.cpu_percent(None, _row(cpu=None), 1.0) is None      # not running
    assert monitor.cpu_percent(_row(cpu=2.0), _row(cpu=1.0), 1.0) == 0.0  # never negative


def test_uptime_and_empty_total():
    rows = monitor.top_rows(None, [_row(started=1000.0, cpu=None, rss=None)], 0.0, now=1000.0 + 3725)
    assert rows[0].uptime == pytest.approx(3725)
    assert monitor.fmt_uptime(3725) == "01:02:05"
    assert monitor.fmt_uptime(2 * 86400 + 5) == "2d00:00:05"
    empty = monitor.top_rows(None, [], 1.0)
    assert len(empty) == 1 and empty[0].cpu_pct == 0.0 and empty[0].memory == 0


def test_sample_reads_the_domain_process(state):
    reg = Registry()
    reg.reserve("self", {"memory": 64, "vcpus": 2})  # owned by this process: a live "domain"
    reg.close()
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    rows = monitor.sample()
    assert len(rows) == 1
    r = rows[0]
    assert (r.name, r.domid, r.pid, r.memory, r.vcpus) == ("self", 1, os.getpid(), 64, 2)
    assert r.cpu_time and r.cpu_time >= 0.05
    assert r.rss and r.rss > 1
    assert r.proc_age is not None and r.proc_age >= 0
    assert r.state in ("-b----", "r-----")


# -- table / batch output --------------------------------------------------------------------------
def _fake_sampler():
    n = {"i": 0}

    def take():
        n["i"] += 1
        t = time.monotonic()
        return [_row("alpha", 1, cpu=1.0 + 0.01 * n["i"], t=t, started=time.time() - 65),
                _row("beta-long-name", 7, cpu=2.0, t=t, pid=4243, memory=256, rss=None, vcpus=2)]
    return take, n


def test_table_lines_align():
    rows = monitor.top_rows(None, [_row("alpha", 1, age=10.0), _row("b", 12, age=10.0)], 0.0)
    lines = monitor.table_lines(rows)
    assert lines[0].split() == list(monitor.COLUMNS)
    assert set(lines[3]) == {"-"}            # rule before the total
    assert lines[4].startswith("Total")
    # right-aligned numeric columns end at the same place as their headers
    end = lines[0].index("ID") + 2
    assert lines[1][:end].endswith(" 1") and lines[2][:end].endswith("12")


def test_run_top_batch(monkeypatch):
    take, n = _fake_sampler()
    monkeypatch.setattr(monitor, "sample", take)
    out = io.StringIO()
    assert monitor.run_top(interval=0.01, iterations=2, out=out, keys=io.StringIO("")) == 0
    text = out.getvalue()
    assert n["i"] == 2
    assert text.count("hypyr top -") == 2
    assert text.count("NAME") == 2 and "CPU(%)" in text and "RSS(MiB)" in text
    assert "alpha" in text and "beta-long-name" in text and text.count("Total") == 2
    assert "\x1b[" not in text                 # plain tables, no terminal control
    assert "Domains: 2 (2 blocked)" in text
    assert "00:01:05" in text                  # alpha's uptime


def test_cli_top_batch(monkeypatch, capsys):
    take, n = _fake_sampler()
    monkeypatch.setattr(monitor, "sample", take)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["top", "-d", "0.01", "-n", "3", "-b"]) == 0
    assert capsys.readouterr().out.count("NAME") == 3


def test_run_top_rejects_bad_arguments():
    with pytest.raises(HypyrError):
        monitor.run_top(interval=0, iterations=1, out=io.StringIO())
    with pytest.raises(HypyrError):
        monitor.run_top(interval=1, iterations=0, out=io.StringIO())


@pytest.mark.parametrize("interval", [float("inf"), 1e308, float("nan"), 86400.5])
def test_run_top_rejects_an_interval_it_cannot_wait(interval, monkeypatch):
    """inf and 1e308 overflowed select(); nan made every wait 0 s, a 100 % CPU loop."""
    monkeypatch.setattr(monitor, "sample", lambda: pytest.fail("sampled with a bad interval"))
    with pytest.raises(HypyrError) as e:
        monitor.run_top(interval=interval, iterations=2, out=io.StringIO(), keys=None)
    assert str(e.value) == f"the refresh interval must be more than 0 and at most 86400 seconds, not {interval}"


# -- keys ------------------------------------------------------------------------------------------
class FakeKeys:
    """Presses the given keys, one per get() call (None = no key within the timeout)."""

    def __init__(self, *presses):
        self.presses = list(presses)
        self.calls = 0

    def get(self, timeout):
        self.calls += 1
        key = self.presses.pop(0) if self.presses else None
        if key is None:
            time.sleep(timeout)  # as a real source: nothing pressed within the timeout
        return key


def test_q_quits(monkeypatch):
    take, n = _fake_sampler()
    monkeypatch.setattr(monitor, "sample", take)
    keys = FakeKeys(None, "x", None, "q", "q")
    out = io.StringIO()
    assert monitor.run_top(interval=0.001, iterations=None, out=out, keys=keys) == 0
    assert keys.presses == ["q"]            # stopped at the first q; "x" did nothing
    assert out.getvalue().count("NAME") == n["i"] >= 1


def test_q_quits_before_iterations_run_out(monkeypatch):
    take, n = _fake_sampler()
    monkeypatch.setattr(monitor, "sample", take)
    # a callable key source; 'Q' counts too
    assert monitor.run_top(interval=0.5, iterations=100, out=io.StringIO(), keys=lambda timeout: "Q") == 0
    assert n["i"] == 1


def test_ctrl_c_is_not_a_traceback(monkeypatch):
    take, n = _fake_sampler()

    def interrupted():
        if n["i"] >= 1:
            raise KeyboardInterrupt
        return take()
    out = io.StringIO()
    assert monitor.run_top(interval=0.001, out=out, keys=None, sampler=interrupted) == 0
    assert out.getvalue().count("NAME") == 1


def test_interactive_ansi_redraw(monkeypatch):
    take, _ = _fake_sampler()
    monkeypatch.setattr(monitor, "sample", take)

    class TtyOut(io.StringIO):
        def isatty(self):
            return True
    out = TtyOut()
    monitor.run_top(interval=0.001, iterations=None, out=out, keys=FakeKeys(None, "q"), batch=False)
    text = out.getvalue()
    assert text.count("\x1b[H\x1b[2J") == 2        # two redraws
    assert text.endswith("\x1b[?25h\x1b[?1049l")    # cursor and screen restored


def test_tty_keys_cbreak_and_restore():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with os.fdopen(os.dup(slave), "r") as stream, monitor._key_source(stream) as ks:
            during = termios.tcgetattr(slave)
            assert not during[3] & termios.ICANON and not during[3] & termios.ECHO
            assert ks.get(0.01) is None
            os.write(master, b"q")
            assert ks.get(1.0) == "q"
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_non_tty_stdin_is_not_read():
    with monitor._key_source(io.StringIO("q")) as ks:
        t0 = time.monotonic()
        assert ks.get(0.02) is None
        assert time.monotonic() - t0 >= 0.015


def test_net_column_is_the_rate_through_the_taps():
    a = _row(cpu=1.0, t=100.0)
    b = _row(cpu=1.5, t=102.0)
    a.net_bytes, b.net_bytes = 1_000_000, 3_000_000
    rows = monitor.top_rows([a], [b], dt=2.0, now=1000.0)
    assert rows[0].net_kbs == pytest.approx(1000.0) and rows[-1].net_kbs == pytest.approx(1000.0)
    assert "NET(KB/s)" in monitor.table_lines(rows)[0] and "1000.0" in monitor.table_lines(rows)[1]
    b.net_bytes = None  # no NIC: a dash, and the total leaves it out
    rows = monitor.top_rows([a], [b], dt=2.0, now=1000.0)
    assert rows[0].net_kbs is None and rows[-1].net_kbs is None
