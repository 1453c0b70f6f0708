"""hypyr.arch.x86.vcpu_state without KVM: plain-data round trips, validation of untrusted dicts,
the KVM struct mapping, and the order capture()/restore() call the vCPU ioctls in (on a fake)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypyr.arch.x86 import vcpu_state as S
from hypyr.arch.x86.records import record_fields
from hypyr.arch.x86.vcpu_state import (
    ClockData,
    DebugRegs,
    IoapicState,
    IrqchipState,
    PicState,
    PitChannel,
    PitState,
    Regs,
    Sregs,
    VcpuEvents,
    VcpuState,
    VmState,
    Xcr,
)
from hypyr.errors import HypyrError, StateError
from hypyr.kvm import B, CpuidEntry


# -- strategies built from the records' own field descriptions ------------------------------------------
def records(cls) -> st.SearchStrategy:
    return st.builds(cls, **{name: _field_values(meta) for name, meta in record_fields(cls)})


def _field_values(meta) -> st.SearchStrategy:
    kind = meta["kind"]
    if kind == "uint":
        s = st.integers(0, (1 << meta["bits"]) - 1)
    elif kind == "sint":
        s = st.integers(-(1 << meta["bits"] - 1), (1 << meta["bits"] - 1) - 1)
    elif kind == "uints":
        s = st.tuples(*[st.integers(0, (1 << meta["bits"]) - 1)] * meta["n"])
    elif kind == "bytes":  # the smallest size, or a few words more; a little random data at the start
        sizes = st.sampled_from([meta["min"], min(meta["max"], meta["min"] + 4 * meta["multiple"])])
        s = st.tuples(st.binary(max_size=32), sizes).map(lambda t: (t[0] + bytes(t[1]))[:t[1]])
    elif kind == "record":
        s = records(meta["cls"])
    elif kind == "records":
        s = st.lists(records(meta["cls"]), min_size=meta["min"], max_size=meta["max"]).map(tuple)
    elif kind == "msrs":
        s = st.dictionaries(st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1), max_size=8)
    else:
        raise AssertionError(kind)
    return st.none() | s if meta.get("optional") else s


def sample_vcpu_state() -> VcpuState:
    return VcpuState(
        vcpu_id=1, mp_state=B.KVM_MP_STATE_RUNNABLE,
        regs=Regs.from_kvm(B.kvm_regs(rip=0x1000, rflags=2, rcx=30)),
        sregs=Sregs.from_kvm(B.kvm_sregs(cr0=0x80050033, efer=0x500, apic_base=0xFEE00800)),
        xsave=bytes(4096), xcrs=(Xcr(xcr=0, value=7),), debugregs=DebugRegs.from_kvm(B.kvm_debugregs(dr6=0xFFFF0FF0)),
        lapic=bytes(1024), msrs={0x10: 123456, 0x6E0: 0, 0xC0000082: 0xFFFF_FFFF_8100_0000},
        events=VcpuEvents.from_kvm(B.kvm_vcpu_events(flags=B.KVM_VCPUEVENT_VALID_SHADOW)), tsc_khz=2_596_136)


def sample_vm_state() -> VmState:
    return VmState(
        irqchip=IrqchipState(pic_master=PicState.from_kvm(B.kvm_pic_state(imr=0xFB, elcr_mask=0xF8)),
                             pic_slave=PicState.from_kvm(B.kvm_pic_state(imr=0xFF)),
                             ioapic=IoapicState.from_kvm(B.kvm_ioapic_state(base_address=0xFEC00000))),
        pit=PitState.from_kvm(B.kvm_pit_state2()),
        clock=ClockData(clock=12_345_678, flags=0, realtime=1_700_000_000_000_000_000, host_tsc=0))


def plain(value) -> bool:
    """Only dicts with str keys, lists, ints, strs, bytes and None, all the way down."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or (isinstance(value, (int, str, bytes)) and not isinstance(value, bool))


# -- round trips ---------------------------------------------------------------------------------------------
def test_samples_round_trip_and_are_plain_json_able_data():
    for state in (sample_vcpu_state(), sample_vm_state()):
        d = state.to_dict()
        assert plain(d)
        assert type(state).from_dict(d) == state
        text = json.dumps(d, default=lambda b: b.hex())  # bytes are the caller's to encode
        assert json.loads(text)["kind"] in ("kvm-vcpu", "kvm-vm")
    d = sample_vcpu_state().to_dict()
    assert d["kind"] == "kvm-vcpu" and d["v"] == S.FORMAT_VERSION
    assert d["msrs"] == [[0x10, 123456], [0x6E0, 0], [0xC0000082, 0xFFFF_FFFF_8100_0000]]  # order kept
    assert d["regs"]["rip"] == 0x1000 and d["sregs"]["cs"]["limit"] == 0
    assert d["events"]["flags"] == B.KVM_VCPUEVENT_VALID_SHADOW


