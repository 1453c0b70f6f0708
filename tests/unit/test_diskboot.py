"""Boot from the disk's own boot loader config (hypyr.image.diskboot): grub.cfg and extlinux
parsing, partition tables, reading ext4 images through debugfs, and the files it extracts.

The images are built here without loop devices (mke2fs -d, partition tables written byte by
byte); no KVM is needed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import diskimages as di
import pytest

from hypyr import cli
from hypyr.errors import HypyrError
from hypyr.image import bootcfg, diskboot, partitions
from hypyr.image.bootcfg import parse_extlinux, parse_grub
from hypyr.toolstack import domconfig, xlcfg
from hypyr.toolstack.domain_vm import vm_config

DATA = Path(__file__).parent / "data"
needs_e2fs = pytest.mark.skipif(di.mke2fs() is None or shutil.which("debugfs", path="/usr/sbin:/sbin:/usr/bin")
                                is None, reason="e2fsprogs (mke2fs, debugfs) is not installed")

GRUB = """\
set default="0"
set timeout=5
menuentry 'Linux 6.1' --class os $menuentry_id_option 'simple' {
    set root='hd0,msdos1'
    linux /boot/vmlinuz-6.1 root=/dev/vda ro quiet marker=first
    initrd /boot/initrd.img-6.1
}
submenu 'Advanced options' $menuentry_id_option 'advanced' {
    menuentry 'Linux 6.1 (recovery mode)' {
        linux /boot/vmlinuz-6.1 root=/dev/vda ro single marker=recovery
        initrd /boot/initrd.img-6.1
    }
    menuentry 'Linux 5.10' --id old {
        linux16 /vmlinuz root=/dev/vda console=hvc0 marker=old
        initrd16 /boot/initrd.img-5.10 /boot/extra.img
    }
}
menuentry "Missing kernel" {
    linux /boot/vmlinuz-gone root=/dev/vda
}
menuentry "Loop" {
    linux /loop1
}
"""

KERNEL = b"KERNEL-6.1" + bytes(range(256)) * 40
INITRD = b"INITRD-6.1" * 100
OLD_KERNEL = b"KERNEL-5.10" * 50


def tree(cfg: str = GRUB, cfg_path: str = "boot/grub/grub.cfg") -> dict:
    return {cfg_path: cfg, "boot/vmlinuz-6.1": KERNEL, "boot/initrd.img-6.1": INITRD,
            "boot/vmlinuz-5.10": OLD_KERNEL, "boot/initrd.img-5.10": b"OLD", "boot/extra.img": b"EXTRA",
            "vmlinuz": "->boot/vmlinuz-5.10", "loop1": "->/loop2", "loop2": "->loop1"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_leftovers(tmp_path, monkeypatch):
    """Temporary files go under tmp_path/tmp; the test checks it is empty afterwards."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    assert list(tmp.iterdir()) == []


# -- parsing (no images) ------------------------------------------------------------------------
def test_grub_default_submenus_ids_and_aliases():
    cfg = parse_grub(GRUB)
    assert [e.index for e in cfg.entries()] == ["0", "1>0", "1>1", "2", "3"]
    assert cfg.select(None).title == "Linux 6.1"
    assert cfg.select(None).cmdline == "root=/dev/vda ro quiet marker=first"
    assert cfg.select(None).root == "hd0,msdos1"
    assert cfg.select("1>1").kernel == "/vmlinuz"
    assert cfg.select("1>1").initrds == ["/boot/initrd.img-5.10", "/boot/extra.img"]
    assert cfg.select("advanced>old").title == "Linux 5.10"
    assert cfg.select("Linux 6.1 (recovery mode)").index == "1>0"
    assert cfg.select("2").title == "Missing kernel"
    with pytest.raises(bootcfg.BootConfigError, match="no entry 'nope'"):
        cfg.select("nope")


@pytest.mark.parametrize("default, title", [('"1>1"', "Linux 5.10"), ("'Missing kernel'", "Missing kernel"),
                                            ("advanced>old", "Linux 5.10"), ("1", "Linux 6.1 (recovery mode)"),
                                            ("${saved_entry}", "Linux 5.10"), ("7", "Linux 6.1")])
def test_grub_default_forms(default, title):
    cfg = parse_grub(GRUB.replace('set default="0"', f"set default={default}"), {"saved_entry": "1>1"})
    assert cfg.select(None).title == title


