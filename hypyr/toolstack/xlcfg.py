"""xl.cfg(5) domain configuration files: what the settings mean, as a validated ``DomainConfig``.

``hypyr create FILE.cfg`` reads the same files as Xen's ``xl create``.  Nothing is ever evaluated:
the syntax (text → ``RawConfig``) is :mod:`hypyr.toolstack.xlsyntax`; this module gives the settings
their meaning (``build``: ``RawConfig`` → ``DomainConfig``), turning xl's spellings into fields.
Validation happens in one place, ``DomainConfig.__post_init__`` (:mod:`hypyr.toolstack.domconfig`);
errors are ``XlCfgError`` (``"FILE:LINE: sentence"``).
Settings, defaults, warnings and errors: docs/toolstack.md, "xl.cfg".
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Sequence
from typing import Any

from hypyr.toolstack.domconfig import INT_RULES, DomainConfig
from hypyr.toolstack.errors import ConfigValueError, InvalidConfig
from hypyr.toolstack.vif import VifError, VifSpec, parse_vif
from hypyr.toolstack.xldisk import parse_disk
from hypyr.toolstack.xlsyntax import RawConfig, XlCfgError, parse, parse_int
from hypyr.toolstack.xlsyntax import show_value as _show

log = logging.getLogger("hypyr.xlcfg")

MAX_FILE_SIZE = 1 << 20          # an xl.cfg is a few hundred bytes; refuse megabytes of "config"


# --------------------------------------------------------------------------- raw → DomainConfig

_STRING_KEYS = ("name", "type", "kernel", "ramdisk", "cmdline", "root", "extra",
                "on_poweroff", "on_reboot", "on_crash", "seccomp", "jail", "bootloader")
_HANDLED = set(_STRING_KEYS) | set(INT_RULES) | {"disk", "cpus", "builder", "vif", "bootloader_args"}
# Keys with no effect on a direct-boot virtio guest: ignored with a debug note.
_IGNORED_KEYS = {
    "uuid", "serial", "vnc", "vnclisten", "vncdisplay", "vncunused", "vncpasswd", "sdl", "opengl",
    "boot", "keymap", "stdvga", "vga", "videoram", "acpi", "apic", "pae", "hap", "localtime",
    "rtc_timeoffset", "xen_platform_pci", "viridian", "device_model_version", "device_model_override",
    "device_model_args", "usb", "usbdevice", "on_watchdog", "on_soft_reset", "pool", "cpus_soft",
    "pvshim", "pvshim_path", "pvshim_cmdline", "pvshim_extra", "max_grant_frames",
    "max_maptrack_frames", "tsc_mode", "shadow_memory", "seclabel", "init_seclabel", "driver_domain",
    "nomigrate", "event_channels", "hpet", "nx", "timer_mode", "vpt_align", "vkb_device",
}
# Keys that ask for something hypyr does not provide: a warning when set to a non-empty value.
_UNSUPPORTED_KEYS = {
    "pci": "PCI passthrough is not supported",
    "firmware": "firmware boot is not supported; hypyr boots kernel= directly",
    "vfb": "virtual framebuffers are not supported",
    "channel": "channels are not supported",
    "vtpm": "vTPMs are not supported",
    "p9": "9pfs is not supported",
    "usbctrl": "USB is not supported",
    "usbdev": "USB is not supported",
    "soundhw": "sound is not supported",
    "vnuma": "virtual NUMA is not supported",
    "dtdev": "device tree passthrough is not supported",
    "iomem": "I/O memory passthrough is not supported",
    "ioports": "I/O port passthrough is not supported",
    "irqs": "IRQ passthrough is not supported",
    "vkb": "virtual keyboards are not supported",
    "vdispl": "virtual displays are not supported",
    "vsnd": "virtual sound is not supported",
    "static_shm": "static shared memory is not supported",
    "cpuid": "CPUID policies are not supported",
}
_XEN_DISK_NAME = re.compile(r"/dev/(?:xvd|hd|sd)[a-z]")


def loads(text: str, filename: str = "<cfg>", cwd: str | os.PathLike | None = None) -> DomainConfig:
    """Parse and validate xl.cfg text; relative paths are taken relative to ``cwd`` (default the
    current directory, as xl).  Raises XlCfgError."""
    return build(parse(text, filename), cwd)


def load(path: str | os.PathLike, cwd: str | os.PathLike | None = None) -> DomainConfig:
    """Read, parse and validate an xl.cfg file.  Raises InvalidConfig (XlCfgError for the contents)."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise InvalidConfig(f"domain config file {name} is not a regular file")
            data = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise InvalidConfig(f"domain config file {name} does not exist") from None
    except IsADirectoryError:
        raise InvalidConfig(f"domain config file {name} is a directory") from None
    except OSError as e:
        raise InvalidConfig(f"cannot read domain config file {name} ({e.strerror or e})") from None
    except ValueError:          # a NUL, or a lone surrogate that has no bytes for the kernel
        raise InvalidConfig(f"domain config file name {name!r} is not a file name") from None
    if len(data) > MAX_FILE_SIZE:
        raise InvalidConfig(f"domain config file {name} is too large to be an xl.cfg file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise XlCfgError(name, line, "the file is not UTF-8 text") from None
    return loads(text, name, cwd)


def build(raw: RawConfig, cwd: str | os.PathLike | None = None) -> DomainConfig:  # noqa: C901 (too complex: pyproject.toml)
    """Turn a RawConfig into a DomainConfig (XlCfgError naming the file and line).

    This only converts: xl's spellings (numbers written as strings, ``builder``, ``cpus = 2``,
    disk and vif spec strings) into DomainConfig fields; the values are checked once, by
    DomainConfig itself, and a ConfigValueError it raises gets the line of its key or item."""
    fn = raw.filename
    base = os.fspath(cwd) if cwd is not None else os.getcwd()
    warnings = list(raw.warnings)

    def warn(line: int | None, msg: str):
        warnings.append(f"{fn}:{line}: {msg}" if line is not None else f"{fn}: {msg}")

    def err(key: str, msg: str, line: int | None = None):
        raise XlCfgError(fn, line if line is not None else raw.line(key), msg)

    for key, (value, line) in raw.items():
        if key in _HANDLED:
            continue
        if key in _IGNORED_KEYS:
            log.debug("%s:%d: ignoring %s (no effect in hypyr)", fn, line, key)
        elif key in _UNSUPPORTED_KEYS:
            if value not in ([], ""):
                warn(line, f"{key} is ignored: {_UNSUPPORTED_KEYS[key]}")
        else:
            warn(line, f"unknown key {key} is ignored")

    kw: dict[str, Any] = {key: raw.value(key) for key in _STRING_KEYS if key in raw}
    for key in INT_RULES:
        if key in raw:
            v = raw.value(key)
            if isinstance(v, str):     # libxlu accepts numbers written as strings
                try:
                    v = parse_int(v)
                except ValueError:
                    pass               # DomainConfig says what is wrong with it
            kw[key] = v

    if "name" not in kw:
        err("name", "name is required (e.g. name = 'guest1')")
    if kw.get("bootloader") == "":
        del kw["bootloader"]           # bootloader = "": none, as in xl
    if "kernel" not in kw and "bootloader" not in kw:
        err("kernel", "kernel is required: hypyr boots a Linux kernel directly (e.g. kernel = '/boot/vmlinuz'), "
                      "or the disk's own grub.cfg with bootloader = 'pygrub'")
    if "bootloader" in kw:
        for key in ("kernel", "ramdisk"):
            if key in kw:
                warn(raw.line(key), f"{key} is ignored: bootloader = 'pygrub' boots what the disk's config names")
                del kw[key]
    if "bootloader_args" in raw:
        args = raw.value("bootloader_args")
        if isinstance(args, str):
            args = args.split()
        if not isinstance(args, list):
            err("bootloader_args", f"bootloader_args must be a list of strings, not {_show(args)}")
        for a in args:
            if isinstance(a, str) and not (a.startswith("--entry=") or a in ("--entry", "-e") or
                                           (args.index(a) > 0 and args[args.index(a) - 1] in ("--entry", "-e"))):
                warn(raw.line("bootloader_args"), f"bootloader_args {a!r} is ignored (hypyr takes --entry=NAME)")
        kw["bootloader_args"] = tuple(args)
        if "bootloader" not in kw:
            warn(raw.line("bootloader_args"), "bootloader_args is ignored: no bootloader is set")
            del kw["bootloader_args"]
    if "builder" in raw:
        b = raw.value("builder")
        if b == "hvm":
            kw.setdefault("type", "hvm")
        elif b == "generic":
            if "type" not in kw:
                warn(raw.line("builder"), "builder='generic' (a PV guest) is treated as type='pvh'")
        else:
            err("builder", f"builder must be 'generic' or 'hvm' (or use type='pvh'), not {_show(b)}")
    for key in ("kernel", "ramdisk"):
        if isinstance(kw.get(key), str) and kw[key]:
            kw[key] = os.path.abspath(os.path.join(base, kw[key]))
    if kw.get("ramdisk") == "":
        kw["ramdisk"] = None

    item_lines: dict[str, list[int | None]] = {}
    if "disk" in raw:
        disks = []
        item_lines["disk"] = []
        for spec, line in _spec_list(raw, "disk", "disk specs", err):
            try:
                disks.append(parse_disk(spec, base))
            except ConfigValueError as e:
                err("disk", e.message, line)
            item_lines["disk"].append(line)
        kw["disks"] = tuple(disks)
    if "vif" in raw:
        kw["vifs"], item_lines["vif"] = _build_vifs(raw, warn, err)
    if "cpus" in raw:
        v = raw.value("cpus")
        if isinstance(v, int):
            v = str(v)
        if isinstance(v, list):
            v = tuple(str(item) if isinstance(item, int) else item for item in v)
            item_lines["cpus"] = list(raw.item_lines.get("cpus", []))
        kw["cpus"] = v

    if "cmdline" in kw and ("root" in kw or "extra" in kw):
        ignored = " and ".join(k for k in ("root", "extra") if k in kw)
        warn(raw.line("cmdline"), f"cmdline is set, so {ignored} {'are' if ' and ' in ignored else 'is'} "
                                  "ignored (as in xl)")

    try:
        cfg = DomainConfig(**kw)
    except ConfigValueError as e:
        lines = item_lines.get(e.key, [])
        line = lines[e.item] if e.item is not None and e.item < len(lines) else None
        other = f" (line {lines[e.other]})" if e.other is not None and e.other < len(lines) else ""
        err(e.key, e.message + other, line)
    line = raw.line("cmdline") if "cmdline" in kw else raw.line("root") or raw.line("extra")
    m = _XEN_DISK_NAME.search(cfg.cmdline_string())
    if m:
        warn(line, f"the kernel command line names {m.group()}, but hypyr guests see their disks as "
                   "/dev/vda, /dev/vdb, ...")
    for w in warnings:
        log.warning("%s", w)
    return _with_warnings(cfg, warnings)


def _spec_list(raw: RawConfig, key: str, what: str, err) -> list[tuple[Any, int | None]]:
    """The (spec, line) pairs of a list key such as ``disk`` or ``vif`` (a lone string is a
    one-item list)."""
    specs = raw.value(key)
    lines: Sequence[int | None] = raw.item_lines.get(key, [])
    if isinstance(specs, str):
        specs, lines = [specs], [raw.line(key)]
    if not isinstance(specs, list):
        err(key, f"{key} must be a list of {what}, not {_show(specs)}")
    return list(zip(specs, lines))


def _build_vifs(raw: RawConfig, warn, err) -> tuple[tuple[VifSpec, ...], list[int | None]]:
    """``vif = [ 'spec', ... ]`` → VifSpecs (devid = position) and the line of each; a spec that
    does not parse is an error naming its line."""
    vifs: list[VifSpec] = []
    lines: list[int | None] = []
    for devid, (spec, line) in enumerate(_spec_list(raw, "vif", "vif specs such as [ 'bridge=xenbr0' ]", err)):
        try:
            v, vif_warnings = parse_vif(spec, devid)
        except VifError as e:
            err("vif", str(e), line)
        for w in vif_warnings:
            warn(line, w)
        vifs.append(v)
        lines.append(line)
    return tuple(vifs), lines


def _with_warnings(cfg: DomainConfig, warnings: list[str]) -> DomainConfig:
    object.__setattr__(cfg, "warnings", tuple(warnings))
    return cfg
