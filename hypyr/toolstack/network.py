"""Host networking for domains: bridges ("networks"), DHCP (dnsmasq), NAT (nftables) and taps.

A *network* is a Linux bridge hypyr made with ``net_create`` (libvirt's verb): the host's
address on it, optionally a dnsmasq DHCP server bound to it alone, and optionally an nftables
table ``hypyr-<name>`` masquerading its subnet out of every other interface.  Records are kept
in ``<state>/networks.json`` (under an flock on ``<state>/networks.lock``); dnsmasq's pid file
and leases are ``<state>/networks/<name>.{pid,leases}``.

A bridge that exists without a record was made by hand: hypyr uses it as it is and never
deletes it.  The default bridge ``xenbr0`` is created as a network (``10.77.0.1/24``, no DHCP,
no NAT) the first time a vif needs it.

Taps (``open_tap``) are not persistent: the tap disappears when the last fd to it is closed,
so a VMM killed with SIGKILL leaves nothing behind.

Bridge, link and address work goes through netlink (pyroute2, imported lazily so that the VMM
never loads it); dnsmasq and nft are run as programs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hypyr import procfs
from hypyr.errors import Conflict, HypyrError, InvalidInput, NotFound
from hypyr.toolstack import paths

DEFAULT_BRIDGE = "xenbr0"
DEFAULT_SUBNET = "10.77.0.1/24"
DNSMASQ = "/usr/sbin/dnsmasq"
NFT = shutil.which("nft") or "/usr/sbin/nft"
DHCP_LEASE_TIME = "12h"

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000              # fail with EBUSY instead of attaching to an existing device
VNET_HDR_SIZE = 12                 # struct virtio_net_hdr_mrg_rxbuf (= the virtio 1.x header)

_NET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,14}")


class NetworkError(HypyrError):
    """A network, bridge or tap problem; str() is one sentence."""


class InvalidNetwork(NetworkError, InvalidInput):
    """A network name or subnet that cannot be used."""


class NetworkNotFound(NetworkError, NotFound):
    """No network (or bridge) of that name."""


class NetworkExists(NetworkError, Conflict):
    """A network, or another interface, of that name (or an overlapping subnet) exists."""


class NetworkInUse(NetworkError, Conflict):
    """Taps are still attached to the network, or it is a bridge hypyr did not make."""


@dataclass(frozen=True)
class Network:
    """A bridge hypyr manages: its name (= the bridge's), host address/prefix, DHCP, NAT."""

    name: str
    subnet: str              # the host's address on the bridge with the prefix, e.g. 10.77.0.1/24
    dhcp: bool = False
    nat: bool = False

    @property
    def bridge(self) -> str:
        return self.name

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.subnet)

    def dhcp_range(self) -> tuple[str, str]:
        """The addresses dnsmasq hands out: every usable one after the host's."""
        net = self.interface.network
        return str(self.interface.ip + 1), str(net.broadcast_address - 1)


@dataclass
class NetworkInfo:
    """What ``net_list`` reports for one network."""

    name: str
    bridge: str
    subnet: str
    dhcp: bool
    nat: bool
    present: bool                          # the bridge exists
    taps: list[str] = field(default_factory=list)
    dnsmasq_pid: int | None = None


# -- records --------------------------------------------------------------------------------------
def _records_path() -> Path:
    return paths.state_dir() / "networks.json"


def _net_dir() -> Path:
    d = paths.state_dir() / "networks"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked() -> Iterator[dict[str, Network]]:
    """The network records, under an exclusive lock; changes to the dict are saved on success."""
    lock_path = paths.state_dir() / "networks.lock"
    paths.create_private(lock_path)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recs = _load()
        before = dict(recs)
        yield recs
        if recs != before:
            tmp = _records_path().with_suffix(".tmp")
            paths.create_private(tmp)
            tmp.write_text(json.dumps({k: asdict(v) for k, v in sorted(recs.items())}, indent=2) + "\n")
            os.replace(tmp, _records_path())


