"""Xen vif specs (xl-network-configuration(5)): ``'bridge=xenbr0,mac=00:16:3e:12:34:56,rate=10Mb/s'``.

A vif spec is a comma-separated list of ``key=value`` settings; ``''`` is one NIC with every
default (a random Xen MAC, the default bridge ``xenbr0``, the tap ``vif<domid>.<devid>``).

Keys hypyr implements: ``mac``, ``bridge``, ``vifname``, ``rate``, ``ip``, ``mtu``, ``model``,
``type``, and its own ``vhost`` (``on``/``off``/``auto``).  ``script`` is accepted with a warning
(hypyr attaches taps to bridges itself); ``model=e1000``/``rtl8139`` with a warning (the guest
always gets virtio-net).  Xen keys hypyr does not implement (``backend``, ``gatewaydev``, ...)
are accepted with a warning naming the key.  Any other key is an error that suggests the
closest known key, so a typo such as ``brige=`` is never silently dropped.

Errors are ``VifError`` (an InvalidConfig) whose str() is ``"vif N: sentence"``.  This module only
parses; it never touches the host (see ``hypyr.toolstack.network`` for bridges and taps).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypyr.toolstack.errors import InvalidConfig

DEFAULT_RATE_INTERVAL_S = 0.05          # xl's default replenish interval: 50 ms
XEN_OUI = (0x00, 0x16, 0x3E)
MODELS = ("virtio", "e1000", "rtl8139")
TYPES = ("ioemu", "vif")
IMPLEMENTED_KEYS = ("mac", "bridge", "vifname", "rate", "ip", "mtu", "model", "script", "type", "vhost")
# Xen keys (and bare flags) hypyr accepts without implementing them: a warning each.
UNIMPLEMENTED_KEYS = {
    "backend": "hypyr has no driver domains; the host is the backend",
    "gatewaydev": "hypyr does not route; put the vif on a bridge (net-create --nat for an uplink)",
    "accel": "acceleration plugins do not exist in hypyr",
    "powerid": "hypyr has no power-management ids",
    "devid": "hypyr numbers vifs in the order they are listed",
    "forwarddev": "hypyr does not forward to a device; put the vif on a bridge",
    "trusted": "hypyr does not pass a trust hint to the guest",
    "untrusted": "hypyr does not pass a trust hint to the guest",
}
_BARE_FLAGS = ("trusted", "untrusted")
_MAC = re.compile(r"([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})[:-]"
                  r"([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})[:-]([0-9A-Fa-f]{2})")
_RATE = re.compile(r"([0-9]{1,19})([GMK]?)([Bb])/s")
_INTERVAL = re.compile(r"([0-9]{1,12})(s|ms|us)?")
_UNIT = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}
_INTERVAL_UNIT = {"s": 1.0, "ms": 1e-3, "us": 1e-6, None: 1e-6}   # a bare number is µs, as in xl


class VifError(InvalidConfig):
    """A bad vif spec; str() is ``"vif DEVID: sentence"``; ``key`` names the offending key."""

    def __init__(self, devid: int, key: str | None, message: str):
        self.devid, self.key, self.message = devid, key, message
        super().__init__(f"vif {devid}: {message}")


@dataclass(frozen=True)
class RateLimit:
    """Xen's credit scheduler for a vif: ``bytes_per_sec`` worth of credit, replenished every
    ``interval_s`` seconds (so at most bytes_per_sec * interval_s bytes per interval)."""

    bytes_per_sec: int
    interval_s: float = DEFAULT_RATE_INTERVAL_S

    def __str__(self) -> str:
        return f"{self.bytes_per_sec}B/s@{round(self.interval_s * 1e6)}us"


def parse_rate(text: str) -> RateLimit:
    """Parse xl's ``RATE[@INTERVAL]``: ``10Mb/s``, ``1MB/s@20ms``, ``100Kb/s@50000us``.

    Units are 1000-based as in xl; ``b`` is bits and ``B`` bytes.  The interval is ``Ns``,
    ``Nms``, ``Nus`` or a bare number of µs; it defaults to 50 ms.  Raises ValueError with a
    short reason (the caller names the vif).
    """
    if not isinstance(text, str):
        raise ValueError("not a string")
    rate, sep, interval = text.strip().partition("@")
    m = _RATE.fullmatch(rate.strip())
    if not m:
        raise ValueError("not a rate")
    bits = m.group(3) == "b"
    value = int(m.group(1)) * _UNIT[m.group(2)]
    bytes_per_sec = value // 8 if bits else value
    if bytes_per_sec <= 0:
        raise ValueError("the rate must be at least 1 B/s")
    interval_s = DEFAULT_RATE_INTERVAL_S
    if sep:
        mi = _INTERVAL.fullmatch(interval.strip())
        if not mi:
            raise ValueError("not an interval")
        interval_s = int(mi.group(1)) * _INTERVAL_UNIT[mi.group(2)]
        if not 1e-6 <= interval_s <= 60.0:
            raise ValueError("the interval must be from 1us to 60s")
    return RateLimit(bytes_per_sec, interval_s)


def random_mac() -> str:
    """A random MAC in Xen's OUI 00:16:3e, with the top bit of the 4th octet cleared as Xen does."""
    r = os.urandom(3)
    return ":".join(f"{b:02x}" for b in (*XEN_OUI, r[0] & 0x7F, r[1], r[2]))


