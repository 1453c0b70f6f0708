"""Networks, bridges, taps (hypyr.toolstack.network) and vifs at domain creation.

Every test that touches the host's networking runs in a forked child inside its own network and
mount namespaces (with a private sysfs), so no bridge, tap, dnsmasq or nftables table ever
appears on the host and no packet leaves the namespace.  Skipped when that is not possible.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import subprocess
import time
import traceback
from pathlib import Path

import pytest

from hypyr.errors import HypyrError
from hypyr.libc import LIBC

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
DNSMASQ = Path("/usr/sbin/dnsmasq")


def in_netns(fn, state_dir: Path):
    """Run fn() in a child in fresh net + mount namespaces; re-raise its failure here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child
        os.close(r)
        result: tuple = ("ok", None)
        try:
            libc = LIBC
            if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
                result = ("skip", f"unshare: {os.strerror(ctypes.get_errno())}")
            elif (libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0
                  or libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None) != 0):
                result = ("skip", f"mount: {os.strerror(ctypes.get_errno())}")
            else:
                os.environ["HYPYR_STATE_DIR"] = str(state_dir)
                try:
                    fn()
                finally:
                    _cleanup()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = ("skip", str(e)) if isinstance(e, pytest.skip.Exception) else \
                ("fail", "".join(traceback.format_exception(e)))
        with os.fdopen(w, "wb") as f:
            f.write(pickle.dumps(result))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, detail = pickle.loads(data) if data else ("fail", "the child died")
    if kind == "skip":
        pytest.skip(detail)
    if kind == "fail":
        pytest.fail(detail, pytrace=False)


def _cleanup() -> None:
    """Stop every dnsmasq the test started (it would keep the namespace alive)."""
    from hypyr.toolstack import network
    for name in list(network._load()):
        try:
            network._stop_dnsmasq(name)
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def netns(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    pytest.importorskip("pyroute2")
    return lambda fn: in_netns(fn, tmp_path / "state")


def _addrs(name: str) -> list[str]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx, family=2)]


def _exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _raises(fn, *args, **kw) -> str:
    try:
        fn(*args, **kw)
    except HypyrError as e:
        return str(e)
    raise AssertionError(f"{fn.__name__} did not raise")


# ---------------------------------------------------------------- networks

def test_net_create_list_destroy(netns):
    def body():
        from hypyr.toolstack import network as n
        net = n.net_create("hbr0", "10.88.0.0/24")
        assert net == n.Network("hbr0", "10.88.0.1/24", False, False)
        assert n.bridge_exists("hbr0") and _addrs("hbr0") == ["10.88.0.1/24"]
        assert Path("/sys/class/net/hbr0/operstate").read_text().strip() in ("up", "unknown", "down")
        [info] = n.net_list()
        assert (info.name, info.bridge, info.subnet, info.dhcp, info.nat, info.present, info.taps) == \
            ("hbr0", "hbr0", "10.88.0.1/24", False, False, True, [])
        assert _raises(n.net_create, "hbr0", "10.89.0.0/24") == "network hbr0 already exists"
        assert _raises(n.net_create, "hbr1", "10.88.0.128/25") == \
            "network hbr1: subnet 10.88.0.128/25 overlaps network hbr0 (10.88.0.0/24)"
        n.net_destroy("hbr0")
        assert not _exists("hbr0") and n.net_list() == []
        assert _raises(n.net_destroy, "hbr0") == "no network named hbr0"
    netns(body)


def test_bad_input_creates_nothing(netns):
    def body():
        from hypyr.toolstack import network as n
        assert _raises(n.net_create, "hbr0", "10.88.0.0/31") == \
            "network hbr0: subnet 10.88.0.0/31 is too small (use a prefix of /30 or shorter)"
        assert _raises(n.net_create, "hbr0", "fast") == \
            "network hbr0: subnet 'fast' is not an IPv4 CIDR like 10.77.0.0/24"
        assert _raises(n.net_create, "a/b", "10.88.0.0/24").startswith("network name 'a/b' must be")
        assert _raises(n.net_create, "lo", "10.88.0.0/24").startswith("an interface named lo already exists")
        assert not _exists("hbr0") and n.net_list() == []
    netns(body)


