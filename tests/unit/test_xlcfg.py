"""xl.cfg parsing and validation (hypyr.toolstack.xlcfg, hypyr.toolstack.domconfig)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.errors import HypyrError
from hypyr.toolstack.domconfig import DomainConfig, parse_cpulist
from hypyr.toolstack.errors import ConfigValueError
from hypyr.toolstack.xlcfg import RawConfig, XlCfgError, load, loads, parse
from hypyr.toolstack.xldisk import DiskSpec, parse_disk, vdev_index

DATA = Path(__file__).parent / "data" / "xlcfg"
BASE = "name = 'g'\nkernel = '/boot/vmlinuz'\n"


def err(text: str, filename: str = "vm.cfg") -> XlCfgError:
    with pytest.raises(XlCfgError) as ei:
        loads(text, filename, cwd="/cwd")
    return ei.value


# ---------------------------------------------------------------- real-world style files


def test_pvh_guest_file():
    cfg = load(DATA / "pvh-guest.cfg")
    assert cfg.name == "example.pvh" and cfg.type == "pvh"
    assert cfg.kernel == "/boot/vmlinuz" and cfg.ramdisk == "/boot/initrd.gz"
    assert (cfg.memory, cfg.maxmem, cfg.vcpus, cfg.maxvcpus) == (512, 1024, 2, 2)
    assert cfg.cmdline_string() == "root=/dev/vda1 ro console=hvc0 quiet"
    assert cfg.disks == (DiskSpec("/images/example-root.img", "raw", "xvda", 0, False),
                         DiskSpec("/images/example-data.img", "raw", "xvdb", 1, True))
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("destroy", "restart", "destroy")
    assert cfg.cpus is None and cfg.cpu_affinity(8) is None
    assert (cfg.cpu_weight, cfg.cap) == (256, 0)
    assert cfg.warnings == ()


def test_key_value_disks_sorted_by_index():
    cfg = load(DATA / "kv-disks.cfg")
    assert [(d.vdev, d.index, d.target, d.read_only) for d in cfg.disks] == [
        ("xvda", 0, "/images/root.img", False),
        ("hdb", 1, "/images/old-style.img", False),
        ("xvdc", 2, "/images/with,comma.img", True),
        ("xvdd", 3, "/dev/vg0/legacy", False),
    ]
    assert cfg.cmdline_string() == ""


def test_cmdline_file_relative_paths_and_warnings(caplog):
    with caplog.at_level(logging.DEBUG, logger="hypyr.xlcfg"):
        cfg = load(DATA / "cmdline.cfg", cwd="/srv/guests")
    assert cfg.type == "hvm" and cfg.memory == 384
    assert cfg.kernel == "/srv/guests/vmlinuz" and cfg.ramdisk == "/srv/guests/initrd.img"
    assert cfg.cmdline_string() == 'console=hvc0 root=/dev/vda rw init=/sbin/init "quoted" tab\there'
    assert cfg.warnings == ()     # vif = [ 'bridge=xenbr0' ] is parsed (tests/unit/test_vif.py)
    assert [(v.devid, v.bridge) for v in cfg.vifs] == [(0, "xenbr0")]


def test_relative_paths_default_to_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = loads("name='g'\nkernel='k/vmlinuz'\ndisk=['./d.img,,xvda']\n")
    assert cfg.kernel == str(tmp_path / "k" / "vmlinuz")
    assert cfg.disks[0].target == str(tmp_path / "d.img")


def test_actions_cpus_weight_cap_file(caplog):
    with caplog.at_level(logging.DEBUG, logger="hypyr.xlcfg"):
        cfg = load(DATA / "actions.cfg")
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("preserve", "destroy", "restart")
    assert (cfg.memory, cfg.maxmem, cfg.vcpus, cfg.maxvcpus) == (1024, 2048, 2, 4)
    assert cfg.cpus == ("2", "3-8,^5")
    assert cfg.cpu_affinity(16) == [{2}, {3, 4, 6, 7, 8}, set(range(16)), set(range(16))]
    assert (cfg.cpu_weight, cfg.cap) == (512, 150)
    assert cfg.warnings == ()      # serial, vnc, boot: debug notes only
    assert {r.levelno for r in caplog.records} == {logging.DEBUG}


def test_bad_disk_file_names_the_line():
    with pytest.raises(XlCfgError) as ei:
        load(DATA / "bad-disk.cfg")
    e = ei.value
    assert e.line == 5
    assert str(e) == (f"{DATA / 'bad-disk.cfg'}:5: disk '/images/b.qcow2,qcow2,xvdb,rw': "
                      "format qcow2 is not supported (hypyr supports only raw images)")


def test_load_missing_and_unreadable(tmp_path):
    with pytest.raises(HypyrError, match=r"^domain config file .*nope\.cfg does not exist$"):
        load(tmp_path / "nope.cfg")
    with pytest.raises(HypyrError, match="is a directory"):
        load(tmp_path)
    (tmp_path / "bin.cfg").write_bytes(b"name = 'g'\n\xff\xfe\n")
    with pytest.raises(XlCfgError, match=r"bin\.cfg:2: the file is not UTF-8 text"):
        load(tmp_path / "bin.cfg")
    assert issubclass(XlCfgError, HypyrError)


def test_load_refuses_a_fifo_without_waiting(tmp_path):
    fifo = tmp_path / "vm.cfg"
    os.mkfifo(fifo)
    result = {}

    def go():
        try:
            load(fifo)
        except HypyrError as e:
            result["error"] = str(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():   # blocked waiting for a writer: release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert result.get("error") == f"domain config file {fifo} is not a regular file"
    with pytest.raises(HypyrError, match=r"^domain config file /dev/null is not a regular file$"):
        load("/dev/null")


# ---------------------------------------------------------------- syntax


def test_strings_quotes_and_escapes():
    raw = parse(r"""a = 'it\'s "fine"'
