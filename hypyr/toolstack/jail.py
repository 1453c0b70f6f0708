"""The jail of a domain's VMM: its own uid and gid, no capabilities, a mount namespace holding
only what it needs, rlimits (issue #13; the design and its limits are in docs/confinement.md).

The domain process forks its VMM (hypyr.toolstack.supervisor); the child calls :func:`enter`
while it is still single-threaded, before it builds the VM.  Everything privileged (the
registry, cgroups, taps, opening the disk images and kernel) stays with the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat
import sys
from dataclasses import dataclass, field

from hypyr.errors import HypyrError
from hypyr.libc import function
from hypyr.memory import address_space

UID_BASE = 0x70000000   # domain d's VMM runs as uid = gid = UID_BASE + d (an unused range; $HYPYR_JAIL_UID_BASE)
ADDRESS_SPACE_EXTRA = 8 << 30   # RLIMIT_AS: guest RAM's reservation plus this (thread stacks, malloc arenas, libraries)
OPEN_FILES = 4096
THREADS = 4096          # RLIMIT_NPROC: the VMM's uid is its own, so this bounds its threads

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_PIVOT_ROOT = 155    # x86-64

# host files the VMM reads after the jail, bound read-only at the same path: name lookups of a
# migration's host, the clock's zone, the memory check and CPU count of each boot, the boot id
# a migration stream carries
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
              "/etc/localtime", "/proc/meminfo", "/proc/sys/kernel/random/boot_id",
              "/sys/devices/system/cpu/online")
LIBRARY_DIRS = ("/usr", "/lib", "/lib64")   # shared libraries Python may still load (lazy imports)
# (path, mode, owned by the VMM): device nodes made in the jail's /dev, numbers as on the host
DEVICES = (("/dev/kvm", 0o600, True), ("/dev/vhost-net", 0o600, True), ("/dev/null", 0o666, False),
           ("/dev/zero", 0o666, False), ("/dev/urandom", 0o666, False), ("/dev/random", 0o666, False))


class JailError(HypyrError):
    """The VMM could not be confined: one sentence."""


@dataclass(frozen=True)
class Jail:
    """What :func:`enter` makes of the VMM process (see :func:`plan`)."""
    uid: int
    gid: int
    root: str                                   # the tmpfs that becomes "/", mounted in the VMM's namespace only
    read_only: tuple[str, ...]                  # host paths visible read-only, at the same path
    writable: tuple[str, ...]                   # host paths visible read-write (the domain's directory)
    devices: tuple[tuple[str, int, bool, int], ...] = field(default=())   # (path, mode, owned, rdev)
    address_space: int = 0                      # RLIMIT_AS in bytes

    def describe(self) -> dict:
        """The jail as `info` shows it."""
        return {"uid": self.uid, "gid": self.gid, "root": "a private tmpfs", "read_only": list(self.read_only),
                "writable": list(self.writable), "devices": [d[0] for d in self.devices],
                "capabilities": "none", "no_new_privs": True,
                "rlimits": {"nofile": OPEN_FILES, "nproc": THREADS, "as": self.address_space, "core": 0}}


def uid_base() -> int:
    raw = os.environ.get("HYPYR_JAIL_UID_BASE", "")
    try:
        base = int(raw) if raw else UID_BASE
    except ValueError:
        raise JailError(f"HYPYR_JAIL_UID_BASE must be a number, not {raw!r}") from None
    if not 1000 <= base <= 0xFFFF0000:
        raise JailError(f"HYPYR_JAIL_UID_BASE must be between 1000 and {0xFFFF0000}, not {base}")
    return base


def _python_dirs() -> list[str]:
    """Where this interpreter imports from: sys.path's directories and hypyr's package.  The
    directory holding the package (a checkout on sys.path, as an editable install puts it) is
    not: of a checkout, the VMM sees the package alone."""
    import hypyr
    package = os.path.dirname(os.path.abspath(hypyr.__file__))
    skip = (os.getcwd(), os.path.dirname(package))
    dirs = [p for p in sys.path if p and os.path.isdir(p) and os.path.abspath(p) not in skip]
    dirs.append(package)
    return dirs


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """``paths`` without duplicates and without those inside another of them, shortest first."""
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in paths}, key=lambda p: (p.count("/"), p)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return tuple(out)


def plan(domid: int, domain_dir: str, memory: int, root: str) -> Jail:
    """The jail of domain ``domid``'s VMM: its tmpfs mounted on ``root`` (an empty directory),
    ``domain_dir`` writable, guest RAM of ``memory`` bytes."""
    base = uid_base()
    ro = [d for d in LIBRARY_DIRS if os.path.isdir(d) and not os.path.islink(d)] + _python_dirs()
    files = tuple(f for f in HOST_FILES if os.path.isfile(f))
    devices = []
    for path, mode, owned in DEVICES:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            devices.append((path, mode, owned, st.st_rdev))
    return Jail(uid=base + domid, gid=base + domid, root=root,
                read_only=_outermost(ro) + files, writable=(os.path.abspath(domain_dir),),
                devices=tuple(devices), address_space=address_space(memory) + ADDRESS_SPACE_EXTRA)


def give_directory(jail: Jail, path: str, files: tuple[str, ...]) -> None:
    """The domain's directory as the VMM's: group-writable and sticky (it may add and rotate its own
    files, never remove the supervisor's), ``files`` in it owned by the VMM."""
    os.chown(path, 0, jail.gid)
    os.chmod(path, 0o1770)
    for name in files:
        try:
            os.chown(os.path.join(path, name), jail.uid, jail.gid, follow_symlinks=False)
        except FileNotFoundError:
            pass


# -- in the VMM process ---------------------------------------------------------------------------
_unshare = function("unshare", [ctypes.c_int])
_mount = function("mount", [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p])
_umount2 = function("umount2", [ctypes.c_char_p, ctypes.c_int])
_syscall = function("syscall", None, ctypes.c_long)
_prctl = function("prctl", None)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise JailError(f"cannot confine the VMM: {what} failed: {os.strerror(e)}")


def _encode(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _mount_call(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None, what: str) -> None:
    _check(_mount(_encode(src), _encode(dst), _encode(fstype), flags, _encode(data)), what)


def _inside(root: str, path: str, is_dir: bool = False) -> str:
    """Host ``path``'s place inside ``root``, its parent directories made (0755; itself too if ``is_dir``)."""
    target = root + path
    os.makedirs(target if is_dir else os.path.dirname(target), mode=0o755, exist_ok=True)
    return target


def _bind(root: str, path: str, read_only: bool) -> None:
    is_dir = os.path.isdir(path)
    target = _inside(root, path, is_dir)
    if not is_dir and not os.path.exists(target):   # a file's mount point is a file
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    _mount_call(path, target, None, MS_BIND, None, f"binding {path}")
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else MS_NOEXEC)
    _mount_call(None, target, None, flags, None, f"making {path} {'read-only' if read_only else 'nosuid'}")


def enter(jail: Jail) -> None:
    """Confine this process (single-threaded: a fork of the domain process) to ``jail``; JailError if not."""
    if os.geteuid() != 0:
        raise JailError('cannot confine the VMM: it does not run as root (jail = "off" runs it unconfined)')
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    sys.path[:] = [os.getcwd() if p == "" else p for p in sys.path]
    umask = os.umask(0o022)    # the jail's directories: 0755, whatever the domain process's umask
    _check(_unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount_call(None, "/", None, MS_REC | MS_PRIVATE, None, "making the mounts private")
    _mount_call("tmpfs", jail.root, "tmpfs", MS_NOSUID, "mode=0755,size=1m,nr_inodes=4096", "mounting its root")
    for path in jail.read_only:
        _bind(jail.root, path, True)
    for path in jail.writable:
        _bind(jail.root, path, False)
    for d in ("/lib", "/lib64"):     # merged /usr: the loader's paths as on the host
        if os.path.islink(d):
            os.symlink(os.readlink(d), jail.root + d)
    for path, mode, owned, rdev in jail.devices:
        target = _inside(jail.root, path)
        os.mknod(target, stat.S_IFCHR | mode, rdev)
        os.chmod(target, mode)
        if owned:
            os.chown(target, jail.uid, jail.gid)
    old = jail.root + "/.old"
    os.umask(umask)
    os.mkdir(old, 0o700)
    _check(_syscall(SYS_PIVOT_ROOT, jail.root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_umount2(b"/.old", MNT_DETACH), "detaching the host's tree")
    os.rmdir("/.old")
    _mount_call(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID, None, "making its root read-only")
    for cap in range(last_cap + 1):
        _check(_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    os.setgroups([])
    os.setresgid(jail.gid, jail.gid, jail.gid)
    os.setresuid(jail.uid, jail.uid, jail.uid)   # from root, without keep-caps: every capability goes
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _check(_prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")   # cleared by setresuid
    for res, value in ((resource.RLIMIT_NOFILE, OPEN_FILES), (resource.RLIMIT_NPROC, THREADS),
                       (resource.RLIMIT_AS, jail.address_space), (resource.RLIMIT_CORE, 0)):
        _soft, hard = resource.getrlimit(res)
        limit = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (limit, limit))