def test_dhcp_starts_dnsmasq_and_destroy_stops_it(netns):
    if not DNSMASQ.exists():
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")

    def body():
        from hypyr.toolstack import network as n
        n.net_create("hbr0", "10.88.0.0/24", dhcp=True)
        [info] = n.net_list()
        pid = info.dnsmasq_pid
        assert pid and Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--interface=hbr0" in argv and b"--dhcp-range=10.88.0.2,10.88.0.254,12h" in argv
        assert b"--port=0" in argv and b"--bind-interfaces" in argv
        n.net_destroy("hbr0")
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        stat = Path(f"/proc/{pid}/stat").read_text().split()[2] if os.path.exists(f"/proc/{pid}") else "gone"
        assert stat in ("gone", "Z")
        assert not list((Path(os.environ["HYPYR_STATE_DIR"]) / "networks").iterdir())
    netns(body)


def test_stop_dnsmasq_never_kills_another_process(netns):
    def body():
        from hypyr.toolstack import network as n
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            n._pid_file("hbr0").write_text(f"{sleeper.pid}\n")
            n._stop_dnsmasq("hbr0")
            assert sleeper.poll() is None
        finally:
            sleeper.kill()
            sleeper.wait()
    netns(body)


def test_nat_table_added_and_removed(netns):
    if subprocess.run(["sh", "-c", "command -v nft || test -x /usr/sbin/nft"], capture_output=True).returncode:
        pytest.skip("nft is not installed (apt-get install nftables)")

    def body():
        from hypyr.toolstack import network as n
        n.net_create("hbr0", "10.88.0.0/24", nat=True)
        rules = subprocess.run([n.NFT, "list", "table", "ip", "hypyr-hbr0"], capture_output=True, text=True)
        assert rules.returncode == 0
        assert 'ip saddr 10.88.0.0/24 oifname != "hbr0" masquerade' in rules.stdout
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        n.net_destroy("hbr0")
        assert subprocess.run([n.NFT, "list", "table", "ip", "hypyr-hbr0"], capture_output=True).returncode != 0
    netns(body)


def test_hand_made_bridge_is_used_and_never_deleted(netns):
    def body():
        from pyroute2 import IPRoute

        from hypyr.toolstack import network as n
        with IPRoute() as ipr:
            ipr.link("add", ifname="mine", kind="bridge")
        assert n.ensure_bridge("mine", 0) == "mine"
        assert _raises(n.net_destroy, "mine") == \
            "bridge mine was not created by hypyr net-create; hypyr never deletes a bridge made by hand"
        assert _exists("mine") and n.net_list() == []
        with IPRoute() as ipr:
            ipr.link("add", ifname="veth0", kind="veth", peer="veth1")
        assert _raises(n.ensure_bridge, "veth0", 1) == "vif 1: veth0 is not a bridge"
    netns(body)


def test_ensure_bridge_missing_and_default(netns):
    def body():
        from hypyr.toolstack import network as n
        assert _raises(n.ensure_bridge, "lan9", 2) == \
            "vif 2: bridge 'lan9' does not exist (create it with: hypyr net-create lan9 --subnet CIDR)"
        assert not _exists("lan9")
        assert n.ensure_bridge(n.DEFAULT_BRIDGE, 0) == "xenbr0"
        assert _addrs("xenbr0") == [n.DEFAULT_SUBNET]
        assert n.lookup("xenbr0") == n.Network("xenbr0", "10.77.0.1/24", False, False)
        assert n.ensure_bridge(n.DEFAULT_BRIDGE, 1) == "xenbr0"       # second use: as it is
    netns(body)


# ---------------------------------------------------------------- taps

