"""The complete KVM-side state of an x86 vCPU (:class:`VcpuState`) and of a VM's in-kernel
interrupt controllers, PIT and kvmclock (:class:`VmState`): captured, restored, and turned into
plain data (ints, lists, dicts, bytes) and back.  Unlike the rest of :mod:`hypyr.arch.x86`, it
calls the vCPU and VM wrappers of :mod:`hypyr.kvm`.  When to capture, and the order of a restore
(CPUID first, MP_STATE last): docs/save-restore.md, "vCPU and VM state".
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from hypyr.errors import StateError
from hypyr.kvm import B, CpuidEntry, KvmError, Vcpu, Vm

log = logging.getLogger("hypyr.state")

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
DEFERRED_MSRS = (MSR_IA32_TSC_DEADLINE,)  # restored after every other MSR
TSC_KHZ_TOLERANCE_PPM = 250  # a TSC rate this close to the host's needs no scaling (KVM's own tolerance)
LAPIC_SIZE = 1024
LEGACY_XSAVE_SIZE = 4096
MAX_CPUID_ENTRIES = 4096
MAX_MSRS = 4096
FORMAT_VERSION = 2  # of the kvm-vcpu and kvm-vm records; 2: CPUID left kvm-vcpu (its own stream record)


# -- plain data <-> records -------------------------------------------------------------------------
# Each record field says in its metadata what it looks like as plain data ("kind") and, for
# records mirroring a KVM struct, where it lives in that struct ("kvm", a dotted path).

class _Meta(dict):
    """A record field's metadata, given as the field's value in the class body."""


def _u(bits: int, kvm: str | None = None, *, optional: bool = False) -> Any:
    return _Meta(kind="uint", bits=bits, kvm=kvm, optional=optional)


def _s(bits: int, kvm: str | None = None) -> Any:
    return _Meta(kind="sint", bits=bits, kvm=kvm)


def _uints(bits: int, n: int, kvm: str | None = None) -> Any:
    return _Meta(kind="uints", bits=bits, n=n, kvm=kvm)


def _blob(min_len: int, max_len: int, multiple: int = 1) -> Any:
    return _Meta(kind="bytes", min=min_len, max=max_len, multiple=multiple)


def _record(cls: type, kvm: str | None = None, *, optional: bool = False) -> Any:
    return _Meta(kind="record", cls=cls, kvm=kvm, optional=optional)


def _records(cls: type, min_n: int, max_n: int, kvm: str | None = None) -> Any:
    return _Meta(kind="records", cls=cls, min=min_n, max=max_n, kvm=kvm)


def _custom(kind: str) -> Any:
    return _Meta(kind=kind)


def _show(value: object) -> str:
    """A short description of an untrusted value (never a huge repr)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if -(1 << 64) < value < 1 << 64 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    return f"a {type(value).__name__}"


