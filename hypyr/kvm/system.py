"""The KVM system handle (/dev/kvm): what the host's KVM offers, and new VMs."""

from __future__ import annotations

import ctypes as C
import errno
import os

from . import bindings as B
from .ioctl import CpuidEntry, KvmError, call, get_cpuid
from .vm import Vm


class KvmUnavailable(Exception):
    """/dev/kvm is missing, unusable or too old; str() is one sentence for the user."""


class Kvm:
    """The system fd (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self._msr_index_list: list[int] | None = None
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: load the kvm module (kvm-intel or kvm-amd) or run on a host "
                                 "with KVM") from None
        except PermissionError:
            raise KvmUnavailable(f"no permission to open {path}: run as root or add your user to the 'kvm' "
                                 "group") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            try:
                version = call(self.fd, B.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
            except KvmError as e:  # e.g. ENOTTY: the path is not a KVM device at all
                raise KvmUnavailable(f"{path} is not a KVM device ({e.strerror})") from None
            if version != B.KVM_API_VERSION:
                raise KvmUnavailable(f"{path} speaks KVM API {version}, hypyr needs {B.KVM_API_VERSION}")
            for cap, name in ((B.KVM_CAP_USER_MEMORY, "USER_MEMORY"), (B.KVM_CAP_IRQCHIP, "IRQCHIP"),
                              (B.KVM_CAP_PIT2, "PIT2"), (B.KVM_CAP_EXT_CPUID, "EXT_CPUID"),
                              (B.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT")):
                if not self.check_extension(cap):
                    raise KvmUnavailable(f"{path} lacks the KVM capability {name} that hypyr needs")
            self.vcpu_mmap_size = call(self.fd, B.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            self.close()  # do not leak the fd of a device we refuse
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return call(self.fd, B.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION")

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(B.KVM_CAP_MAX_VCPUS) or self.check_extension(B.KVM_CAP_NR_VCPUS) or 4

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension(B.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID, asked once per handle (it does not change; a migration's
        downtime asks for it twice)."""
        if self._supported_cpuid is None:
            self._supported_cpuid = tuple(get_cpuid(self.fd, B.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID"))
        return list(self._supported_cpuid)

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST), in KVM's order."""
        if self._msr_index_list is None:
            header = B.kvm_msr_list_header(nmsrs=0)
            try:  # a first call with room for none says how many there are
                call(self.fd, B.KVM_GET_MSR_INDEX_LIST, header, what="KVM_GET_MSR_INDEX_LIST")
            except KvmError as e:
                if e.errno != errno.E2BIG:
                    raise
            n = header.nmsrs

            class kvm_msr_list(C.Structure):
                _fields_ = [("nmsrs", C.c_uint32), ("indices", C.c_uint32 * n)]
            buf = kvm_msr_list(nmsrs=n)
            call(self.fd, B.KVM_GET_MSR_INDEX_LIST, buf, what="KVM_GET_MSR_INDEX_LIST")
            self._msr_index_list = list(buf.indices[:buf.nmsrs])
        return list(self._msr_index_list)

    def create_vm(self) -> Vm:
        fd = call(self.fd, B.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")
        return Vm(self, fd)