def test_open_tap_attaches_and_vanishes_on_close(netns):
    def body():
        import fcntl
        import struct

        from hypyr.toolstack import network as n
        n.net_create("hbr0", "10.88.0.0/24")
        fd = n.open_tap("vif7.0", "hbr0", None, 0)
        try:
            assert not os.get_inheritable(fd)
            assert n.bridge_ports("hbr0") == ["vif7.0"]
            assert Path("/sys/class/net/vif7.0/mtu").read_text().strip() == "1500"
            flags = int(Path("/sys/class/net/vif7.0/tun_flags").read_text(), 16)
            assert flags & (n.IFF_TAP | n.IFF_NO_PI | n.IFF_VNET_HDR) == n.IFF_TAP | n.IFF_NO_PI | n.IFF_VNET_HDR
            TUNGETVNETHDRSZ = 0x800454D7
            hdr = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, b"\0" * 4))[0]
            assert hdr == 12
            assert n.tap_stats("vif7.0") == (0, 0)
            assert [x.taps for x in n.net_list()] == [["vif7.0"]]
            assert _raises(n.net_destroy, "hbr0") == \
                "network hbr0 still has vif7.0 attached (destroy those domains first)"
            assert _raises(n.open_tap, "vif7.0", "hbr0", None, 3) == \
                "vif 3: an interface named vif7.0 already exists (choose another vifname)"
            assert n.bridge_ports("hbr0") == ["vif7.0"]
        finally:
            os.close(fd)
        deadline = time.monotonic() + 2
        while _exists("vif7.0") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _exists("vif7.0") and n.bridge_ports("hbr0") == []
        fd = n.open_tap("big0", "hbr0", 9000, 1)
        assert Path("/sys/class/net/big0/mtu").read_text().strip() == "9000"
        os.close(fd)
        n.net_destroy("hbr0")
        assert _raises(n.tap_stats, "vif7.0") == "there is no interface vif7.0"
    netns(body)


def test_open_tap_failure_leaves_nothing(netns):
    def body():
        from hypyr.toolstack import network as n
        before = len(os.listdir("/proc/self/fd"))
        assert _raises(n.open_tap, "vif1.0", "nobridge", None, 0) == "vif 0: bridge 'nobridge' does not exist"
        assert not _exists("vif1.0") and len(os.listdir("/proc/self/fd")) == before
    netns(body)


# ---------------------------------------------------------------- domains (toolstack side)

def _cfg(tmp: Path, vifs: str):
    from hypyr.toolstack.xlcfg import loads
    kernel = tmp / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    return loads(f"name='web'\nkernel='{kernel}'\nmemory=16\nvif=[{vifs}]\n", "web.cfg")


def test_create_with_bad_vifs_leaves_nothing(netns, tmp_path):
    def body():
        from hypyr.toolstack import api, network
        from hypyr.toolstack.registry import Registry
        reg = Registry()
        # a missing bridge: refused before anything is reserved
        assert _raises(api.create, _cfg(tmp_path, "'bridge=lan9'")) == \
            "vif 0: bridge 'lan9' does not exist (create it with: hypyr net-create lan9 --subnet CIDR)"
        # a tap name clash on the second vif: the first tap is closed, the registry row removed
        network.net_create("hbr0", "10.88.0.0/24")
        fd = network.open_tap("taken0", "hbr0")
        try:
            msg = _raises(api.create, _cfg(tmp_path, "'bridge=hbr0', 'bridge=hbr0,vifname=taken0'"))
            assert msg == "vif 1: an interface named taken0 already exists (choose another vifname)"
            assert reg.list() == [] and network.bridge_ports("hbr0") == ["taken0"]
        finally:
            os.close(fd)
    netns(body)


