import lzma
import os
import shutil
import stat
import struct
import subprocess

import pytest
from test_cpio import parse_newc  # tests/unit is on sys.path (pytest rootdir-less import)

from hypyr.errors import HypyrError
from hypyr.image import build as B
from hypyr.image import debs
from hypyr.image import default as D
from hypyr.image.exitport import EXIT_PORT, exit_helper_elf

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")


def fake_ko(depends: str = "") -> bytes:
    """A minimal ELF64 'module' whose .modinfo section carries depends=..."""
    modinfo = b"license=GPL\0" + f"depends={depends}\0".encode() + b"vermagic=9.9.9 SMP\0"
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    shoff = shstr_off + len(shstr)
    shoff += -shoff % 8
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 1, 0x3E, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = ehdr + modinfo + shstr
    body += bytes(shoff - len(body))
    sh = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sh += struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, data_off, len(modinfo), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    return body + sh


# name -> (relative path, depends)
FAKE_MODS = {
    "virtio_ring": ("kernel/drivers/virtio/virtio_ring.ko", ""),
    "virtio": ("kernel/drivers/virtio/virtio.ko", "virtio_ring"),
    "virtio_mmio": ("kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring"),
    "virtio_blk": ("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
    "vsock": ("kernel/net/vmw_vsock/vsock.ko", ""),
    "vmw_vsock_virtio_transport_common": ("kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko", "vsock"),
    "vmw_vsock_virtio_transport": ("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                                   "vmw_vsock_virtio_transport_common,virtio,virtio_ring,vsock"),
    "kvm_amd": ("kernel/arch/x86/kvm/kvm-amd.ko.xz", "kvm,ccp"),
    "kvm": ("kernel/arch/x86/kvm/kvm.ko", "irqbypass"),
    "irqbypass": ("kernel/virt/lib/irqbypass.ko", ""),
    "ccp": ("kernel/drivers/crypto/ccp/ccp.ko", ""),
}


def fake_dyn_elf(interp: str | None = None, needed: tuple[str, ...] = ()) -> bytes:
    """A minimal ELF64 executable/library with PT_INTERP and a PT_DYNAMIC naming DT_NEEDED libraries."""
    base = 0x400000
    phnum = 3
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
    interp_b = (interp.encode() + b"\0") if interp else b""
    ph_off = 64
    interp_off = ph_off + phnum * 56
    str_off = interp_off + len(interp_b)
    dyn_off = str_off + len(strtab)
    dyn_off += -dyn_off % 8
    dyn = b""
    pos = 1
    for n in needed:
        dyn += struct.pack("<qQ", 1, pos)
        pos += len(n) + 1
    dyn += struct.pack("<qQ", 5, base + str_off) + struct.pack("<qQ", 0, 0)
    total = dyn_off + len(dyn)
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 3, 0x3E, 1, base, ph_off, 0, 0, 64, 56, phnum, 64, 0, 0)
    phs = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    if interp:
        phs += struct.pack("<IIQQQQQQ", 3, 4, interp_off, base + interp_off, base + interp_off,
                           len(interp_b), len(interp_b), 1)
    else:
        phs += struct.pack("<IIQQQQQQ", 4, 4, 0, 0, 0, 0, 0, 4)  # PT_NOTE: a filler
    phs += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, base + dyn_off, base + dyn_off, len(dyn), len(dyn), 8)
    body = ehdr + phs + interp_b + strtab
    return body + bytes(dyn_off - len(body)) + dyn


LD = "/lib64/ld-linux-x86-64.so.2"
# package -> {path: (bytes, mode) or symlink target str}
FAKE_USERLAND = {
    "iperf3": {"usr/bin/iperf3": (fake_dyn_elf(LD, ("libiperf.so.0", "libc.so.6")), 0o755)},
    "libiperf0": {"usr/lib/x86_64-linux-gnu/libiperf.so.0.0.0":
                  (fake_dyn_elf(None, ("libc.so.6", "libcrypto.so.3", "libsctp.so.1")), 0o644),
                  "usr/lib/x86_64-linux-gnu/libiperf.so.0": "libiperf.so.0.0.0"},
    "libc6": {"lib/x86_64-linux-gnu/libc.so.6": (fake_dyn_elf(LD, ("ld-linux-x86-64.so.2",)), 0o755),
              "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": (fake_dyn_elf(None), 0o755),
              "lib64/ld-linux-x86-64.so.2": "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"},
    "libsctp1": {"usr/lib/x86_64-linux-gnu/libsctp.so.1": (fake_dyn_elf(None, ("libc.so.6",)), 0o644)},
    "libssl3": {"usr/lib/x86_64-linux-gnu/libcrypto.so.3": (fake_dyn_elf(None, ("libc.so.6",)), 0o644)},
}