def test_debian_generated_grub_cfg():
    """A grub.cfg as grub-mkconfig writes it on Debian 12: if/else/fi, functions, search lines."""
    cfg = parse_grub((DATA / "grub-debian.cfg").read_text())
    e = cfg.select(None)
    assert (e.title, e.kernel, e.initrds) == ("Debian GNU/Linux", "/boot/vmlinuz-6.1.0-50-amd64",
                                              ["/boot/initrd.img-6.1.0-50-amd64"])
    assert e.root == "uuid=0f1c1e6a-6a4e-4b8f-9e38-7d0b1b8f9c11" and e.id == "gnulinux-simple-0f1c1e6a"
    rec = cfg.select("gnulinux-advanced-0f1c1e6a>gnulinux-6.1.0-50-amd64-recovery-0f1c1e6a")
    assert "$vt_handoff" in rec.cmdline and "vt_handoff" in rec.warnings[0]
    assert cfg.select("1>2").kernel == "/boot/vmlinuz-6.1.0-40-amd64"


def test_grub_variables_and_quotes():
    cfg = parse_grub('set v=/boot\nset args="a b"\nmenuentry "x" {\n linux $v/k "opt=${args}" \'$lit\' \\\n  more\n}\n')
    e = cfg.select(None)
    assert e.kernel == "/boot/k" and e.cmdline == 'opt="a b" $lit more' and e.warnings == []


@pytest.mark.parametrize("text, problem", [("menuentry 'a' {\n linux /k\n", "missing }"),
                                           ("menuentry 'a {\n linux /k\n}\n", "unterminated"),
                                           ("set default=0\n", "no boot entries")])
def test_grub_broken(text, problem):
    with pytest.raises(bootcfg.BootConfigError, match=problem):
        parse_grub(text).select(None)


EXTLINUX = """\
# comment
UI menu.c32
DEFAULT rescue
TIMEOUT 50
LABEL linux
  MENU LABEL Debian
  KERNEL /boot/vmlinuz-6.1
  INITRD /boot/initrd.img-6.1
  APPEND root=/dev/vda ro marker=extlinux
LABEL rescue
  menu label Rescue
  linux ../vmlinuz-5.10
  append initrd=../initrd.img-5.10 root=/dev/vda single
"""


def test_extlinux():
    cfg = parse_extlinux(EXTLINUX)
    e = cfg.select(None)
    assert (e.title, e.kernel, e.initrds, e.cmdline) == ("Rescue", "../vmlinuz-5.10", ["../initrd.img-5.10"],
                                                         "root=/dev/vda single")
    assert cfg.select("linux").title == "Debian" and cfg.select("Debian").cmdline.endswith("marker=extlinux")
    assert parse_extlinux(EXTLINUX.replace("DEFAULT rescue", "")).select(None).title == "Debian"
    assert parse_extlinux("DEFAULT /vmlinuz root=/dev/vda\n").select(None).kernel == "/vmlinuz"


# -- partition tables ---------------------------------------------------------------------------
def test_partition_tables_are_bounds_checked(tmp_path):
    img = tmp_path / "bad.img"
    img.write_bytes(bytes(446) + bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
                    + (1 << 30).to_bytes(4, "little") + bytes(48) + b"\x55\xaa")
    with pytest.raises(partitions.PartitionError, match="outside the image"):
        partitions.read_partitions(str(img))
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(4096))
    assert partitions.read_partitions(str(raw)) == [partitions.Partition(0, 0, 4096)]
    with pytest.raises(diskboot.DiskBootError, match="holds no ext2/3/4 filesystem"):
        diskboot.load(str(raw))


# -- images ---------------------------------------------------------------------------------------
@needs_e2fs
def test_bare_ext4_default_entry(tmp_path, no_leftovers):
    img = di.ext4(tmp_path / "disk.img", tree())
    before = digest(img)
    with diskboot.load(str(img)) as boot:
        assert Path(boot.kernel).read_bytes() == KERNEL
        assert Path(boot.initrd).read_bytes() == INITRD
        assert boot.cmdline == "root=/dev/vda ro quiet marker=first console=ttyS0"
        assert boot.title == "Linux 6.1" and boot.config == f"/boot/grub/grub.cfg in {img}"
        for f in (boot.kernel, boot.initrd):
            assert os.stat(f).st_mode & 0o777 == 0o600
        assert os.stat(boot.tmpdir).st_mode & 0o777 == 0o700
    assert digest(img) == before


