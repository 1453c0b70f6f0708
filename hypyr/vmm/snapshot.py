"""Save and restore a whole VM in the record stream of :mod:`hypyr.vmm.stream`, and the pieces
live migration (:mod:`hypyr.vmm.migration`) shares with them.

::

    save(vm, f)              pause the vCPUs (none left with an I/O to complete), quiesce every
                             device, capture device states, then VM and vCPU states; write HEADER,
                             guest RAM (zero pages as ZERO runs), STATE, END; then resume
                             (``keep_running``) or leave the VM paused and quiesced
    restore(f, console_out)  HEADER (format, host CPU) -> RAM -> STATE -> END checked -> build the
                             VM from the saved config without a kernel -> VM state, vCPUs, device
                             states -> resume devices; returns the VM with its vCPUs not started

A file that is truncated, corrupt, of another format version or from an incompatible CPU is a
:class:`~hypyr.errors.SnapshotError` (one sentence), raised before a VM exists: its guest RAM is
released and nothing else was made.  docs/migration.md describes the format and the checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from hypyr.arch.x86 import cpuid as x86cpuid
from hypyr.arch.x86 import layout
from hypyr.arch.x86.vcpu_state import VcpuState, VmState, cpuid_from_plain, cpuid_to_plain
from hypyr.devices.state import StateReader
from hypyr.devices.virtio.blk import VirtioBlk
from hypyr.errors import HypyrError, SnapshotError, StateError
from hypyr.kvm import CpuidEntry, Kvm, KvmError, KvmUnavailable
from hypyr.memory import GuestMemory

from .builder import LinuxVm, build_vm, guest_cpuid
from .config import VmConfig
from .header import SnapshotHeader, encode_header, read_header_record
from .header import read_header as read_saved_header
from .pages import PageLoader, PageSender
from .stream import (
    PAGE,
    Rec,
    StreamReader,
    StreamWriter,
    decode_json,
    encode_json,
)
from .stream import VERSION as FORMAT_VERSION

log = logging.getLogger("hypyr.snapshot")

__all__ = ["save", "restore", "read_header", "release_disks", "reacquire_disks", "SnapshotHeader", "SaveStats",
           "Progress", "FORMAT_VERSION"]


@dataclass(frozen=True)
class Progress:
    """What a long save, restore or migration has done so far (for a progress bar)."""
    phase: str                # "memory" (first pass), "iteration", "stop-and-copy", "state", "loading"
    iteration: int            # pre-copy pass (1: the full first pass)
    bytes: int                # bytes written or read so far
    pages: int                # pages sent or loaded so far, data and zero
    total_pages: int          # pages of guest RAM
    dirty_pages: int = 0      # migration: pages left to send at the last look
    dirty_rate: float = 0.0   # migration: pages per second the guest dirtied in the last pass


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class SaveStats:
    seconds: float
    bytes: int
    pages_data: int           # pages written with their data
    pages_zero: int           # pages written as ZERO runs (no data)


# -- the host CPU ---------------------------------------------------------------------------------------
# (leaf, subleaf, register, bits that need not match): the CPUID words that say which
# features the guest may use; OSXSAVE, APIC and OSPKE follow the guest's own CR4/APIC base.
_FEATURE_WORDS = ((0x1, 0, "ecx", 1 << 27), (0x1, 0, "edx", 1 << 9), (0x7, 0, "ebx", 0), (0x7, 0, "ecx", 1 << 4),
                  (0x7, 0, "edx", 0), (0x7, 1, "eax", 0), (0xD, 1, "eax", 0), (0x80000001, 0, "ecx", 0),
                  (0x80000001, 0, "edx", 0), (0x80000008, 0, "ebx", 0), (0x40000001, 0, "eax", 0))


def _feature_words(entries: Sequence[CpuidEntry]) -> dict[str, int]:
    by_leaf = {(e.function, e.index): e for e in entries}
    out = {}
    for leaf, sub, reg, ignore in _FEATURE_WORDS:
        e = by_leaf.get((leaf, sub))
        if e is not None:
            out[f"{leaf:#x}.{sub}.{reg}"] = getattr(e, reg) & ~ignore & 0xFFFF_FFFF
    return out


def _signature(entries: Sequence[CpuidEntry]) -> dict:
    eax = next((e.eax for e in entries if e.function == 1), 0)
    family = (eax >> 8) & 0xF
    model = (eax >> 4) & 0xF
    if family in (6, 15):
        model |= ((eax >> 16) & 0xF) << 4
    if family == 15:
        family += (eax >> 20) & 0xFF
    return {"vendor": x86cpuid.cpu_vendor(list(entries)), "family": family, "model": model, "stepping": eax & 0xF}


def cpu_signature(kvm: Kvm, guest_cpuid: Sequence[CpuidEntry]) -> dict:
    """This host's CPU (vendor, family, model, stepping) and the feature words the guest was given."""
    return {**_signature(kvm.supported_cpuid()), "features": _feature_words(guest_cpuid)}