def test_elf_dynamic():
    assert debs.elf_dynamic(fake_dyn_elf(LD, ("libfoo.so.1", "libc.so.6"))) == (LD, ["libfoo.so.1", "libc.so.6"])
    assert debs.elf_dynamic(fake_dyn_elf()) == (None, [])
    with pytest.raises(HypyrError):
        debs.elf_dynamic(b"#!/bin/sh\n" + bytes(64))


def unpack_fake_userland(tmp_path):
    roots = []
    for pkg, files in FAKE_USERLAND.items():
        root = tmp_path / pkg
        for rel, v in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(v, str):
                os.symlink(v, p)
            else:
                p.write_bytes(v[0])
        roots.append(root)
    return roots


def test_program_closure(tmp_path):
    roots = unpack_fake_userland(tmp_path)
    got = debs.program_closure(roots, ["usr/bin/iperf3"])
    assert sorted(got) == ["lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
                           "lib/x86_64-linux-gnu/libcrypto.so.3", "lib/x86_64-linux-gnu/libiperf.so.0",
                           "lib/x86_64-linux-gnu/libsctp.so.1", "lib64/ld-linux-x86-64.so.2", "usr/bin/iperf3"]
    # symlinks, absolute ones too, resolve inside the package roots
    assert got["lib64/ld-linux-x86-64.so.2"] == tmp_path / "libc6/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert got["lib/x86_64-linux-gnu/libiperf.so.0"].name == "libiperf.so.0.0.0"
    with pytest.raises(HypyrError, match="libcrypto"):
        debs.program_closure([r for r in roots if r.name != "libssl3"], ["usr/bin/iperf3"])
    with pytest.raises(HypyrError, match="nope"):
        debs.program_closure(roots, ["usr/bin/nope"])


def test_add_programs_stores_a_file_once(tmp_path):
    from hypyr.image.cpio import CpioWriter
    w = CpioWriter()
    added = B.add_programs(w, unpack_fake_userland(tmp_path), ["usr/bin/iperf3"])
    assert "usr/bin/iperf3" in added
    entries = {e.name: e for e in w.entries()}
    assert stat.S_ISREG(entries["lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"].mode)
    assert entries["lib64/ld-linux-x86-64.so.2"].data == b"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert entries["usr/bin/iperf3"].mode & 0o111


def make_modtree(root, with_dep_file=False):
    moddir = root / "lib" / "modules" / "9.9.9-test"
    for _name, (rel, deps) in FAKE_MODS.items():
        p = moddir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = fake_ko(deps)
        p.write_bytes(lzma.compress(data) if rel.endswith(".xz") else data)
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n")
    if with_dep_file:
        lines = []
        for _name, (rel, deps) in FAKE_MODS.items():
            # modules.dep lists full transitive deps, deepest last
            lines.append(f"{rel}: " + " ".join(FAKE_MODS[d][0] for d in deps.split(",") if d))
        (moddir / "modules.dep").write_text("\n".join(lines) + "\n")
    return moddir


def names(order):
    return [debs.mod_name(r) for r in order]


@pytest.mark.parametrize("with_dep_file", [False, True])
def test_module_order_dependencies_first(tmp_path, with_dep_file):
    moddir = make_modtree(tmp_path, with_dep_file)
    tree = debs.ModuleTree(moddir)
    res = tree.resolve(["vmw_vsock_virtio_transport", "virtio-mmio", "ext4", "nope", "kvm-amd", "virtio_blk"])
    order = names(res.ordered)
    assert len(order) == len(set(order))
    for name in order:
        deps = [d for d in FAKE_MODS[name][1].split(",") if d]
        for d in deps:
            assert order.index(d) < order.index(name), (d, name, order)
    assert order.index("vmw_vsock_virtio_transport") < order.index("virtio_mmio")  # request order kept
    assert res.builtin == ["ext4"] and res.missing == ["nope"]
    assert "kernel/arch/x86/kvm/kvm-amd.ko.xz" in res.ordered
    assert debs.module_order(moddir, ["kvm_amd"])[-1].endswith("kvm-amd.ko.xz")


