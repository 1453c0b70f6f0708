"""The HEADER record of a save file or migration stream: what a destination needs before it
builds anything (format, kind, the VM's configuration and memory layout, device names, the
source's CPU signature, the caller's own data).  Plain data and checks only, so the toolstack
can look at a save file or an incoming stream without loading the device model; the host CPU
is checked by :func:`hypyr.vmm.snapshot.check_cpu`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from hypyr.arch.x86 import layout
from hypyr.devices.state import StateReader
from hypyr.errors import HypyrError, SnapshotError, StateError

from .config import VmConfig, config_from_dict, config_to_dict
from .stream import VERSION as FORMAT_VERSION
from .stream import Rec, StreamReader, decode_json, encode_json


@dataclass(frozen=True)
class SnapshotHeader:
    """The HEADER record: what a destination needs before it builds anything."""
    kind: str                           # "save" or "migration"
    created: float                      # time.time() on the source
    config: VmConfig                    # NICs with tap_fd -1: the caller supplies taps
    memory: list[tuple[int, int]]       # guest RAM regions (start, size)
    devices: list[str]                  # LinuxVm.devices names, in build order
    cpu: dict                           # the source's CPU signature (see cpu_signature)
    extra: dict = field(default_factory=dict)  # the caller's own data (e.g. the domain's xl.cfg)

    def vm_config(self, tap_fds: Sequence[int] = ()) -> VmConfig:
        """The saved configuration, the NICs on ``tap_fds`` (one per NIC, in order)."""
        nets = self.config.nets
        if len(tap_fds) != len(nets):
            raise SnapshotError(f"the saved VM has {len(nets)} NIC(s): give one tap for each, not {len(tap_fds)}")
        return self.config._replace(nets=[n._replace(tap_fd=fd) for n, fd in zip(nets, tap_fds)])


def encode_header(kind: str, config: VmConfig, memory: Sequence[tuple[int, int]], devices: Sequence[str],
                  cpu: dict, extra: dict | None) -> bytes:
    """The HEADER record's payload (``cpu``: the source's signature, see snapshot.cpu_signature)."""
    return encode_json({"format": FORMAT_VERSION, "kind": kind, "created": time.time(),
                        "config": config_to_dict(config), "memory": [[int(s), n] for s, n in memory],
                        "devices": list(devices), "cpu": cpu, "extra": extra or {}})


def parse_header(payload: bytes, what: str) -> SnapshotHeader:
    d = decode_json(payload, what, "HEADER")
    try:
        r = StateReader(d, "header")
        if r.integer("format", 0, 1 << 31) != FORMAT_VERSION:
            raise StateError("its format version is not the preamble's")
        kind = r.text("kind", 16)
        created = r.raw("created")
        config = config_from_dict(r.raw("config"))
        memory = r.items("memory", 2, 1)
        devices = r.items("devices", 64)
        cpu = parse_cpu(r.raw("cpu"))
        extra = r.raw("extra")
        r.done()
        if kind not in ("save", "migration") or not isinstance(created, (int, float)) or isinstance(created, bool):
            raise StateError("kind or creation time is malformed")
        if not isinstance(extra, dict) or not all(isinstance(n, str) and len(n) <= 64 for n in devices):
            raise StateError("extra or the device names are malformed")
        try:
            expected = layout.ram_layout(config.memory)
        except HypyrError:
            expected = None
        if not 1 <= config.vcpus <= layout.MAX_VCPUS or expected is None or memory != [list(m) for m in expected]:
            raise StateError("the memory layout or vCPU count does not follow from the configuration")
    except StateError as e:
        raise SnapshotError(f"{what} is corrupt (its HEADER: {e})") from None
    return SnapshotHeader(kind=kind, created=float(created), config=config, memory=expected,
                          devices=list(devices), cpu=cpu, extra=extra)


def read_header_record(reader: StreamReader) -> SnapshotHeader:
    """Preamble and HEADER from ``reader``, checked (SnapshotError), but not against this host's CPU."""
    reader.preamble()
    _, payload = reader.next(expect=(Rec.HEADER,))
    return parse_header(payload, reader.what)


def read_header(f: BinaryIO) -> SnapshotHeader:
    """The header of save file ``f`` (to see what it holds before restoring it)."""
    try:
        return read_header_record(StreamReader(f, "the save file"))
    except OSError as e:
        raise SnapshotError(f"cannot read the save file: {e.strerror or e}") from None


def parse_cpu(raw: object) -> dict:
    r = StateReader(raw, "cpu")
    sig = {"vendor": r.text("vendor", 12), "family": r.integer("family", 0, 0x10F),
           "model": r.integer("model", 0, 0xFF), "stepping": r.integer("stepping", 0, 0xF)}
    features = r.raw("features")
    r.done()
    if not isinstance(features, dict) or len(features) > 64 or not all(
            isinstance(k, str) and len(k) < 32 and isinstance(v, int) and not isinstance(v, bool)
            and 0 <= v <= 0xFFFF_FFFF for k, v in features.items()):
        raise StateError("cpu.features must map CPUID words to 32-bit values")
    return {**sig, "features": features}
