"""A validated domain configuration: :class:`DomainConfig`, what ``xl create`` would build, with xl's defaults.

Constructing one is the only validation (``ConfigValueError``, naming the key and, for a list,
the item).  What fills one in from an xl.cfg file is :mod:`hypyr.toolstack.xlcfg`; the registry
keeps one as JSON (``to_dict``/``from_dict``).  Also here: xl's CPU list syntax (``parse_cpulist``).
Settings, defaults and errors: docs/toolstack.md, "xl.cfg".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from hypyr.arch.x86.layout import MAX_VCPUS
from hypyr.errors import HypyrError, InvalidInput
from hypyr.toolstack.errors import ConfigValueError
from hypyr.toolstack.names import name_problem
from hypyr.toolstack.vif import VifError, VifSpec, check_distinct
from hypyr.toolstack.xldisk import DiskSpec
from hypyr.toolstack.xlsyntax import show_value as _show

MAX_CPU = 65535                  # highest host CPU number a CPU list may name
ACTIONS = ("destroy", "restart", "preserve")
XL_ONLY_ACTIONS = ("rename-restart", "coredump-destroy", "coredump-restart", "soft-reset")

# --------------------------------------------------------------------------- CPU lists


def parse_cpulist(text: str, ncpus: int) -> set[int]:
    """Parse an xl CPULIST such as ``"all"``, ``"0-3,5,^1"``, ``"all,^7"`` or ``"^0"``.

    Items are comma-separated: ``N``, ``N-M``, ``all`` (CPUs 0..ncpus-1), and exclusions
    ``^N`` / ``^N-M``.  The result is the union of the included items minus the excluded ones;
    with only exclusions the start is all CPUs.  Only the syntax is checked (and numbers are
    capped at MAX_CPU): whether the CPUs exist on the host is for the caller.  NUMA ``node:``
    items are not supported.  Raises InvalidInput with one sentence.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"{_show(text)} is not a CPU list")
    include: set[int] = set()
    exclude: set[int] = set()
    any_include = False
    items = text.split(",")
    if not text.strip():
        raise InvalidInput("the CPU list is empty (use e.g. 'all' or '0-3')")
    for raw_item in items:
        item = raw_item.strip()
        neg = item.startswith("^")
        body = item[1:].strip() if neg else item
        if body.startswith(("node:", "nodes:")):
            raise InvalidInput(f"NUMA node affinity ({_show(item)}) is not supported in CPU lists")
        if body == "all" and not neg:
            cpus = set(range(ncpus))
        else:
            m = re.fullmatch(r"([0-9]{1,6})(?:\s*-\s*([0-9]{1,6}))?", body)
            if not m:
                raise InvalidInput(f"{_show(item)} in CPU list {_show(text)} is not a CPU number, "
                                 "range (N-M), exclusion (^N) or 'all'")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise InvalidInput(f"CPU range {_show(item)} in CPU list {_show(text)} is backwards")
            if hi > MAX_CPU:
                raise InvalidInput(f"CPU {hi} in CPU list {_show(text)} is beyond the limit of {MAX_CPU}")
            cpus = set(range(lo, hi + 1))
        if neg:
            exclude |= cpus
        else:
            include |= cpus
            any_include = True
    if not any_include:
        include = set(range(ncpus))
    return include - exclude


# --------------------------------------------------------------------------- DomainConfig

INT_RULES: dict[str, tuple[int, int | None, str]] = {
    "memory": (1, None, "memory must be a positive integer (MiB)"),
    "maxmem": (1, None, "maxmem must be a positive integer (MiB)"),
    "vcpus": (1, MAX_VCPUS, f"vcpus must be an integer from 1 to {MAX_VCPUS}"),
    "maxvcpus": (1, MAX_VCPUS, f"maxvcpus must be an integer from 1 to {MAX_VCPUS}"),
    "cpu_weight": (1, 65535, "cpu_weight must be an integer from 1 to 65535"),
    "cap": (0, None, "cap must be an integer of at least 0 (percent of one CPU; 0 is no cap)"),
}