def test_create_refuses_a_mac_of_a_live_domain(netns, tmp_path):
    def body():
        from hypyr.toolstack import api
        from hypyr.toolstack.domconfig import DomainConfig
        from hypyr.toolstack.registry import Registry
        reg = Registry()
        other = _cfg(tmp_path, "'mac=00:16:3e:00:00:01,bridge=xenbr0'")
        rec = reg.reserve("other", json.dumps(other.to_dict()))     # owned (alive) by this process
        msg = _raises(api.create, _cfg(tmp_path, "'mac=00:16:3E:00:00:01'"))
        assert msg == "vif 0: mac 00:16:3e:00:00:01 is already used by domain other (vif 0)"
        assert [r.name for r in reg.list()] == ["other"]
        # MACs and bridges are filled in and kept in the stored config
        cfg = api.prepare_vifs(_cfg(tmp_path, "'', 'bridge=xenbr0'"), reg)
        assert [v.bridge for v in cfg.vifs] == ["xenbr0", "xenbr0"]
        assert all(v.mac and v.mac.startswith("00:16:3e:") for v in cfg.vifs)
        assert len({v.mac for v in cfg.vifs} | {"00:16:3e:00:00:01"}) == 3
        assert DomainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).vifs == cfg.vifs
        reg.remove(rec.domid)
    netns(body)


def test_network_list_rows(netns, tmp_path):
    def body():
        from hypyr.toolstack import api, network, spawn
        from hypyr.toolstack.registry import Registry
        reg = Registry()
        cfg = api.prepare_vifs(_cfg(tmp_path, "'mac=00:16:3e:00:00:02', 'vifname=web1'"), reg)
        rec = reg.reserve("web", json.dumps(cfg.to_dict()))
        fds = spawn._open_taps(cfg, rec.domid)
        try:
            rows = api.network_list("web")
            assert rows == [
                {"devid": 0, "mac": "00:16:3e:00:00:02", "bridge": "xenbr0", "tap": f"vif{rec.domid}.0",
                 "rx_bytes": 0, "tx_bytes": 0},
                {"devid": 1, "mac": cfg.vifs[1].mac, "bridge": "xenbr0", "tap": "web1",
                 "rx_bytes": 0, "tx_bytes": 0}]
            assert network.bridge_ports("xenbr0") == sorted([f"vif{rec.domid}.0", "web1"])
        finally:
            for fd in fds:
                os.close(fd)
            reg.remove(rec.domid)
    netns(body)


# ---------------------------------------------------------------- the domain process's view

def test_vm_config_nets_and_ip_args(tmp_path, monkeypatch):
    from hypyr.toolstack import domain_vm, network
    from hypyr.vmm.config import NetConfig
    monkeypatch.setenv("HYPYR_STATE_DIR", str(tmp_path / "state"))
    with network._locked() as recs:
        recs["dh0"] = network.Network("dh0", "10.90.0.1/16", dhcp=True)
    cfg = _cfg(tmp_path, "'mac=00:16:3e:00:00:03,bridge=dh0,ip=10.90.1.2,rate=8Mb/s@20ms,mtu=1400,vhost=off', "
                         "'mac=00:16:3e:00:00:04,bridge=dh0,vifname=web1', "
                         "'mac=00:16:3e:00:00:05,bridge=xenbr0,ip=10.77.0.9/25'")
    vc = domain_vm.vm_config(cfg, [7, 8, 9], domid=4)
    assert vc.nets == [NetConfig(7, "00:16:3e:00:00:03", 1400, False, (1_000_000, 0.02), "vif4.0"),
                       NetConfig(8, "00:16:3e:00:00:04", None, None, None, "web1"),
                       NetConfig(9, "00:16:3e:00:00:05", None, None, None, "vif4.2")]
    assert vc.cmdline.endswith(" hypyr.ip.0=10.90.1.2/16 hypyr.ip.1=dhcp hypyr.ip.2=10.77.0.9/25")
    with pytest.raises(HypyrError) as ei:
        domain_vm.vm_config(cfg, [7])
    assert str(ei.value) == "3 vifs but 1 taps (domains with vifs are started by hypyr create)"