def _load() -> dict[str, Network]:
    try:
        data = json.loads(_records_path().read_text())
        return {k: Network(**v) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError) as e:
        raise NetworkError(f"the network records {_records_path()} are damaged ({e})") from None


# -- netlink --------------------------------------------------------------------------------------
def _ipr():
    from pyroute2 import IPRoute  # lazy: the VMM never imports pyroute2
    return IPRoute()


def _link(ipr, name: str):
    """The link message of interface ``name``, or None."""
    idx = ipr.link_lookup(ifname=name)
    return ipr.get_links(idx[0])[0] if idx else None


def _is_bridge(msg) -> bool:
    info = msg.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge"


def _ports(ipr, bridge_index: int) -> list[str]:
    return sorted(m.get_attr("IFLA_IFNAME") for m in ipr.get_links()
                  if m.get_attr("IFLA_MASTER") == bridge_index)


def bridge_exists(name: str) -> bool:
    """Is there a bridge named ``name`` (made by hypyr or by hand)?"""
    with _ipr() as ipr:
        msg = _link(ipr, name)
        return msg is not None and _is_bridge(msg)


def bridge_ports(name: str) -> list[str]:
    """The interfaces attached to bridge ``name`` (empty if there is no such bridge)."""
    with _ipr() as ipr:
        msg = _link(ipr, name)
        return _ports(ipr, msg["index"]) if msg is not None else []


# -- networks -------------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NET_NAME.fullmatch(name):
        raise InvalidNetwork(f"network name {name!r} must be 1-15 letters, digits, '_' or '-' starting with a letter "
                           "(it is also the bridge's name)")


def _parse_subnet(name: str, subnet: str) -> str:
    """'10.77.0.0/24' → '10.77.0.1/24' (the host takes the first usable address)."""
    try:
        net = ipaddress.IPv4Interface(subnet).network
    except (ValueError, TypeError):
        raise InvalidNetwork(f"network {name}: subnet {subnet!r} is not an IPv4 CIDR like 10.77.0.0/24") from None
    if net.prefixlen > 30:
        raise InvalidNetwork(f"network {name}: subnet {subnet} is too small (use a prefix of /30 or shorter)")
    return f"{net.network_address + 1}/{net.prefixlen}"


def net_create(name: str, subnet: str, dhcp: bool = False, nat: bool = False) -> Network:
    """Create bridge ``name`` with the subnet's first usable address, up; with ``dhcp`` start
    dnsmasq on it, with ``nat`` masquerade the subnet.  On any failure nothing is left behind."""
    _check_name(name)
    host = _parse_subnet(name, subnet)
    net = Network(name, host, bool(dhcp), bool(nat))
    with _locked() as recs:
        if name in recs:
            raise NetworkExists(f"network {name} already exists")
        for other in recs.values():
            if other.interface.network.overlaps(net.interface.network):
                raise NetworkExists(f"network {name}: subnet {net.interface.network} overlaps network "
                                   f"{other.name} ({other.interface.network})")
        with _ipr() as ipr:
            if _link(ipr, name) is not None:
                raise NetworkExists(f"an interface named {name} already exists (a bridge made by hand "
                                   f"is used as it is: name it in a vif's bridge= without net-create)")
            undo: list = []
            try:
                ipr.link("add", ifname=name, kind="bridge")
                undo.append(lambda: ipr.link("del", ifname=name))
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.addr("add", index=idx, address=str(net.interface.ip), prefixlen=net.interface.network.prefixlen)
                ipr.link("set", index=idx, state="up")
                if dhcp:
                    _start_dnsmasq(net)
                    undo.append(lambda: _stop_dnsmasq(name))
                if nat:
                    _nat_add(net)
                    undo.append(lambda: _nat_remove(name))
            except BaseException as e:
                for fn in reversed(undo):
                    with contextlib.suppress(Exception):
                        fn()
                if isinstance(e, HypyrError) or not isinstance(e, Exception):
                    raise
                raise NetworkError(f"network {name} could not be created ({e})") from None
        recs[name] = net
    return net


