"""seccomp-BPF allow-lists per VMM thread kind (``vcpu``, ``io``, ``control``, ``main``; issue #13).

Each thread installs its kind's filter on itself (:func:`install`) before it starts its work;
modes ``kill`` (default), ``log`` and ``off``.  A small ctypes binding of libseccomp, loaded on
the first install.  docs/confinement.md has the kinds, the lists and how to debug them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterable

from hypyr.errors import HypyrError
from hypyr.libc import function

MODES = ("kill", "log", "off")
DEFAULT_MODE = "kill"
KINDS = ("vcpu", "io", "control", "main")

# libseccomp actions (seccomp.h)
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000


def SCMP_ACT_ERRNO(err: int) -> int:  # the C macro's name
    return 0x00050000 | (err & 0xFFFF)


# filter attributes (enum scmp_filter_attr)
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_NNP = 3
_ATTR_CTL_OPTIMIZE = 8
# argument comparisons (enum scmp_compare)
_CMP_EQ = 4
_CMP_MASKED_EQ = 7

PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
CLONE_THREAD = 0x00010000
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0


class SeccompError(HypyrError):
    pass


# -- the allow-lists ---------------------------------------------------------------------------------
# What the Python runtime may do on any thread: allocator and GC (mmap/munmap/mremap/mprotect/
# madvise/brk), locks (futex), time, signals (the vCPU kick, rt_sigreturn), thread creation and
# exit, lazy imports (openat/newfstatat/getdents64/readlink/getcwd on sys.path), logging with
# rotation (rename/unlink, dup2 of stderr onto the new file), os.urandom (getrandom).
PYTHON = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close",
    "openat", "fstat", "newfstatat", "statx", "stat", "lstat", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "getcwd", "getdents64", "fcntl", "dup", "dup2", "dup3",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat",
    "fsync", "fdatasync", "ftruncate", "fchmod",
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    "futex", "set_robust_list", "get_robust_list", "rseq", "sched_yield", "sched_getaffinity",
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "uname", "sysinfo",
    "prlimit64", "getrlimit", "getrusage", "times", "umask",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "restart_syscall",
    "poll", "ppoll", "select", "pselect6", "pipe2", "eventfd2",
    "getrandom", "exit", "exit_group",
)
# every kind runs device code that drives KVM, vhost or a tap (ioctl), may write to a console
# client's socket (the console hub), and may start or stop watching a descriptor on the I/O
# thread's epoll (vhost-net starts on the vCPU thread that writes DRIVER_OK)
_DEVICE = ("ioctl", "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt")
_EPOLL = ("epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2")
_FILE_IO = ("preadv", "pwritev", "preadv2", "pwritev2", "fallocate", "sync_file_range")

ALLOW: dict[str, frozenset[str]] = {
    # _FILE_IO too: without ioeventfds (no in-kernel irqchip) a vCPU's MMIO exit runs the queue
    # notification, and so virtio-blk requests, itself (and starts the block workers)
    "vcpu": frozenset(PYTHON + _DEVICE + ("epoll_ctl",) + _FILE_IO),
    "io": frozenset(PYTHON + _DEVICE + _EPOLL + _FILE_IO),
    "control": frozenset(PYTHON + _DEVICE + _EPOLL + _FILE_IO + (
        "accept", "accept4", "connect", "bind", "listen", "getsockname", "getpeername", "recvfrom", "recvmsg",
        "flock")),
    # a reboot builds a new VM (KVM, guest RAM, eventfds, epoll, images, /dev/vhost-net, the vCPU
    # pinning); the end of the domain removes its socket and scheduler cgroup
    "main": frozenset(PYTHON + _DEVICE + _EPOLL + _FILE_IO + (
        "flock", "sched_setaffinity", "rmdir")),
}
# never allowed to any kind (tests check the lists against this; the filter's default action
# covers them, and clone is allowed only with CLONE_THREAD)
DENIED = frozenset((
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setfsuid", "setfsgid", "setgroups", "capset", "unshare", "setns", "reboot", "swapon", "swapoff",
    "userfaultfd", "personality", "socket", "clone", "clone3", "iopl", "ioperm", "acct", "settimeofday",
    "clock_settime", "adjtimex", "pidfd_getfd", "process_madvise", "name_to_handle_at", "open_by_handle_at",
))

# ioctl requests no kind may make (on a terminal the VMM holds, e.g. `hypyr run`'s stdin): typing
# into it, the VT console controls, redirecting the system console, loading a line discipline
DENIED_IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C, "TIOCCONS": 0x541D, "TIOCSETD": 0x5423}


# -- libseccomp ---------------------------------------------------------------------------------------
class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib: ctypes.CDLL | None = None
_prctl = function("prctl")        # variadic: arguments unchecked
_syscall = function("syscall")
_free = function("free", [ctypes.c_void_p], None)
_lib_lock = threading.Lock()


def _libseccomp() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
            except OSError:
                raise SeccompError("seccomp filtering needs libseccomp (apt-get install libseccomp2), "
                                   "or run with seccomp off") from None
            lib.seccomp_init.argtypes = [ctypes.c_uint32]
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_release.argtypes = [ctypes.c_void_p]
            lib.seccomp_release.restype = None
            lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
            lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                   ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
            lib.seccomp_load.argtypes = [ctypes.c_void_p]
            lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            lib.seccomp_export_pfc.argtypes = [ctypes.c_void_p, ctypes.c_int]
            _lib = lib
        return _lib


def syscall_number(name: str) -> int | None:
    """The x86-64 number of syscall ``name`` (None if libseccomp does not know it)."""
    nr = _libseccomp().seccomp_syscall_resolve_name(name.encode())
    return None if nr < 0 else nr


def syscall_name(nr: int) -> str | None:
    """The name of x86-64 syscall ``nr`` (for reading the kernel's seccomp log lines)."""
    lib = _libseccomp()
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p   # malloc'd: freed here
    p = lib.seccomp_syscall_resolve_num_arch(0, nr)
    if not p:
        return None
    try:
        return ctypes.string_at(p).decode()
    finally:
        _free(p)


def check_mode(mode: object, what: str = "seccomp") -> str:
    """``mode`` if it is one of :data:`MODES`; one sentence otherwise."""
    if mode not in MODES:
        raise HypyrError(f"{what} must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


class _Filter:
    """A libseccomp filter context being built (released by :meth:`close`)."""

    def __init__(self, default: int):
        self.lib = _libseccomp()
        self.ctx = self.lib.seccomp_init(default)
        if not self.ctx:
            raise SeccompError("seccomp_init failed")

    def attr(self, attr: int, value: int, required: bool = True) -> None:
        rc = self.lib.seccomp_attr_set(self.ctx, attr, value)
        if rc < 0 and required:
            raise SeccompError(f"seccomp_attr_set({attr}) failed: {os.strerror(-rc)}")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # a syscall this architecture does not have (e.g. "time" variants): nothing to allow
        arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise SeccompError(f"seccomp rule for {name} failed: {os.strerror(-rc)}")

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        if rc < 0:
            raise SeccompError(f"cannot load the seccomp filter: {os.strerror(-rc)}")

    def export_pfc(self, fd: int) -> None:
        self.lib.seccomp_export_pfc(self.ctx, fd)

    def close(self) -> None:
        if self.ctx:
            self.lib.seccomp_release(self.ctx)
            self.ctx = None


def build(kind: str, mode: str, extra: Iterable[str] = ()) -> _Filter:
    """The filter for a thread of ``kind`` in ``mode`` (kill or log), not loaded."""
    if kind not in ALLOW:
        raise ValueError(f"unknown seccomp thread kind {kind!r}")
    check_mode(mode)
    if mode == "off":
        raise ValueError("no filter is built for seccomp mode off")
    deny = SCMP_ACT_KILL_PROCESS if mode == "kill" else SCMP_ACT_LOG
    f = _Filter(deny)
    try:
        f.attr(_ATTR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)   # x32 and i386 syscalls, in every mode
        f.attr(_ATTR_CTL_NNP, 1)
        f.attr(_ATTR_CTL_OPTIMIZE, 2, required=False)      # a binary tree (libseccomp >= 2.5)
        for name in sorted(ALLOW[kind] | set(extra)):
            f.rule(SCMP_ACT_ALLOW, name)
        f.rule(SCMP_ACT_ALLOW, "clone", (0, _CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        f.rule(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
        # a thread this one creates confines itself further (another filter can only restrict)
        for option in (PR_SET_NO_NEW_PRIVS, PR_GET_SECCOMP, PR_SET_SECCOMP):
            f.rule(SCMP_ACT_ALLOW, "prctl", (0, _CMP_EQ, option, 0))
        f.rule(SCMP_ACT_ALLOW, "seccomp")
        if kind == "control":
            for family in (AF_UNIX, AF_INET, AF_INET6):
                f.rule(SCMP_ACT_ALLOW, "socket", (0, _CMP_EQ, family, 0))
            f.rule(SCMP_ACT_ALLOW, "socket", (0, _CMP_EQ, AF_NETLINK, 0), (2, _CMP_EQ, NETLINK_ROUTE, 0))
    except BaseException:
        f.close()
        raise
    return f


def _no_new_privs() -> None:
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(e)}")


def build_ioctl_guard(mode: str) -> _Filter:
    """A second filter every kind loads: ``ioctl`` is allowed (KVM, vhost, taps, Python's isatty),
    but not the terminal requests that act outside the process (:data:`DENIED_IOCTLS`), compared
    on the low 32 bits, which are all the kernel reads of the request."""
    f = _Filter(SCMP_ACT_ALLOW)
    try:
        f.attr(_ATTR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)
        deny = SCMP_ACT_KILL_PROCESS if check_mode(mode) == "kill" else SCMP_ACT_LOG
        for request in DENIED_IOCTLS.values():
            f.rule(deny, "ioctl", (1, _CMP_MASKED_EQ, 0xFFFFFFFF, request))
    except BaseException:
        f.close()
        raise
    return f


def install(kind: str, mode: str) -> None:
    """Confine the calling thread (and the threads it creates from now on) to ``kind``'s list;
    nothing for mode ``off``."""
    if check_mode(mode) == "off":
        return
    _no_new_privs()
    for make in (lambda: build(kind, mode), lambda: build_ioctl_guard(mode)):
        f = make()
        try:
            f.load()
        finally:
            f.close()


def filtered() -> bool:
    """Does the calling thread run under a seccomp filter?"""
    return _prctl(PR_GET_SECCOMP, 0, 0, 0, 0) == 2


# -- the test-only hook ---------------------------------------------------------------------------
SYS_personality = 135   # x86-64; in every kind's DENIED, and harmless if let through (a query)


def forbidden_syscall() -> int:
    """Make one syscall that no thread kind allows (``personality(0xffffffff)``, which only reads
    the persona when it does run): under a ``kill`` filter the process dies of SIGSYS."""
    return _syscall(SYS_personality, ctypes.c_ulong(0xFFFFFFFF))


__all__ = ["MODES", "DEFAULT_MODE", "KINDS", "ALLOW", "DENIED", "PYTHON", "SeccompError", "check_mode",
           "build", "syscall_name", "install", "filtered", "syscall_number", "forbidden_syscall"]
