"""Xen vif specs and rates (hypyr.toolstack.vif) and vif = [...] in xl.cfg."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.vif import RateLimit, VifError, VifSpec, default_vifname, parse_rate, parse_vif, random_mac
from hypyr.toolstack.xlcfg import XlCfgError, load, loads

DATA = Path(__file__).parent / "data" / "xlcfg"
BASE = "name = 'g'\nkernel = '/boot/vmlinuz'\n"


def vif_error(spec: str, devid: int = 0) -> VifError:
    with pytest.raises(VifError) as ei:
        parse_vif(spec, devid)
    return ei.value


# ---------------------------------------------------------------- rates

@pytest.mark.parametrize("text, bps, interval", [
    ("10Mb/s", 1_250_000, 0.05),
    ("10Mb/s@20ms", 1_250_000, 0.02),
    ("1MB/s", 1_000_000, 0.05),
    ("100Kb/s@50000us", 12_500, 0.05),
    ("5KB/s", 5_000, 0.05),
    ("2Gb/s", 250_000_000, 0.05),
    ("1GB/s@1s", 1_000_000_000, 1.0),
    ("800B/s", 800, 0.05),
    ("800b/s@2000", 100, 0.002),           # a bare interval is in µs, as in xl
])
def test_parse_rate(text, bps, interval):
    r = parse_rate(text)
    assert r == RateLimit(bps, pytest.approx(interval))


@pytest.mark.parametrize("text", ["fast", "10", "10Mb", "10mb/s", "10 Mb/s x", "0Mb/s", "7b/s",
                                  "10Mb/s@", "10Mb/s@fast", "10Mb/s@20ks", "10Mb/s@0ms", "10Mb/s@61s", "-1MB/s"])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        parse_rate(text)


# ---------------------------------------------------------------- MACs and names

def test_random_mac_is_xen_oui_unicast_and_varies():
    macs = {random_mac() for _ in range(64)}
    assert len(macs) > 60
    for m in macs:
        assert re.fullmatch(r"00:16:3e:[0-7][0-9a-f]:[0-9a-f]{2}:[0-9a-f]{2}", m)


def test_default_vifname():
    assert default_vifname(3, 0) == "vif3.0" and default_vifname(12, 7) == "vif12.7"


# ---------------------------------------------------------------- parse_vif

def test_empty_spec_is_all_defaults():
    v, w = parse_vif("", 0)
    assert v == VifSpec(0) and w == []
    assert v.tap_name(5) == "vif5.0"


def test_every_key():
    v, w = parse_vif("mac=00:16:3E:12:34:56, bridge=xenbr1,vifname=web0,rate=10Mb/s@20ms,ip=10.77.0.5/24,"
                     "mtu=9000,model=virtio,type=vif,vhost=off", 2)
    assert v == VifSpec(2, mac="00:16:3e:12:34:56", bridge="xenbr1", vifname="web0",
                        rate=RateLimit(1_250_000, 0.02), ip="10.77.0.5/24", mtu=9000, model="virtio",
                        vhost=False, type="vif")
    assert w == [] and v.tap_name(9) == "web0"
    assert parse_vif("vhost=on", 0)[0].vhost is True
    assert parse_vif("vhost=auto", 0)[0].vhost is None
    assert parse_vif("type=ioemu,ip=10.1.2.3", 0)[0].ip == "10.1.2.3"


def test_script_and_emulated_models_are_warnings():
    v, w = parse_vif("script=vif-bridge,model=e1000", 1)
    assert v.script == "vif-bridge" and v.model == "e1000"
    assert w == ["vif 1: script vif-bridge is ignored: hypyr attaches its taps to the bridge itself",
                 "vif 1: model e1000 is provided as virtio-net (hypyr always provides virtio-net)"]
    assert "rtl8139" in parse_vif("model=rtl8139", 0)[1][0]


@pytest.mark.parametrize("key", ["backend=0", "gatewaydev=eth0", "accel=x", "powerid=1", "devid=3",
                                 "forwarddev=eth1", "trusted", "untrusted", "colo_sock_mirror_id=1"])
def test_unimplemented_xen_keys_warn_with_their_name(key):
    v, w = parse_vif(f"bridge=xenbr0,{key}", 0)
    name = key.partition("=")[0]
    assert v == VifSpec(0, bridge="xenbr0")
    assert len(w) == 1 and w[0].startswith(f"vif 0: {name} is ignored")


@pytest.mark.parametrize("spec, message", [
    ("brige=xenbr0", "vif 0: unknown key 'brige' (did you mean bridge?)"),
    ("maac=00:16:3e:00:00:01", "vif 0: unknown key 'maac' (did you mean mac?)"),
    ("zzz=1", "vif 0: unknown key 'zzz' (known keys: mac, bridge, vifname, rate, ip, mtu, model, script, "
              "type, vhost)"),
    ("rate=fast", "vif 0: rate 'fast' is not a rate like 10Mb/s or 10Mb/s@20ms"),
    ("mac=00:16:3e:12:34", "vif 0: mac '00:16:3e:12:34' is not a MAC address like 00:16:3e:12:34:56"),
    ("mac=00:16:3e:12:34:zz", "vif 0: mac '00:16:3e:12:34:zz' is not a MAC address like 00:16:3e:12:34:56"),
    ("mac=01:16:3e:12:34:56", "vif 0: mac '01:16:3e:12:34:56' is a multicast address (the low bit of the "
                              "first octet is set)"),
    ("mac=00:00:00:00:00:00", "vif 0: mac '00:00:00:00:00:00' is the all-zero address"),
    ("bridge=xenbr0,bridge=xenbr1", "vif 0: bridge is given more than once"),
    ("bridge=", "vif 0: bridge is empty"),
    ("bridge=a-very-long-bridge-name", "vif 0: bridge 'a-very-long-bridge-name' is not a Linux interface name "
                                       "(1-15 characters, no '/', ':' or spaces)"),
    ("vifname=a/b", "vif 0: vifname 'a/b' is not a Linux interface name (1-15 characters, no '/', ':' or spaces)"),
    ("vifname=eth0:1", "vif 0: vifname 'eth0:1' is not a Linux interface name (1-15 characters, no '/', ':' or "
                       "spaces)"),
    ("mtu=67", "vif 0: mtu 67 must be an integer from 68 to 65535"),
    ("mtu=65536", "vif 0: mtu 65536 must be an integer from 68 to 65535"),
    ("mtu=big", "vif 0: mtu 'big' must be an integer from 68 to 65535"),
    ("ip=10.0.0.300", "vif 0: ip '10.0.0.300' is not an IPv4 address like 10.77.0.2 or 10.77.0.2/24"),
    ("ip=fe80::1", "vif 0: ip 'fe80::1' is not an IPv4 address like 10.77.0.2 or 10.77.0.2/24"),
    ("model=ne2k_pci", "vif 0: model 'ne2k_pci' is not supported (hypyr provides virtio-net; e1000 and "
                       "rtl8139 are accepted as virtio)"),
    ("type=pv", "vif 0: type 'pv' must be ioemu or vif"),
    ("vhost=maybe", "vif 0: vhost 'maybe' must be on, off or auto"),
    ("xenbr0", "vif 0: 'xenbr0' is not a key=value setting (e.g. bridge=xenbr0)"),
])
def test_bad_specs_name_the_vif_and_key(spec, message):
    e = vif_error(spec)
    assert str(e) == message
    assert e.devid == 0 and e.key is not None


def test_not_a_string():
    assert str(vif_error(7, 3)).startswith("vif 3: each vif must be a quoted spec string")  # type: ignore[arg-type]


def test_round_trip_dict_and_json():
    v, _ = parse_vif("mac=00:16:3e:00:00:01,bridge=b,vifname=t,rate=1MB/s@10ms,ip=10.0.0.2,mtu=1400,"
                     "model=virtio,vhost=on,script=s,type=vif", 4)
    assert VifSpec.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert VifSpec.from_dict(VifSpec(0).to_dict()) == VifSpec(0)


@given(st.text(max_size=60))
def test_parse_vif_never_raises_anything_but_vif_error(spec):
    try:
        v, w = parse_vif(spec, 0)
    except VifError as e:
        assert str(e).startswith("vif 0: ")
    else:
        assert isinstance(v, VifSpec) and all(x.startswith("vif 0: ") for x in w)


# ---------------------------------------------------------------- xl.cfg

def test_vif_file():
    cfg = load(DATA / "vif.cfg")
    assert [v.devid for v in cfg.vifs] == [0, 1, 2]
    assert cfg.vifs[0] == VifSpec(0)
    assert cfg.vifs[1] == VifSpec(1, mac="00:16:3e:12:34:56", bridge="xenbr0", vifname="web0",
                                  rate=RateLimit(1_250_000, 0.02), ip="10.77.0.10")
    assert cfg.vifs[2] == VifSpec(2, bridge="lan1", mtu=9000, model="e1000", vhost=False, script="vif-bridge")
    fn = str(DATA / "vif.cfg")
    assert cfg.warnings == (f"{fn}:8: vif 2: model e1000 is provided as virtio-net (hypyr always provides "
                            "virtio-net)",
                            f"{fn}:8: vif 2: script vif-bridge is ignored: hypyr attaches its taps to the "
                            "bridge itself",
                            f"{fn}:8: vif 2: backend is ignored: hypyr has no driver domains; the host is the "
                            "backend")


def test_vif_config_round_trips_through_the_registry_json():
    cfg = load(DATA / "vif.cfg")
    again = DomainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.vifs == cfg.vifs
    assert DomainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "vifs"}).vifs == ()


def test_single_spec_string_and_empty_list():
    assert loads(BASE + "vif = 'bridge=xenbr0'\n").vifs == (VifSpec(0, bridge="xenbr0"),)
    assert loads(BASE + "vif = []\n").vifs == ()
    assert loads(BASE + "vif = ['']\n").vifs == (VifSpec(0),)


@pytest.mark.parametrize("text, line, message", [
    ("vif = [ 'bridge=xenbr0',\n        'brige=xenbr0' ]\n", 4, "vif 1: unknown key 'brige' (did you mean bridge?)"),
    ("vif = [ 'rate=fast' ]\n", 3, "vif 0: rate 'fast' is not a rate like 10Mb/s or 10Mb/s@20ms"),
    ("vif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3E:00:00:01' ]\n", 3,
     "vif 1: mac 00:16:3e:00:00:01 is already used by vif 0"),
    ("vif = [ 'vifname=a', 'vifname=a' ]\n", 3, "vif 1: vifname a is already used by vif 0"),
    ("vif = 7\n", 3, "vif must be a list of vif specs such as [ 'bridge=xenbr0' ], not 7"),
    ("vif = [ 7 ]\n", 3, "vif 0: each vif must be a quoted spec string such as 'bridge=xenbr0', not 7"),
])
def test_vif_errors_name_file_line_vif_and_key(text, line, message):
    with pytest.raises(XlCfgError) as ei:
        loads(BASE + text, "vm.cfg")
    assert str(ei.value) == f"vm.cfg:{line}: {message}"


def test_damaged_stored_vifs_are_one_sentence():
    d = loads(BASE + "vif=['']\n").to_dict()
    d["vifs"] = [{"devid": 0, "mac": "nonsense"}]
    with pytest.raises(Exception) as ei:
        DomainConfig.from_dict(d)
    assert str(ei.value).startswith("the stored domain configuration is not valid (vif 0: mac")