def check_cpu(sig: dict, kvm: Kvm, nr_vcpus: int, what: str) -> None:
    """SnapshotError unless this host can run a guest of CPU signature ``sig``: the same vendor,
    and every feature the guest was given offered here too (another family or model is logged)."""
    host_entries = kvm.supported_cpuid()
    here = _signature(host_entries)
    if sig["vendor"] != here["vendor"]:
        raise SnapshotError(f"{what} was made on a {sig['vendor'] or 'unknown'} CPU; this host's is "
                            f"{here['vendor'] or 'unknown'}")
    adjusted = guest_cpuid(kvm, 0, nr_vcpus)
    offered = _feature_words(adjusted)
    if any(value & ~offered.get(key, 0) for key, value in sig["features"].items()):
        # Some KVMs give a vCPU more than KVM_GET_SUPPORTED_CPUID lists (KVM_GET_CPUID2 then reads
        # back more than was set, and the saved state holds that): a word exactly what a vCPU set
        # up the same way reads back here is offered here.
        for key, value in _probe_features(kvm, adjusted).items():
            if sig["features"].get(key) == value:
                offered[key] = offered.get(key, 0) | value
    for key, value in sig["features"].items():
        missing = value & ~offered.get(key, 0)
        if missing:
            bits = ", ".join(str(b) for b in range(32) if missing >> b & 1)
            raise SnapshotError(f"{what} needs CPU features this host lacks (CPUID {key} bit(s) {bits})")
    if (sig["family"], sig["model"]) != (here["family"], here["model"]):
        log.info("%s was made on CPU family %d model %d; this host is family %d model %d", what, sig["family"],
                 sig["model"], here["family"], here["model"])


def _probe_features(kvm: Kvm, entries: Sequence[CpuidEntry]) -> dict[str, int]:
    """The feature words a scratch vCPU given ``entries`` reads back (KVM_GET_CPUID2); {} if
    that cannot be done."""
    try:
        vm = kvm.create_vm()
    except (AttributeError, KvmError, OSError):
        return {}
    try:
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid(list(entries))
            return _feature_words(vcpu.get_cpuid())
        finally:
            vcpu.close()
    except (KvmError, OSError):
        return {}
    finally:
        vm.close()


def _header_payload(vm: LinuxVm, kind: str, guest_cpuid: Sequence[CpuidEntry], extra: dict | None) -> bytes:
    return encode_header(kind, vm.config, [(int(r.start), r.size) for r in vm.machine.memory.regions],
                         list(vm.devices), cpu_signature(vm.machine.kvm, guest_cpuid), extra)


def read_checked_header(reader: StreamReader, kvm: Kvm | None) -> SnapshotHeader:
    """Preamble and HEADER from ``reader``, the CPU checked against this host's."""
    return _checked(read_header_record(reader), kvm, reader.what)


def read_header(f: BinaryIO, *, kvm: Kvm | None = None) -> SnapshotHeader:
    """The header of save file ``f`` (:func:`hypyr.vmm.header.read_header`), the CPU checked
    against this host's."""
    return _checked(read_saved_header(f), kvm, "the save file")


def _checked(header: SnapshotHeader, kvm: Kvm | None, what: str) -> SnapshotHeader:
    _with_kvm(kvm, lambda k: check_cpu(header.cpu, k, header.config.vcpus, what))
    return header


def _with_kvm(kvm: Kvm | None, use):
    if kvm is not None:
        return use(kvm)
    try:
        k = Kvm()
    except KvmUnavailable as e:
        raise SnapshotError(str(e)) from None
    try:
        return use(k)
    finally:
        k.close()


# -- pausing, state -----------------------------------------------------------------------------------------
def quiesce_devices(vm: LinuxVm) -> None:
    for dev in vm.devices.values():
        dev.quiesce()


def resume_devices(vm: LinuxVm) -> None:
    for dev in vm.devices.values():
        dev.resume()