def _check_int(value: object, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{where}: must be an integer, not {_show(value)}")
    if not lo <= value <= hi:
        raise StateError(f"{where}: {_show(value)} is out of range {lo}..{hi}")
    return int(value)


def _check_list(value: object, lo: int, hi: int, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise StateError(f"{where}: must be a list, not {_show(value)}")
    if not lo <= len(value) <= hi:
        raise StateError(f"{where}: has {len(value)} entries, not {lo}..{hi}" if lo != hi
                         else f"{where}: has {len(value)} entries, not {lo}")
    return list(value)


def _check_keys(data: object, names: list[str], where: str) -> dict:
    if not isinstance(data, dict):
        raise StateError(f"{where}: must be a dict, not {_show(data)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise StateError(f"{where}: field {missing[0]!r} is missing")
    extra = [k for k in data if k not in names]
    if extra:
        raise StateError(f"{where}: unknown field {_show(extra[0])}")
    return data


_Spec = tuple[tuple[str, Any, tuple[str, ...], int], ...]


def _fields(cls: type) -> _Spec:
    """(name, metadata, path of the KVM struct member, largest value or -1) of each field of a
    record class, worked out once, when the class is made (a migration's downtime converts every
    vCPU's records both ways).  The largest value is a plain unsigned integer field's: one that a
    good value passes with one comparison (the general path names the field only for a bad one)."""
    return cls._spec   # type: ignore[attr-defined]


def record_fields(cls: type) -> list[tuple[str, dict]]:
    """(name, metadata) of each field of a record class, in order."""
    return [(name, meta) for name, meta, _, _ in _fields(cls)]


class _Record:
    """Base of the frozen state records: keyword (or positional) construction of every field,
    equality, hashing and repr over the fields, :meth:`replace`, :meth:`to_dict` and a validating
    :meth:`from_dict`.  A subclass lists its fields as ``name: type = _u(...)`` (or ``_record``,
    ``_blob``...).  Not dataclasses: making one compiles its methods, ~30 ms each in the lab."""

    _kind: ClassVar[str | None] = None  # top-level records carry "kind" and "v" (format version)
    _spec: ClassVar[_Spec] = ()
    _names: ClassVar[tuple[str, ...]] = ()
    _name_set: ClassVar[frozenset[str]] = frozenset()
    _keys: ClassVar[frozenset[str]] = frozenset()   # the keys of the plain form

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = [(name, meta) for name, meta in vars(cls).items() if isinstance(meta, _Meta)]
        for name, _ in fields:
            delattr(cls, name)
        cls._spec = tuple((name, meta, tuple((meta.get("kvm") or name).split(".")),
                           (1 << meta["bits"]) - 1 if meta["kind"] == "uint" else -1) for name, meta in fields)
        cls._names = tuple(name for name, _ in fields)
        cls._name_set = frozenset(cls._names)
        cls._keys = cls._name_set | ({"kind", "v"} if cls._kind else set())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._names
        values = dict(zip(names, args))
        if len(args) > len(names) or not values.keys().isdisjoint(kwargs):
            raise TypeError(f"{type(self).__name__}: too many or repeated arguments")
        values.update(kwargs)
        if values.keys() != self._name_set:
            wrong = sorted(self._name_set ^ values.keys())
            raise TypeError(f"{type(self).__name__}: missing or unknown fields {wrong}")
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: use replace()")

    def replace(self, **changes: Any):
        """A copy with ``changes``."""
        return type(self)(**{**self.__dict__, **changes})

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._names)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names)
        return f"{self.__class__.__name__}({fields})"

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self._kind, "v": FORMAT_VERSION} if self._kind else {}
        for name, meta, _, hi in _fields(type(self)):
            value = getattr(self, name)
            out[name] = value if hi >= 0 else _to_plain(meta, value)
        return out

    @classmethod
    def from_dict(cls, data: object, where: str | None = None):
        """The record ``data`` describes; :class:`StateError` naming the field for anything missing,
        unknown, of the wrong type or out of range (and nothing else)."""
        where = where or (cls._kind or cls.__name__)
        fields = _fields(cls)
        names = cls._keys
        if not isinstance(data, dict) or data.keys() != names:   # say which key is missing or unknown
            data = _check_keys(data, [name for name, _, _, _ in fields] + (["kind", "v"] if cls._kind else []),
                               where)
        if cls._kind:
            if data["kind"] != cls._kind:
                raise StateError(f"{where}: this is {_show(data['kind'])} state, not {cls._kind!r} state")
            v = _check_int(data["v"], 0, 1 << 31, f"{where}.v")
            if v != FORMAT_VERSION:
                raise StateError(f"{where}: state format version {v} is not supported "
                                 f"(this hypyr reads version {FORMAT_VERSION})")
        values = {}
        for name, meta, _, hi in fields:
            value = data[name]
            if type(value) is int and 0 <= value <= hi:   # the usual field: a good unsigned integer
                values[name] = value
            else:
                values[name] = _from_plain(meta, value, f"{where}.{name}")
        return cls(**values)


def _to_plain(meta, value) -> Any:
    kind = meta["kind"]
    if value is None:
        return None
    if kind in ("uint", "sint"):
        return value
    if kind == "uints":
        return list(value)
    if kind == "bytes":
        return bytes(value)
    if kind == "record":
        return value.to_dict()
    if kind == "records":
        return [r.to_dict() for r in value]
    if kind == "msrs":
        return [[index, data] for index, data in value.items()]
    raise AssertionError(kind)


_CPUID_FIELDS = list(CpuidEntry._fields)