b = "tab\there\nnl \\ back \"dq\" \x41\101 \a"
c = ''
""")
    assert raw.value("a") == 'it\'s "fine"'
    assert raw.value("b") == 'tab\there\nnl \\ back "dq" AA \a'
    assert raw.value("c") == ""
    assert raw["a"] == ('it\'s "fine"', 1) and raw.line("b") == 2


def test_hash_inside_strings_is_not_a_comment():
    raw = parse("extra = 'a # b' # real comment\nroot = \"#x\"#c\n# whole line\n")
    assert raw.value("extra") == "a # b" and raw.value("root") == "#x"
    assert list(raw) == ["extra", "root"]


def test_multiline_lists_trailing_commas_semicolons_numbers():
    raw = parse("""disk = [
   'a',   # one
   # a comment line
   "b",
]; memory = 0x100 ; vcpus=010
cpus = [ 1, [2, '3'], ]
empty = []
""")
    assert raw["disk"] == (["a", "b"], 1)
    assert raw.item_lines["disk"] == [2, 4]
    assert raw.value("memory") == 256 and raw.line("memory") == 5
    assert raw.value("vcpus") == 8             # octal, as in xl
    assert raw.value("cpus") == [1, [2, "3"]]
    assert raw.value("empty") == []
    assert isinstance(raw, RawConfig) and list(raw) == ["disk", "memory", "vcpus", "cpus", "empty"]


def test_crlf_and_empty_statements():
    raw = parse("name = 'g'\r\n;;\r\nmemory = 64;\r\n")
    assert raw.value("name") == "g" and raw.value("memory") == 64


def test_duplicate_key_later_wins_with_warning():
    cfg = loads(BASE + "memory = 256\nvcpus = 1\nmemory = 512\n", "vm.cfg")
    assert cfg.memory == 512
    assert cfg.warnings == ("vm.cfg:5: memory is set again (first on line 3); the later value is used",)


def test_unknown_key_is_a_warning_not_an_error():
    cfg = loads(BASE + "frobnicate = 7\nvif = []\nfirmware = 'ovmf'\n", "vm.cfg")
    assert cfg.warnings == ("vm.cfg:3: unknown key frobnicate is ignored",
                            "vm.cfg:5: firmware is ignored: firmware boot is not supported; "
                            "hypyr boots kernel= directly")


@pytest.mark.parametrize("text, line, message", [
    ("name = 'g\n", 1, "unterminated string: the ' has no closing ' on the same line"),
    ("a = 1\nb = \"x\\\"\n", 2, 'unterminated string: the " has no closing " on the same line'),
    ("a = 1\ndisk = [ 'x',\n  'y'\n", 2, "the list for disk is not closed with ']' (found the end of the file)"),
    ("disk = [ 'x',\nname = 'g'\n", 1, "the list for disk is not closed with ']' (found 'name' on line 2)"),
    ("disk = [ 'x' 'y' ]\n", 1, "missing ',' between items of the list for disk"),
    ("disk = [ , ]\n", 1, "unexpected ',' in the list for disk (an item is missing)"),
    ("\n\nmemory 512\n", 3, "expected '=' after memory, found a number"),
    ("memory =\n", 1, "memory has no value"),
    ("memory = 5 6\n", 1, "expected a new line or ';' after the value of memory, found a number"),
    ("= 5\n", 1, "expected a setting such as memory = 512, found '='"),
    ("9lives = 1\n", 1, "'9lives' is not a number (use decimal, 0x hex or 0 octal)"),
    ("a = 1\nb = @\n", 2, "unexpected character '@'"),
    ("acpi = true\n", 1, "the value of acpi must be a quoted string, a number or a list, "
                         "not the bare word true (write 1 or 0)"),
    ("on_reboot = restart\n", 1, "the value of on_reboot must be a quoted string, a number or a list, "
                                 "not the bare word restart (quote it: on_reboot = 'restart')"),
    ("a = 'x\\qy'\n", 1, "unknown escape sequence \\q in a string (write \\\\ for a backslash)"),
    ("a = '\\x4'\n", 1, "\\x in a string must be followed by two hex digits"),
    ("a = 'nul\\0'\n", 1, "strings cannot contain NUL characters"),
    ("a = " + "[" * 40 + "]" * 40 + "\n", 1, "lists are nested too deeply in a"),
])
def test_syntax_errors(text, line, message):
    with pytest.raises(XlCfgError) as ei:
        parse(text, "vm.cfg")
    assert (ei.value.line, ei.value.message) == (line, message)
    assert str(ei.value) == f"vm.cfg:{line}: {message}"


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("extra, line, message", [
    ("memory = 'lots'", 3, "memory must be a positive integer (MiB), not 'lots'"),
    ("memory = 0", 3, "memory must be a positive integer (MiB), not 0"),
    ("memory = -5", 3, "memory must be a positive integer (MiB), not -5"),
    ("memory = [1]", 3, "memory must be a positive integer (MiB), not a list"),
    ("vcpus = 0", 3, "vcpus must be an integer from 1 to 254, not 0"),
    ("vcpus = 255", 3, "vcpus must be an integer from 1 to 254, not 255"),
    ("maxvcpus = 100000000000", 3, "maxvcpus must be an integer from 1 to 254, not 100000000000"),
    ("vcpus = '0x7fffffff'", 3, "vcpus must be an integer from 1 to 254, not 2147483647"),
    ("memory = 512\nmaxmem = 256", 4, "maxmem (256 MiB) must not be less than memory (512 MiB)"),
    ("maxmem = 64", 3, "maxmem (64 MiB) must not be less than memory (128 MiB)"),
    ("vcpus = 4\nmaxvcpus = 2", 4, "maxvcpus (2) must not be less than vcpus (4)"),
    ("cpu_weight = 70000", 3, "cpu_weight must be an integer from 1 to 65535, not 70000"),
    ("cap = -1", 3, "cap must be an integer of at least 0 (percent of one CPU; 0 is no cap), not -1"),
    ("on_reboot = 'reboot'", 3, "on_reboot must be one of destroy, restart, preserve, not 'reboot'"),
    ("on_crash = 'coredump-restart'", 3,
     "on_crash='coredump-restart' is not supported by hypyr; use one of destroy, restart, preserve"),
    ("type = 'pv'", 3, "pv guests are not supported; use type='pvh'"),
    ("type = 'kvm'", 3, "type must be 'pvh' or 'hvm', not 'kvm'"),
    ("builder = 'linux'", 3, "builder must be 'generic' or 'hvm' (or use type='pvh'), not 'linux'"),
    ("kernel = 5", 3, "kernel must be a quoted string, not 5"),
    ("cpus = '0-'", 3, "cpus: '0-' in CPU list '0-' is not a CPU number, range (N-M), exclusion (^N) or 'all'"),
    ("vcpus = 2\ncpus = ['1',\n   '3-1']", 5, "cpus: CPU range '3-1' in CPU list '3-1' is backwards"),
    ("cpus = ['0', '1']", 3, "cpus lists 2 vCPUs but the domain has only 1"),
])
def test_bad_values_name_the_line(extra, line, message):
    e = err(BASE + extra + "\n")
    assert (e.line, e.message) == (line, message)
    assert str(e) == f"vm.cfg:{line}: {message}"


def test_vcpu_counts_are_bounded_and_errors_name_the_key():
    """A huge maxvcpus used to be accepted (then `create` hung building per-vCPU tables); a bad vcpus
    was reported by the VMM as --vcpus, a flag the cfg file does not have."""
    assert loads(BASE + "vcpus = 254\n").maxvcpus == 254
    for key in ("vcpus", "maxvcpus"):
        e = err(BASE + f"{key} = 1000\n")
        assert e.message.startswith(f"{key} must be") and "--" not in str(e)
        with pytest.raises(ConfigValueError, match=f"^{key} must be an integer from 1 to 254, not 10000000000$"):
            DomainConfig(name="g", kernel="/k", **{key: 10**10})


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "dom/0", "12", "naïve"])
def test_bad_names(name):
    e = err(f"kernel = '/k'\n\nname = '{name}'\n")
    assert e.line == 3 and e.message.startswith("name must")


@pytest.mark.parametrize("name", ["a", "Web-01", "db_2.prod", "0day", "x" * 64])
def test_good_names(name):
    assert loads(f"name = '{name}'\nkernel = '/k'\n").name == name


def test_required_keys():
    assert str(err("kernel = '/k'\n")) == "vm.cfg: name is required (e.g. name = 'guest1')"
    assert str(err("name = 'g'\n")).startswith("vm.cfg: kernel is required")


def test_defaults():
    cfg = loads(BASE)
    assert (cfg.type, cfg.memory, cfg.maxmem, cfg.vcpus, cfg.maxvcpus) == ("pvh", 128, 128, 1, 1)
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash) == ("destroy", "restart", "destroy")
    assert (cfg.cpu_weight, cfg.cap, cfg.disks, cfg.ramdisk) == (256, 0, (), None)


def test_cmdline_root_extra_semantics():
    assert loads(BASE + "root = '/dev/vda'").cmdline_string() == "root=/dev/vda"
    assert loads(BASE + "extra = 'quiet'").cmdline_string() == "quiet"
    assert loads(BASE + "root = '/dev/vda'\nextra='quiet'").cmdline_string() == "root=/dev/vda quiet"
    cfg = loads(BASE + "root = '/dev/vda'\nextra = 'x'\ncmdline = 'console=hvc0'", "vm.cfg")
    assert cfg.cmdline_string() == "console=hvc0"
    assert cfg.warnings == ("vm.cfg:5: cmdline is set, so root and extra are ignored (as in xl)",)


def test_xen_disk_names_on_the_cmdline_warn():
    cfg = loads(BASE + "root = '/dev/xvda1 ro'", "vm.cfg")
    assert cfg.cmdline_string() == "root=/dev/xvda1 ro"
    assert cfg.warnings == ("vm.cfg:3: the kernel command line names /dev/xvda, but hypyr guests see "
                            "their disks as /dev/vda, /dev/vdb, ...",)


def test_builder_is_deprecated_type():
    assert loads(BASE + "builder = 'hvm'").type == "hvm"
    cfg = loads(BASE + "builder = 'generic'", "vm.cfg")
    assert cfg.type == "pvh" and "treated as type='pvh'" in cfg.warnings[0]
    assert loads(BASE + "builder = 'hvm'\ntype = 'pvh'").type == "pvh"


def test_cpus_string_form_applies_to_every_vcpu():
    cfg = loads(BASE + "vcpus = 3\ncpus = 'all,^0'")
    assert cfg.cpus == "all,^0"
    assert cfg.cpu_affinity(4) == [{1, 2, 3}] * 3
    assert loads(BASE + "cpus = 2").cpus == "2"


def test_disk_errors_name_the_item_line():
    e = err(BASE + "disk = [\n  '/a.img,raw,xvda',\n  '/b.img,raw,hda,rw',\n]\n")
    assert e.line == 5
    assert e.message == "disk hda is the same guest disk as xvda (line 4)"
    e = err(BASE + "disk = [ '/a.img,raw,xvda,rw', '/c.iso,,hdc,cdrom' ]\n")
    assert (e.line, e.message) == (3, "disk '/c.iso,,hdc,cdrom': CD-ROM drives (cdrom) are not supported")


def test_single_disk_string_is_accepted():
    assert loads(BASE + "disk = '/a.img,,xvda'").disks[0].target == "/a.img"


# ---------------------------------------------------------------- disk specs


@pytest.mark.parametrize("spec, want", [
    ("/dev/vg/guest-volume,,hda", ("/dev/vg/guest-volume", "hda", 0, False)),
    ("/dev/vg/guest-volume,raw,hda,rw", ("/dev/vg/guest-volume", "hda", 0, False)),
    ("format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume", ("/dev/vg/guest-volume", "hda", 0, False)),
    ("raw:/dev/vg/guest-volume,hda,w", ("/dev/vg/guest-volume", "hda", 0, False)),
    ("phy:/dev/vg/x,xvdb,r", ("/dev/vg/x", "xvdb", 1, True)),
    ("tap:aio:/img/a.img,xvdc,w", ("/img/a.img", "xvdc", 2, False)),
    ("file:/img/a.img,sdz,ro", ("/img/a.img", "sdz", 25, True)),
    ("/img/a.img,raw,vdaa,ro,", ("/img/a.img", "vdaa", 26, True)),
    ("vdev=xvda,access=ro,/img/b.img", ("/img/b.img", "xvda", 0, True)),
    ("/img/c.img,,xvda,,discard,backendtype=qdisk", ("/img/c.img", "xvda", 0, False)),
    ("vdev=xvda, target=/img/odd name, with=stuff ", ("/img/odd name, with=stuff ", "xvda", 0, False)),
    ("sdb,,xvdb", ("/dev/sdb", "xvdb", 1, False)),
    ("./rel.img,,xvda", ("/cwd/rel.img", "xvda", 0, False)),
])
def test_parse_disk(spec, want):
    d = parse_disk(spec, "/cwd")
    assert (d.target, d.vdev, d.index, d.read_only) == want and d.format == "raw"


@pytest.mark.parametrize("spec, fragment", [
    ("/a.qcow2,qcow2,xvda", "format qcow2 is not supported (hypyr supports only raw images)"),
    ("qcow2:/a.img,xvda,w", "format qcow2 is not supported"),
    ("/a.img,ext4,xvda", "format 'ext4' is not a disk format"),
    ("/a.img,raw,xvda1", "vdev xvda1 is a partition; hypyr attaches whole disks"),
    ("/a.img,raw,d0p1", "vdev 'd0p1' is not supported"),
    ("/a.img,raw", "no vdev"),
    (",,xvda", "no target"),
    ("/a.img,raw,xvda,rx", "access 'rx' must be rw (or w) or ro (or r)"),
    ("/a.img,raw,xvda,rw,extra", "too many positional parameters"),
    ("/a.img,raw,xvda,vdev=xvdb", "vdev is given more than once"),
    ("/a.img,raw,hdc:cdrom,r", "CD-ROM drives (cdrom) are not supported"),
    ("devtype=cdrom,target=/a.iso", "CD-ROM drives (cdrom) are not supported"),
    ("nbd:host:1234,xvda,w", "block scripts (nbd:) are not supported"),
    ("/a.img,raw,xvda,script=block-x", "block scripts (script=) are not supported"),
    ("/a.img,raw,xvda,colour=red", "unknown parameter 'colour'"),
    ("", "the spec is empty"),
])
def test_parse_disk_errors(spec, fragment):
    with pytest.raises(HypyrError, match=None) as ei:
        parse_disk(spec)
    assert fragment in str(ei.value)
    assert str(ei.value).startswith(f"disk '{spec}': ")


def test_vdev_index():
    assert [vdev_index(v) for v in ("xvda", "hda", "sdb", "vdc", "xvdz", "xvdaa", "xvdba")] == [0, 0, 1, 2, 25, 26, 52]


# ---------------------------------------------------------------- CPU lists


@pytest.mark.parametrize("text, want", [
    ("all", set(range(8))),
    ("0-3,5,^1", {0, 2, 3, 5}),
    ("all,^7", set(range(7))),
    ("^1", {0, 2, 3, 4, 5, 6, 7}),
    ("^0-6", {7}),
    ("3", {3}),
    (" 1 , 2-4 ", {1, 2, 3, 4}),
    ("^1,0-3", {0, 2, 3}),
    ("12", {12}),             # syntax only: the host range is checked later
    ("all,^0-7", set()),
])
def test_parse_cpulist(text, want):
    assert parse_cpulist(text, 8) == want


@pytest.mark.parametrize("text", ["", "  ", "a", "1,,2", "1-", "-1", "3-1", "1-2-3", "^", "^all",
                                  "node:0", "nodes:0-1", "99999999", "0-70000", "1.5", "0x1"])
def test_parse_cpulist_errors(text):
    with pytest.raises(HypyrError):
        parse_cpulist(text, 8)


# ---------------------------------------------------------------- DomainConfig API


def test_to_dict_from_dict_round_trip():
    cfg = load(DATA / "actions.cfg")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["memory"] == 1024 and d["vcpus"] == 2 and d["cpus"] == ["2", "3-8,^5"]
    back = DomainConfig.from_dict(d)
    assert back == cfg and back.cpus == ("2", "3-8,^5")
    cfg = load(DATA / "kv-disks.cfg")
    back = DomainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.disks == cfg.disks
    assert DomainConfig.from_dict({**cfg.to_dict(), "future_key": 1}) == cfg


def test_from_dict_rejects_bad_records():
    with pytest.raises(HypyrError, match="stored domain configuration is not valid"):
        DomainConfig.from_dict({"name": "g", "kernel": "/k", "memory": 0})
    with pytest.raises(HypyrError, match="stored domain configuration is not valid"):
        DomainConfig.from_dict({"name": "g"})


def test_direct_construction_validates():
    cfg = DomainConfig(name="g", kernel="/k",
                       disks=[DiskSpec("/b", "raw", "xvdb", 1), DiskSpec("/a", "raw", "xvda", 0)])
    assert [d.vdev for d in cfg.disks] == ["xvda", "xvdb"] and cfg.maxmem == 128
    with pytest.raises(HypyrError, match="vcpus must be"):
        DomainConfig(name="g", kernel="/k", vcpus=0)
    assert isinstance(hash(cfg), int)      # frozen, with tuples for containers


# ---------------------------------------------------------------- robustness


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_xlcfgerror(text):
    try:
        loads(text, "fuzz.cfg", cwd="/cwd")
    except XlCfgError as e:
        assert str(e).startswith("fuzz.cfg")
        assert "\n" not in e.message or "\\n" in e.message


_pieces = st.sampled_from(["name", "kernel", "disk", "cpus", "memory", "=", "'", '"', "[", "]", ",", ";",
                           "#", "\n", " ", "\\", "0x1f", "07", "12", "'/k'", "'g'", "'/a.img,raw,xvda'",
                           "'0-3,^1'", "'x=y, target=/z'", "type", "'pvh'", "maxmem", "-3", "true"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=40).map("".join))
def test_config_shaped_noise_only_raises_xlcfgerror(text):
    try:
        cfg = loads(text, "fuzz.cfg", cwd="/cwd")
    except XlCfgError:
        return
    assert DomainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789-,^ al", max_size=30))
def test_cpulist_noise_only_raises_hypyrerror(text):
    try:
        parse_cpulist(text, 8)
    except HypyrError:
        pass


def test_pathological_inputs_are_fast():
    parse("a = [" + "'x'," * 50000 + "]\n")
    parse("# c\n" * 50000)
    with pytest.raises(XlCfgError):
        parse("a = '" + "x" * 200000)
    with pytest.raises(XlCfgError):
        parse("a = " + "9" * 5000)
