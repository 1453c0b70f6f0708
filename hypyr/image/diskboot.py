"""Boot from the disk's own boot loader config, as Xen's ``bootloader = "pygrub"``.

``load(image, entry)`` finds grub.cfg (or an extlinux/syslinux config) in the disk image — a bare
ext2/3/4 filesystem or an MBR/GPT-partitioned disk — picks the default entry (or the one named),
and copies that entry's kernel and initrd out of the image into private temporary files (a 0700
directory, files 0600).  The VMM then boots them like any ``--kernel``/``--initrd``; the
``DiskBoot`` it returns removes the files on ``close()`` (or leaving its ``with`` block).

The image is only read (hypyr.image.partitions in Python, hypyr.image.extfs through ``debugfs``
opened read-only); it is never mounted and no loop device is used.  Every failure is one sentence
naming the file and the image, and nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from hypyr.errors import HypyrError, InvalidInput
from hypyr.image import partitions
from hypyr.image.bootcfg import BootConfig, BootConfigError, BootEntry, parse_extlinux, parse_grub, parse_grubenv
from hypyr.image.extfs import ExtFs, ExtFsError, FileMissing

log = logging.getLogger("hypyr.diskboot")

# where configs are looked for, in this order, on each ext filesystem of the image
CONFIG_PATHS = (
    ("/boot/grub/grub.cfg", "grub"),
    ("/grub/grub.cfg", "grub"),              # a separate /boot partition
    ("/boot/grub2/grub.cfg", "grub"),
    ("/grub2/grub.cfg", "grub"),
    ("/boot/extlinux/extlinux.conf", "extlinux"),
    ("/extlinux/extlinux.conf", "extlinux"),
    ("/extlinux.conf", "extlinux"),
    ("/boot/syslinux/syslinux.cfg", "extlinux"),
    ("/syslinux/syslinux.cfg", "extlinux"),
    ("/syslinux.cfg", "extlinux"),
)
SERIAL_CONSOLE = "console=ttyS0"


class DiskBootError(InvalidInput):
    """The disk cannot be booted from its own config; str() is one sentence naming the file."""


@dataclass
class DiskBoot:
    kernel: str                      # private temporary files: removed by close()
    initrd: str | None
    cmdline: str
    title: str                       # the entry's title
    config: str                      # e.g. "/boot/grub/grub.cfg in disk.img partition 1"
    warnings: list[str] = field(default_factory=list)
    tmpdir: str = ""

    def close(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""

    def __enter__(self) -> DiskBoot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fs(image: str, p: partitions.Partition) -> ExtFs:
    name = image if p.scheme == "raw" else f"{image} partition {p.number}"
    return ExtFs(image, p.offset, name)


def find_config(image: str) -> tuple[ExtFs, str, str, list[partitions.Partition]]:
    """(filesystem, config path, kind, the image's ext partitions) of the first config found."""
    try:
        with open(image, "rb"):
            pass
    except OSError as e:
        raise DiskBootError(f"cannot read the disk image {image} ({e.strerror or e})") from None
    try:
        found = partitions.filesystems(image)
    except OSError as e:
        raise DiskBootError(f"cannot read the disk image {image} ({e.strerror or e})") from None
    if not found:
        raise DiskBootError(f"{image} holds no ext2/3/4 filesystem (bare or in an MBR or GPT partition) "
                            "to find a boot loader config in")
    for p in found:
        fs = _fs(image, p)
        for path, kind in CONFIG_PATHS:
            try:
                if fs.exists(path):
                    return fs, path, kind, found
            except ExtFsError as e:
                log.debug("%s: %s", fs.name, e)
    where = image if len(found) == 1 and found[0].scheme == "raw" else f"any ext partition of {image}"
    raise DiskBootError(f"no boot loader config (/boot/grub/grub.cfg, /boot/extlinux/extlinux.conf, ...) "
                        f"in {where}")


def read_config(image: str) -> tuple[BootConfig, ExtFs, str, list[partitions.Partition]]:
    fs, path, kind, found = find_config(image)
    where = f"{path} in {fs.name}"
    try:
        text = fs.read_text(path)
        if kind == "grub":
            env: dict[str, str] = {}
            envfile = posixpath.join(posixpath.dirname(path), "grubenv")
            if fs.exists(envfile):
                env = parse_grubenv(fs.read_text(envfile))
            return parse_grub(text, env), fs, path, found
        return parse_extlinux(text), fs, path, found
    except BootConfigError as e:
        raise DiskBootError(f"the boot loader config {where} {e}") from None
    except ExtFsError as e:
        raise DiskBootError(f"the boot loader config {where} cannot be read: {e}") from None


def _device(image: str, dev: str, found: list[partitions.Partition], default: ExtFs) -> ExtFs | None:
    """The filesystem GRUB's device ``dev`` names ("hd0,gpt2", "uuid=...", ...), or None."""
    m = re.fullmatch(r"hd0(?:,(?:gpt|msdos)?(\d+))?", dev)
    if m:
        if m.group(1) is None:
            return _fs(image, found[0]) if found[0].scheme == "raw" else None
        return next((_fs(image, p) for p in found if p.number == int(m.group(1))), None)
    kind, _, value = dev.partition("=")
    for p in found:
        try:
            if kind == "uuid" and partitions.ext_uuid(image, p).lower() == value.lower():
                return _fs(image, p)
            if kind == "label" and partitions.ext_label(image, p) == value:
                return _fs(image, p)
            if kind == "file" and _fs(image, p).exists(value):
                return _fs(image, p)
        except (OSError, ExtFsError):
            continue
    return None


def _locate(image: str, cfg_fs: ExtFs, cfg_path: str, kind: str, entry: BootEntry, path: str,
            found: list[partitions.Partition], warnings: list[str]) -> tuple[ExtFs, str]:
    """(filesystem, absolute path) of a kernel or initrd path as the entry writes it."""
    dev = entry.root
    m = re.match(r"\(([^)]*)\)(.*)", path)
    if m:
        dev, path = m.group(1), m.group(2) or "/"
    if kind == "extlinux" and not path.startswith("/"):
        path = posixpath.join(posixpath.dirname(cfg_path), path)
    if not path.startswith("/"):
        path = "/" + path
    if dev and not dev.startswith("$"):
        fs = _device(image, dev, found, cfg_fs)
        if fs is not None:
            return fs, path
        msg = (f"entry {entry.title!r}: GRUB's device ({dev}) is not a filesystem of {image}; "
               f"its files are looked for where the config is")
        if msg not in warnings:
            warnings.append(msg)
    return cfg_fs, path


def load(image: str, entry: str | None = None, tmp_parent: str | None = None) -> DiskBoot:
    """Read the image's boot loader config, pick ``entry`` (title, id, index or GRUB path; the
    config's default when None) and extract its kernel and initrd.  DiskBootError (one sentence)
    on any failure, with nothing left behind."""
    cfg, fs, cfg_path, found = read_config(image)
    where = f"{cfg_path} in {fs.name}"
    try:
        chosen = cfg.select(entry)
    except BootConfigError as e:
        raise DiskBootError(f"the boot loader config {where} {e}") from None
    warnings = list(cfg.warnings) + chosen.warnings
    if chosen.multiboot and chosen.kernel is None:
        raise DiskBootError(f"entry {chosen.title!r} of {where} does not boot a Linux kernel "
                            "(a multiboot, chainloader or com32 entry), which --boot disk cannot do")
    if chosen.kernel is None:
        raise DiskBootError(f"entry {chosen.title!r} of {where} names no kernel")
    tmpdir = tempfile.mkdtemp(prefix="hypyr-boot-", dir=tmp_parent)   # mode 0700
    try:
        kernel = _extract(image, fs, cfg_path, cfg.kind, chosen, [chosen.kernel], found, warnings,
                          os.path.join(tmpdir, "kernel"), where)
        initrd = None
        if chosen.initrds:
            initrd = _extract(image, fs, cfg_path, cfg.kind, chosen, chosen.initrds, found, warnings,
                              os.path.join(tmpdir, "initrd"), where)
        cmdline = chosen.cmdline
        if not any(w.startswith("console=") for w in cmdline.split()):
            cmdline = f"{cmdline} {SERIAL_CONSOLE}".strip()
        return DiskBoot(kernel, initrd, cmdline, chosen.title, where, warnings, tmpdir)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _extract(image: str, fs: ExtFs, cfg_path: str, kind: str, entry: BootEntry, paths: list[str],
             found, warnings: list[str], dest: str, where: str) -> str:
    """Copy ``paths`` (one after another, as GRUB concatenates initrds) into ``dest`` (0600)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        for written in paths:
            src_fs, path = _locate(image, fs, cfg_path, kind, entry, written, found, warnings)
            if src_fs.offset != fs.offset and not src_fs.exists(path) and fs.exists(path):
                warnings.append(f"entry {entry.title!r}: {path} is not in {src_fs.name}, where GRUB's root "
                                f"points; booting the one beside the config")
                src_fs = fs
            try:
                if src_fs.copy_to(path, fd) == 0:
                    raise DiskBootError(f"{path} in {src_fs.name}, named by entry {entry.title!r} of {where}, "
                                        "is empty")
            except FileMissing:
                there = "" if src_fs.offset == fs.offset else f" in {src_fs.name}"
                raise DiskBootError(f"{path}{there}, named by entry {entry.title!r} of {where}, "
                                    "does not exist") from None
            except ExtFsError as e:
                raise DiskBootError(f"entry {entry.title!r} of {where}: {e}") from None
    finally:
        os.close(fd)
    return dest


def describe(image: str) -> list[tuple[str, str, bool]]:
    """(index, title, is-default) of each entry, for listing; DiskBootError as ``load``."""
    cfg, fs, cfg_path, _ = read_config(image)
    try:
        default = cfg.select(None)
    except BootConfigError as e:
        raise DiskBootError(f"the boot loader config {cfg_path} in {fs.name} {e}") from None
    return [(e.index, e.title, e is default) for e in cfg.entries()]


__all__ = ["DiskBoot", "DiskBootError", "HypyrError", "load", "describe", "find_config", "CONFIG_PATHS"]