def cpuid_to_plain(entries: Sequence[CpuidEntry]) -> list[dict[str, int]]:
    """A vCPU's CPUID table as plain data (one dict per entry)."""
    return [{n: getattr(e, n) for n in _CPUID_FIELDS} for e in entries]


def cpuid_from_plain(value: object, where: str) -> list[CpuidEntry]:
    """The CPUID table :func:`cpuid_to_plain` made; :class:`StateError` naming the bad entry."""
    entries = []
    for i, e in enumerate(_check_list(value, 0, MAX_CPUID_ENTRIES, where)):
        e = _check_keys(e, _CPUID_FIELDS, f"{where}[{i}]")
        words = [e[n] for n in _CPUID_FIELDS]
        if not all(type(w) is int and 0 <= w <= 0xFFFF_FFFF for w in words):   # name the bad one
            words = [_check_int(e[n], 0, 0xFFFF_FFFF, f"{where}[{i}].{n}") for n in _CPUID_FIELDS]
        entries.append(CpuidEntry(*words))
    return entries


def _from_plain(meta, value, where: str) -> Any:
    kind = meta["kind"]
    if value is None and meta.get("optional"):
        return None
    if kind == "uint":
        return _check_int(value, 0, (1 << meta["bits"]) - 1, where)
    if kind == "sint":
        half = 1 << (meta["bits"] - 1)
        return _check_int(value, -half, half - 1, where)
    if kind == "uints":
        items = _check_list(value, meta["n"], meta["n"], where)
        return tuple(_check_int(v, 0, (1 << meta["bits"]) - 1, f"{where}[{i}]") for i, v in enumerate(items))
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray)):
            raise StateError(f"{where}: must be bytes, not {_show(value)}")
        if not meta["min"] <= len(value) <= meta["max"] or len(value) % meta["multiple"]:
            size = (f"{meta['min']}" if meta["min"] == meta["max"]
                    else f"{meta['min']}..{meta['max']}, a multiple of {meta['multiple']}")
            raise StateError(f"{where}: has {len(value)} bytes, not {size}")
        return bytes(value)
    if kind == "record":
        return meta["cls"].from_dict(value, where)
    if kind == "records":
        items = _check_list(value, meta["min"], meta["max"], where)
        return tuple(meta["cls"].from_dict(v, f"{where}[{i}]") for i, v in enumerate(items))
    if kind == "msrs":
        msrs: dict[int, int] = {}
        for i, pair in enumerate(_check_list(value, 0, MAX_MSRS, where)):
            index, data = pair if type(pair) is list and len(pair) == 2 else _check_list(pair, 2, 2, f"{where}[{i}]")
            if not (type(index) is int and 0 <= index <= 0xFFFF_FFFF):
                index = _check_int(index, 0, 0xFFFF_FFFF, f"{where}[{i}][0]")
            if index in msrs:
                raise StateError(f"{where}[{i}]: MSR {index:#x} appears twice")
            if not (type(data) is int and 0 <= data < 1 << 64):
                data = _check_int(data, 0, (1 << 64) - 1, f"{where}[{i}][1]")
            msrs[index] = data
        return msrs
    raise AssertionError(kind)


class _KvmRecord(_Record):
    """A record mirroring the KVM struct ``_kvm``: :meth:`from_kvm` / :meth:`to_kvm`.  Padding and
    reserved fields are not kept (KVM wants them zero)."""

    _kvm: ClassVar[type]

    @classmethod
    def from_kvm(cls, s):
        values: dict[str, Any] = {}
        for name, meta, path, hi in _fields(cls):
            raw = getattr(s, path[0]) if len(path) == 1 else _get_path(s, path)
            if hi >= 0:
                values[name] = int(raw)
            elif meta["kind"] == "record":
                values[name] = meta["cls"].from_kvm(raw)
            elif meta["kind"] == "records":
                values[name] = tuple(meta["cls"].from_kvm(x) for x in raw)
            elif meta["kind"] == "uints":
                values[name] = tuple(raw)
            else:
                values[name] = int(raw)
        return cls(**values)

    def to_kvm(self, s=None):
        """The KVM struct (or fill ``s``, e.g. a struct nested in another, in place)."""
        s = self._kvm() if s is None else s
        for field_name, meta, (*parents, name), hi in _fields(type(self)):
            value = getattr(self, field_name)
            owner = _get_path(s, parents) if parents else s
            if hi >= 0:
                setattr(owner, name, value)
            elif meta["kind"] == "record":
                value.to_kvm(getattr(owner, name))
            elif meta["kind"] == "records":
                array = getattr(owner, name)
                for i, r in enumerate(value):
                    r.to_kvm(array[i])
            elif meta["kind"] == "uints":
                getattr(owner, name)[:] = list(value)
            else:
                setattr(owner, name, value)
        return s