@settings(max_examples=40, deadline=None)
@given(records(VcpuState))
def test_any_vcpu_state_round_trips(state):
    assert VcpuState.from_dict(state.to_dict()) == state


@settings(max_examples=40, deadline=None)
@given(records(VmState))
def test_any_vm_state_round_trips(state):
    d = state.to_dict()
    assert plain(d)
    assert VmState.from_dict(d) == state


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([Regs, Sregs, DebugRegs, VcpuEvents, Xcr, PicState, IoapicState, PitChannel, PitState])
       .flatmap(records))
def test_kvm_struct_mapping_round_trips(record):
    s = record.to_kvm()
    assert isinstance(s, type(record)._kvm)
    assert type(record).from_kvm(s) == record


def test_vcpu_events_fields_map_to_kvm_nested_fields():
    ev = B.kvm_vcpu_events(sipi_vector=0x9A, flags=0x2D, exception_has_payload=1, exception_payload=0xCAFE)
    ev.exception.nr, ev.exception.error_code, ev.interrupt.shadow = 14, 0x1234, 2
    ev.nmi.masked, ev.smi.smm_inside_nmi, ev.smi.latched_init, ev.triple_fault.pending = 1, 1, 1, 1
    e = VcpuEvents.from_kvm(ev)
    assert (e.exception_nr, e.exception_error_code, e.interrupt_shadow, e.nmi_masked) == (14, 0x1234, 2, 1)
    assert (e.smi_inside_nmi, e.smi_latched_init, e.triple_fault_pending) == (1, 1, 1)
    assert (e.sipi_vector, e.flags, e.exception_has_payload, e.exception_payload) == (0x9A, 0x2D, 1, 0xCAFE)
    assert bytes(e.to_kvm()) == bytes(ev)


def test_to_kvm_leaves_reserved_fields_zero():
    raw = B.kvm_debugregs(dr7=0x400)
    raw.reserved[3] = 99
    assert DebugRegs.from_kvm(raw).to_kvm().reserved[3] == 0


# -- validation of untrusted dicts ------------------------------------------------------------------------
def _set(path, value):
    """A mutation of the sample vCPU dict: set ``path`` (keys/indices) to ``value``."""
    def mutate(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]
    return mutate


BAD_VCPU = [
    (_delete(["regs"]), "field 'regs' is missing"),
    (_set(["bogus"], 1), "unknown field 'bogus'"),
    (_set(["kind"], "kvm-vm"), "not 'kvm-vcpu' state"),
    (_set(["v"], S.FORMAT_VERSION + 1), f"version {S.FORMAT_VERSION + 1} is not supported"),
    (_set(["regs", "rax"], "1"), "kvm-vcpu.regs.rax: must be an integer, not '1'"),
    (_set(["regs", "rax"], True), "kvm-vcpu.regs.rax: must be an integer, not a bool"),
    (_set(["regs", "rip"], -1), "kvm-vcpu.regs.rip: -1 is out of range"),
    (_set(["regs", "rip"], 1 << 64), "out of range 0..18446744073709551615"),
    (_set(["regs", "rip"], 1 << 200), "a 201-bit integer is out of range"),
    (_set(["regs"], [1, 2]), "kvm-vcpu.regs: must be a dict, not a list"),
    (_delete(["sregs", "cs", "limit"]), "kvm-vcpu.sregs.cs: field 'limit' is missing"),
    (_set(["sregs", "cs", "selector"], 0x10000), "kvm-vcpu.sregs.cs.selector"),
    (_set(["sregs", "interrupt_bitmap"], [0, 0, 0]), "kvm-vcpu.sregs.interrupt_bitmap: has 3 entries, not 4"),
    (_set(["sregs", "interrupt_bitmap", 2], None), "kvm-vcpu.sregs.interrupt_bitmap[2]: must be an integer"),
    (_set(["lapic"], bytes(1023)), "kvm-vcpu.lapic: has 1023 bytes, not 1024"),
    (_set(["lapic"], "00" * 1024), "kvm-vcpu.lapic: must be bytes, not '0000"),
    (_set(["xsave"], bytes(4098)), "kvm-vcpu.xsave: has 4098 bytes"),
    (_set(["xsave"], bytes(512)), "kvm-vcpu.xsave: has 512 bytes"),
    (_set(["xcrs"], [{"xcr": 0, "value": 1}] * 17), "kvm-vcpu.xcrs: has 17 entries, not 0..16"),
    (_set(["xcrs", 0, "value"], "7"), "kvm-vcpu.xcrs[0].value"),
    (_set(["msrs"], [[0x10, 1], [0x10, 2]]), "kvm-vcpu.msrs[1]: MSR 0x10 appears twice"),
    (_set(["msrs"], [[0x10, 1, 2]]), "kvm-vcpu.msrs[0]: has 3 entries, not 2"),
    (_set(["msrs"], [[0x10, 1 << 64]]), "kvm-vcpu.msrs[0][1]"),
    (_set(["msrs"], {"16": 1}), "kvm-vcpu.msrs: must be a list, not a dict"),
    (_set(["events", "nmi_pending"], 256), "kvm-vcpu.events.nmi_pending"),
    (_set(["tsc_khz"], "fast"), "kvm-vcpu.tsc_khz: must be an integer"),
    (_set(["mp_state"], None), "kvm-vcpu.mp_state: must be an integer, not a NoneType"),
]