def pause_and_quiesce(vm: LinuxVm) -> bool:
    """Pause every vCPU (none left with an I/O exit to complete), then quiesce every device.
    Returns whether the VM was paused already.  SnapshotError (and the VM as it was) if it has
    stopped or a device cannot be quiesced."""
    machine = vm.machine
    if machine.stop_reason is not None:
        raise SnapshotError(f"the VM has stopped ({machine.stop_reason.message}): there is nothing to save")
    was_paused = machine.paused
    machine.pause()
    if machine.stop_reason is not None:
        raise SnapshotError(f"the VM stopped ({machine.stop_reason.message}) while it was being paused")
    try:
        quiesce_devices(vm)
    except StateError as e:
        resume_running(vm, was_paused)
        raise SnapshotError(f"the VM cannot be saved now: {e}") from None
    return was_paused


def resume_running(vm: LinuxVm, was_paused: bool) -> None:
    """Undo :func:`pause_and_quiesce`: devices first, then the vCPUs unless they were paused."""
    resume_devices(vm)
    if not was_paused:
        vm.machine.resume()


def capture_cpuid(vm: LinuxVm) -> list[list[CpuidEntry]]:
    """Every vCPU's CPUID table, with the vCPUs out of KVM_RUN (a vCPU ioctl waits for it).  It
    cannot change once a vCPU has run, so a migration takes it before the final pause."""
    try:
        return [vt.vcpu.get_cpuid() for vt in vm.machine.vcpus]
    except KvmError as e:
        raise SnapshotError(f"KVM would not give the VM's CPUID: {e}") from None


def cpuid_payload(tables: Sequence[Sequence[CpuidEntry]]) -> bytes:
    """The CPUID record's payload."""
    return encode_json({"vcpus": [cpuid_to_plain(t) for t in tables]})


def load_cpuid(vm: LinuxVm, reader: StreamReader, checked: dict) -> None:
    """Read the CPUID record and give each vCPU its table, before any other vCPU state: KVM checks
    much of that against it.  SnapshotError if it is corrupt, does not fit the VM, or asks for
    features this host's KVM lacks (``checked``: the feature words the header had, already
    checked against this host; the same words are not checked twice)."""
    _, payload = reader.next(expect=(Rec.CPUID,))
    machine = vm.machine
    n = len(machine.vcpus)
    try:
        r = StateReader(decode_json(payload, reader.what, "CPUID"), "its CPUID")
        tables = [cpuid_from_plain(t, f"the CPUID of vcpu[{i}]") for i, t in enumerate(r.items("vcpus", n, n))]
        r.done()
    except StateError as e:
        raise SnapshotError(f"{reader.what} is corrupt ({e})") from None
    words = _feature_words(tables[0]) if tables else checked
    if words != checked:
        check_cpu({**_signature(machine.kvm.supported_cpuid()), "features": words}, machine.kvm, n, reader.what)
    try:
        for table, vt in zip(tables, machine.vcpus):
            vt.vcpu.set_cpuid(table)
    except KvmError as e:
        raise SnapshotError(f"KVM refused the CPUID in {reader.what}: {e}") from None


def capture_state(vm: LinuxVm, paused: bool) -> dict:
    """With the vCPUs paused and every device quiesced: device states (in build order), then the
    VM's interrupt controllers, PIT and clock, then every vCPU (docs/save-restore.md)."""
    machine = vm.machine
    try:
        devices = [[name, dev.save_state()] for name, dev in vm.devices.items()]
        vm_state = VmState.capture(machine.vm)
        msrs = machine.kvm.msr_index_list()
        vcpus = [VcpuState.capture(vt.vcpu, msrs) for vt in machine.vcpus]
    except StateError as e:
        raise SnapshotError(f"the VM cannot be saved now: {e}") from None
    except KvmError as e:
        raise SnapshotError(f"KVM would not give the VM's state: {e}") from None
    return {"vm": vm_state.to_dict(), "vcpus": [s.to_dict() for s in vcpus], "devices": devices, "paused": paused}


def apply_state(vm: LinuxVm, state: object, *, advance_clock: bool, what: str) -> None:
    """Load a STATE record's contents into ``vm`` (fresh, its vCPUs not running): VM state, then
    every vCPU, then every device, which stay quiesced (:func:`resume_devices` once RAM is
    loaded).  Everything is parsed first.  Nothing here reads or writes guest RAM, so a
    migration's last pages may still arrive after it."""
    machine = vm.machine
    try:
        r = StateReader(state, "its STATE")
        vm_state = VmState.from_dict(r.raw("vm"))
        n = len(machine.vcpus)
        vcpus = [VcpuState.from_dict(v, f"vcpu[{i}]") for i, v in enumerate(r.items("vcpus", n, n))]
        devices = r.items("devices", len(vm.devices), len(vm.devices))
        paused = r.flag("paused")
        r.done()
        for d, mine in zip(devices, vm.devices):
            if not isinstance(d, list) or len(d) != 2 or d[0] != mine:
                raise StateError(f"the saved devices are not this VM's ({mine!r} expected)")
    except StateError as e:
        raise SnapshotError(f"{what} is corrupt ({e})") from None
    try:
        vm_state.restore(machine.vm, advance_clock=advance_clock)
        for s, vt in zip(vcpus, machine.vcpus):
            s.restore(vt.vcpu)
        for name, dev_state in devices:
            vm.devices[name].load_state(dev_state)
    except StateError as e:
        raise SnapshotError(f"{what} does not fit this VM: {e}") from None
    except KvmError as e:
        raise SnapshotError(f"KVM refused the state in {what}: {e}") from None
    vm.saved_paused = paused