def _get_path(s, path: Sequence[str]):
    for name in path:
        s = getattr(s, name)
    return s


# -- vCPU records ------------------------------------------------------------------------------------
class Regs(_KvmRecord):
    _kvm = B.kvm_regs
    rax: int = _u(64)
    rbx: int = _u(64)
    rcx: int = _u(64)
    rdx: int = _u(64)
    rsi: int = _u(64)
    rdi: int = _u(64)
    rsp: int = _u(64)
    rbp: int = _u(64)
    r8: int = _u(64)
    r9: int = _u(64)
    r10: int = _u(64)
    r11: int = _u(64)
    r12: int = _u(64)
    r13: int = _u(64)
    r14: int = _u(64)
    r15: int = _u(64)
    rip: int = _u(64)
    rflags: int = _u(64)


class Segment(_KvmRecord):
    _kvm = B.kvm_segment
    base: int = _u(64)
    limit: int = _u(32)
    selector: int = _u(16)
    type: int = _u(8)
    present: int = _u(8)
    dpl: int = _u(8)
    db: int = _u(8)
    s: int = _u(8)
    l: int = _u(8)
    g: int = _u(8)
    avl: int = _u(8)
    unusable: int = _u(8)


class DescriptorTable(_KvmRecord):
    _kvm = B.kvm_dtable
    base: int = _u(64)
    limit: int = _u(16)


class Sregs(_KvmRecord):
    _kvm = B.kvm_sregs
    cs: Segment = _record(Segment)
    ds: Segment = _record(Segment)
    es: Segment = _record(Segment)
    fs: Segment = _record(Segment)
    gs: Segment = _record(Segment)
    ss: Segment = _record(Segment)
    tr: Segment = _record(Segment)
    ldt: Segment = _record(Segment)
    gdt: DescriptorTable = _record(DescriptorTable)
    idt: DescriptorTable = _record(DescriptorTable)
    cr0: int = _u(64)
    cr2: int = _u(64)
    cr3: int = _u(64)
    cr4: int = _u(64)
    cr8: int = _u(64)
    efer: int = _u(64)
    apic_base: int = _u(64)
    interrupt_bitmap: tuple[int, ...] = _uints(64, 4)


class Xcr(_KvmRecord):
    _kvm = B.kvm_xcr
    xcr: int = _u(32)  # which XCR (0: XCR0)
    value: int = _u(64)


class DebugRegs(_KvmRecord):
    _kvm = B.kvm_debugregs
    db: tuple[int, ...] = _uints(64, 4)
    dr6: int = _u(64)
    dr7: int = _u(64)
    flags: int = _u(64)


class VcpuEvents(_KvmRecord):
    """kvm_vcpu_events, flattened (``exception.nr`` is ``exception_nr``)."""
    _kvm = B.kvm_vcpu_events
    exception_injected: int = _u(8, "exception.injected")
    exception_nr: int = _u(8, "exception.nr")
    exception_has_error_code: int = _u(8, "exception.has_error_code")
    exception_pending: int = _u(8, "exception.pending")
    exception_error_code: int = _u(32, "exception.error_code")
    interrupt_injected: int = _u(8, "interrupt.injected")
    interrupt_nr: int = _u(8, "interrupt.nr")
    interrupt_soft: int = _u(8, "interrupt.soft")
    interrupt_shadow: int = _u(8, "interrupt.shadow")
    nmi_injected: int = _u(8, "nmi.injected")
    nmi_pending: int = _u(8, "nmi.pending")
    nmi_masked: int = _u(8, "nmi.masked")
    sipi_vector: int = _u(32)
    flags: int = _u(32)  # KVM_VCPUEVENT_VALID_*: which optional fields KVM_SET_VCPU_EVENTS takes
    smi_smm: int = _u(8, "smi.smm")
    smi_pending: int = _u(8, "smi.pending")
    smi_inside_nmi: int = _u(8, "smi.smm_inside_nmi")
    smi_latched_init: int = _u(8, "smi.latched_init")
    triple_fault_pending: int = _u(8, "triple_fault.pending")
    exception_has_payload: int = _u(8)
    exception_payload: int = _u(64)