@needs_e2fs
def test_named_entry_symlink_console_and_two_initrds(tmp_path, no_leftovers):
    img = di.ext4(tmp_path / "disk.img", tree())
    with diskboot.load(str(img), "Linux 5.10") as boot:
        assert Path(boot.kernel).read_bytes() == OLD_KERNEL          # /vmlinuz -> boot/vmlinuz-5.10
        assert Path(boot.initrd).read_bytes() == b"OLD" + b"EXTRA"   # concatenated, as GRUB does
        assert boot.cmdline == "root=/dev/vda console=hvc0 marker=old"   # has console=: left alone
    with diskboot.load(str(img), "1>0") as boot:
        assert boot.cmdline.endswith("marker=recovery console=ttyS0")


@needs_e2fs
@pytest.mark.parametrize("scheme", ["mbr", "gpt"])
def test_partitioned_images(tmp_path, no_leftovers, scheme):
    fs = di.ext4(tmp_path / "root.ext4", tree())
    swap = di.ext4(tmp_path / "other.ext4", {"etc/hostname": "x"}, size_mib=2)   # an ext fs with no config
    disk = tmp_path / "disk.img"
    if scheme == "mbr":
        offsets = di.mbr_disk(disk, [(swap, 0x83, False), (fs, 0x83, True)])
    else:
        offsets = di.gpt_disk(disk, [(None, di.ESP, 2048), (swap, di.LINUX_FS, 0), (fs, di.LINUX_FS, 0)])
    fs_part = "msdos2" if scheme == "mbr" else "gpt3"
    di.ext4(fs, tree(GRUB.replace("hd0,msdos1", f"hd0,{fs_part}")))
    subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=512", f"seek={offsets[-1] // 512}", "conv=notrunc",
                    "status=none"], check=True)
    before = digest(disk)
    found = partitions.filesystems(str(disk))
    assert fs.stat().st_size in [p.size for p in found] and offsets[-1] in [p.offset for p in found]
    with diskboot.load(str(disk)) as boot:
        assert Path(boot.kernel).read_bytes() == KERNEL
        assert boot.config == f"/boot/grub/grub.cfg in {disk} partition {len(offsets)}"
        assert boot.warnings == []
    assert digest(disk) == before


@needs_e2fs
def test_separate_boot_partition(tmp_path, no_leftovers):
    """/boot on its own partition: grub.cfg at /grub/grub.cfg, kernel paths relative to it, and
    GRUB's root found by the filesystem's UUID."""
    boot_uuid = "1b2c3d4e-0000-4000-8000-00000000b007"
    cfg = f"""set default=0
menuentry 'Split' {{
    search --no-floppy --fs-uuid --set=root {boot_uuid}
    linux /vmlinuz-6.1 root=/dev/vda2 ro marker=split
    initrd /initrd.img-6.1
}}
"""
    bootfs = di.ext4(tmp_path / "boot.ext4", {"grub/grub.cfg": cfg, "vmlinuz-6.1": KERNEL,
                                              "initrd.img-6.1": INITRD}, fs_uuid=boot_uuid)
    rootfs = di.ext4(tmp_path / "root.ext4", {"etc/hostname": "x", "boot/.keep": ""})
    disk = tmp_path / "disk.img"
    di.mbr_disk(disk, [(bootfs, 0x83, False), (rootfs, 0x83, True)])
    with diskboot.load(str(disk)) as boot:
        assert Path(boot.kernel).read_bytes() == KERNEL and Path(boot.initrd).read_bytes() == INITRD
        assert boot.config == f"/grub/grub.cfg in {disk} partition 1" and boot.warnings == []
        assert "marker=split" in boot.cmdline


@needs_e2fs
def test_extlinux_image_relative_paths(tmp_path, no_leftovers):
    img = di.ext4(tmp_path / "disk.img", {"boot/extlinux/extlinux.conf": EXTLINUX, "boot/vmlinuz-5.10": OLD_KERNEL,
                                          "boot/initrd.img-5.10": b"OLD", "boot/vmlinuz-6.1": KERNEL})
    with diskboot.load(str(img)) as boot:
        assert boot.title == "Rescue" and Path(boot.kernel).read_bytes() == OLD_KERNEL
        assert Path(boot.initrd).read_bytes() == b"OLD"
        assert boot.cmdline == "root=/dev/vda single console=ttyS0"
    with pytest.raises(diskboot.DiskBootError, match=r"^/boot/initrd\.img-6\.1, named by entry 'Debian' of "):
        diskboot.load(str(img), "linux")     # the initrd it names is not there


