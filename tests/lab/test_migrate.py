"""Save, restore and live migration of real guests (same host, as xl's localhost case): the
guest's counters go on (same boot, uptime growing), its disk has every line once, its console
and a TCP stream from another domain keep working, a dirtied memory region checks out, both
vCPUs run after, and a destination that dies mid-stream leaves the source running."""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from procs import ancestors, children
from test_net import SUBNET_HOST, lan  # noqa: F401 (lan is a fixture)
from test_toolstack import console_log, wait_for, write_cfg, xl  # noqa: F401 (xl is a fixture)
from test_virtio import debugfs_cat, make_disk

# One line on the console every 0.1 s: its count (a shell variable: guest memory), the boot id
# and the uptime; the same count appended to a file on the disk, synced every 10 lines.
COUNTER = ("mount /dev/vda /mnt; b=$(cat /proc/sys/kernel/random/boot_id); i=0; "
           "while true; do i=$((i+1)); echo n-$i >> /mnt/log; [ $((i % 10)) = 0 ] && sync; "
           "echo \"c-$i $b $(cut -d' ' -f1 /proc/uptime)\"; sleep 0.1; done")
LINE = re.compile(r"^c-(\d+) (\S+) ([\d.]+)$", re.M)


def whole_lines(text: str) -> str:
    """A console log without its carriage returns and without a last line not yet ended: the log
    may stop halfway through one ("cpu0-12" of "cpu0-123"), as a source's does when it stops."""
    text = text.replace("\r", "")
    return text[:text.rfind("\n") + 1]


def counts(text: str) -> list[tuple[int, str, float]]:
    return [(int(n), b, float(u)) for n, b, u in LINE.findall(whole_lines(text))]


def wait_count(xl, name: str, above: int, timeout: float = 240) -> list[tuple[int, str, float]]:  # noqa: F811
    return wait_for(lambda: (c := counts(console_log(xl, name))) and c[-1][0] > above and c,
                    timeout=timeout, what=f"{name}'s counter past {above}")


def assert_continues(before: list, after: list) -> None:
    """The counter went on from where it was: no reset, no reboot, uptime still growing."""
    last_n, boot, last_up = before[-1]
    first_n, boot2, first_up = after[0]
    assert boot2 == boot, "the guest rebooted"
    assert last_n < first_n <= last_n + 2, f"counter went from {last_n} to {first_n}"  # (+2: a line cut at the pause)
    assert first_up >= last_up
    assert [n for n, _, _ in after] == list(range(first_n, first_n + len(after)))


def disk_lines_once(disk) -> int:
    """The disk's log holds n-1, n-2, … each exactly once, in order; returns how many."""
    lines = debugfs_cat(disk, "log").split()
    assert lines == [f"n-{i}" for i in range(1, len(lines) + 1)], lines[:5] + ["…"] + lines[-5:]
    return len(lines)