class VcpuState(_Record):
    """Everything KVM holds for one x86 vCPU.  ``msrs`` maps index to value in KVM's order;
    ``tsc_khz`` is None where the host cannot tell (no KVM_CAP_GET_TSC_KHZ)."""

    _kind = "kvm-vcpu"
    vcpu_id: int = _u(32)
    mp_state: int = _u(32)
    regs: Regs = _record(Regs)
    sregs: Sregs = _record(Sregs)
    xsave: bytes = _blob(LEGACY_XSAVE_SIZE, 1 << 20, 4)
    xcrs: tuple[Xcr, ...] = _records(Xcr, 0, B.KVM_MAX_XCRS)
    debugregs: DebugRegs = _record(DebugRegs)
    lapic: bytes = _blob(LAPIC_SIZE, LAPIC_SIZE)
    msrs: dict[int, int] = _custom("msrs")
    events: VcpuEvents = _record(VcpuEvents)
    tsc_khz: int | None = _u(32, optional=True)

    @classmethod
    def capture(cls, vcpu: Vcpu, msr_indices: list[int] | None = None) -> VcpuState:
        """Read the vCPU's state (it must not be in KVM_RUN).  ``msr_indices``: the MSRs to save
        (default: KVM_GET_MSR_INDEX_LIST); those KVM refuses to read for this vCPU are left out."""
        if vcpu.completion_pending:
            raise StateError(f"vCPU {vcpu.id} has an I/O exit KVM has not completed: re-enter KVM_RUN "
                             f"once with immediate_exit set before capturing its state")
        # MP_STATE first: reading it makes KVM process pending INIT/SIPI, which changes other state.
        # VCPU_EVENTS last: the other reads can move pending events around.
        mp_state = vcpu.get_mp_state()
        regs = Regs.from_kvm(vcpu.get_regs())
        sregs = Sregs.from_kvm(vcpu.get_sregs())
        xsave = vcpu.get_xsave()
        kx = vcpu.get_xcrs()
        xcrs = tuple(Xcr.from_kvm(x) for x in kx.xcrs[:kx.nr_xcrs])
        debugregs = DebugRegs.from_kvm(vcpu.get_debugregs())
        lapic = bytes(vcpu.get_lapic().regs)
        tsc_khz = vcpu.get_tsc_khz() if vcpu.vm.kvm.check_extension(B.KVM_CAP_GET_TSC_KHZ) else None
        if msr_indices is None:
            msr_indices = vcpu.vm.kvm.msr_index_list()
        msrs = _read_msrs(vcpu, msr_indices)
        events = VcpuEvents.from_kvm(vcpu.get_vcpu_events())
        return cls(vcpu_id=vcpu.id, mp_state=mp_state, regs=regs, sregs=sregs, xsave=xsave, xcrs=xcrs,
                   debugregs=debugregs, lapic=lapic, msrs=msrs, events=events, tsc_khz=tsc_khz)

    def restore(self, vcpu: Vcpu) -> None:
        """Load this state into ``vcpu`` (of a fresh VM, after :meth:`VmState.restore`), in the
        order the module docstring gives.  KvmError when KVM refuses a part (it names the ioctl,
        or the MSR)."""
        if vcpu.id != self.vcpu_id:
            raise StateError(f"this is the state of vCPU {self.vcpu_id}, not of vCPU {vcpu.id}")
        self._restore_tsc_khz(vcpu)
        vcpu.set_sregs(self.sregs.to_kvm())
        vcpu.set_regs(self.regs.to_kvm())
        vcpu.set_xsave(self.xsave)
        kx = B.kvm_xcrs(nr_xcrs=len(self.xcrs))
        for i, x in enumerate(self.xcrs):
            x.to_kvm(kx.xcrs[i])
        vcpu.set_xcrs(kx)
        vcpu.set_debugregs(self.debugregs.to_kvm())
        vcpu.set_lapic(B.kvm_lapic_state.from_buffer_copy(self.lapic))
        vcpu.set_msrs([(i, v) for i, v in self.msrs.items() if i not in DEFERRED_MSRS])
        vcpu.set_msrs([(i, self.msrs[i]) for i in DEFERRED_MSRS if i in self.msrs])
        vcpu.set_vcpu_events(self.events.to_kvm())
        vcpu.set_mp_state(self.mp_state)

    def _restore_tsc_khz(self, vcpu: Vcpu) -> None:
        if self.tsc_khz is None or not vcpu.vm.kvm.check_extension(B.KVM_CAP_GET_TSC_KHZ):
            return
        here = vcpu.get_tsc_khz()
        if abs(here - self.tsc_khz) * 1_000_000 > self.tsc_khz * TSC_KHZ_TOLERANCE_PPM:
            log.info("vCPU %d: scaling the TSC from %d kHz to the saved %d kHz", vcpu.id, here, self.tsc_khz)
            vcpu.set_tsc_khz(self.tsc_khz)  # KvmError where this host cannot run the TSC at that rate