@needs_e2fs
@pytest.mark.parametrize("files, entry, sentence", [
    ({"etc/hostname": "x"}, None, "no boot loader config"),
    ({"boot/grub/grub.cfg": "menuentry 'a' {\n linux /k\n"}, None, "/boot/grub/grub.cfg in {img} ends inside 'a'"),
    ({"boot/grub/grub.cfg": "set timeout=1\n"}, None, "/boot/grub/grub.cfg in {img} has no boot entries"),
    (None, "Missing kernel", "/boot/vmlinuz-gone, named by entry 'Missing kernel' of /boot/grub/grub.cfg in {img}, "
                             "does not exist"),
    (None, "Loop", "/loop1 in {img} goes through more than 8 symbolic links"),
    (None, "nope", "has no entry 'nope'"),
])
def test_bad_configs_are_one_sentence_and_leave_nothing(tmp_path, no_leftovers, files, entry, sentence):
    img = di.ext4(tmp_path / "disk.img", files if files is not None else tree())
    before = digest(img)
    with pytest.raises(diskboot.DiskBootError) as e:
        diskboot.load(str(img), entry)
    msg = str(e.value)
    assert sentence.format(img=img) in msg and "\n" not in msg
    assert digest(img) == before


@needs_e2fs
def test_loop_in_a_directory_symlink(tmp_path, no_leftovers):
    t = tree(GRUB.replace("/boot/initrd.img-6.1\n}", "/d1/initrd\n}", 1))
    t.update({"d1": "->d2", "d2": "->d1"})
    img = di.ext4(tmp_path / "disk.img", t)
    with pytest.raises(diskboot.DiskBootError, match="loop of symbolic links"):
        diskboot.load(str(img))