def rehearse_load(vm: LinuxVm) -> None:
    """Capture a freshly built ``vm``'s own state and load it back, devices quiesced again after:
    a migration's destination does this while RAM arrives, so that its load inside the downtime
    runs warm code and KVM paths (on the host it took half as long: docs/migration.md)."""
    quiesce_devices(vm)
    state = decode_json(encode_json(capture_state(vm, paused=True)), "the rehearsal", "STATE")
    apply_state(vm, state, advance_clock=False, what="the rehearsal")
    resume_devices(vm)
    quiesce_devices(vm)


# -- guest RAM --------------------------------------------------------------------------------------------

_AFTER_STATE = (Rec.PAGES, Rec.ZERO, Rec.END)


def load_records(reader: StreamReader, memory: GuestMemory, progress: ProgressFn | None = None,
                 on_sync: Callable[[], None] | None = None,
                 on_state: Callable[[object], None] | None = None) -> object:
    """Read PAGES/ZERO records into ``memory`` up to STATE, more of them up to END (checked);
    return the state.  ``on_sync``: called at each SYNC record (a migration's; a save file has
    none); ``on_state(state)``: called as soon as STATE is in (a migration sends it before its
    last pages, so that the destination loads it while they arrive)."""
    loader = PageLoader(memory, reader.what)
    total = memory.size // PAGE
    last = time.monotonic()
    state = None
    memory_records = (Rec.PAGES, Rec.ZERO, Rec.STATE) + ((Rec.SYNC,) if on_sync is not None else ())
    while True:
        rtype, payload = reader.next(expect=memory_records if state is None else _AFTER_STATE,
                                     pages_into=loader.pages_into)
        if rtype is Rec.ZERO:
            loader.put_zero(payload)
        elif rtype is Rec.SYNC and on_sync is not None:
            on_sync()
        elif rtype is Rec.STATE:
            state = decode_json(payload, reader.what, "STATE")
            if on_state is not None:
                on_state(state)
        elif rtype is Rec.END:
            return state
        if progress is not None and time.monotonic() - last > 0.2:
            last = time.monotonic()
            progress(Progress("loading", 0, reader.bytes, loader.pages, total))


def load_vm(reader: StreamReader, header: SnapshotHeader, console_out: Callable[[bytes], None], *,
            tap_fds: Sequence[int] = (), configure: Callable[[SnapshotHeader], VmConfig] | None = None,
            kvm: Kvm | None = None, progress: ProgressFn | None = None, advance_clock: bool = False,
            lock_disks_at_end: bool = False, on_built: Callable[[LinuxVm], None] | None = None,
            on_sync: Callable[[], None] | None = None) -> LinuxVm:
    """The rest of the stream after its header, as a new VM (vCPUs not started, devices
    resumed).  The VM is built first (so that a live migration's downtime does not include
    it), then RAM is read into it, the state is loaded as it comes (a migration sends it before
    its last pages) and the devices resume once END checked out.
    ``lock_disks_at_end``: the images are opened unlocked and locked only after END (the
    source lets go of them just before).  ``on_built(vm)`` runs once the VM is built, before
    its RAM is read; ``on_sync``: as for :func:`load_records`.  On any failure everything is
    released again."""
    config = configure(header) if configure is not None else header.vm_config(tap_fds)
    if layout.ram_layout(config.memory) != header.memory:
        raise SnapshotError(f"the configuration given for {reader.what} has another memory size than the saved VM")
    try:  # (validates the config before it allocates the RAM, which has the header's layout)
        vm = build_vm(config, console_out, kvm=kvm, boot=False, lock_disks=not lock_disks_at_end)
    except SnapshotError:
        raise
    except (HypyrError, KvmError) as e:
        raise SnapshotError(f"the VM of {reader.what} cannot be built here: {e}") from None
    try:
        if list(vm.devices) != header.devices:
            raise SnapshotError(f"the VM built for {reader.what} has other devices than the saved one "
                                f"({', '.join(header.devices)})")
        load_cpuid(vm, reader, header.cpu["features"])
        if on_built is not None:
            on_built(vm)
        load_records(reader, vm.machine.memory, progress, on_sync,
                     lambda state: apply_state(vm, state, advance_clock=advance_clock, what=reader.what))
        if lock_disks_at_end:
            reacquire_disks(vm)
        resume_devices(vm)
    except BaseException:
        vm.close()
        raise
    return vm