def net_destroy(name: str) -> None:
    """Stop DHCP, remove NAT and delete the bridge of network ``name``; refuses while taps are
    attached, and for a bridge hypyr did not create."""
    with _locked() as recs:
        net = recs.get(name)
        with _ipr() as ipr:
            msg = _link(ipr, name)
            if net is None:
                if msg is not None and _is_bridge(msg):
                    raise NetworkInUse(f"bridge {name} was not created by hypyr net-create; hypyr never "
                                       "deletes a bridge made by hand")
                raise NetworkNotFound(f"no network named {name}")
            if msg is not None:
                taps = _ports(ipr, msg["index"])
                if taps:
                    raise NetworkInUse(f"network {name} still has {', '.join(taps)} attached (destroy those "
                                       "domains first)")
            _stop_dnsmasq(name)
            _nat_remove(name)
            if msg is not None:
                ipr.link("del", index=msg["index"])
        del recs[name]


def lookup(name: str) -> Network | None:
    """The record of network ``name`` (None for a bridge made by hand or no bridge at all)."""
    return _load().get(name)


def net_list() -> list[NetworkInfo]:
    """The networks hypyr created, with their attached taps (bridges made by hand are not listed)."""
    with _locked() as recs:
        nets = sorted(recs.values(), key=lambda n: n.name)
    out = []
    with _ipr() as ipr:
        for n in nets:
            msg = _link(ipr, n.name)
            taps = _ports(ipr, msg["index"]) if msg is not None else []
            out.append(NetworkInfo(n.name, n.bridge, n.subnet, n.dhcp, n.nat, msg is not None, taps,
                                   _dnsmasq_pid(n.name) if n.dhcp else None))
    return out


def ensure_bridge(name: str, devid: int | None = None) -> str:
    """Make sure bridge ``name`` exists for vif ``devid``: use an existing bridge as it is,
    create the default network for ``xenbr0``, refuse any other missing bridge."""
    who = f"vif {devid}: " if devid is not None else ""
    for _ in range(2):
        with _ipr() as ipr:
            msg = _link(ipr, name)
        if msg is not None:
            if not _is_bridge(msg):
                raise NetworkError(f"{who}{name} is not a bridge")
            return name
        if name != DEFAULT_BRIDGE:
            raise NetworkNotFound(f"{who}bridge '{name}' does not exist (create it with: hypyr net-create "
                               f"{name} --subnet CIDR)")
        try:
            net_create(DEFAULT_BRIDGE, DEFAULT_SUBNET)
            return name
        except NetworkExists:
            continue             # another hypyr created it meanwhile: look again
    raise NetworkError(f"{who}the default bridge {DEFAULT_BRIDGE} could not be created")


# -- dnsmasq --------------------------------------------------------------------------------------
def _pid_file(name: str) -> Path:
    return _net_dir() / f"{name}.pid"


