"""Raw KVM ABI: ioctl numbers, capability numbers and ctypes mirrors of the kernel structs.

Layouts follow include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h (x86-64).
Nothing here does anything; :mod:`hypyr.kvm` wraps it.
"""

from __future__ import annotations

import ctypes as C

KVMIO = 0xAE
KVM_API_VERSION = 12


def _IO(nr: int) -> int:
    return (KVMIO << 8) | nr


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IOW(nr: int, t) -> int:
    return _IOC(1, nr, C.sizeof(t))


def _IOR(nr: int, t) -> int:
    return _IOC(2, nr, C.sizeof(t))


def _IOWR(nr: int, t) -> int:
    return _IOC(3, nr, C.sizeof(t))


# --- structs -------------------------------------------------------------------------------
class kvm_userspace_memory_region(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32), ("guest_phys_addr", C.c_uint64),
                ("memory_size", C.c_uint64), ("userspace_addr", C.c_uint64)]


class kvm_regs(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint32), ("selector", C.c_uint16),
                ("type", C.c_uint8), ("present", C.c_uint8), ("dpl", C.c_uint8), ("db", C.c_uint8),
                ("s", C.c_uint8), ("l", C.c_uint8), ("g", C.c_uint8), ("avl", C.c_uint8),
                ("unusable", C.c_uint8), ("padding", C.c_uint8)]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


class kvm_sregs(C.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", C.c_uint64), ("cr2", C.c_uint64), ("cr3", C.c_uint64), ("cr4", C.c_uint64),
                ("cr8", C.c_uint64), ("efer", C.c_uint64), ("apic_base", C.c_uint64),
                ("interrupt_bitmap", C.c_uint64 * 4)]


class kvm_fpu(C.Structure):
    _fields_ = [("fpr", (C.c_uint8 * 16) * 8), ("fcw", C.c_uint16), ("fsw", C.c_uint16),
                ("ftwx", C.c_uint8), ("pad1", C.c_uint8), ("last_opcode", C.c_uint16),
                ("last_ip", C.c_uint64), ("last_dp", C.c_uint64), ("xmm", (C.c_uint8 * 16) * 16),
                ("mxcsr", C.c_uint32), ("pad2", C.c_uint32)]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