@pytest.mark.parametrize("mutate, message", BAD_VCPU)
def test_garbled_vcpu_state_is_refused_naming_the_field(mutate, message):
    d = sample_vcpu_state().to_dict()
    mutate(d)
    with pytest.raises(StateError) as exc:
        VcpuState.from_dict(d)
    assert message in str(exc.value)
    assert isinstance(exc.value, HypyrError)


SAMPLE_CPUID = [CpuidEntry(0, eax=0xD, ebx=0x756E6547), CpuidEntry(0xD, 1, 1, eax=0xF)]


def test_cpuid_table_round_trips_through_json():
    plain = json.loads(json.dumps(S.cpuid_to_plain(SAMPLE_CPUID)))
    assert S.cpuid_from_plain(plain, "vcpu[0]") == SAMPLE_CPUID


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t[1].pop("edx"), "vcpu[0][1]: field 'edx' is missing"),
    (lambda t: t[0].update(eax=-5), "vcpu[0][0].eax"),
    (lambda t: t[0].update(leaf=1), "vcpu[0][0]: unknown field 'leaf'"),
    (lambda t: t.extend(t * 2048), "vcpu[0]: has 4098 entries, not 0..4096"),
])
def test_garbled_cpuid_table_is_refused_naming_the_entry(mutate, message):
    table = S.cpuid_to_plain(SAMPLE_CPUID)
    mutate(table)
    with pytest.raises(StateError, match=re.escape(message)):
        S.cpuid_from_plain(table, "vcpu[0]")


def test_garbled_vm_state_is_refused_naming_the_field():
    d = sample_vm_state().to_dict()
    d["pit"]["channels"] = d["pit"]["channels"][:2]
    with pytest.raises(StateError, match=r"kvm-vm\.pit\.channels: has 2 entries, not 3"):
        VmState.from_dict(d)
    d = sample_vm_state().to_dict()
    d["pit"]["channels"][0]["count_load_time"] = 1 << 63
    with pytest.raises(StateError, match=r"kvm-vm\.pit\.channels\[0\]\.count_load_time"):
        VmState.from_dict(d)
    d = sample_vm_state().to_dict()
    d["irqchip"]["ioapic"]["redirtbl"] = [0] * 23
    with pytest.raises(StateError, match=r"kvm-vm\.irqchip\.ioapic\.redirtbl"):
        VmState.from_dict(d)
    d = sample_vm_state().to_dict()
    d["clock"] = None  # only irqchip and pit may be absent
    with pytest.raises(StateError, match=r"kvm-vm\.clock: must be a dict"):
        VmState.from_dict(d)


def test_absent_optional_parts_are_accepted():
    d = sample_vm_state().to_dict()
    d["irqchip"] = d["pit"] = None
    state = VmState.from_dict(d)
    assert state.irqchip is None and state.pit is None
    d = sample_vcpu_state().to_dict()
    d["tsc_khz"] = None
    assert VcpuState.from_dict(d).tsc_khz is None


@pytest.mark.parametrize("data", [None, [], "kvm-vcpu", 5, {1: 2}, {"kind": "kvm-vcpu"}])
def test_not_a_state_at_all(data):
    with pytest.raises(StateError):
        VcpuState.from_dict(data)