def test_vmm_does_not_import_pyroute2():
    out = subprocess.run([os.sys.executable, "-c", "import sys, hypyr.toolstack.domain, hypyr.toolstack.network, "
                          "hypyr.vmm.builder; print('pyroute2' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_net_commands(netns):
    def body():
        import contextlib
        import io

        from hypyr.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["net-create", "hbr0", "--subnet", "10.88.0.0/24"]) == 0
            assert main(["net-list", "--json"]) == 0
            assert main(["net-list"]) == 0
            assert main(["net-create", "hbr1", "--subnet", "nonsense"]) == 1
            assert main(["net-destroy", "nope"]) == 1
            assert main(["network-list", "nodomain"]) == 1
            assert main(["net-destroy", "hbr0"]) == 0
        lines = out.getvalue().splitlines()
        listed = json.loads("\n".join(lines[:lines.index("]") + 1]))
        assert [(x["name"], x["subnet"], x["taps"]) for x in listed] == [("hbr0", "10.88.0.1/24", [])]
        assert lines[-2].split() == ["Name", "Bridge", "Subnet", "DHCP", "NAT", "Taps"]
        assert lines[-1].split() == ["hbr0", "hbr0", "10.88.0.1/24", "no", "no", "-"]
        assert "hypyr: error: network hbr1: subnet 'nonsense' is not an IPv4 CIDR like 10.77.0.0/24" in err.getvalue()
        assert "hypyr: error: no network named nope" in err.getvalue()
        assert "hypyr: error: no domain named nodomain" in err.getvalue()
    netns(body)


def test_net_create_failure_rolls_back(netns):
    def body():
        from hypyr.toolstack import network as n
        n.DNSMASQ = "/bin/false"                    # "dnsmasq" fails to start: the bridge goes too
        msg = _raises(n.net_create, "hbr0", "10.88.0.0/24", dhcp=True)
        assert msg == "network hbr0: dnsmasq did not start (exit status 1)"
        assert not _exists("hbr0") and n.net_list() == []
    netns(body)


# ---------------------------------------------------------------- the device on a real TAP

def test_virtio_net_on_a_real_tap(netns):
    """The device's frames cross a real TAP and bridge (inside the namespace): a good frame
    arrives on the bridge, one with an absurd GSO header is refused by the kernel and counted,
    a frame sent from the bridge side reaches the guest's receive buffer."""
    def body():
        import socket
        import struct

        from test_virtio_net import Nic
        from virtio_mock import Buf

        from hypyr.devices.virtio import net as N
        from hypyr.devices.virtio.device import VIRTIO_F_VERSION_1
        from hypyr.toolstack import network as n

        n.net_create("hbr0", "10.88.0.0/24")
        fd = n.open_tap("vif9.0", "hbr0", None, 0)

        nic = Nic(VIRTIO_F_VERSION_1 | N.F_MRG_RXBUF | N.F_CSUM, tap_fd=fd)
        assert not nic.status() & 64  # the real TUNSETOFFLOAD took the offloads
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))  # local experimental type
        cap.bind(("hbr0", 0))
        cap.settimeout(2)
        frame = b"\xff" * 6 + bytes.fromhex("00163e000001") + b"\x88\xb5" + os.urandom(200)
        good = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0) + frame
        bad = struct.pack("<BBHHHHH", 1, 1, 60000, 1, 65000, 65000, 0) + frame  # NEEDS_CSUM, TCPV4 GSO, nonsense
        for pkt in (bad, good):
            nic.tx.add_chain([Buf(nic.tx.alloc(pkt), len(pkt))])
        nic.t.notify(1)
        assert nic.dev.counters.tx_dropped == 1 and nic.dev.counters.tx_packets == 1
        assert cap.recv(4096) == frame
        bufs = {nic.rx.add_chain([Buf(a, 2048, write=True)]): a for a in [nic.rx.alloc(2048) for _ in range(8)]}
        reply = b"\xff" * 6 + bytes.fromhex("00163e000002") + b"\x88\xb5" + b"pong" * 20
        cap.send(reply)
        got: list[bytes] = []  # the kernel's own IPv6 chatter may come first
        deadline = time.monotonic() + 3
        while reply not in got and time.monotonic() < deadline:
            nic.dev._rx_ready()
            got += [nic.mem.read(bufs[h] + 12, w - 12) for h, w in nic.rx.take_used()]
            time.sleep(0.01)
        assert reply in got
        nic.dev.close()
        os.close(fd)
    netns(body)