def test_compressed_module_is_decompressed(tmp_path):
    moddir = make_modtree(tmp_path)
    data = debs.read_module(moddir / FAKE_MODS["kvm_amd"][0])
    assert debs.modinfo(data)["depends"] == ["kvm,ccp"]


def test_mod_name_normalises():
    assert debs.mod_name("kernel/arch/x86/kvm/kvm-amd.ko.zst") == "kvm_amd"
    assert debs.mod_name("virtio-pci") == "virtio_pci"


def test_missing_dependency_is_an_error(tmp_path):
    moddir = tmp_path / "m"
    moddir.mkdir()
    (moddir / "a.ko").write_bytes(fake_ko("ghost"))
    with pytest.raises(HypyrError):
        debs.ModuleTree(moddir).resolve(["a"])


def test_exit_helper_elf_shape():
    elf = exit_helper_elf()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    entry, = struct.unpack_from("<Q", elf, 24)
    assert (e_type, e_machine) == (2, 0x3E)
    p_type, p_flags, p_off, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, 64)
    assert p_type == 1 and p_filesz == len(elf) and p_vaddr <= entry < p_vaddr + p_filesz
    assert bytes([0xEE]) in elf and struct.pack("<I", EXIT_PORT) in elf  # out dx,al ; port


def test_init_script_contract():
    init = D.init_script().decode()
    lines = [l for l in init.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    first_echo = next(l for l in lines if l.startswith("echo"))
    assert first_echo == 'echo "[${uptime:-?}] hypyr: init started"'   # the first line it prints
    assert lines.index(first_echo) == 2   # after reading the uptime (mount /proc, read), nothing else
    for needle in ("hypyr.exec=", "base64 -d", "seek=244", "/bin/hypyr-exit", "poweroff -f",
                   "hypyr guest ready", "hypyr.console=", "/etc/hypyr/modules",
                   "ip link set lo up", "ip=*)", "hypyr.ip.*=*)", "udhcpc -i", "/etc/hypyr/udhcpc.script"):
        assert needle in init


def _net_part() -> str:
    init = D.init_script().decode()
    start = init.index("net_wait() {")
    end = init.index("\n", init.index('[ -z "$netgw" ]'))
    return init[start:end]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@pytest.mark.parametrize("cmdline,expect", [
    ("ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off",
     ["ip link set lo up", "ip addr add 10.77.0.2/24 dev eth0", "ip link set eth0 up",
      "ip route add default via 10.77.0.1 dev eth0"]),
    ("ip=192.168.1.5:::255.255.0.0:guest:eth1:none",
     ["ip link set lo up", "ip addr add 192.168.1.5/16 dev eth1", "ip link set eth1 up", "hostname guest"]),
    ("ip=10.1.2.3", ["ip link set lo up", "ip addr add 10.1.2.3/8 dev eth0", "ip link set eth0 up"]),
    ("ip=dhcp", ["ip link set lo up", "ip link set eth0 up",
                 "udhcpc -i eth0 -q -n -t 10 -T 1 -s /etc/hypyr/udhcpc.script"]),
    ("ip=:::::eth1:dhcp", ["ip link set lo up", "ip link set eth1 up",
                           "udhcpc -i eth1 -q -n -t 10 -T 1 -s /etc/hypyr/udhcpc.script"]),
    ("ip=off", ["ip link set lo up"]),
    ("hypyr.ip.0=10.0.0.2/24 hypyr.ip.1=dhcp hypyr.gw=10.0.0.1",
     ["ip link set lo up", "ip addr add 10.0.0.2/24 dev eth0", "ip link set eth0 up", "ip link set eth1 up",
      "udhcpc -i eth1 -q -n -t 10 -T 1 -s /etc/hypyr/udhcpc.script", "ip route add default via 10.0.0.1"]),
])
def test_init_network_config(cmdline, expect, tmp_path):
    """The init's networking section, with ip/udhcpc/hostname stubbed to log their arguments."""
    log, _ = run_init_network(cmdline, tmp_path)
    assert log == expect


@pytest.mark.parametrize("fails", [2, 3])
def test_init_runs_udhcpc_again_and_shows_each_failure(fails, tmp_path):
    log, out = run_init_network("ip=dhcp", tmp_path, udhcpc_fails=fails)
    assert log.count("udhcpc -i eth0 -q -n -t 10 -T 1 -s /etc/hypyr/udhcpc.script") == 3
    failures = [l for l in out.splitlines() if l.startswith("hypyr: DHCP on eth0 failed (run ")]
    assert len(failures) == fails and all(l.endswith(": udhcpc: no lease, failing") for l in failures)
    assert ("hypyr: no DHCP lease on eth0" in out) == (fails == 3)


def run_init_network(cmdline: str, tmp_path, udhcpc_fails: int = 0) -> tuple[list[str], str]:
    """Run the init's networking section for ``cmdline`` with ip/udhcpc/hostname stubbed to log
    their arguments (udhcpc failing its first ``udhcpc_fails`` runs); (the log, its stdout)."""
    log = tmp_path / "log"
    script = f"""
log={log}
ip() {{ echo "ip $*" >>$log; }}
udhcpc() {{
    echo "udhcpc $*" >>$log
    n=$(grep -c ^udhcpc $log)
    [ "$n" -gt {udhcpc_fails} ] && return 0
    echo "udhcpc: started"; echo "udhcpc: no lease, failing" >&2; return 1
}}
hostname() {{ echo "hostname $*" >>$log; }}
ipcalc() {{  # busybox ipcalc -p ADDR [MASK] (classful without MASK)
    case "$3" in
        255.255.255.0) echo PREFIX=24 ;; 255.255.0.0) echo PREFIX=16 ;;
        "") case "$2" in 10.*) echo PREFIX=8 ;; *) echo PREFIX=24 ;; esac ;;
    esac
}}
mkdir -p {tmp_path}/sys/class/net/eth0 {tmp_path}/sys/class/net/eth1
host_set=""; ipconf=""; netcfg=""; netgw=""
for arg in {cmdline}; do
    case "$arg" in
        ip=*) ipconf="${{arg#ip=}}" ;;
        hypyr.ip.*=*) a="${{arg#hypyr.ip.}}"; netcfg="$netcfg eth${{a%%=*}}=${{a#*=}}" ;;
        hypyr.gw=*) netgw="${{arg#hypyr.gw=}}" ;;
    esac
done
""" + _net_part().replace("/sys/class/net/", f"{tmp_path}/sys/class/net/") + "\n"
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines(), r.stdout


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_init_script_parses():
    r = subprocess.run(["sh", "-n"], input=D.init_script(), capture_output=True)
    assert r.returncode == 0, r.stderr


# ---- build() with fake packages (no network) -------------------------------------------------

def make_deb(tmp_path, name, files):
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: fake\n")
    for rel, v in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(v, str):  # a symbolic link
            os.symlink(v, p)
            continue
        data, mode = v
        p.write_bytes(data)
        p.chmod(mode)
    deb = tmp_path / f"{name}_1.0_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    modroot = tmp_path / "kmods"
    moddir = make_modtree(modroot)
    files = {"boot/vmlinuz-9.9.9-test": (b"fake bzImage", 0o644)}
    for p in moddir.rglob("*"):
        if p.is_file():
            files[str(p.relative_to(modroot))] = (p.read_bytes(), 0o644)
    kdeb = make_deb(tmp_path, "linux-image-9.9.9-test", files)
    bb = b"#!/bin/sh\n[ \"$1\" = --list-full ] && printf 'bin/ls\\nsbin/poweroff\\nbin/sh\\n'\n"
    bdeb = make_deb(tmp_path, "busybox-static", {"bin/busybox": (bb, 0o755)})
    monkeypatch.setenv("HYPYR_IMAGE_DIR", str(tmp_path / "image"))
    monkeypatch.setenv("HYPYR_DEB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(debs, "resolve_package", lambda n: n)
    pkgs = {B.BUSYBOX_PACKAGE: bdeb}
    for pkg, pfiles in FAKE_USERLAND.items():
        pkgs[pkg] = make_deb(tmp_path, pkg, pfiles)
    monkeypatch.setattr(debs, "download", lambda n, cache=None: pkgs.get(n, kdeb))
    return kdeb


@needs_dpkg
def test_build_contents_and_stamp(fake_env, capsys):
    out = B.build()
    assert out.kernel.read_bytes() == b"fake bzImage"
    import gzip
    entries = {e["name"]: e for e in parse_newc(gzip.decompress(out.initrd.read_bytes()))}
    init = entries["init"]
    assert stat.S_ISREG(init["mode"]) and init["mode"] & 0o111
    assert init["data"] == D.init_script()
    assert stat.S_ISCHR(entries["dev/console"]["mode"]) and stat.S_ISCHR(entries["dev/null"]["mode"])
    for d in ("proc", "sys", "dev", "tmp", "mnt", "root", "etc"):
        assert stat.S_ISDIR(entries[d]["mode"])
    assert entries["bin/ls"]["data"] == b"/bin/busybox" and stat.S_ISLNK(entries["bin/sh"]["mode"])
    assert entries["bin/hypyr-exit"]["mode"] & 0o111
    order = entries["etc/hypyr/modules"]["data"].decode().split()
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_mmio.ko")
    assert all(f"lib/modules/{m}" in entries for m in order)
    assert "virtio_mmio.ko" in order and "ext4.ko" not in order  # ext4 is built in here
    assert entries["usr/bin/iperf3"]["mode"] & 0o111
    assert "lib/x86_64-linux-gnu/libcrypto.so.3" in entries and "lib64/ld-linux-x86-64.so.2" in entries
    assert entries["etc/hypyr/udhcpc.script"]["mode"] & 0o111

    first = out.initrd.read_bytes()
    mtime = out.initrd.stat().st_mtime_ns
    capsys.readouterr()
    again = B.build()  # same inputs: nothing is rebuilt
    assert again == out and out.initrd.stat().st_mtime_ns == mtime
    assert "building" not in capsys.readouterr().err
    B.build(force=True)  # forced: rebuilt, byte-identical
    assert out.initrd.read_bytes() == first
    assert D.ensure() == out


@needs_dpkg
def test_stamp_changes_with_inputs(fake_env, monkeypatch):
    out = B.build()
    old = (out.dir / D.STAMP).read_text()
    monkeypatch.setattr(D, "init_script", lambda: b"#!/bin/sh\necho \"hypyr: init started\"\n")
    B.build()
    assert (out.dir / D.STAMP).read_text() != old
    monkeypatch.setattr(D, "GUEST_MODULES", ["virtio_blk"])
    s2 = (out.dir / D.STAMP).read_text()
    B.build()
    assert (out.dir / D.STAMP).read_text() != s2


def test_image_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPYR_IMAGE_DIR", str(tmp_path / "x"))
    assert D.image_dir() == tmp_path / "x" and D.paths().initrd == tmp_path / "x" / "initrd.img"
    monkeypatch.delenv("HYPYR_IMAGE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert D.image_dir() == tmp_path / "c" / "hypyr" / "image"


def test_build_rejects_missing_kernel_deb(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPYR_IMAGE_DIR", str(tmp_path))
    with pytest.raises(HypyrError):
        B.build(kernel_deb=tmp_path / "nope.deb")


@pytest.mark.skipif(os.environ.get("HYPYR_TEST_NETWORK") != "1", reason="set HYPYR_TEST_NETWORK=1")
def test_real_build(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPYR_IMAGE_DIR", str(tmp_path / "image"))
    out = B.build()
    assert out.kernel.stat().st_size > 1_000_000
    import gzip
    entries = {e["name"]: e for e in parse_newc(gzip.decompress(out.initrd.read_bytes()))}
    assert "bin/busybox" in entries and "lib/modules/virtio_mmio.ko" in entries
    data = out.initrd.read_bytes()
    B.build(force=True)
    assert out.initrd.read_bytes() == data


@needs_dpkg
def test_ensure_rebuilds_when_init_changes(fake_env, monkeypatch):
    out = D.ensure()
    before = out.initrd.read_bytes()
    assert D.ensure() == out and out.initrd.read_bytes() == before
    monkeypatch.setattr(D, "init_script", lambda: b"#!/bin/sh\necho \"hypyr: init started\"\n# v2\n")
    D.ensure()
    assert out.initrd.read_bytes() != before