def _leaves(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(d, list) and d:
        for i, v in enumerate(d):
            yield from _leaves(v, path + (i,))
    else:
        yield path


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.text(max_size=5),
                 st.binary(max_size=5), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                            st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_garbling_is_a_state_error_or_a_valid_state(data):
    d = sample_vcpu_state().to_dict()
    paths = list(_leaves(d))
    path = data.draw(st.sampled_from(paths))
    if path:
        _set(list(path), data.draw(JUNK))(d)
    try:
        VcpuState.from_dict(d)
    except StateError:
        pass


# -- the ioctl order, on a fake vCPU ---------------------------------------------------------------------
class FakeKvm:
    def __init__(self, caps=None):
        self.caps = caps or {B.KVM_CAP_GET_TSC_KHZ: 1}

    def check_extension(self, cap):
        return self.caps.get(cap, 0)

    def msr_index_list(self):
        return [0x10, 0x6E0, 0xDEAD, 0x174, 0x10]


class FakeVcpu:
    """Records the state ioctls in order; refuses to read MSR 0xdead."""

    def __init__(self, vcpu_id=1, tsc_khz=2_596_136):
        self.id, self.calls, self.tsc = vcpu_id, [], tsc_khz
        self.completion_pending = False
        self.vm = type("FakeVm", (), {"kvm": FakeKvm()})()

    def __getattr__(self, name):
        kinds = {"regs": B.kvm_regs, "sregs": B.kvm_sregs, "debugregs": B.kvm_debugregs,
                 "vcpu_events": B.kvm_vcpu_events, "xcrs": B.kvm_xcrs, "lapic": B.kvm_lapic_state}
        op, _, what = name.partition("_")

        def call(*args):
            self.calls.append((name, args))
            if op == "get":
                return {"mp": 0, "xsave": bytes(4096), "tsc": self.tsc}.get(what.split("_")[0]) \
                    if what not in kinds else kinds[what]()
        return call

    def get_msrs(self, indices):
        self.calls.append(("get_msrs", (list(indices),)))
        out = {}
        for i in indices:
            if i == 0xDEAD:
                break
            out[i] = i + 1
        return out

    def names(self):
        return [n for n, _ in self.calls]


def test_capture_order_and_unreadable_msrs():
    v = FakeVcpu()
    state = VcpuState.capture(v)
    names = v.names()
    assert names[0] == "get_mp_state" and names[-1] == "get_vcpu_events"
    assert state.msrs == {0x10: 0x11, 0x6E0: 0x6E1, 0x174: 0x175}  # 0xdead refused, duplicates dropped
    assert state.vcpu_id == 1 and state.tsc_khz == 2_596_136


def test_capture_without_get_tsc_khz_records_none():
    v = FakeVcpu()
    v.vm.kvm.caps = {}
    assert VcpuState.capture(v).tsc_khz is None
    assert "get_tsc_khz" not in v.names()


def test_capture_refuses_pending_io():
    v = FakeVcpu()
    v.completion_pending = True
    with pytest.raises(StateError, match="immediate_exit"):
        VcpuState.capture(v)
    assert v.calls == []


def test_restore_order():
    v = FakeVcpu()
    sample_vcpu_state().restore(v)
    sets = [(n, a) for n, a in v.calls if n.startswith("set_")]
    assert [n for n, _ in sets] == ["set_sregs", "set_regs", "set_xsave", "set_xcrs",
                                    "set_debugregs", "set_lapic", "set_msrs", "set_msrs",
                                    "set_vcpu_events", "set_mp_state"]
    msr_batches = [a[0] for n, a in sets if n == "set_msrs"]
    assert msr_batches == [[(0x10, 123456), (0xC0000082, 0xFFFF_FFFF_8100_0000)], [(0x6E0, 0)]]
    xcrs = next(a[0] for n, a in sets if n == "set_xcrs")
    assert (xcrs.nr_xcrs, xcrs.xcrs[0].xcr, xcrs.xcrs[0].value) == (1, 0, 7)


def test_restore_scales_the_tsc_only_beyond_the_tolerance():
    state = sample_vcpu_state()
    v = FakeVcpu(tsc_khz=state.tsc_khz + state.tsc_khz * 200 // 1_000_000)  # 200 ppm off
    state.restore(v)
    assert "set_tsc_khz" not in v.names()
    v = FakeVcpu(tsc_khz=state.tsc_khz + state.tsc_khz * 300 // 1_000_000)  # 300 ppm off
    state.restore(v)
    assert ("set_tsc_khz", (state.tsc_khz,)) in v.calls
    assert v.names().index("set_tsc_khz") < v.names().index("set_sregs")  # before the TSC MSR write
    v = FakeVcpu(tsc_khz=1)
    state.replace(tsc_khz=None).restore(v)
    assert "set_tsc_khz" not in v.names()


def test_restore_into_another_vcpu_is_refused():
    with pytest.raises(StateError, match="vCPU 1, not of vCPU 0"):
        sample_vcpu_state().restore(FakeVcpu(vcpu_id=0))
