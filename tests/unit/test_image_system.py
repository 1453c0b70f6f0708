"""`hypyr image build --system` without root or network: option checks, the files written into the
system (grub.cfg, fstab, the DHCP .network file, the initramfs module list), the mmdebstrap command
line, the stamp, the refusals, and the whole pipeline with mmdebstrap replaced by a fake tree
(mke2fs -d builds the image, hypyr's disk boot reads it back)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hypyr import cli
from hypyr.image import bootcfg, diskboot
from hypyr.image import system as S

needs_e2fs = pytest.mark.skipif(S._mke2fs() is None or S._tool("debugfs") is None,
                                reason="e2fsprogs (mke2fs, debugfs) not installed")
REL = "6.1.0-99-cloud-amd64"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh5cHlyaHlweXJoeXB5cmh5cHlyaHlweXJoeXB5cmh5 me@host\n"


@pytest.mark.parametrize("text,n", [("2G", 2 << 30), ("1536M", 1536 << 20), ("3g", 3 << 30),
                                    ("512MiB", 512 << 20), (str(1 << 30), 1 << 30), ("1T", 1 << 40)])
def test_sizes(text, n):
    assert S.parse_size(text) == n


@pytest.mark.parametrize("text,words", [("", "not a size"), ("2X", "not a size"), ("-1G", "not a size"),
                                        ("1.5G", "not a size"), ("100M", "at least 512M"),
                                        ("3T", "2T at most")])
def test_bad_sizes_are_one_sentence(text, words):
    with pytest.raises(S.SystemImageError, match=words) as e:
        S.parse_size(text)
    assert "\n" not in str(e.value)


def test_hostnames_and_packages():
    assert S.check_hostname("web-1.example.org") == "web-1.example.org"
    for bad in ("", "-x", "x-", "a b", "a_b", "a..b", "x" * 64):
        with pytest.raises(S.SystemImageError, match="not a valid host name"):
            S.check_hostname(bad)
    assert S.check_packages(["vim", " curl ", "", "linux-image-6.12-cloud-amd64/bookworm-backports",
                             "libc6:amd64", "foo=1.2-3"]) == (
        "vim", "curl", "linux-image-6.12-cloud-amd64/bookworm-backports", "libc6:amd64", "foo=1.2-3")
    for bad in ("Vim", "a;rm -rf /", "$(x)", "a b"):
        with pytest.raises(S.SystemImageError, match="not a Debian package name"):
            S.check_packages([bad])


def test_password_and_keys(tmp_path):
    assert S.check_password("s3cret pw:x") == "s3cret pw:x"
    for bad in ("", "a\nb"):
        with pytest.raises(S.SystemImageError):
            S.check_password(bad)
    pub = tmp_path / "id.pub"
    pub.write_text("# mine\n" + KEY + "\n")
    assert S.read_ssh_keys(pub) == KEY
    priv = tmp_path / "id"
    priv.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(S.SystemImageError, match="is a private key"):
        S.read_ssh_keys(priv)
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    with pytest.raises(S.SystemImageError, match="holds no OpenSSH public key"):
        S.read_ssh_keys(junk)
    with pytest.raises(S.SystemImageError, match="cannot read the SSH key file"):
        S.read_ssh_keys(tmp_path / "missing.pub")


def test_make_spec_needs_a_way_to_log_in(tmp_path):
    with pytest.raises(S.SystemImageError, match="--root-password PASSWORD or --ssh-key FILE"):
        S.make_spec(tmp_path / "x.img")
    spec = S.make_spec(tmp_path / "x.img", size="1G", root_password="pw", packages=["vim"])
    assert spec.size == 1 << 30 and spec.hostname == "hypyr" and spec.packages == ("vim",)
    assert S.SSH_PACKAGE not in spec.all_packages()
    pub = tmp_path / "k.pub"
    pub.write_text(KEY)
    keyed = S.make_spec(tmp_path / "x.img", ssh_key_file=pub)
    assert keyed.root_password is None and keyed.ssh_keys == KEY
    assert S.SSH_PACKAGE in keyed.all_packages() and S.KERNEL_PACKAGE in keyed.all_packages()


def test_grub_cfg_boots_the_kernel_with_root_vda_on_ttys0():
    cfg = bootcfg.parse_grub(S.grub_cfg(REL, "web"))
    e = cfg.select(None)
    assert e.kernel == f"/boot/vmlinuz-{REL}"
    assert e.initrds == [f"/boot/initrd.img-{REL}"]
    assert e.cmdline.split() == ["root=/dev/vda", "ro", "console=ttyS0"]
    assert len(list(cfg.entries())) == 1 and "web" in e.title


def test_fstab_network_hosts_and_modules():
    assert [l.split() for l in S.fstab().splitlines() if not l.startswith("#")] == [
        ["/dev/vda", "/", "ext4", "errors=remount-ro", "0", "1"]]
    net = S.network_file()
    assert "[Match]\nName=en* eth*\n" in net and "[Network]\nDHCP=ipv4\n" in net
    assert "127.0.1.1\tweb.example.org web\n" in S.hosts("web.example.org")
    mods = [l for l in S.initramfs_modules().splitlines() if l and not l.startswith("#")]
    assert {"virtio_mmio", "virtio_blk"} <= set(mods)


def test_mmdebstrap_command_line_and_its_setup_hook(tmp_path):
    spec = S.SystemSpec(out=tmp_path / "x.img", size=1 << 30, root_password="pw", packages=("vim",))
    args = S.mmdebstrap_args(spec, tmp_path / "root")
    assert args[0] == "mmdebstrap" and "--mode=root" in args and "--format=directory" in args
    assert "--variant=minbase" in args
    include = next(a for a in args if a.startswith("--include="))[len("--include="):].split(",")
    assert "systemd-sysv" in include and S.KERNEL_PACKAGE in include and include[-1] == "vim"
    assert S.SSH_PACKAGE not in include
    assert args[args.index(S.SUITE) + 1:] == [str(tmp_path / "root"), *S.MIRRORS]
    # the hook, run as mmdebstrap runs it (sh -c HOOK exec TARGET), writes the module list
    hook = next(a for a in args if a.startswith("--setup-hook="))[len("--setup-hook="):]
    target = tmp_path / "t"
    target.mkdir()
    subprocess.run(["sh", "-c", hook, "exec", str(target)], check=True)
    assert (target / "etc/initramfs-tools/modules").read_text() == S.initramfs_modules()


def test_stamp_matches_the_same_options_only(tmp_path):
    out = tmp_path / "x.img"
    spec = S.SystemSpec(out=out, size=1 << 30, root_password="pw")
    out.write_bytes(b"img")
    assert not S.is_current(spec)                                    # no stamp
    S.stamp_path(out).write_text(S.stamp_text(spec))
    assert S.is_current(spec)
    assert "pw" not in json.loads(S.stamp_path(out).read_text()).values()   # only a salted hash
    for other in (S.SystemSpec(out=out, size=2 << 30, root_password="pw"),
                  S.SystemSpec(out=out, size=1 << 30, root_password="pw2"),
                  S.SystemSpec(out=out, size=1 << 30, root_password="pw", hostname="other"),
                  S.SystemSpec(out=out, size=1 << 30, root_password="pw", packages=("vim",))):
        assert not S.is_current(other)
    S.stamp_path(out).write_text("{not json")
    assert not S.is_current(spec)


def test_host_refusals(tmp_path, monkeypatch):
    spec = S.SystemSpec(out=tmp_path / "x.img", size=1 << 30, root_password="pw")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(S.SystemImageError, match="needs root"):
        S.check_host(spec)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = S._tool
    monkeypatch.setattr(S, "_tool", lambda n: None if n == "mmdebstrap" else real(n))
    with pytest.raises(S.SystemImageError, match="apt-get install mmdebstrap"):
        S.check_host(spec)
    monkeypatch.setattr(S, "_tool", lambda n: "/usr/bin/" + n)
    monkeypatch.setattr(S, "_mke2fs", lambda: "/sbin/mke2fs")
    (tmp_path / "x.img").write_bytes(b"")
    with pytest.raises(S.SystemImageError, match="already exists: give --force"):
        S.check_host(spec)
    S.check_host(S.SystemSpec(out=tmp_path / "x.img", size=1 << 30, root_password="pw", force=True))
    with pytest.raises(S.SystemImageError, match="does not exist"):
        S.check_host(S.SystemSpec(out=tmp_path / "no" / "x.img", size=1 << 30, root_password="pw"))


def fake_install(root: Path) -> None:
    """What mmdebstrap leaves that hypyr's steps look at: a kernel, an initrd, networkd's units, sshd."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{REL}").write_bytes(b"K" * 5000)
    (root / "boot" / f"initrd.img-{REL}").write_bytes(b"I" * 3000)
    units = root / "lib/systemd/system"
    units.mkdir(parents=True)
    for u in ("systemd-networkd.service", "systemd-networkd.socket"):
        (units / u).write_text("[Unit]\n")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "root").mkdir(mode=0o700)
    (root / "var/cache/apt/archives").mkdir(parents=True)
    (root / "var/cache/apt/archives/x.deb").write_bytes(b"deb")