def test_save_restore_keeps_the_guest_going_and_refuses_a_truncated_file(xl, guest_image, tmp_path):  # noqa: F811
    disk = make_disk(tmp_path / "disk.img")
    xl("create", str(write_cfg(tmp_path, guest_image, "sv", memory=160, command=COUNTER, disks=[disk])))
    wait_count(xl, "sv", 20)
    image = tmp_path / "sv.save"
    p = xl("save", "sv", str(image))
    assert "saved" in p.stdout
    assert json.loads(xl("list", "--json").stdout) == []  # xl save: the domain is gone
    before = counts((xl.state / "logs" / "sv.console.log").read_text(errors="replace"))

    bad = tmp_path / "truncated.save"
    bad.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    p = xl("restore", str(bad), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert json.loads(xl("list", "--json").stdout) == []  # nothing created

    p = xl("restore", str(image))
    assert re.search(r"restored \(id \d+\)", p.stdout + p.stderr)
    after = wait_count(xl, "sv", before[-1][0] + 15)
    assert_continues(before, after)
    xl("destroy", "sv")
    assert disk_lines_once(disk) >= before[-1][0] - 10  # synced every 10 lines


def test_serve_creates_saves_and_restores_a_guest_from_its_fork_server(xl, guest_image, tmp_path):  # noqa: F811
    """Through `hypyr serve`'s API: the counting guest is created, saved and restored, and it keeps
    counting; both domain processes were forked by the server's fork server."""
    from hypyr.toolstack import paths
    from hypyr.toolstack.registry import Registry
    from hypyr.toolstack.server import ApiClient
    sock = tmp_path / "api.sock"
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "hypyr", "serve", "--socket", str(sock)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        helper = wait_for(lambda: sock.exists() and children(server.pid), 120, what="hypyr serve and its fork server")
        api = ApiClient(str(sock))

        def forked_by_the_helper() -> bool:
            with Registry(paths.registry_path(xl.state)) as reg:
                chain = ancestors(reg.get("fs").pid)
            return chain[chain.index(server.pid) - 1] == helper[0]
        disk = make_disk(tmp_path / "disk.img")
        api.post("/domains", {"path": str(write_cfg(tmp_path, guest_image, "fs", memory=160, command=COUNTER,
                                                    disks=[disk]))})
        assert forked_by_the_helper()
        wait_count(xl, "fs", 20)
        api.post("/domains/fs/save", {"file": str(tmp_path / "fs.save")})
        before = counts((xl.state / "logs" / "fs.console.log").read_text(errors="replace"))
        api.post("/restore", {"file": str(tmp_path / "fs.save")})
        assert forked_by_the_helper()
        after = wait_count(xl, "fs", before[-1][0] + 15)
        assert_continues(before, after)
        api.delete("/domains/fs")
        assert disk_lines_once(disk) >= before[-1][0] - 10
    finally:
        server.terminate()
        server.wait(timeout=60)
        print((tmp_path / "serve.log").read_text(errors="replace")[-2000:])


# Each vCPU counts (pinned; vCPU 0 also appends its count to the disk, synced every 10); an 8 MiB
# tmpfs file is hashed every 3 s while another loop keeps rewriting 16 MiB of random data; and it
# prints each line of the TCP stream another domain (PEER_COMMAND) sends it all along.
MG_ADDR, PEER_ADDR = "10.80.0.40", "10.80.0.41"
PEER_COMMAND = (f"until ping -c 1 -W 1 {MG_ADDR} >/dev/null; do sleep 1; done; "
                f"i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.1; done | nc {MG_ADDR} 5005; "
                "echo stream-ended")


def busy_command(vcpus: int) -> str:
    counters = "".join(f"taskset -c {cpu} sh -c 'i=0; while true; do i=$((i+1)); echo cpu{cpu}-$i; sleep 0.2; done' & "
                       for cpu in range(1, vcpus))
    return ("mount /dev/vda /mnt; "
            "dd if=/dev/urandom of=/tmp/keep bs=1M count=8 2>/dev/null; "
            "(while true; do echo keep-$(sha256sum </tmp/keep | cut -c1-64); sleep 3; done) & "
            "(while true; do dd if=/dev/urandom of=/tmp/churn bs=1M count=16 conv=notrunc 2>/dev/null; done) & "
            "taskset -c 0 sh -c 'i=0; while true; do i=$((i+1)); echo n-$i >> /mnt/log; "
            "[ $((i % 10)) = 0 ] && sync; echo cpu0-$i; sleep 0.2; done' & "
            + counters +
            "nc -l -p 5005 | while read l; do echo got-$l; done; echo stream-ended")


def cpu_counts(text: str, cpu: int) -> list[int]:
    return [int(n) for n in re.findall(rf"^cpu{cpu}-(\d+)$", whole_lines(text), re.M)]


KEEP = re.compile(r"keep-([0-9a-f]{64})$", re.M)


def stream_lines(text: str) -> list[int]:
    """The numbers of the peer's TCP lines a console printed, in order."""
    return [int(n) for n in re.findall(r"got-line-(\d+)$", whole_lines(text), re.M)]  # (after a cut line too)


def around_gap(text: str, numbers: list[int]) -> str:
    """The console lines around the first number missing from ``numbers`` (for a failure)."""
    missing = next((a + 1 for a, b in itertools.pairwise(numbers) if b != a + 1), None)
    lines = whole_lines(text).splitlines()
    at = next((i for i, line in enumerate(lines) if missing is not None and line.endswith(f"got-line-{missing - 1}")),
              0)
    return "\n".join(lines[max(0, at - 5):at + 15])


def newest_kept_console(xl) -> str:  # noqa: F811
    kept = sorted((xl.state / "logs").glob("*.console.log"), key=lambda p: p.stat().st_mtime)
    assert kept, "the source domain's console log was not kept"
    return kept[-1].read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver(port: int) -> subprocess.Popen:
    """`hypyr migrate-receive` on ``port``; its output lines are collected in ``.lines``."""
    proc = subprocess.Popen([sys.executable, "-m", "hypyr", "migrate-receive", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.lines = []  # type: ignore[attr-defined]

    def collect() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            print("receiver:", line, end="")
            proc.lines.append(line)  # type: ignore[attr-defined]
    threading.Thread(target=collect, daemon=True).start()
    return proc


def wait_line(proc: subprocess.Popen, text: str, timeout: float = 60) -> None:
    """Wait until ``proc`` (from :func:`receiver`) printed a line containing ``text``."""
    wait_for(lambda: any(text in line for line in proc.lines), timeout=timeout, step=0.1,  # type: ignore[attr-defined]
             what=f"{text!r} from {proc.args}")


# The 2-vCPU case was opt-in from 2026-12-05 to 12-07: its guest triple-faulted in the lab, and so
# do QEMU's own L2 guests at a like rate (docs/lab.md, "QEMU's L2 guests fault too").  A test
# whose guest faults is now rerun (hypyr.lab.rerun), and the case passed 4 of 4 runs in a row
# in one lab session (2026-12-07), so it runs in every suite again.
@pytest.mark.parametrize("vcpus", [1, 2])
def test_live_migration_of_a_busy_guest_with_a_tcp_stream(xl, lan, guest_image, tmp_path, vcpus):  # noqa: F811
    """The issue's TCP stream "from another domain": a peer domain on the same bridge sends
    numbered lines to the migrating guest, which prints them; none is lost, doubled or reordered."""
    lan("lan0", f"{SUBNET_HOST}/24")
    disk = make_disk(tmp_path / "disk.img")
    xl("create", str(write_cfg(tmp_path, guest_image, "mg", memory=192, vcpus=vcpus, command=busy_command(vcpus),
                               disks=[disk], extra_keys=f"vif = [ 'bridge=lan0,ip={MG_ADDR}' ]")))
    log = wait_for(lambda: (t := console_log(xl, "mg")) and KEEP.search(whole_lines(t)) and cpu_counts(t, vcpus - 1)
                   and t, what="the guest's loops to start (and its hash of 8 MiB in /tmp, the guest's tmpfs)")
    keep = set(KEEP.findall(whole_lines(log)))
    assert len(keep) == 1, keep
    xl("create", str(write_cfg(tmp_path, guest_image, "peer", memory=128, command=PEER_COMMAND,
                               extra_keys=f"vif = [ 'bridge=lan0,ip={PEER_ADDR}' ]")))
    wait_for(lambda: len(stream_lines(console_log(xl, "mg"))) > 10, timeout=180, what="the peer's lines over TCP")

    # a destination that dies mid-stream (killed as soon as it takes the connection): the source runs on
    port = free_port()
    dest = receiver(port)
    wait_line(dest, "waiting for a migration")
    src = subprocess.Popen([sys.executable, "-m", "hypyr", "migrate", "mg", f"127.0.0.1:{port}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_line(dest, "receiving domain")
    dest.send_signal(signal.SIGKILL)
    out, _ = src.communicate(timeout=180)
    dest.wait(30)
    print(out)
    assert src.returncode != 0 and "Traceback" not in out and "runs on here" in out
    wait_for(lambda: sorted(d["name"] for d in json.loads(xl("list", "--json").stdout)) == ["mg", "peer"],
             timeout=60, what="only the source domain (and the peer) to be left")
    n0 = cpu_counts(console_log(xl, "mg"), 0)[-1]
    wait_for(lambda: cpu_counts(console_log(xl, "mg"), 0)[-1] > n0 + 5, timeout=60, what="the source to go on")

    # the real migration
    port = free_port()
    dest = receiver(port)
    wait_line(dest, "waiting for a migration")
    p = xl("migrate", "mg", f"127.0.0.1:{port}", timeout=600)
    assert dest.wait(120) == 0
    m = re.search(r"downtime (\d+(?:\.\d+)?) ?ms", p.stdout + p.stderr)
    assert "migrated" in p.stdout + p.stderr and m, p.stdout + p.stderr
    print(f"reported downtime: {m.group(1)} ms")
    assert sorted(d["name"] for d in json.loads(xl("list", "--json").stdout)) == ["mg", "peer"]
    before = newest_kept_console(xl)  # the source's console, kept when it went
    for cpu in range(vcpus):  # every vCPU runs on: each pinned counter goes on from where it was
        last = cpu_counts(before, cpu)[-1]
        def past(cpu=cpu, last=last):
            return (c := cpu_counts(console_log(xl, "mg"), cpu)) and c[-1] > last + 5 and c
        got = wait_for(past, timeout=120, what=f"cpu{cpu}'s counter after the migration")
        assert last < got[0] <= last + 2, (cpu, last, got[0])
    got_before = stream_lines(before)
    after_lines = wait_for(lambda: (n := stream_lines(console_log(xl, "mg"))) and n[-1] > got_before[-1] + 20 and n,
                           timeout=120, what="the peer's lines after the migration")
    # one stream, in order, every line once: what the source printed, then the destination (the
    # line the source was printing as it stopped may be cut in two, as for the counters above)
    last = got_before[-1]
    assert got_before == list(range(got_before[0], last + 1)), around_gap(before, got_before)  # (or rotated)
    assert last < after_lines[0] <= last + 2 and after_lines == list(range(after_lines[0], after_lines[-1] + 1)), \
        (last, after_lines[:5])
    assert "stream-ended" not in console_log(xl, "peer") + console_log(xl, "mg")
    # the region written once before hashes the same after the migration, under the churn
    n_before = before.count("keep-")
    after = wait_for(lambda: (t := console_log(xl, "mg")) and t.count("keep-") > 1 and t, timeout=120,
                     what="a hash after the migration")
    assert n_before >= 1 and set(KEEP.findall(whole_lines(after))) == keep
    last_disk = cpu_counts(console_log(xl, "mg"), 0)[-1]
    xl("destroy", "mg")
    xl("destroy", "peer")
    assert disk_lines_once(disk) >= last_disk - 10 > 0
