"""vhost-net: the virtio-net data path in the host kernel (Documentation: drivers/vhost, and
kvmtool's virtio/vhost.c for the set-up order).

The VMM keeps the device model (config space, features, status); at DRIVER_OK it hands the
kernel the guest memory map, each ring's addresses and progress, the KVM ioeventfd of each
queue (kick) and the irqfd of the device's interrupt (call), and the TAP as the backend.
Closing the vhost descriptor stops it (device reset).

Save/restore: :meth:`VhostNet.suspend` detaches the backend (the kernel finishes what it took)
and reads each ring's last avail index back (VHOST_GET_VRING_BASE); the device model puts it in
its queues, whose state is what gets saved, and :meth:`VhostNet.start` programs the rings from
the (restored) queues again, with that index.  The kernel reads the used index from the ring
itself.

Live migration (#11): while vhost runs, its writes into guest RAM bypass KVM's dirty-page log
and the VMM's own, so during a migration the NIC runs on the userspace data path instead
(``VirtioNet.vhost_allowed``, docs/migration.md).  A vhost dirty log (VHOST_SET_LOG_BASE with
VHOST_F_LOG_ALL, VHOST_VRING_F_LOG on the rings) would keep vhost running; not done.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, Sequence

from hypyr.memory import GuestMemory

VHOST_DEVICE = "/dev/vhost-net"

VHOST_GET_FEATURES = 0x8008AF00
VHOST_SET_FEATURES = 0x4008AF00
VHOST_SET_OWNER = 0x0000AF01
VHOST_SET_MEM_TABLE = 0x4008AF03
VHOST_SET_VRING_NUM = 0x4008AF10
VHOST_SET_VRING_ADDR = 0x4028AF11
VHOST_SET_VRING_BASE = 0x4008AF12
VHOST_GET_VRING_BASE = 0xC008AF12
VHOST_SET_VRING_KICK = 0x4008AF20
VHOST_SET_VRING_CALL = 0x4008AF21
VHOST_NET_SET_BACKEND = 0x4008AF30

_MEM_REGION = struct.Struct("<QQQQ")   # guest_phys_addr, memory_size, userspace_addr, flags_padding
_VRING_STATE = struct.Struct("<II")    # index, num
_VRING_FILE = struct.Struct("<Ii")     # index, fd
_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log


class VhostError(Exception):
    """vhost-net refused a step; the message names it."""


def usable() -> bool:
    """Whether /dev/vhost-net can be opened here."""
    try:
        os.close(os.open(VHOST_DEVICE, os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


class QueueRing:
    """What vhost needs of one virtqueue (a plain record, so this module needs no queue type)."""
    __slots__ = ("size", "desc", "avail", "used", "last_avail")

    def __init__(self, size: int, desc: int, avail: int, used: int, last_avail: int):
        self.size, self.desc, self.avail, self.used, self.last_avail = size, desc, avail, used, last_avail


class VhostNet:
    """One vhost-net instance for one device: :meth:`start` at DRIVER_OK, :meth:`stop` at reset."""

    def __init__(self, tap_fd: int, kick_fds: Sequence[int], call_fd: int,
                 on_running: Callable[[bool], None] | None = None):
        """``kick_fds``: the KVM ioeventfd of each queue; ``call_fd``: the device's irqfd;
        ``on_running(bool)`` tells the VMM to stop (True) or resume (False) watching the
        kicks and the TAP itself."""
        self.tap_fd, self.kick_fds, self.call_fd = tap_fd, list(kick_fds), call_fd
        self._on_running = on_running
        self._fd: int | None = None
        self._nrings = 0

    @property
    def running(self) -> bool:
        return self._fd is not None

    def start(self, mem: GuestMemory, rings: Sequence[QueueRing], features: int) -> None:
        """Hand the data path to the kernel.  Raises VhostError (and leaves vhost stopped)."""
        self.stop()
        try:
            fd = os.open(VHOST_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostError(f"cannot open {VHOST_DEVICE}: {e.strerror}") from None
        self._fd = fd
        self._nrings = len(rings)
        try:
            self._setup(fd, mem, rings, features)
        except OSError as e:
            self.stop()
            raise VhostError(f"vhost-net set-up failed: {e}") from None

    def _setup(self, fd: int, mem: GuestMemory, rings: Sequence[QueueRing], features: int) -> None:
        _ioctl(fd, VHOST_SET_OWNER, 0, "SET_OWNER")
        offered = struct.unpack("<Q", _ioctl(fd, VHOST_GET_FEATURES, bytes(8), "GET_FEATURES"))[0]
        _ioctl(fd, VHOST_SET_FEATURES, struct.pack("<Q", features & offered), "SET_FEATURES")
        table = bytearray(struct.pack("<II", len(mem.regions), 0))
        for r in mem.regions:
            table += _MEM_REGION.pack(int(r.start), r.size, r.host_address(), 0)
        _ioctl(fd, VHOST_SET_MEM_TABLE, bytes(table), "SET_MEM_TABLE")
        for i, ring in enumerate(rings):
            _ioctl(fd, VHOST_SET_VRING_NUM, _VRING_STATE.pack(i, ring.size), "SET_VRING_NUM")
            _ioctl(fd, VHOST_SET_VRING_BASE, _VRING_STATE.pack(i, ring.last_avail), "SET_VRING_BASE")
            addr = _VRING_ADDR.pack(i, 0, _host(mem, ring.desc), _host(mem, ring.used), _host(mem, ring.avail), 0)
            _ioctl(fd, VHOST_SET_VRING_ADDR, addr, "SET_VRING_ADDR")
            _ioctl(fd, VHOST_SET_VRING_KICK, _VRING_FILE.pack(i, self.kick_fds[i]), "SET_VRING_KICK")
            _ioctl(fd, VHOST_SET_VRING_CALL, _VRING_FILE.pack(i, self.call_fd), "SET_VRING_CALL")
        for i in range(len(rings)):
            _ioctl(fd, VHOST_NET_SET_BACKEND, _VRING_FILE.pack(i, self.tap_fd), "NET_SET_BACKEND")
        # the driver may have kicked before vhost watched the eventfds: look at the rings once
        if self._on_running is not None:
            self._on_running(True)
        for kick in self.kick_fds[:len(rings)]:
            os.eventfd_write(kick, 1)

    def suspend(self) -> list[int]:
        """Stop the kernel's data path for a save: detach the backend (the kernel completes
        what it took), read each ring's last avail index, close.  Raises VhostError (vhost is
        stopped all the same)."""
        fd = self._fd
        if fd is None:
            raise VhostError("vhost-net is not running")
        try:
            for i in range(self._nrings):
                _ioctl(fd, VHOST_NET_SET_BACKEND, _VRING_FILE.pack(i, -1), "NET_SET_BACKEND")
            return [_VRING_STATE.unpack(_ioctl(fd, VHOST_GET_VRING_BASE, _VRING_STATE.pack(i, 0),
                                               "GET_VRING_BASE"))[1] & 0xFFFF
                    for i in range(self._nrings)]
        except OSError as e:
            raise VhostError(f"vhost-net could not be stopped cleanly: {e}") from None
        finally:
            self.stop()

    def stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            if self._on_running is not None:
                self._on_running(False)


def _host(mem: GuestMemory, gpa: int) -> int:
    """The VMM's virtual address of guest-physical ``gpa`` (the queue has checked the ring lies in RAM)."""
    for r in mem.regions:
        if r.contains(gpa):
            return r.host_address() + (gpa - int(r.start))
    raise VhostError(f"guest address {gpa:#x} is not in RAM")


def _ioctl(fd: int, request: int, arg, what: str):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise OSError(e.errno, f"VHOST_{what}: {e.strerror}") from None
