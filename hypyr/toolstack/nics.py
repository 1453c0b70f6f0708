"""From vif specs to plugged NICs: MACs and bridges, TAPs, the VMM's NetConfigs and the guest's
address arguments — one path for `hypyr create` and `hypyr run --net`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hypyr.errors import HypyrError
from hypyr.toolstack.vif import VifSpec, random_mac

if TYPE_CHECKING:
    from hypyr.vmm.config import NetConfig


def assign(vifs: Sequence[VifSpec], used: dict[str, str]) -> tuple[VifSpec, ...]:
    """Give each vif a MAC (random in Xen's OUI unless given; ``used`` maps the MACs of other
    live domains to who has them) and a bridge that exists (xenbr0 unless given)."""
    from hypyr.toolstack import network
    out: list[VifSpec] = []
    for v in vifs:
        if v.mac in used:
            raise HypyrError(f"vif {v.devid}: mac {v.mac} is already used by {used[v.mac]}")
        mac = v.mac
        taken = set(used) | {o.mac for o in tuple(vifs) + tuple(out) if o.mac}
        while mac is None or (v.mac is None and mac in taken):
            mac = random_mac()
        bridge = network.ensure_bridge(v.bridge or network.DEFAULT_BRIDGE, v.devid)
        out.append(dataclasses.replace(v, mac=mac, bridge=bridge))
    return tuple(out)


def _assigned(v: VifSpec) -> tuple[str, str]:
    """The (MAC, bridge) :func:`assign` gave vif ``v``."""
    if v.mac is None or v.bridge is None:
        raise HypyrError(f"vif {v.devid} has no MAC or bridge yet (nics.assign gives them)")
    return v.mac, v.bridge


def open_taps(vifs: Sequence[VifSpec], names: Sequence[str]) -> list[int]:
    """Open and attach one TAP per vif (named ``names[i]``); on failure close those opened."""
    if not vifs:
        return []
    from hypyr.toolstack import network
    fds: list[int] = []
    try:
        for v, name in zip(vifs, names):
            fds.append(network.open_tap(name, _assigned(v)[1], v.mtu, v.devid))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def net_configs(vifs: Sequence[VifSpec], tap_fds: Sequence[int], names: Sequence[str]) -> list[NetConfig]:
    """The VMM's NIC configs: vif i on the open TAP ``tap_fds[i]``."""
    from hypyr.vmm.config import NetConfig  # only where a VM is built: `hypyr list` never loads the VMM
    if len(tap_fds) != len(vifs):
        raise HypyrError(f"{len(vifs)} vifs but {len(tap_fds)} taps (domains with vifs are started by hypyr create)")
    return [NetConfig(tap_fd=fd, mac=_assigned(v)[0], mtu=v.mtu, vhost=v.vhost,
                      tx_rate=(v.rate.bytes_per_sec, v.rate.interval_s) if v.rate else None, name=name)
            for v, fd, name in zip(vifs, tap_fds, names)]


def guest_ip_args(vifs: Sequence[VifSpec]) -> str:
    """``hypyr.ip.N=ADDR/PREFIX`` (the network's prefix when not given, else /24) for each vif
    with ``ip=``, ``hypyr.ip.N=dhcp`` for one without on a ``--dhcp`` network: what the default
    image's init reads."""
    if not vifs:
        return ""
    from hypyr.toolstack.network import lookup
    args = []
    for i, v in enumerate(vifs):
        net = lookup(v.bridge) if v.bridge else None
        if v.ip:
            prefix = net.interface.network.prefixlen if net else 24
            args.append(f"hypyr.ip.{i}={v.ip if '/' in v.ip else f'{v.ip}/{prefix}'}")
        elif net is not None and net.dhcp:
            args.append(f"hypyr.ip.{i}=dhcp")
    return " ".join(args)