# -- disks ---------------------------------------------------------------------------------------------------
def release_disks(vm: LinuxVm) -> None:
    """Release every disk image's lock (keeping it open) so that another VMM may open it: the
    hand-over of shared storage.  Only with the devices quiesced (after a save or the final
    copy of a migration); :func:`reacquire_disks` undoes it."""
    for dev in vm.virtio:
        if isinstance(dev, VirtioBlk):
            dev.unlock_image()


def reacquire_disks(vm: LinuxVm, timeout: float = 5.0) -> None:
    """Take the disk images' locks back; HypyrError if another process still holds one after
    ``timeout`` seconds (the VM must then not write to it)."""
    deadline = time.monotonic() + timeout
    for dev in vm.virtio:
        if not isinstance(dev, VirtioBlk):
            continue
        while True:
            try:
                dev.relock_image()
                break
            except HypyrError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# -- save and restore ------------------------------------------------------------------------------------------
def save(vm: LinuxVm, f: BinaryIO, *, keep_running: bool = False, progress: ProgressFn | None = None,
         extra: dict | None = None) -> SaveStats:
    """Write ``vm`` to ``f``.  The VM is paused and its devices quiesced for the save; then it
    runs on with ``keep_running`` (``xl save -c``; a VM paused before stays paused), or stays
    paused and quiesced for the caller to destroy (its disks stay locked until then, or until
    :func:`release_disks`).  ``extra``: plain data kept in the header for the caller (e.g. the
    domain's configuration).  SnapshotError on failure, after which the VM runs on as before."""
    t0 = time.monotonic()
    was_paused = pause_and_quiesce(vm)
    try:
        state = capture_state(vm, was_paused)
        cpuid = capture_cpuid(vm)
        w = StreamWriter(f)
        w.preamble()
        w.record(Rec.HEADER, _header_payload(vm, "save", cpuid[0] if cpuid else [], extra))
        w.record(Rec.CPUID, cpuid_payload(cpuid))
        total = vm.machine.memory.size // PAGE
        last = [time.monotonic()]

        def tick() -> None:
            if progress is not None and time.monotonic() - last[0] > 0.2:
                last[0] = time.monotonic()
                progress(Progress("memory", 1, w.bytes, sender.data_pages + sender.zero_pages, total))
        sender = PageSender(w, vm.machine.memory, tick)
        sender.send_all()
        if progress is not None:
            progress(Progress("state", 1, w.bytes, total, total))
        w.record(Rec.STATE, encode_json(state))
        w.end()
        w.flush()
    except BaseException as e:
        resume_running(vm, was_paused)
        if isinstance(e, OSError):
            raise SnapshotError(f"cannot write the save file: {e.strerror or e}") from None
        raise
    if keep_running:
        resume_running(vm, was_paused)
    return SaveStats(seconds=time.monotonic() - t0, bytes=w.bytes, pages_data=sender.data_pages,
                     pages_zero=sender.zero_pages)


def restore(f: BinaryIO, console_out: Callable[[bytes], None], *, tap_fds: Sequence[int] = (),
            configure: Callable[[SnapshotHeader], VmConfig] | None = None, kvm: Kvm | None = None,
            progress: ProgressFn | None = None) -> LinuxVm:
    """A new VM from save file ``f``, its vCPUs not started (``vm.machine.start()`` runs it;
    ``pause()`` first to have it start paused; ``vm.saved_paused`` says whether it was paused
    when saved).  kvmclock goes on from its saved value.  NICs: ``tap_fds`` (one per saved NIC),
    or ``configure(header)`` returns the whole configuration.  SnapshotError, with nothing
    left behind, if the file is truncated, corrupt, of another version, from another CPU, or
    does not fit."""
    reader = StreamReader(f, "the save file")
    try:
        header = read_checked_header(reader, kvm)
        return load_vm(reader, header, console_out, tap_fds=tap_fds, configure=configure, kvm=kvm,
                       progress=progress)
    except OSError as e:
        raise SnapshotError(f"cannot read the save file: {e.strerror or e}") from None