def _check_int(key: str, value: Any) -> int:
    lo, hi, rule = INT_RULES[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise ConfigValueError(key, f"{rule}, not {_show(value)}")
    return value


def _check_action(key: str, value: Any) -> str:
    if value in ACTIONS:
        return value
    valid = ", ".join(ACTIONS)
    if value in XL_ONLY_ACTIONS:
        raise ConfigValueError(key, f"{key}='{value}' is not supported by hypyr; use one of {valid}")
    raise ConfigValueError(key, f"{key} must be one of {valid}, not {_show(value)}")


def _check_cpus(value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    listed = isinstance(value, (list, tuple))
    for i, s in enumerate(value if listed else [value]):
        item = i if listed else None
        if not isinstance(s, str):
            raise ConfigValueError("cpus", f"cpus must be a CPU list string or a list of them, not {_show(s)}", item)
        try:
            parse_cpulist(s, 1)
        except InvalidInput as e:
            raise ConfigValueError("cpus", f"cpus: {e}", item) from None
    return tuple(value) if listed else value


def _check_disks(value: Any) -> tuple[DiskSpec, ...]:
    """DiskSpecs (raw, no two the same guest disk), sorted by index."""
    disks = tuple(value)
    for i, d in enumerate(disks):
        if not isinstance(d, DiskSpec):
            raise ConfigValueError("disk", f"disks must be DiskSpec objects, not {_show(d)}", i)
        if d.format != "raw":
            raise ConfigValueError("disk", f"disk {d.vdev}: format {d.format} is not supported (only raw)", i)
        for j, other in enumerate(disks[:i]):
            if other.index == d.index:
                raise ConfigValueError("disk", f"disk {d.vdev} is the same guest disk as {other.vdev}", i, j)
    return tuple(sorted(disks, key=lambda d: d.index))


def _check_vifs(value: Any) -> tuple[VifSpec, ...]:
    """VifSpecs with distinct devids, MACs and vifnames (ConfigValueError("vif", ...) if not)."""
    vifs = tuple(value)
    for i, v in enumerate(vifs):
        if not isinstance(v, VifSpec):
            raise ConfigValueError("vif", f"vifs must be VifSpec objects, not {_show(v)}", i)
        if any(other.devid == v.devid for other in vifs[:i]):
            raise ConfigValueError("vif", f"vif {v.devid} is listed twice", i)
    try:
        check_distinct(vifs)
    except VifError as e:
        item = next(i for i, v in enumerate(vifs) if v.devid == e.devid)
        raise ConfigValueError("vif", str(e), item) from None
    return vifs


@dataclass(frozen=True)
class DomainConfig:
    """A validated domain configuration (what ``xl create`` would build), with xl's defaults.

    Constructing one validates it (ConfigValueError, an InvalidConfig, naming the key and, for a
    list, the item); ``build`` turns that into an XlCfgError with the file and line.  This is the
    only validation.  ``maxmem``/``maxvcpus`` left as None become ``memory``/``vcpus``.  ``cpus``
    is None (no pinning), one CPU list string for every vCPU, or a tuple of strings, one per vCPU.
    """

    name: str
    kernel: str = ""
    type: str = "pvh"
    memory: int = 128
    maxmem: int | None = None
    vcpus: int = 1
    maxvcpus: int | None = None
    ramdisk: str | None = None
    cmdline: str | None = None
    root: str | None = None
    extra: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    cpus: str | tuple[str, ...] | None = None
    cpu_weight: int = 256
    cap: int = 0
    vifs: tuple[VifSpec, ...] = ()
    seccomp: str = "kill"
    jail: str = "on"                     # the VMM's jail (a hypyr extension): on (when root) or off
    bootloader: str | None = None        # "pygrub": boot the first disk's own config
    bootloader_args: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        def put(attr, value):
            object.__setattr__(self, attr, value)

        problem = name_problem(self.name)
        if problem:
            raise ConfigValueError("name", problem)
        if self.type == "pv":
            raise ConfigValueError("type", "pv guests are not supported; use type='pvh'")
        if self.type not in ("pvh", "hvm"):
            raise ConfigValueError("type", f"type must be 'pvh' or 'hvm', not {_show(self.type)}")
        for key in ("kernel", "ramdisk", "cmdline", "root", "extra"):
            v = getattr(self, key)
            if not (v is None and key != "kernel") and not isinstance(v, str):
                raise ConfigValueError(key, f"{key} must be a quoted string, not {_show(v)}")
        if self.bootloader is not None:
            _check_bootloader(self)
            put("bootloader_args", tuple(self.bootloader_args))
        elif not self.kernel:
            raise ConfigValueError("kernel", "kernel must be the path of a Linux kernel image, not ''")
        for key in INT_RULES:
            if getattr(self, key) is not None:
                _check_int(key, getattr(self, key))
        maxmem = self.memory if self.maxmem is None else self.maxmem
        maxvcpus = self.vcpus if self.maxvcpus is None else self.maxvcpus
        put("maxmem", maxmem)
        put("maxvcpus", maxvcpus)
        if maxmem < self.memory:
            raise ConfigValueError("maxmem", f"maxmem ({maxmem} MiB) must not be less than "
                                             f"memory ({self.memory} MiB)")
        if maxvcpus < self.vcpus:
            raise ConfigValueError("maxvcpus", f"maxvcpus ({maxvcpus}) must not be less than "
                                               f"vcpus ({self.vcpus})")
        for key in ("on_poweroff", "on_reboot", "on_crash"):
            _check_action(key, getattr(self, key))
        if self.seccomp not in ("kill", "log", "off"):
            raise ConfigValueError("seccomp", f"seccomp must be 'kill', 'log' or 'off', not {_show(self.seccomp)}")
        if self.jail not in ("on", "off"):
            raise ConfigValueError("jail", f"jail must be 'on' or 'off', not {_show(self.jail)}")
        put("disks", _check_disks(self.disks))
        put("cpus", _check_cpus(self.cpus))
        put("vifs", _check_vifs(self.vifs))
        if isinstance(self.cpus, tuple) and len(self.cpus) > maxvcpus:
            raise ConfigValueError("cpus", f"cpus lists {len(self.cpus)} vCPUs but the domain has only "
                                           f"{maxvcpus}")
        put("warnings", tuple(self.warnings))

    def cmdline_string(self) -> str:
        """The guest kernel command line as xl builds it: ``cmdline``, else ``root=ROOT EXTRA``."""
        if self.cmdline is not None:
            return self.cmdline
        parts = []
        if self.root:
            parts.append(f"root={self.root}")
        if self.extra:
            parts.append(self.extra)
        return " ".join(parts)

    def cpu_affinity(self, ncpus: int) -> list[set[int]] | None:
        """Host CPUs for each vCPU (0..maxvcpus-1), or None when ``cpus`` is not set."""
        if self.cpus is None:
            return None
        n = self.vcpus if self.maxvcpus is None else self.maxvcpus   # (never None after __post_init__)
        if isinstance(self.cpus, str):
            return [parse_cpulist(self.cpus, ncpus) for _ in range(n)]
        return [parse_cpulist(self.cpus[v], ncpus) if v < len(self.cpus) else set(range(ncpus))
                for v in range(n)]

    def to_dict(self) -> dict:
        """A JSON-able dict (for the registry); ``from_dict`` reverses it.  Warnings are left out."""
        return {"name": self.name, "type": self.type, "memory": self.memory, "maxmem": self.maxmem,
                "vcpus": self.vcpus, "maxvcpus": self.maxvcpus, "kernel": self.kernel,
                "ramdisk": self.ramdisk, "cmdline": self.cmdline, "root": self.root, "extra": self.extra,
                "disks": [d.to_dict() for d in self.disks], "on_poweroff": self.on_poweroff,
                "on_reboot": self.on_reboot, "on_crash": self.on_crash,
                "cpus": list(self.cpus) if isinstance(self.cpus, tuple) else self.cpus,
                "cpu_weight": self.cpu_weight, "cap": self.cap,
                "vifs": [v.to_dict() for v in self.vifs], "seccomp": self.seccomp,
                "jail": self.jail, "bootloader": self.bootloader, "bootloader_args": list(self.bootloader_args)}

    @property
    def boot_entry(self) -> str | None:
        """The entry pygrub's ``--entry=NAME`` in ``bootloader_args`` names, if any."""
        entry = None
        for i, a in enumerate(self.bootloader_args):
            if a.startswith("--entry="):
                entry = a[len("--entry="):]
            elif a in ("--entry", "-e") and i + 1 < len(self.bootloader_args):
                entry = self.bootloader_args[i + 1]
        return entry

    @classmethod
    def from_dict(cls, d: dict) -> DomainConfig:
        """Rebuild (and re-validate) from ``to_dict`` output; unknown keys are ignored."""
        try:
            kw = {k: v for k, v in d.items() if k in _FIELDS and k != "warnings"}
            kw["disks"] = tuple(DiskSpec(**x) for x in d.get("disks", ()))
            if isinstance(kw.get("cpus"), list):
                kw["cpus"] = tuple(kw["cpus"])
            kw["vifs"] = tuple(VifSpec.from_dict(x) for x in d.get("vifs", ()))
            kw["bootloader_args"] = tuple(d.get("bootloader_args") or ())
            return cls(**kw)
        except (TypeError, AttributeError, KeyError, ValueError, ConfigValueError, VifError) as e:
            raise HypyrError(f"the stored domain configuration is not valid ({e})") from None


_FIELDS = {f for f in DomainConfig.__dataclass_fields__}


def _check_bootloader(cfg: DomainConfig) -> None:
    if not isinstance(cfg.bootloader, str) or os.path.basename(cfg.bootloader) != "pygrub":
        raise ConfigValueError("bootloader", f"bootloader must be 'pygrub' (hypyr reads the disk's grub.cfg or "
                                             f"extlinux.conf itself), not {_show(cfg.bootloader)}")
    if not cfg.disks:
        raise ConfigValueError("bootloader", "bootloader = 'pygrub' boots the first disk's own boot loader config, "
                                             "but the domain has no disk")
    for i, a in enumerate(cfg.bootloader_args):
        if not isinstance(a, str):
            raise ConfigValueError("bootloader_args", f"bootloader_args must be strings, not {_show(a)}", i)