def _read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """The values of ``indices`` (in that order, duplicates dropped), skipping those KVM will not
    read for this vCPU (KVM_GET_MSRS stops at the first it refuses)."""
    todo = list(dict.fromkeys(indices))
    values: dict[int, int] = {}
    while todo:
        got = vcpu.get_msrs(todo)
        values.update(got)
        if len(got) == len(todo):
            break
        log.debug("vCPU %d: MSR %#x cannot be read, not saved", vcpu.id, todo[len(got)])
        todo = todo[len(got) + 1:]
    return values


# -- VM records --------------------------------------------------------------------------------------
class PicState(_KvmRecord):
    _kvm = B.kvm_pic_state
    last_irr: int = _u(8)
    irr: int = _u(8)
    imr: int = _u(8)
    isr: int = _u(8)
    priority_add: int = _u(8)
    irq_base: int = _u(8)
    read_reg_select: int = _u(8)
    poll: int = _u(8)
    special_mask: int = _u(8)
    init_state: int = _u(8)
    auto_eoi: int = _u(8)
    rotate_on_auto_eoi: int = _u(8)
    special_fully_nested_mode: int = _u(8)
    init4: int = _u(8)
    elcr: int = _u(8)
    elcr_mask: int = _u(8)


class IoapicState(_KvmRecord):
    """The IOAPIC; each redirection table entry is its raw 64-bit value."""
    _kvm = B.kvm_ioapic_state
    base_address: int = _u(64)
    ioregsel: int = _u(32)
    id: int = _u(32)
    irr: int = _u(32)
    redirtbl: tuple[int, ...] = _uints(64, B.KVM_IOAPIC_NUM_PINS)


class IrqchipState(_Record):
    pic_master: PicState = _record(PicState)
    pic_slave: PicState = _record(PicState)
    ioapic: IoapicState = _record(IoapicState)


class PitChannel(_KvmRecord):
    """One i8254 channel.  ``count_load_time`` is host time: KVM restarts the count on restore."""
    _kvm = B.kvm_pit_channel_state
    count: int = _u(32)
    latched_count: int = _u(16)
    count_latched: int = _u(8)
    status_latched: int = _u(8)
    status: int = _u(8)
    read_state: int = _u(8)
    write_state: int = _u(8)
    write_latch: int = _u(8)
    rw_mode: int = _u(8)
    mode: int = _u(8)
    bcd: int = _u(8)
    gate: int = _u(8)
    count_load_time: int = _s(64)


class PitState(_KvmRecord):
    _kvm = B.kvm_pit_state2
    channels: tuple[PitChannel, ...] = _records(PitChannel, 3, 3)
    flags: int = _u(32)