def default_vifname(domid: int, devid: int) -> str:
    """The tap name xl gives a vif without ``vifname``: ``vif<domid>.<devid>``."""
    return f"vif{int(domid)}.{int(devid)}"


def normalize_mac(text: str) -> str:
    """``00:16:3E:12:34:56`` (or with ``-``) → ``00:16:3e:12:34:56``; ValueError if not a unicast MAC."""
    m = _MAC.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError("not a MAC address like 00:16:3e:12:34:56")
    octets = [int(x, 16) for x in m.groups()]
    if octets[0] & 1:
        raise ValueError("a multicast address (the low bit of the first octet is set)")
    if octets == [0] * 6:
        raise ValueError("the all-zero address")
    return ":".join(f"{b:02x}" for b in octets)


def valid_ifname(name: str) -> bool:
    """Linux's rules for an interface name: 1-15 bytes, not . or .., no '/', ':' or whitespace."""
    return (isinstance(name, str) and 0 < len(name.encode()) <= 15 and name not in (".", "..")
            and not re.search(r"[/:\s]", name) and name.isprintable())


@dataclass(frozen=True)
class VifSpec:
    """One validated vif.  None means "the default" (chosen when the domain is created)."""

    devid: int
    mac: str | None = None
    bridge: str | None = None
    vifname: str | None = None
    rate: RateLimit | None = None
    ip: str | None = None
    mtu: int | None = None
    model: str | None = None
    vhost: bool | None = None
    script: str | None = None
    type: str | None = None

    def __post_init__(self):
        def bad(key: str, msg: str):
            raise VifError(self.devid if isinstance(self.devid, int) else -1, key, msg)

        if isinstance(self.devid, bool) or not isinstance(self.devid, int) or self.devid < 0:
            raise VifError(-1, "devid", f"devid must be an integer of at least 0, not {self.devid!r}")
        if self.mac is not None:
            try:
                object.__setattr__(self, "mac", normalize_mac(self.mac))
            except ValueError as e:
                bad("mac", f"mac {self.mac!r} is {e}")
        for key in ("bridge", "vifname"):
            v = getattr(self, key)
            if v is not None and not valid_ifname(v):
                bad(key, f"{key} {v!r} is not a Linux interface name (1-15 characters, "
                         "no '/', ':' or spaces)")
        if self.rate is not None and not isinstance(self.rate, RateLimit):
            bad("rate", f"rate must be a RateLimit, not {self.rate!r}")
        if self.ip is not None:
            try:
                ipaddress.IPv4Interface(self.ip)
            except (ValueError, TypeError):
                bad("ip", f"ip {self.ip!r} is not an IPv4 address like 10.77.0.2 or 10.77.0.2/24")
        if self.mtu is not None and (isinstance(self.mtu, bool) or not isinstance(self.mtu, int)
                                     or not 68 <= self.mtu <= 65535):
            bad("mtu", f"mtu {self.mtu!r} must be an integer from 68 to 65535")
        if self.model is not None and self.model not in MODELS:
            bad("model", f"model {self.model!r} is not supported (hypyr provides virtio-net; "
                         "e1000 and rtl8139 are accepted as virtio)")
        if self.vhost not in (None, True, False):
            bad("vhost", f"vhost must be on, off or auto, not {self.vhost!r}")
        if self.type is not None and self.type not in TYPES:
            bad("type", f"type {self.type!r} must be ioemu or vif")

    def tap_name(self, domid: int) -> str:
        """The host tap name: ``vifname`` or ``vif<domid>.<devid>``."""
        return self.vifname or default_vifname(domid, self.devid)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``from_dict`` reverses it."""
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rate"] = None if self.rate is None else {"bytes_per_sec": self.rate.bytes_per_sec,
                                                     "interval_s": self.rate.interval_s}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VifSpec:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if kw.get("rate") is not None:
            kw["rate"] = RateLimit(int(kw["rate"]["bytes_per_sec"]), float(kw["rate"]["interval_s"]))
        return cls(**kw)


def check_distinct(vifs: Sequence[VifSpec]) -> None:
    """No two vifs may share a MAC or a vifname (VifError naming the later one)."""
    for i, v in enumerate(vifs):
        for other in vifs[:i]:
            if v.mac is not None and other.mac == v.mac:
                raise VifError(v.devid, "mac", f"mac {v.mac} is already used by vif {other.devid}")
            if v.vifname is not None and other.vifname == v.vifname:
                raise VifError(v.devid, "vifname", f"vifname {v.vifname} is already used by vif {other.devid}")


def _closest(key: str) -> str:
    known = list(IMPLEMENTED_KEYS) + list(UNIMPLEMENTED_KEYS)
    near = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else f" (known keys: {', '.join(IMPLEMENTED_KEYS)})"


def parse_vif(spec: str, devid: int) -> tuple[VifSpec, list[str]]:  # noqa: C901 (too complex: pyproject.toml)
    """Parse one xl vif spec for NIC ``devid``; return the VifSpec and warnings ("vif N: ...").

    Raises VifError ("vif N: sentence") for bad values, duplicate keys and unknown keys.
    """
    if not isinstance(spec, str):
        raise VifError(devid, None, f"each vif must be a quoted spec string such as 'bridge=xenbr0', "
                                    f"not {spec!r}")
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue                   # '' (all defaults), and xl tolerates empty items
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            if key in _BARE_FLAGS:
                warnings.append(f"vif {devid}: {key} is ignored: {UNIMPLEMENTED_KEYS[key]}")
                continue
            raise VifError(devid, key, f"{key!r} is not a key=value setting (e.g. bridge=xenbr0)")
        if key in seen:
            raise VifError(devid, key, f"{key} is given more than once")
        if key in UNIMPLEMENTED_KEYS:
            warnings.append(f"vif {devid}: {key} is ignored: {UNIMPLEMENTED_KEYS[key]}")
        elif key.startswith("colo_"):
            warnings.append(f"vif {devid}: {key} is ignored: hypyr has no COLO replication")
        elif key not in IMPLEMENTED_KEYS:
            raise VifError(devid, key, f"unknown key {key!r}{_closest(key)}")
        elif key == "script" and value:
            warnings.append(f"vif {devid}: script {value} is ignored: hypyr attaches its taps "
                            "to the bridge itself")
        elif key == "model" and value.lower() in ("e1000", "rtl8139"):
            warnings.append(f"vif {devid}: model {value.lower()} is provided as virtio-net "
                            "(hypyr always provides virtio-net)")
        seen[key] = value

    kw: dict[str, Any] = {}
    for key in ("mac", "bridge", "vifname", "ip", "script", "type"):
        if key in seen:
            kw[key] = seen[key]
            if not seen[key]:
                raise VifError(devid, key, f"{key} is empty")
    if "rate" in seen:
        try:
            kw["rate"] = parse_rate(seen["rate"])
        except ValueError:
            raise VifError(devid, "rate", f"rate {seen['rate']!r} is not a rate like 10Mb/s or "
                                          "10Mb/s@20ms") from None
    if "mtu" in seen:
        if not re.fullmatch(r"[0-9]{1,6}", seen["mtu"]):
            raise VifError(devid, "mtu", f"mtu {seen['mtu']!r} must be an integer from 68 to 65535")
        kw["mtu"] = int(seen["mtu"])
    if "model" in seen:
        kw["model"] = seen["model"].lower()
    if "vhost" in seen:
        v = seen["vhost"].lower()
        choices = {"on": True, "1": True, "yes": True, "off": False, "0": False, "no": False, "auto": None}
        if v not in choices:
            raise VifError(devid, "vhost", f"vhost {seen['vhost']!r} must be on, off or auto")
        kw["vhost"] = choices[v]
    return VifSpec(devid, **kw), warnings