def test_configure_writes_the_system_files(tmp_path):
    root = tmp_path / "root"
    fake_install(root)
    spec = S.SystemSpec(out=tmp_path / "x.img", size=1 << 30, ssh_keys=KEY, hostname="web")
    assert S.configure(root, spec, tmp_path / "log") == REL
    assert (root / "etc/hostname").read_text() == "web\n"
    assert (root / "etc/fstab").read_text() == S.fstab()
    assert (root / "etc/systemd/network/20-hypyr-dhcp.network").read_text() == S.network_file()
    assert (root / "boot/grub/grub.cfg").read_text() == S.grub_cfg(REL, "web")
    assert os.readlink(root / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service") == \
        "/lib/systemd/system/systemd-networkd.service"
    assert (root / "etc/systemd/system/sockets.target.wants/systemd-networkd.socket").is_symlink()
    keys = root / "root/.ssh/authorized_keys"
    assert keys.read_text() == KEY and keys.stat().st_mode & 0o777 == 0o600
    assert (root / "root/.ssh").stat().st_mode & 0o777 == 0o700
    assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()    # made on first boot instead
    assert (root / "etc/systemd/system/multi-user.target.wants/hypyr-ssh-keygen.service").is_symlink()
    assert (root / "etc/machine-id").read_text() == ""
    assert os.readlink(root / "etc/systemd/system/systemd-firstboot.service") == "/dev/null"   # masked
    assert not (root / "var/cache/apt/archives/x.deb").exists()


def test_configure_needs_a_kernel_with_its_initrd(tmp_path):
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{REL}").write_bytes(b"K")
    with pytest.raises(S.SystemImageError, match="no /boot/vmlinuz-"):
        S.configure(root, S.SystemSpec(out=tmp_path / "x", size=1 << 30, ssh_keys=KEY), tmp_path / "log")


@needs_e2fs
def test_build_pipeline_with_a_fake_mmdebstrap(tmp_path, monkeypatch, capfd):
    """build(): the tree mmdebstrap would make -> configure -> mke2fs -d -> disk boot check ->
    the image and its stamp; a second build is a no-op; no work directory is left behind."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_tool = S._tool
    monkeypatch.setattr(S, "_tool", lambda n: "/usr/bin/mmdebstrap" if n == "mmdebstrap" else real_tool(n))
    real_run = S._run_logged

    def run(args, what, logfile, stdin=None):
        if args[0] == "mmdebstrap":
            fake_install(Path(args[-1 - len(S.MIRRORS)]))
            return
        real_run(args, what, logfile, stdin)
    monkeypatch.setattr(S, "_run_logged", run)
    out = tmp_path / "sys.img"
    spec = S.SystemSpec(out=out, size=32 << 20, ssh_keys=KEY)
    assert S.build(spec) == out
    err = capfd.readouterr().err
    assert "[1/5]" in err and "[5/5]" in err and f"built {out}" in err
    with diskboot.load(str(out)) as b:
        assert Path(b.kernel).read_bytes() == b"K" * 5000
        assert b.initrd and Path(b.initrd).read_bytes() == b"I" * 3000
        assert b.cmdline == "root=/dev/vda ro console=ttyS0"
    r = subprocess.run([S._tool("debugfs") or "debugfs", "-R", "cat /etc/fstab", str(out)],
                       capture_output=True, text=True)
    assert r.stdout == S.fstab()
    assert S.stamp_path(out).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sys.img", "sys.img.stamp", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []
    mtime = out.stat().st_mtime_ns
    assert S.build(spec) == out and out.stat().st_mtime_ns == mtime      # up to date: nothing done
    assert "up to date" in capfd.readouterr().err


@needs_e2fs
def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(S, "_tool", lambda n: shutil.which("true") if n == "mmdebstrap" else shutil.which(n))
    real_run = S._run_logged

    def run(args, what, logfile, stdin=None):
        if args[0] == "mmdebstrap":
            real_run(["sh", "-c", "echo 'E: Unable to locate package nosuch'; exit 1"], what, logfile)
        real_run(args, what, logfile, stdin)
    monkeypatch.setattr(S, "_run_logged", run)
    with pytest.raises(S.SystemImageError, match=r"mmdebstrap failed .*Unable to locate package nosuch"):
        S.build(S.SystemSpec(out=tmp_path / "sys.img", size=32 << 20, ssh_keys=KEY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []


def _one_error(capfd) -> str:
    out, err = capfd.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_cli_refusals_are_one_sentence(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HYPYR_SYSTEM_DIR", str(tmp_path / "sysdir"))
    assert cli.main(["image", "build", "--out", str(tmp_path / "x.img")]) == 1
    assert _one_error(capfd) == "hypyr: error: --out, --root-password, --ssh-key and --packages go with --system"
    assert cli.main(["image", "build", "--system", "--out", str(tmp_path / "x.img")]) == 1
    assert "--root-password PASSWORD or --ssh-key FILE" in _one_error(capfd)
    assert cli.main(["image", "build", "--system", "--root-password", "pw", "--size", "10M"]) == 1
    assert "at least 512M" in _one_error(capfd)
    assert cli.main(["image", "build", "--system", "--root-password", "pw", "--packages", "ok,Bad!"]) == 1
    assert "not a Debian package name" in _one_error(capfd)
    assert cli.main(["image", "build", "--system", "--root-password", "pw", "--dir", str(tmp_path)]) == 1
    assert "not --system" in _one_error(capfd)
    (tmp_path / "x.img").write_bytes(b"")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["image", "build", "--system", "--root-password", "pw", "--out", str(tmp_path / "x.img")]) == 1
    assert "already exists: give --force" in _one_error(capfd)
    assert (tmp_path / "x.img").read_bytes() == b""