class ClockData(_Record):
    """kvmclock at capture.  ``realtime`` is the host's CLOCK_REALTIME (ns) at that instant: KVM's
    own reading when ``flags`` has KVM_CLOCK_REALTIME, else hypyr's, right after KVM_GET_CLOCK."""
    clock: int = _u(64)
    flags: int = _u(32)
    realtime: int = _u(64)
    host_tsc: int = _u(64)


class VmState(_Record):
    """The VM-wide KVM state: in-kernel PICs and IOAPIC, PIT, kvmclock.  ``irqchip``/``pit`` are
    None for a VM created without them."""

    _kind = "kvm-vm"
    irqchip: IrqchipState | None = _record(IrqchipState, optional=True)
    pit: PitState | None = _record(PitState, optional=True)
    clock: ClockData = _record(ClockData)

    @classmethod
    def capture(cls, vm: Vm) -> VmState:
        """Read the VM's state; call it with every vCPU out of KVM_RUN."""
        irqchip = None
        if _exists(lambda: vm.get_irqchip(B.KVM_IRQCHIP_PIC_MASTER)):
            irqchip = IrqchipState(
                pic_master=PicState.from_kvm(vm.get_irqchip(B.KVM_IRQCHIP_PIC_MASTER).chip.pic),
                pic_slave=PicState.from_kvm(vm.get_irqchip(B.KVM_IRQCHIP_PIC_SLAVE).chip.pic),
                ioapic=IoapicState.from_kvm(vm.get_irqchip(B.KVM_IRQCHIP_IOAPIC).chip.ioapic))
        pit = PitState.from_kvm(vm.get_pit2()) if _exists(vm.get_pit2) else None
        c = vm.get_clock()
        realtime = c.realtime if c.flags & B.KVM_CLOCK_REALTIME else time.time_ns()
        clock = ClockData(clock=c.clock, flags=c.flags, realtime=realtime, host_tsc=c.host_tsc)
        return cls(irqchip=irqchip, pit=pit, clock=clock)

    def restore(self, vm: Vm, *, advance_clock: bool = False) -> None:
        """Load this state into ``vm`` (fresh, with the same irqchip/PIT, before its vCPUs' states).

        kvmclock resumes at the captured value (``advance_clock=False``: the guest does not see
        the time it spent saved), or, for a migration, that value plus the host CLOCK_REALTIME
        time elapsed since the capture (``advance_clock=True``); it never goes back."""
        if (self.irqchip is not None) != _exists(lambda: vm.get_irqchip(B.KVM_IRQCHIP_PIC_MASTER)):
            raise StateError("the saved VM and this one differ in having an in-kernel irqchip")
        if (self.pit is not None) != _exists(vm.get_pit2):
            raise StateError("the saved VM and this one differ in having an in-kernel PIT")
        # interrupt controllers before the PIT, whose output pin drives them
        if self.irqchip is not None:
            for chip_id, state in ((B.KVM_IRQCHIP_PIC_MASTER, self.irqchip.pic_master),
                                   (B.KVM_IRQCHIP_PIC_SLAVE, self.irqchip.pic_slave)):
                chip = B.kvm_irqchip(chip_id=chip_id)
                state.to_kvm(chip.chip.pic)
                vm.set_irqchip(chip)
            chip = B.kvm_irqchip(chip_id=B.KVM_IRQCHIP_IOAPIC)
            self.irqchip.ioapic.to_kvm(chip.chip.ioapic)
            vm.set_irqchip(chip)
        if self.pit is not None:
            vm.set_pit2(self.pit.to_kvm())
        self._restore_clock(vm, advance_clock)

    def _restore_clock(self, vm: Vm, advance: bool) -> None:
        c = self.clock
        data = B.kvm_clock_data(clock=c.clock)
        if advance:
            if c.flags & B.KVM_CLOCK_REALTIME and vm.clock_flags() & B.KVM_CLOCK_REALTIME:
                data.flags, data.realtime = B.KVM_CLOCK_REALTIME, c.realtime  # KVM adds the time since
            else:
                data.clock = min(c.clock + max(0, time.time_ns() - c.realtime), (1 << 64) - 1)
        vm.set_clock(data)


def _exists(get) -> bool:
    """Whether the VM has the in-kernel device ``get`` reads (KVM answers ENXIO when it has not)."""
    try:
        get()
    except KvmError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    return True
