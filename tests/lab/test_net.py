"""Networking end to end, inside the lab's L1 only (it has no NIC to the outside): domains on
hypyr networks (bridges) ping each other, move a 64 MiB blob intact guest→guest and guest→host over
vhost-net and over the userspace path, stay isolated on separate bridges, get DHCP leases, obey
a vif rate, keep TCP across pause and the MAC across reboot, and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_toolstack import SHOW_WHERE_ON_NMI, TICKER, console_log, wait_for, write_cfg, xl  # noqa: F401 (xl is a fixture)

from hypyr import procfs
from hypyr.lab.testguard import GuestStuck, session_threads
from hypyr.toolstack import paths
from hypyr.toolstack.errors import DomainNotFound
from hypyr.toolstack.registry import Registry

SUBNET_HOST = "10.80.0.1"


@pytest.fixture
def lan(xl):  # noqa: F811
    """Make hypyr networks; afterwards destroy the domains, then the networks."""
    made: list[str] = []

    def make(name: str, subnet: str, *flags: str) -> str:
        xl("net-create", name, "--subnet", subnet, *flags)
        made.append(name)
        return name
    yield make
    p = xl("list", "--json", check=False)
    if p.returncode == 0:
        for d in json.loads(p.stdout):
            xl("destroy", d["name"], check=False)
    for name in made:
        xl("net-destroy", name, check=False)


def domain(xl, tmp_path, image, name: str, vifs: list[str], command: str, memory: int = 160) -> None:  # noqa: F811
    vif = "vif = [ " + ", ".join(f"'{v}'" for v in vifs) + " ]"
    xl("create", str(write_cfg(tmp_path, image, name, memory=memory, command=command, extra_keys=vif,
                               options=SHOW_WHERE_ON_NMI)))


def wait_console(xl, name: str, marker: str, timeout: float = 300) -> str:  # noqa: F811
    """The console log of ``name`` once it shows the whole line with ``marker`` (the console
    arrives in pieces: a line may be half written); on timeout, fail showing its end."""
    def whole_line(t: str) -> bool:
        at = t.find(marker)
        return at >= 0 and "\n" in t[at:]
    return wait_or_show(xl, lambda: (t := console_log(xl, name)) and whole_line(t) and t, timeout,
                        f"{marker!r} on {name}'s console")


def wait_or_show(xl, pred, timeout: float, what: str):  # noqa: F811
    """``pred()``'s first true value within ``timeout``; else fail showing where every domain is
    (:func:`where_stuck`), as GuestStuck if one hung in guest mode."""
    try:
        return wait_for(pred, timeout=timeout, what=what)
    except AssertionError as e:
        report, stuck = where_stuck(xl)
        raise (GuestStuck if stuck else AssertionError)(f"{e}\n{report}") from None


SAMPLE_S = 5
NMI_ANSWER_S = 20   # a running guest prints its panic within a few seconds, even in the lab


def where_stuck(xl) -> tuple[str, list[str]]:  # noqa: F811
    """What each domain was doing when a test gave up on it, and which were stuck in guest mode.

    Shown: the end of its console; every thread of its VMM's session over SAMPLE_S seconds
    (testguard.session_threads: CPU and guest time, wait channel, kernel stack) and its vCPUs'
    exits then; its vCPUs' registers; its virtio queues' indices (a lost notification shows
    there); then its guest's own backtrace: `hypyr trigger nmi` into a
    guest booted with SHOW_WHERE_ON_NMI (it then reboots).  Of a domain that is gone: the end
    of its vmm.log (how it ended: a triple fault, say).  Stuck: a vCPU thread stayed inside
    KVM_RUN (testguard.session_threads) the whole sample without one exit, and the guest printed
    nothing in NMI_ANSWER_S after the NMI.  (A 400 s wait and this fit the lab's 600 s limit.)"""
    names = [d["name"] for d in json.loads(xl("list", "--json").stdout)]  # all: the fault may be the peer's
    mem, tmp = procfs.meminfo(), os.statvfs("/tmp")
    out = [f"--- this host: {mem.get('MemAvailable', 0) >> 10} of {mem.get('MemTotal', 0) >> 10} MiB available, "
           f"{(tmp.f_blocks - tmp.f_bfree) * tmp.f_frsize >> 20} MiB used in /tmp (in the lab: RAM)"]
    stuck = []
    for n in names:
        lines = [x for x in console_log(xl, n).splitlines() if not x.startswith("tick-")]
        out.append(f"--- {n}'s console ends with:\n" + "\n".join(lines[-25:]))
        before = _vcpus(xl, n)
        sid = _session(xl, n)
        threads, in_guest = session_threads(sid, SAMPLE_S) if sid is not None else ("(gone)", [])
        exits = {tid: c - before.get(tid, 0) for tid, c in _vcpus(xl, n).items()}
        out.append(f"--- {n}'s VMM session over {SAMPLE_S} s:\n{threads}\n--- its vCPU threads' exits then: "
                   + ", ".join(f"{tid}: {e}" for tid, e in exits.items()))
        never_left = any(exits.get(tid) == 0 for tid in in_guest)
        out.append(f"--- {n}'s registers:\n" + xl("info", n, "--registers", check=False).stdout)
        out.append(f"--- {n}'s virtio queues:\n" + xl("info", n, "--queues", check=False).stdout)
        size = len(console_log(xl, n))
        xl("trigger", n, "nmi", check=False)
        deadline = time.monotonic() + NMI_ANSWER_S
        while time.monotonic() < deadline and "Kernel Offset:" not in console_log(xl, n)[size:]:
            time.sleep(1)
        answer = console_log(xl, n)[size:]
        out.append(f"--- {n}'s console after an NMI:\n" + answer[-6000:])
        if never_left and not answer:
            stuck.append(n)
    for log in sorted((Path(xl.state) / paths.LOGS_DIR).glob("*.vmm.log")):  # domains gone: how they ended
        name = log.name.removesuffix(".vmm.log")
        if name not in names:
            try:
                tail = log.read_text(errors="replace").splitlines()[-4:]
            except OSError as e:
                tail = [f"(unreadable: {e})"]
            out.append(f"--- {name} is gone; its vmm.log ends with:\n" + "\n".join(tail))
    return "\n".join(out), stuck


def _session(xl, name: str) -> int | None:  # noqa: F811
    """The session of ``name``'s VMM process, or None if it is gone."""
    try:
        with Registry(paths.registry_path(xl.state)) as reg:
            pid = reg.get(name).pid
        return os.getsid(pid) if pid else None
    except (DomainNotFound, OSError):
        return None


def _vcpus(xl, name: str) -> dict[int, int]:  # noqa: F811
    """Each vCPU thread of ``name``'s VMM: its exits to the VMM so far."""
    p = xl("info", name, "--json", check=False)
    try:
        return {v["tid"]: v["exits"] for v in json.loads(p.stdout)["vcpus"] if isinstance(v.get("tid"), int)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def domid(xl, name: str) -> int:  # noqa: F811
    return json.loads(xl("list", "--json", name).stdout)[0]["domid"]


class Sink:
    """A TCP server on L1 that hashes one connection (or collects its lines)."""

    def __init__(self, addr: str, port: int, lines: bool = False):
        self.sock = socket.create_server((addr, port), reuse_port=False)
        self.sock.settimeout(400)
        self.conn: socket.socket | None = None
        self.sha, self.count, self.lines = hashlib.sha256(), 0, [] if lines else None
        self.first = self.last = 0.0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and drop the connection now, so the port is free for the next test
        (or this test's rerun) even if no guest ever connected."""
        for s in (self.sock, self.conn):
            try:
                if s is not None:
                    s.shutdown(socket.SHUT_RDWR)   # wakes the thread's accept() or recv()
            except OSError:
                pass
        self._thread.join(10)
        self.sock.close()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            self.conn = conn
            self.sock.close()   # one connection: a later one (the guest after a reboot) is refused
            buf = b""
            with conn:
                while chunk := conn.recv(1 << 20):
                    now = time.monotonic()
                    self.first = self.first or now
                    self.last = now
                    self.sha.update(chunk)
                    self.count += len(chunk)
                    if self.lines is not None:
                        buf += chunk
                        *done, buf = buf.split(b"\n")
                        self.lines.extend(x.decode() for x in done)
        except OSError:
            pass   # closed by close(), or no guest connected in time: the test sees done and count
        finally:
            self.done.set()


@pytest.fixture
def sink():
    """Make :class:`Sink` servers; afterwards close them all (a failed test's port is free for
    its rerun)."""
    made: list[Sink] = []

    def make(addr: str, port: int, lines: bool = False) -> Sink:
        made.append(Sink(addr, port, lines))
        return made[-1]
    yield make
    for s in made:
        s.close()


SEND = ("until ping -c 1 -W 1 {peer} >/dev/null; do sleep 1; done; ping -c 3 {peer} && echo ping-ok; "
        "dd if=/dev/urandom of=/tmp/blob bs=1M count={mib} 2>/dev/null; echo blob-$(sha256sum /tmp/blob | cut -c1-64); "
        "until nc {peer} 5001 < /tmp/blob; do sleep 1; done; echo sent-to-guest; "
        "nc {host} 5002 < /tmp/blob && echo sent-to-host; " + TICKER)
RECV = ("nc -l -p 5001 | sha256sum > /tmp/sum; "  # hashed as it arrives (64 MiB would not fit in /tmp)
        "echo got-$(cut -c1-64 /tmp/sum); "
        "ping -c 3 {peer} && echo ping-back-ok; " + TICKER)


# 64 MiB each way, as the issue asks.  Whole-suite lab runs under QEMU 7.2 (and once under 10) saw
# this transfer stall (docs/networking.md, "Bulk transfers in whole-suite lab runs");
# HYPYR_LAB_BULK_MIB=N moves N MiB instead, to tell a size effect from a lab fault.
BULK_MIB = int(os.environ.get("HYPYR_LAB_BULK_MIB", "64"))


@pytest.mark.parametrize("vhost", ["on", "off"])
def test_two_domains_talk_and_move_a_blob_intact(xl, lan, sink, guest_image, tmp_path, vhost):  # noqa: F811
    lan("lan0", f"{SUBNET_HOST}/24")
    server = sink(SUBNET_HOST, 5002)
    domain(xl, tmp_path, guest_image, "rx", [f"bridge=lan0,ip=10.80.0.11,vhost={vhost}"],
           RECV.format(peer="10.80.0.10"))
    domain(xl, tmp_path, guest_image, "tx", [f"bridge=lan0,ip=10.80.0.10,vhost={vhost}"],
           SEND.format(peer="10.80.0.11", host=SUBNET_HOST, mib=BULK_MIB), memory=256)  # blob in RAM
    tx = wait_console(xl, "tx", "sent-to-host", timeout=400)
    rx = wait_console(xl, "rx", "ping-back-ok", timeout=120)
    blob = re.search(r"blob-([0-9a-f]{64})", tx).group(1)
    assert "ping-ok" in tx
    got = re.search(r"got-(\S*)", rx)
    assert got and got.group(1) == blob, f"sent {blob}, received {got and got.group(1)}"  # guest→guest intact
    assert server.done.wait(60) and server.count == BULK_MIB << 20 and server.sha.hexdigest() == blob  # guest→host
    vmm_log = (xl.state / "domains" / str(domid(xl, "tx")) / "vmm.log").read_text()
    assert ("vhost-net" in vmm_log) == (vhost == "on")
    nics = json.loads(xl("network-list", "tx", "--json").stdout)
    assert len(nics) == 1 and nics[0]["bridge"] == "lan0" and nics[0]["tap"] == f"vif{domid(xl, 'tx')}.0"
    assert nics[0]["mac"].startswith("00:16:3e:") and nics[0]["tx_bytes"] > 2 * (BULK_MIB << 20)
    # `hypyr info --queues`: the receiver's NIC as the device saw it (its driver up, the blob through it)
    nic = json.loads(xl("info", "rx", "--json").stdout)["virtio"]["virtio0"]
    rxq = nic["queues"][0]
    assert nic["status"] == 0xF and nic["vhost"] == (vhost == "on"), nic
    if vhost == "off":  # (vhost-net's kernel side keeps its own counts and ring progress)
        assert (rxq["avail_idx"] - rxq["last_avail"]) & 0xFFFF <= rxq["size"], nic
        assert nic["counters"]["rx_bytes"] >= BULK_MIB << 20, nic


def test_separate_bridges_are_isolated(xl, lan, guest_image, tmp_path):  # noqa: F811
    lan("lana", "10.81.0.1/24")
    lan("lanb", "10.82.0.1/24")
    # both guests in 10.83.0.0/24, each on its own bridge: only a shared bridge could join them
    subprocess.run(["ip", "addr", "add", "10.83.0.1/24", "dev", "lana"], check=True)
    domain(xl, tmp_path, guest_image, "gb", ["bridge=lanb,ip=10.83.0.11/24"], TICKER)
    cmd = ("until ping -c 1 -W 1 10.83.0.1 >/dev/null; do sleep 1; done; echo reach-own-bridge; "
           "ping -c 5 -W 1 10.83.0.11 >/dev/null && echo reach-other || echo other-unreachable; " + TICKER)
    domain(xl, tmp_path, guest_image, "ga", ["bridge=lana,ip=10.83.0.10/24"], cmd)
    log = wait_console(xl, "ga", "tick-")
    assert "reach-own-bridge" in log and "other-unreachable" in log and "reach-other\n" not in log
    assert "tick-" in console_log(xl, "gb")  # gb was up all along


def test_dhcp_leases_are_in_the_subnet_and_distinct(xl, lan, guest_image, tmp_path):  # noqa: F811
    lan("dh0", "10.84.0.1/24", "--dhcp")
    cmd = "echo addr-$(ip -4 -o addr show eth0 | awk '{print $4}'); " + TICKER
    for name in ("d1", "d2"):
        domain(xl, tmp_path, guest_image, name, ["bridge=dh0"], cmd)
    addrs = []
    for name in ("d1", "d2"):
        log = wait_console(xl, name, "addr-")
        m = re.search(r"addr-(10\.84\.0\.\d+)/24", log)
        assert m, log
        addrs.append(m.group(1))
    assert addrs[0] != addrs[1] and SUBNET_HOST not in addrs


def test_vif_rate_limits_transmit(xl, lan, sink, guest_image, tmp_path):  # noqa: F811
    lan("lan0", f"{SUBNET_HOST}/24")
    server = sink(SUBNET_HOST, 5003)
    cmd = (f"until ping -c 1 -W 1 {SUBNET_HOST} >/dev/null; do sleep 1; done; "
           f"dd if=/dev/zero bs=64K count=128 2>/dev/null | nc {SUBNET_HOST} 5003; echo sent; " + TICKER)
    domain(xl, tmp_path, guest_image, "slow", ["bridge=lan0,ip=10.80.0.20,rate=8Mb/s@20ms"], cmd)
    wait_or_show(xl, server.done.is_set, 300, "the guest's 8 MiB to reach the host")
    assert server.count == 8 << 20
    rate = server.count / (server.last - server.first)
    print(f"measured {rate / 1e6:.2f} MB/s against a limit of 1.00 MB/s")
    assert 0.8e6 <= rate <= 1.2e6


def test_tcp_survives_pause_and_mac_survives_reboot(xl, lan, sink, guest_image, tmp_path):  # noqa: F811
    lan("lan0", f"{SUBNET_HOST}/24")
    server = sink(SUBNET_HOST, 5004, lines=True)
    cmd = (f"echo mac-$(cat /sys/class/net/eth0/address); "
           f"until ping -c 1 -W 1 {SUBNET_HOST} >/dev/null; do sleep 1; done; "
           f"i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done | nc {SUBNET_HOST} 5004; "
           + TICKER)  # after the reboot nobody listens: the guest just ticks
    domain(xl, tmp_path, guest_image, "pz", ["bridge=lan0,ip=10.80.0.30"], cmd)
    wait_for(lambda: len(server.lines) > 5, timeout=300, what="lines over TCP")
    xl("pause", "pz")
    time.sleep(0.5)
    paused_at = len(server.lines)
    time.sleep(4)
    assert len(server.lines) <= paused_at + 1
    xl("unpause", "pz")
    wait_for(lambda: len(server.lines) > paused_at + 10, timeout=60, what="lines after unpause")
    assert server.lines == [f"line-{i}" for i in range(len(server.lines))]  # one connection, nothing lost
    assert not server.done.is_set()
    mac = json.loads(xl("network-list", "pz", "--json").stdout)[0]["mac"]
    assert f"mac-{mac}" in console_log(xl, "pz")
    xl("reboot", "pz")
    wait_for(lambda: console_log(xl, "pz").count(f"mac-{mac}") >= 2, timeout=300, what="the MAC after reboot")
    assert json.loads(xl("network-list", "pz", "--json").stdout)[0]["mac"] == mac


def _taps() -> list[str]:
    return sorted(n for n in os.listdir("/sys/class/net") if n.startswith("vif"))


def _dnsmasq_pids() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "dnsmasq":
                pids.append(int(comm.parent.name))
        except OSError:
            pass
    return pids


def _tun_fds() -> int:
    n = 0
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            n += os.readlink(fd) == "/dev/net/tun"
        except OSError:
            pass
    return n


def test_create_destroy_and_kill_leave_nothing_behind(xl, lan, guest_image, tmp_path):  # noqa: F811
    lan("dh1", "10.85.0.1/24", "--dhcp")
    dnsmasq = _dnsmasq_pids()
    assert len(dnsmasq) == 1
    cfg = write_cfg(tmp_path, guest_image, "cy", command=TICKER, extra_keys="vif = [ 'bridge=dh1', 'bridge=dh1' ]")
    for _ in range(20):
        xl("create", str(cfg))
        assert len(_taps()) == 2
        xl("destroy", "cy")
    assert _taps() == [] and os.listdir("/sys/class/net/dh1/brif") == [] and _tun_fds() == 0
    assert _dnsmasq_pids() == dnsmasq
    xl("create", str(cfg))  # kill -9 of the VMM: the kernel removes its taps with its descriptors
    tid = json.loads(xl("vcpu-list", "cy", "--json").stdout)[0]["tid"]
    pid = int(Path(f"/proc/{tid}/status").read_text().split("Tgid:")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _taps() == [], timeout=30, what="the taps to go")
    xl("net-destroy", "dh1")
    assert not os.path.exists("/sys/class/net/dh1")
    assert _dnsmasq_pids() == []


@pytest.mark.parametrize("vif, words", [
    ("bridge=nosuchbr", ["vif 0", "nosuchbr"]),
    ("bridge=lan0,mac=00:16:3e:zz:00:01", ["vif 0", "mac"]),
    ("bridge=lan0,rate=fast", ["vif 0", "rate"]),
    ("bridge=lan0,brigde=lan0", ["vif 0", "brigde"]),
])
def test_bad_vif_is_one_sentence_and_creates_nothing(xl, lan, guest_image, tmp_path, vif, words):  # noqa: F811
    lan("lan0", f"{SUBNET_HOST}/24")
    cfg = write_cfg(tmp_path, guest_image, "bad", command=TICKER, extra_keys=f"vif = [ '{vif}' ]")
    p = xl("create", str(cfg), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert all(w in p.stderr for w in words), p.stderr
    assert json.loads(xl("list", "--json").stdout) == [] and _taps() == []


def test_duplicate_mac_of_a_live_domain_is_refused(xl, lan, guest_image, tmp_path):  # noqa: F811
    lan("lan0", f"{SUBNET_HOST}/24")
    domain(xl, tmp_path, guest_image, "m1", ["bridge=lan0,mac=00:16:3e:00:00:42"], TICKER)
    cfg = write_cfg(tmp_path, guest_image, "m2", command=TICKER,
                    extra_keys="vif = [ 'bridge=lan0,mac=00:16:3e:00:00:42' ]")
    p = xl("create", str(cfg), check=False)
    assert p.returncode != 0 and "00:16:3e:00:00:42" in p.stderr and "m1" in p.stderr
    assert [d["name"] for d in json.loads(xl("list", "--json").stdout)] == ["m1"] and len(_taps()) == 1