class kvm_msrs_header(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [("function", C.c_uint32), ("index", C.c_uint32), ("flags", C.c_uint32),
                ("eax", C.c_uint32), ("ebx", C.c_uint32), ("ecx", C.c_uint32), ("edx", C.c_uint32),
                ("padding", C.c_uint32 * 3)]


class kvm_cpuid2_header(C.Structure):
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", C.c_uint8 * 1024)]


class kvm_mp_state(C.Structure):
    _fields_ = [("mp_state", C.c_uint32)]


class kvm_irq_level(C.Structure):
    _fields_ = [("irq", C.c_uint32), ("level", C.c_uint32)]


class kvm_pit_config(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("pad", C.c_uint32 * 15)]


class kvm_irqfd(C.Structure):
    _fields_ = [("fd", C.c_uint32), ("gsi", C.c_uint32), ("flags", C.c_uint32),
                ("resamplefd", C.c_uint32), ("pad", C.c_uint8 * 16)]


class kvm_ioeventfd(C.Structure):
    _fields_ = [("datamatch", C.c_uint64), ("addr", C.c_uint64), ("len", C.c_uint32),
                ("fd", C.c_int32), ("flags", C.c_uint32), ("pad", C.c_uint8 * 36)]


# --- state save/restore (KVM_GET/SET_* of the vCPU and VM) -----------------------------------
class kvm_msr_list_header(C.Structure):  # followed by nmsrs u32 MSR indices
    _fields_ = [("nmsrs", C.c_uint32)]


class kvm_exception_events(C.Structure):
    _fields_ = [("injected", C.c_uint8), ("nr", C.c_uint8), ("has_error_code", C.c_uint8),
                ("pending", C.c_uint8), ("error_code", C.c_uint32)]


class kvm_interrupt_events(C.Structure):
    _fields_ = [("injected", C.c_uint8), ("nr", C.c_uint8), ("soft", C.c_uint8), ("shadow", C.c_uint8)]


class kvm_nmi_events(C.Structure):
    _fields_ = [("injected", C.c_uint8), ("pending", C.c_uint8), ("masked", C.c_uint8), ("pad", C.c_uint8)]


class kvm_smi_events(C.Structure):
    _fields_ = [("smm", C.c_uint8), ("pending", C.c_uint8), ("smm_inside_nmi", C.c_uint8),
                ("latched_init", C.c_uint8)]


class kvm_triple_fault_events(C.Structure):
    _fields_ = [("pending", C.c_uint8)]


class kvm_vcpu_events(C.Structure):
    _fields_ = [("exception", kvm_exception_events), ("interrupt", kvm_interrupt_events),
                ("nmi", kvm_nmi_events), ("sipi_vector", C.c_uint32), ("flags", C.c_uint32),
                ("smi", kvm_smi_events), ("triple_fault", kvm_triple_fault_events),
                ("reserved", C.c_uint8 * 26), ("exception_has_payload", C.c_uint8),
                ("exception_payload", C.c_uint64)]


class kvm_debugregs(C.Structure):
    _fields_ = [("db", C.c_uint64 * 4), ("dr6", C.c_uint64), ("dr7", C.c_uint64), ("flags", C.c_uint64),
                ("reserved", C.c_uint64 * 9)]


class kvm_xsave(C.Structure):
    """The legacy 4 KiB buffer; KVM_GET_XSAVE2 and KVM_SET_XSAVE may use more (KVM_CAP_XSAVE2)."""
    _fields_ = [("region", C.c_uint32 * 1024)]


class kvm_xcr(C.Structure):
    _fields_ = [("xcr", C.c_uint32), ("reserved", C.c_uint32), ("value", C.c_uint64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(C.Structure):
    _fields_ = [("nr_xcrs", C.c_uint32), ("flags", C.c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", C.c_uint64 * 16)]


class kvm_pic_state(C.Structure):
    _fields_ = [(n, C.c_uint8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
        "init4", "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(C.Structure):
    # each redirection entry as its raw 64 bits (the kernel's union with a bitfield view)
    _fields_ = [("base_address", C.c_uint64), ("ioregsel", C.c_uint32), ("id", C.c_uint32),
                ("irr", C.c_uint32), ("pad", C.c_uint32), ("redirtbl", C.c_uint64 * KVM_IOAPIC_NUM_PINS)]


class _irqchip_union(C.Union):
    _fields_ = [("dummy", C.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(C.Structure):
    _fields_ = [("chip_id", C.c_uint32), ("pad", C.c_uint32), ("chip", _irqchip_union)]


class kvm_pit_channel_state(C.Structure):
    _fields_ = [("count", C.c_uint32), ("latched_count", C.c_uint16), ("count_latched", C.c_uint8),
                ("status_latched", C.c_uint8), ("status", C.c_uint8), ("read_state", C.c_uint8),
                ("write_state", C.c_uint8), ("write_latch", C.c_uint8), ("rw_mode", C.c_uint8),
                ("mode", C.c_uint8), ("bcd", C.c_uint8), ("gate", C.c_uint8), ("count_load_time", C.c_int64)]


class kvm_pit_state2(C.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", C.c_uint32), ("reserved", C.c_uint32 * 9)]


class kvm_clock_data(C.Structure):
    _fields_ = [("clock", C.c_uint64), ("flags", C.c_uint32), ("pad0", C.c_uint32), ("realtime", C.c_uint64),
                ("host_tsc", C.c_uint64), ("pad", C.c_uint32 * 4)]


class kvm_dirty_log(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("padding1", C.c_uint32), ("dirty_bitmap", C.c_uint64)]  # a pointer


class kvm_clear_dirty_log(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("num_pages", C.c_uint32), ("first_page", C.c_uint64),
                ("dirty_bitmap", C.c_uint64)]  # a pointer


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32), ("args", C.c_uint64 * 4), ("pad", C.c_uint8 * 64)]


# kvm_run and its exit union (offset 32, 256 bytes)
class _exit_io(C.Structure):
    _fields_ = [("direction", C.c_uint8), ("size", C.c_uint8), ("port", C.c_uint16),
                ("count", C.c_uint32), ("data_offset", C.c_uint64)]


class _exit_mmio(C.Structure):
    _fields_ = [("phys_addr", C.c_uint64), ("data", C.c_uint8 * 8), ("len", C.c_uint32),
                ("is_write", C.c_uint8)]


class _exit_fail_entry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", C.c_uint64), ("cpu", C.c_uint32)]


class _exit_internal(C.Structure):
    _fields_ = [("suberror", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class _exit_system_event(C.Structure):
    _fields_ = [("type", C.c_uint32), ("ndata", C.c_uint32), ("data", C.c_uint64 * 16)]


class _exit_ex(C.Structure):
    _fields_ = [("exception", C.c_uint32), ("error_code", C.c_uint32)]


class _exit_union(C.Union):
    _fields_ = [("io", _exit_io), ("mmio", _exit_mmio), ("fail_entry", _exit_fail_entry),
                ("internal", _exit_internal), ("system_event", _exit_system_event),
                ("ex", _exit_ex), ("hw", C.c_uint64), ("padding", C.c_uint8 * 256)]


class kvm_run(C.Structure):
    _fields_ = [("request_interrupt_window", C.c_uint8), ("immediate_exit", C.c_uint8),
                ("padding1", C.c_uint8 * 6), ("exit_reason", C.c_uint32),
                ("ready_for_interrupt_injection", C.c_uint8), ("if_flag", C.c_uint8),
                ("flags", C.c_uint16), ("cr8", C.c_uint64), ("apic_base", C.c_uint64),
                ("exit", _exit_union), ("kvm_valid_regs", C.c_uint64), ("kvm_dirty_regs", C.c_uint64)]


assert C.sizeof(kvm_segment) == 24 and C.sizeof(kvm_sregs) == 312 and C.sizeof(kvm_regs) == 144
assert C.sizeof(kvm_fpu) == 416 and C.sizeof(kvm_run) == 304 and C.sizeof(kvm_cpuid_entry2) == 40
assert C.sizeof(kvm_vcpu_events) == 64 and kvm_vcpu_events.exception_payload.offset == 56
assert C.sizeof(kvm_debugregs) == 128 and C.sizeof(kvm_xsave) == 4096 and C.sizeof(kvm_xcrs) == 392
assert C.sizeof(kvm_pic_state) == 16 and C.sizeof(kvm_ioapic_state) == 216 and C.sizeof(kvm_irqchip) == 520
assert C.sizeof(kvm_pit_channel_state) == 24 and C.sizeof(kvm_pit_state2) == 112
assert C.sizeof(kvm_clock_data) == 48 and C.sizeof(kvm_msr_list_header) == 4
assert C.sizeof(kvm_dirty_log) == 16 and C.sizeof(kvm_clear_dirty_log) == 24 and C.sizeof(kvm_enable_cap) == 104

# --- ioctl numbers -------------------------------------------------------------------------
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, kvm_msr_list_header)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, kvm_cpuid2_header)
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(0x63, kvm_irqchip)  # sic: the kernel's header says _IOR
KVM_IRQFD = _IOW(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(0x7C, kvm_clock_data)
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, kvm_regs)
KVM_SET_REGS = _IOW(0x82, kvm_regs)
KVM_GET_SREGS = _IOR(0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, kvm_msrs_header)
KVM_SET_MSRS = _IOW(0x89, kvm_msrs_header)
KVM_GET_FPU = _IOR(0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, kvm_cpuid2_header)
KVM_GET_CPUID2 = _IOWR(0x91, kvm_cpuid2_header)
KVM_GET_MP_STATE = _IOR(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(0x99, kvm_mp_state)
KVM_NMI = _IO(0x9A)
KVM_GET_PIT2 = _IOR(0x9F, kvm_pit_state2)          # VM ioctl; shares 0x9f with the vCPU's GET_VCPU_EVENTS
KVM_SET_PIT2 = _IOW(0xA0, kvm_pit_state2)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(0xA2)
KVM_GET_TSC_KHZ = _IO(0xA3)
KVM_ENABLE_CAP = _IOW(0xA3, kvm_enable_cap)
KVM_GET_XSAVE = _IOR(0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(0xA7, kvm_xcrs)
KVM_CLEAR_DIRTY_LOG = _IOWR(0xC0, kvm_clear_dirty_log)
KVM_GET_XSAVE2 = _IOR(0xCF, kvm_xsave)

# --- capabilities --------------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_READONLY_MEM = 81
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE2 = 208

# --- exit reasons --------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3

KVM_PIT_SPEAKER_DUMMY = 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

# kvm_clock_data.flags (KVM_CHECK_EXTENSION(KVM_CAP_ADJUST_CLOCK) returns the ones supported)
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# kvm_vcpu_events.flags: which optional fields KVM_SET_VCPU_EVENTS should take
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

EXIT_REASON_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in dict(globals()).items()
                     if k.startswith("KVM_EXIT_") and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
