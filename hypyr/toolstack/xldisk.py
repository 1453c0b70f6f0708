"""xl disk specs (xl-disk-configuration(5)): ``'/images/root.img,raw,xvda,rw'`` or the keyed form
``'target=/images/root.img,vdev=xvda,access=ro'``, parsed into a :class:`DiskSpec`.  hypyr attaches
raw images only; Xen's other formats, scripts and backends are refused or ignored with the reason.
This module only parses (see docs/toolstack.md, "xl.cfg")."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from hypyr.toolstack.errors import ConfigValueError, InvalidConfig
from hypyr.toolstack.xlsyntax import show_value as _show

log = logging.getLogger("hypyr.xlcfg")

_VDEV = re.compile(r"(xvd|hd|sd|vd)([a-z]{1,2})")
_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd", "qed")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_IGNORED_PREFIXES = ("tapdisk", "tap2", "tap", "aio", "ioemu", "file", "phy")
_KNOWN_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
_IGNORED_DISK_KEYS = ("backend", "backendtype", "specification")
_IGNORED_DISK_FLAGS = ("discard", "no-discard", "direct-io-safe", "trusted", "untrusted")


@dataclass(frozen=True)
class DiskSpec:
    """One ``disk`` entry: an absolute host path, ``'raw'``, the xl vdev, its index, read-only."""

    target: str
    format: str
    vdev: str
    index: int
    read_only: bool = False

    def to_dict(self) -> dict:
        return {"target": self.target, "format": self.format, "vdev": self.vdev,
                "index": self.index, "read_only": self.read_only}


def vdev_index(vdev: str) -> int:
    """The disk index of an xl vdev: xvda/hda/sda/vda → 0, xvdb → 1, ..., xvdz → 25, xvdaa → 26.

    Raises InvalidConfig for partitions (xvda1) and other forms.
    """
    m = _VDEV.fullmatch(vdev)
    if not m:
        if re.fullmatch(r"(xvd|hd|sd|vd)[a-z]{1,2}[0-9]+", vdev):
            raise InvalidConfig(f"vdev {vdev} is a partition; hypyr attaches whole disks (use e.g. xvda)")
        raise InvalidConfig(f"vdev {_show(vdev)} is not supported (use xvdX, hdX, sdX or vdX, e.g. xvda)")
    index = 0
    for ch in m.group(2):
        index = index * 26 + (ord(ch) - ord("a") + 1)
    return index - 1


def parse_disk(spec: str, cwd: str | None = None) -> DiskSpec:  # noqa: C901 (too complex: pyproject.toml)
    """Parse one xl-disk-configuration(5) DISKSPEC; raises ConfigValueError("disk", sentence)."""
    if not isinstance(spec, str):
        raise ConfigValueError("disk", f"each disk must be a quoted spec string, not {_show(spec)}")

    def bad(msg: str):
        raise ConfigValueError("disk", f"disk {_show(spec)}: {msg}")

    params: dict[str, str] = {}
    deprecated_prefix = False

    def put(name: str, value: str):
        if name in params:
            bad(f"{name} is given more than once")
        params[name] = value

    i, n = 0, len(spec)
    if not spec.strip():
        bad("the spec is empty (use e.g. '/images/guest.img,raw,xvda,rw')")
    while True:
        while i < n and spec[i] in " \t\n":
            i += 1
        j = spec.find(",", i)
        j = n if j < 0 else j
        tok = spec[i:j]
        if "=" in tok:
            k, _, v = tok.partition("=")
            k = k.strip()
            if k == "target":          # consumes the rest of the spec, commas and all
                put("target", spec[i + tok.index("=") + 1:])
                break
            v = v.strip()
            if k in ("format", "vdev", "access", "devtype"):
                put(k, v)
            elif k == "script":
                bad("block scripts (script=) are not supported")
            elif k in _IGNORED_DISK_KEYS:
                log.debug("disk %r: ignoring %s=%s", spec, k, v)
            else:
                bad(f"unknown parameter {_show(k)}")
        else:
            tok = tok.strip()
            if tok == "cdrom":
                put("devtype", "cdrom")
            elif tok in _IGNORED_DISK_FLAGS:
                log.debug("disk %r: ignoring flag %s", spec, tok)
            elif tok == "" and j >= n and i > 0:
                pass                   # a trailing comma
            elif "target" not in params:
                while True:            # deprecated prefixes: raw:, phy:, tap:aio:, ...
                    head, sep, tail = tok.partition(":")
                    if not sep:
                        break
                    if head in _FORMAT_PREFIXES:
                        put("format", head)
                    elif head in _SCRIPT_PREFIXES:
                        bad(f"block scripts ({head}:) are not supported")
                    elif head not in _IGNORED_PREFIXES:
                        break
                    deprecated_prefix = True
                    tok = tail
                put("target", tok)
            elif "format" not in params and not deprecated_prefix:
                put("format", tok)
            elif "vdev" not in params:
                vdev, sep, devtype = tok.partition(":")
                put("vdev", vdev)
                if sep:
                    put("devtype", devtype)
            elif "access" not in params:
                put("access", tok)
            else:
                bad(f"too many positional parameters (at {_show(tok)}); the order is target,format,vdev,access")
        if j >= n:
            break
        i = j + 1

    devtype = params.get("devtype", "")
    if devtype == "cdrom":
        bad("CD-ROM drives (cdrom) are not supported")
    if devtype not in ("", "disk"):
        bad(f"devtype {_show(devtype)} is not supported")
    target = params.get("target", "")
    if not target:
        bad("no target (the image file or block device) is given")
    fmt = params.get("format", "") or "raw"
    if fmt != "raw":
        if fmt in _KNOWN_FORMATS:
            bad(f"format {fmt} is not supported (hypyr supports only raw images)")
        bad(f"format {_show(fmt)} is not a disk format (hypyr supports raw)")
    vdev = params.get("vdev", "")
    if not vdev:
        bad("no vdev (the guest disk name, e.g. xvda) is given")
    try:
        index = vdev_index(vdev)
    except InvalidConfig as e:
        bad(str(e))
    access = params.get("access", "") or "rw"
    if access in ("rw", "w"):
        read_only = False
    elif access in ("ro", "r"):
        read_only = True
    else:
        bad(f"access {_show(access)} must be rw (or w) or ro (or r)")
    if target.startswith(("./", "../")):
        target = os.path.abspath(os.path.join(cwd or os.getcwd(), target))
    elif not target.startswith("/"):
        target = "/dev/" + target     # xl: "/dev will be prepended if the path doesn't start with '/'"
    return DiskSpec(target, "raw", vdev, index, read_only)