# -- front ends -------------------------------------------------------------------------------------
@needs_e2fs
def test_cli_refusals_are_one_sentence(tmp_path, capsys, no_leftovers):
    img = di.ext4(tmp_path / "disk.img", {"etc/hostname": "x"})
    assert cli.main(["run", "--boot", "disk", "--disk", str(img)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no boot loader config" in err[0] and str(img) in err[0]
    assert cli.main(["run", "--boot", "disk", "--disk", str(img), "--kernel", "/k"]) == 1
    assert "--kernel cannot be given" in capsys.readouterr().err
    assert cli.main(["run", "--boot", "disk"]) == 1
    assert "needs a --disk" in capsys.readouterr().err
    assert cli.main(["run", "--boot-entry", "x"]) == 1
    assert "give --boot disk too" in capsys.readouterr().err


@needs_e2fs
def test_cli_passes_the_entry_to_the_vmm(tmp_path, monkeypatch, no_leftovers):
    img = di.ext4(tmp_path / "disk.img", tree())
    seen = {}

    def fake_run(args, config):
        seen["config"] = config
        seen["kernel"] = Path(config.kernel).read_bytes()
        return 0
    monkeypatch.setattr("hypyr.cli.run._run_vm", fake_run)
    assert cli.main(["run", "--boot", "disk", "--boot-entry", "old", "--disk", str(img), "--exec", "true",
                     "--append", "extra=1"]) == 0
    c = seen["config"]
    assert seen["kernel"] == OLD_KERNEL and not os.path.exists(c.kernel)   # removed once the VM is gone
    assert c.cmdline == "root=/dev/vda console=hvc0 marker=old extra=1"
    assert "hypyr.exec=" in c.full_cmdline() and c.disks[0].path == str(img)


def test_xlcfg_bootloader_keys(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    cfg = xlcfg.loads(f"name='g'\nbootloader='pygrub'\nbootloader_args=['--entry=Linux 5.10']\n"
                      f"disk=['{disk},raw,xvda,rw']\nextra='quiet'\n")
    assert cfg.bootloader == "pygrub" and cfg.boot_entry == "Linux 5.10" and cfg.kernel == ""
    assert domconfig.DomainConfig.from_dict(cfg.to_dict()) == cfg
    cfg = xlcfg.loads(f"name='g'\nbootloader='/usr/lib/xen/bin/pygrub'\nbootloader_args='-q --entry 1>1'\n"
                      f"kernel='/k'\ndisk=['{disk},raw,xvda,rw']\n")
    assert cfg.boot_entry == "1>1" and cfg.kernel == ""
    assert any("kernel is ignored" in w for w in cfg.warnings) and any("'-q' is ignored" in w for w in cfg.warnings)
    with pytest.raises(xlcfg.XlCfgError, match="has no disk"):
        xlcfg.loads("name='g'\nbootloader='pygrub'\n")
    with pytest.raises(xlcfg.XlCfgError, match="must be 'pygrub'"):
        xlcfg.loads(f"name='g'\nbootloader='grub2'\ndisk=['{disk},raw,xvda,rw']\n")
    with pytest.raises(xlcfg.XlCfgError, match="kernel is required"):
        xlcfg.loads("name='g'\n")


def test_vm_config_with_a_disk_boot(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    cfg = xlcfg.loads(f"name='g'\nbootloader='pygrub'\ndisk=['{disk},raw,xvda,rw']\nextra='x=1'\n")
    boot = diskboot.DiskBoot("/tmp/k", "/tmp/i", "root=/dev/vda console=ttyS0", "t", "c")
    vc = vm_config(cfg, boot=boot)
    assert (vc.kernel, vc.initrd, vc.cmdline) == ("/tmp/k", "/tmp/i", "root=/dev/vda console=ttyS0 x=1")


@needs_e2fs
def test_domain_extracts_once_into_its_directory(tmp_path, reg, no_leftovers):
    """A pygrub domain's files live in its own directory, are extracted once (its reboots reuse
    them: the confined domain process may not start debugfs) and go when it closes them."""
    from hypyr.toolstack.domain import Domain
    img = di.ext4(tmp_path / "disk.img", tree())
    cfg = xlcfg.loads(f"name='pg'\nbootloader='pygrub'\nbootloader_args=['--entry=old']\n"
                      f"disk=['{img},raw,xvda,ro']\nextra='x=1'\n")
    rec = reg.reserve("pg", cfg.to_dict())
    d = Domain(rec.domid, rec.uuid, reg)
    boot = d._disk_boot()
    assert boot is not None and Path(boot.kernel).parent.parent == d.dir
    assert Path(boot.kernel).read_bytes() == OLD_KERNEL and d._disk_boot() is boot
    vc = vm_config(d.cfg, boot=boot)
    assert vc.cmdline == "root=/dev/vda console=hvc0 marker=old x=1" and vc.kernel == boot.kernel
    boot.close()
    assert not list(d.dir.glob("hypyr-boot-*"))


@needs_e2fs
def test_domain_with_a_bad_disk_config_reports_one_sentence(tmp_path, reg, no_leftovers):
    from hypyr.toolstack.domain import Domain
    img = di.ext4(tmp_path / "disk.img", {"etc/hostname": "x"})
    cfg = xlcfg.loads(f"name='pg'\nbootloader='pygrub'\ndisk=['{img},raw,xvda,ro']\n")
    rec = reg.reserve("pg", cfg.to_dict())
    d = Domain(rec.domid, rec.uuid, reg)
    with pytest.raises(diskboot.DiskBootError, match=f"no boot loader config .* in {img}$"):
        d.boot()
    assert not list(d.dir.glob("hypyr-boot-*"))
    d._prefetch_disk_boot()                   # a restored domain: only its later reboot fails
    with pytest.raises(HypyrError, match="no boot loader config"):
        d._disk_boot()


def test_grub_one_line_entry():
    cfg = parse_grub("menuentry 'x' { linux /k a=1; initrd /i; }\nmenuentry y {\nlinux /k2\n}")
    assert [(e.title, e.kernel, e.initrds, e.cmdline) for e in cfg.entries()] == [
        ("x", "/k", ["/i"], "a=1"), ("y", "/k2", [], "")]


@needs_e2fs
def test_logical_partition_in_an_extended_one(tmp_path, no_leftovers):
    """MBR: partition 1 extended (0x05) holding one EBR and logical partition 5 with the config."""
    import struct
    fs = di.ext4(tmp_path / "root.ext4", tree())
    sectors = fs.stat().st_size // 512
    ext_start, disk = 2048, tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate((ext_start + 2048 + sectors) * 512)
        f.seek(446)   # the extended partition covers the EBR's 2048 sectors and the logical one
        f.write(struct.pack("<B3sB3sII", 0, bytes(3), 0x05, bytes(3), ext_start, 2048 + sectors).ljust(64, b"\0")
                + b"\x55\xaa")
        f.seek(ext_start * 512 + 446)  # the EBR: the logical partition starts 2048 sectors after it
        f.write(struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048, sectors).ljust(64, b"\0") + b"\x55\xaa")
        f.seek((ext_start + 2048) * 512)
        f.write(fs.read_bytes())
    parts = partitions.read_partitions(str(disk))
    assert [(p.number, p.offset) for p in parts] == [(5, (ext_start + 2048) * 512)]
    with diskboot.load(str(disk)) as boot:
        assert boot.config.endswith("partition 5") and Path(boot.kernel).read_bytes() == KERNEL