def _start_dnsmasq(net: Network) -> None:
    if not os.access(DNSMASQ, os.X_OK):
        raise NetworkError(f"network {net.name}: DHCP needs dnsmasq ({DNSMASQ}; Debian package dnsmasq-base)")
    first, last = net.dhcp_range()
    d = _net_dir()
    cmd = [DNSMASQ, f"--pid-file={d / (net.name + '.pid')}", "--conf-file=/dev/null", "--bind-interfaces",
           f"--interface={net.name}", "--except-interface=lo", "--port=0",
           f"--dhcp-range={first},{last},{DHCP_LEASE_TIME}", f"--dhcp-leasefile={d / (net.name + '.leases')}",
           "--dhcp-no-override", "--dhcp-authoritative"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkError(f"network {net.name}: dnsmasq did not start ({e})") from None
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise NetworkError(f"network {net.name}: dnsmasq did not start ({msg})")


def _dnsmasq_pid(name: str) -> int | None:
    """The pid in the network's pid file if it is a running dnsmasq serving that bridge."""
    try:
        pid = int(_pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None
    if procfs.comm(pid) != "dnsmasq" or f"--interface={name}".encode() not in procfs.cmdline(pid):
        return None
    return pid


def _stop_dnsmasq(name: str, timeout: float = 5.0) -> None:
    pid = _dnsmasq_pid(name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _dnsmasq_pid(name) == pid and time.monotonic() < deadline:
                time.sleep(0.05)
            if _dnsmasq_pid(name) == pid:
                os.kill(pid, signal.SIGKILL)
    for suffix in ("pid", "leases"):
        with contextlib.suppress(FileNotFoundError):
            (_net_dir() / f"{name}.{suffix}").unlink()


# -- NAT (nftables) -------------------------------------------------------------------------------
def _nft(script: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetworkError("NAT needs nft (Debian package nftables)") from None


def _nat_add(net: Network) -> None:
    script = (f"table ip hypyr-{net.name} {{\n"
              "  chain postrouting {\n"
              "    type nat hook postrouting priority srcnat; policy accept;\n"
              f"    ip saddr {net.interface.network} oifname != \"{net.name}\" masquerade\n"
              "  }\n"
              "}\n")
    r = _nft(script)
    if r.returncode != 0:
        raise NetworkError(f"network {net.name}: nft could not add the NAT table ({r.stderr.strip()})")
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except OSError as e:
        _nat_remove(net.name)
        raise NetworkError(f"network {net.name}: cannot enable IP forwarding ({e.strerror})") from None


def _nat_remove(name: str) -> None:
    """Delete table hypyr-NAME if it exists (ip_forward is left on)."""
    try:
        listed = subprocess.run([NFT, "list", "table", "ip", f"hypyr-{name}"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return                   # no nft: there is no table to delete
    if listed.returncode == 0:
        _nft(f"delete table ip hypyr-{name}\n")


# -- taps -----------------------------------------------------------------------------------------
def open_tap(ifname: str, bridge: str, mtu: int | None = None, devid: int | None = None) -> int:
    """Create tap ``ifname`` (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, 12-byte vnet header, not
    persistent), set its MTU (default: the bridge's), attach it to ``bridge`` and set it up.

    Returns the fd (close-on-exec: whoever passes it to a child clears that).  The tap exists as
    long as an fd to it is open.  On any failure the fd is closed and nothing is left behind.
    """
    who = f"vif {devid}: " if devid is not None else ""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise NetworkExists(f"{who}an interface named {ifname} already exists (choose another vifname)") \
                    from None
            raise NetworkError(f"{who}cannot create tap {ifname} ({e.strerror})") from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        with _ipr() as ipr:
            br = _link(ipr, bridge)
            if br is None or not _is_bridge(br):
                raise NetworkNotFound(f"{who}bridge '{bridge}' does not exist")
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, mtu=mtu or br.get_attr("IFLA_MTU"))
            ipr.link("set", index=idx, master=br["index"])
            ipr.link("set", index=idx, state="up")
        return fd
    except BaseException as e:
        os.close(fd)
        if isinstance(e, HypyrError) or not isinstance(e, Exception):
            raise
        raise NetworkError(f"{who}cannot attach tap {ifname} to bridge {bridge} ({e})") from None


def tap_stats(ifname: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of tap ``ifname`` as the host counts them.

    The guest's view is the other way round: the host's rx is what the guest transmitted and
    the host's tx what the guest received.  Raises NetworkError if there is no such interface.
    """
    base = Path("/sys/class/net") / ifname / "statistics"
    try:
        return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())
    except (OSError, ValueError):
        raise NetworkNotFound(f"there is no interface {ifname}") from None


def guest_traffic(ifname: str) -> tuple[int, int] | None:
    """(bytes received, bytes sent) by the guest behind tap ``ifname``: :func:`tap_stats` turned
    round; None if there is no such tap (its domain is not running)."""
    try:
        host_rx, host_tx = tap_stats(ifname)
    except NetworkError:
        return None
    return host_tx, host_rx


def info_dict(info: NetworkInfo) -> dict[str, Any]:
    """A JSON-able dict of a NetworkInfo (for --json and the API)."""
    return asdict(info)
