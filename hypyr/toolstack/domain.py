"""The domain process: one detached VMM process per domain, as Xen's xl runs without a daemon.

``main([DOMID, READY_FD])``, started in a new session by ``hypyr create`` (or ``restore``,
``migrate-receive``) through hypyr.toolstack.spawn, builds the VM, serves its control socket (one
JSON object per line each way) and applies ``on_poweroff``/``on_reboot``/``on_crash``.  Its
registry updates name its row by (DOMID, UUID): on ``StaleDomainError`` it updates nothing more,
stops its VM and exits.  Where its VM comes from (a fresh build, a save file, a migration) is
:mod:`hypyr.toolstack.domain_vm`; its control operations are :mod:`hypyr.toolstack.domain_ops`.
Design notes and the control protocol: docs/toolstack.md, "The domain process".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hypyr import preopened
from hypyr.errors import HypyrError
from hypyr.toolstack import control, domain_ops, domain_vm, jail, nics, paths, procmem, supervisor, vmmlog
from hypyr.toolstack.console import ConsoleHub
from hypyr.toolstack.domconfig import DomainConfig
from hypyr.toolstack.domrecord import DomainState
from hypyr.toolstack.errors import DomainStateError, type_name
from hypyr.toolstack.registry import Registry, StaleDomainError
from hypyr.vmm import seccomp
from hypyr.vmm.builder import LinuxVm, build_linux_vm
from hypyr.vmm.stop import StopKind, StopReason

if TYPE_CHECKING:
    from hypyr.image.diskboot import DiskBoot  # pygrub's (imported when a domain uses it)

log = logging.getLogger("hypyr.domain")

CRASH_KINDS = (StopKind.TRIPLE_FAULT, StopKind.CRASH, StopKind.INTERNAL_ERROR, StopKind.FAIL_ENTRY)


class Domain:
    def __init__(self, domid: int, uuid: str, registry: Registry, tap_fds: Sequence[int] = (),
                 restore: str | None = None, restore_paused: bool = False, incoming_fd: int | None = None,
                 watch_fd: int | None = None):
        self.domid = domid
        self.incoming_fd = incoming_fd         # the first boot receives a live migration on this socket
        self.watch_fd = watch_fd
        self.migration_sock: socket.socket | None = None   # source: open until this process exits
        self.restore_file = restore            # the first boot restores this save file
        self.restore_paused = restore_paused
        self.uuid = uuid
        self.tap_fds = list(tap_fds)
        self.registry: Registry | supervisor.SupervisorLink = registry   # jailed: the link to its supervisor
        self.save_files: supervisor.SaveFiles | supervisor.SupervisorLink = supervisor.SaveFiles()
        self.jail: jail.Jail | None = None        # the VMM's jail, once it is in one
        rec = registry.get(str(domid))
        if rec.uuid != uuid:
            raise StaleDomainError(f"domain id {domid} belongs to another domain ({rec.name}, uuid {rec.uuid})")
        self.name = rec.name
        self.cfg = DomainConfig.from_dict(rec.config_dict())
        # the vifs' guest addresses, from the networks (state the jailed VMM cannot read): once
        self.ip_args = nics.guest_ip_args(self.cfg.vifs)
        self.dir = paths.domain_dir(domid)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock_path = self.dir / "control.sock"
        self.console = ConsoleHub(self.dir / "console.log")
        self.vm: LinuxVm | None = None
        self.state = DomainState.CREATING
        self._lock = threading.Lock()
        self.busy = threading.Lock()   # one save (or migration) at a time
        self.pause_lock = threading.Lock()   # pause, unpause, and the pause around a register read
        self._exit = threading.Event()
        self.destroy_requested = False
        self.reboot_requested = False
        self.orphaned = False      # our row is another domain's now: update nothing more
        self._sock_id: tuple[int, int] | None = None   # (st_dev, st_ino) of the control socket we bound
        self.test_hooks = os.environ.get("HYPYR_TEST_HOOKS") == "1"
        self.main_call: Callable[[], object] | None = None   # the test hook's call for the main thread
        self._boot: DiskBoot | None = None   # bootloader = "pygrub": the extracted kernel and initrd
        self._boot_error: str | None = None  # why they could not be extracted (restore, migration)

    # -- lifecycle ----------------------------------------------------------------------------
    def boot(self) -> None:
        if self.cfg.bootloader is not None and (self.incoming_fd is not None or self.restore_file is not None):
            self._prefetch_disk_boot()     # for later reboots, while this process may still run debugfs
        if self.incoming_fd is not None:
            fd, self.incoming_fd = self.incoming_fd, None
            watch_fd, self.watch_fd = self.watch_fd, None
            self.vm = domain_vm.receive(fd, watch_fd, self.name, self.cfg.seccomp, self.console.write,
                                        domain_vm.configure_nets(self.cfg, self.tap_fds, self.domid))
            self._pin_vcpus()
            self.set_state(DomainState.PAUSED if self.vm.machine.paused else DomainState.RUNNING)
            return
        if self.restore_file is not None:
            path, self.restore_file = self.restore_file, None   # a later reboot boots afresh
            self.vm = domain_vm.restore(path, self.console.write,
                                        domain_vm.configure_nets(self.cfg, self.tap_fds, self.domid))
            paused = self.restore_paused or self.vm.saved_paused
            if paused:
                self.vm.machine.pause()        # before start: the vCPUs start parked
        else:
            self.vm = build_linux_vm(domain_vm.vm_config(self.cfg, self.tap_fds, self.domid, self._disk_boot(),
                                                         self.ip_args),
                                     self.console.write)
            paused = False
        self.vm.machine.start()
        self._pin_vcpus()
        self.set_state(DomainState.PAUSED if paused else DomainState.RUNNING)

    def _disk_boot(self) -> DiskBoot | None:
        """bootloader = "pygrub": the first disk's default (or --entry) kernel, initrd and command
        line, extracted into this domain's directory.  Done once, when the domain first boots,
        and kept for its reboots: once the VM runs this process is confined by seccomp and may
        not start debugfs (docs/boot.md); the files go when the process ends."""
        if self.cfg.bootloader is None:
            return None
        if self._boot is None and self._boot_error is not None:
            raise HypyrError(self._boot_error)   # confined now: no second try
        if self._boot is None:
            from hypyr.image import diskboot
            self._boot = diskboot.load(self.cfg.disks[0].target, self.cfg.boot_entry, tmp_parent=str(self.dir))
            for w in self._boot.warnings:
                log.warning("domain %s: %s", self.name, w)
            log.info("domain %s boots %r from %s", self.name, self._boot.title, self._boot.config)
        return self._boot

    def _prefetch_disk_boot(self) -> None:
        """A restored or migrated-in domain does not boot from its disk now, but a later reboot
        will, when this process is confined: extract the files now; a failure only fails that
        reboot, with the same sentence."""
        try:
            self._disk_boot()
        except HypyrError as e:
            log.warning("domain %s: a reboot will fail: %s", self.name, e)
            self._boot_error = str(e)

    @contextlib.contextmanager
    def running_vm(self):
        """The running VM, held for one save, migration or register read at a time."""
        if not self.busy.acquire(blocking=False):
            raise DomainStateError(f"domain {self.name} is already being saved or migrated")
        try:
            vm = self.vm
            if vm is None or vm.machine.stop_reason is not None:
                raise DomainStateError(f"domain {self.name} is not running")
            yield vm
        finally:
            self.busy.release()

    def save_extra(self) -> dict:
        """What `hypyr restore` needs to rebuild this domain: kept in the save file's header."""
        return {"hypyr_domain": 1, "name": self.name, "uuid": self.uuid, "domid": self.domid,
                "config": self.cfg.to_dict()}

    def _pin_vcpus(self) -> None:
        """xl.cfg `cpus`: host CPU affinity of each vCPU thread."""
        affinity = self.cfg.cpu_affinity(os.cpu_count() or 1)
        if affinity is None:
            return
        for vt in self.live.machine.vcpus:
            cpus = affinity[vt.vcpu.id] if vt.vcpu.id < len(affinity) else None
            if cpus and vt.thread is not None and vt.thread.native_id:
                try:
                    os.sched_setaffinity(vt.thread.native_id, cpus)
                except OSError as e:
                    raise HypyrError(f"cannot pin vCPU {vt.vcpu.id} of {self.name} to CPUs {sorted(cpus)}: "
                                     f"{e.strerror}") from None

    def _apply_sched(self, pid: int) -> None:
        """xl.cfg `cpu_weight`/`cap` through cgroups for the VMM process ``pid``; without cgroups
        only the defaults are allowed."""
        from hypyr.toolstack import sched
        custom = self.cfg.cpu_weight != 256 or self.cfg.cap != 0
        try:
            sched.place(self, pid)
            sched.set_params(self, weight=self.cfg.cpu_weight, cap=self.cfg.cap)
        except HypyrError as e:
            if custom:
                raise
            log.info("domain %s: no scheduler group (%s)", self.name, e)

    def own(self, update, *args, **kw):
        """A registry update of our row (domid, uuid).  Once the row is another domain's, log it,
        update nothing more and stop the VM."""
        if self.orphaned:
            return None
        try:
            return update(self.domid, *args, uuid=self.uuid, **kw)
        except StaleDomainError as e:
            self.orphaned = True
            log.error("domain %s: %s; stopping this orphaned domain process", self.name, e)
            if self.vm is not None and self.vm.machine.stop_reason is None:   # not stopped (and closed) yet
                self.vm.machine.stop(StopReason(StopKind.DESTROYED, "its registry row belongs to another domain"))
            return None

    def set_state(self, state: DomainState, reason: str | None = None) -> None:
        self.state = state
        self.own(self.registry.update_state, state, exit_reason=reason)

    def run(self, ready_fd: int | None) -> int:
        try:
            return self._run(ready_fd)
        finally:
            self._end_host_side()

    def _end_host_side(self) -> None:
        """What the domain process (or a jailed VMM's supervisor) undoes at its end: the files a
        pygrub boot extracted, the cgroup."""
        from hypyr.toolstack import sched
        if self._boot is not None:
            self._boot.close()
        try:
            sched.remove(self, evacuate=True)
        except HypyrError as e:
            log.warning("domain %s: %s", self.name, e)

    def _run(self, ready_fd: int | None, server: socket.socket | None = None) -> int:
        """Boot, serve and supervise the VM in this process (``server``: the control socket a
        jailed VMM's supervisor bound, which also placed it in its cgroup)."""
        try:
            if server is None:
                server, self._sock_id = control.bind(self.sock_path)
                self._apply_sched(os.getpid())
            self.boot()
        except HypyrError as e:
            self._report(ready_fd, e)
            return 1
        except Exception as e:  # noqa: BLE001 - reported to `create` as one line, logged in full
            log.exception("domain %s failed to start", self.name)
            self._report(ready_fd, HypyrError(f"the domain failed to start: {e}"))
            return 1
        paused = self.state is DomainState.PAUSED     # restored paused (set_running says running)
        self.own(self.registry.set_running, os.getpid(), str(self.sock_path))
        if paused:
            self.set_state(DomainState.PAUSED)
        if self.orphaned:
            self._report(ready_fd, StaleDomainError(f"domain id {self.domid} was given to another domain "
                                                    f"while {self.name} started"))
            self.live.machine.wait()
            self.live.close()
            self._unlink_socket()
            return 1
        # the control thread confines itself to its own list: started before this thread takes
        # the "main" one, which would otherwise bound it too (filters stack)
        threading.Thread(target=control.ControlServer(self, self.cfg.seccomp).accept_loop, args=(server,),
                         name="control", daemon=True).start()
        procmem.trim_malloc()    # what building the VM freed
        try:   # the VM runs: from now on this thread only supervises it (docs/confinement.md)
            seccomp.install("main", self.cfg.seccomp)
        except HypyrError as e:
            log.error("domain %s: %s", self.name, e)
            self._report(ready_fd, e)
            self.live.machine.stop(StopReason(StopKind.DESTROYED, str(e)))
            self.live.machine.wait()
            self.live.close()
            self._cleanup()
            return 1
        self._report(ready_fd, None)
        return self._supervise()

    # -- the jail (docs/confinement.md) ---------------------------------------------------------
    def wants_jail(self) -> bool:
        """Jail the VMM: ``jail = "on"`` (the default) and this process may (it runs as root)."""
        if self.cfg.jail == "off":
            return False
        if os.geteuid() != 0:
            log.info("domain %s: its VMM is not jailed (the toolstack runs as uid %d, not root)",
                     self.name, os.geteuid())
            return False
        return True

    def run_jailed(self, ready_fd: int | None) -> int:
        """Supervise a jailed VMM child (hypyr.toolstack.supervisor) until it exits; its exit code."""
        try:
            server, self._sock_id = control.bind(self.sock_path)
            if self.cfg.bootloader is not None:
                self._prefetch_disk_boot()     # debugfs runs here, never in the jail
            domain_vm.open_for_vmm(self.cfg, self._boot, self.restore_file)
            spec = jail.plan(self.domid, str(self.dir), self.cfg.memory << 20, str(paths.jail_dir()))
            jail.give_directory(spec, str(self.dir), ("control.sock", "console.log", "console.log.1",
                                                      "vmm.log", "vmm.log.1"))
        except HypyrError as e:
            self._report(ready_fd, e)
            self._end_host_side()
            return 1
        procmem.import_before_fork(self.cfg, restoring=self.restore_file is not None,
                                   receiving=self.incoming_fd is not None)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:   # the VMM
            mine.close()
            code = 1
            try:
                code = self._run_in_jail(theirs, server, spec, ready_fd)
            except BaseException:  # noqa: BLE001 - the child never returns into the supervisor's code
                log.exception("domain %s: its VMM failed", self.name)
            finally:
                logging.shutdown()
                os._exit(code)
        theirs.close()
        server.close()
        self.console.close()
        preopened.close_all()
        for fd in (*self.tap_fds, self.incoming_fd, self.watch_fd):   # the VMM's alone
            if fd is not None:
                os.close(fd)
        try:
            try:
                self._apply_sched(pid)
            except HypyrError as e:
                os.kill(pid, signal.SIGKILL)
                self._report(ready_fd, e)
            else:
                if ready_fd is not None:
                    os.close(ready_fd)    # the VMM reports; its end alone tells `create` if it dies
                mine.sendall(b"go")
                with Registry() as reg:
                    procmem.trim_malloc()    # the pages the VMM's half of the heap leaves free here
                    supervisor.Supervisor(mine, reg, self.domid, self.uuid, pid, str(self.sock_path)).serve()
            status = os.waitpid(pid, 0)[1]
        finally:
            mine.close()
            self._end_host_side()
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            log.error("domain %s: its VMM (pid %d) was killed by signal %d", self.name, pid, -code)
            return 128 - code
        return code

    def _run_in_jail(self, sock: socket.socket, server: socket.socket, spec: jail.Jail,
                     ready_fd: int | None) -> int:
        """The VMM child: wait for the supervisor's go, confine itself, run the domain."""
        if sock.recv(16) != b"go":
            return 1
        parent = os.getppid()
        try:
            jail.enter(spec)
        except HypyrError as e:
            self._report(ready_fd, e)
            return 1
        if os.getppid() != parent:   # the supervisor died before PDEATHSIG was armed
            return 1
        self.registry = self.save_files = supervisor.SupervisorLink(sock)
        self.jail = spec
        return self._run(ready_fd, server)

    @property
    def live(self) -> LinuxVm:
        """The domain's VM, from boot() on (before, a RuntimeError: a bug)."""
        if self.vm is None:
            raise RuntimeError(f"domain {self.name} has no VM yet")
        return self.vm

    def _supervise(self) -> int:
        while True:
            reason = self.live.machine.wait()
            if self.main_call is not None:   # the test hook (HYPYR_TEST_HOOKS)
                self.main_call()
            action = self._action_for(reason)
            log.info("domain %s stopped (%s): %s", self.name, reason.message, action)
            if reason.registers:   # a crash: the vCPU's registers, on one line as every record
                log.warning("domain %s: registers of vCPU %s: %s", self.name, reason.vcpu,
                            reason.registers.replace("\n", " | "))
            if action == "restart":
                self.live.close()
                self.own(self.registry.bump_restarts)
                try:
                    self.boot()
                except HypyrError as e:
                    log.error("domain %s could not restart: %s", self.name, e)
                    self._keep(DomainState.CRASHED, str(e))
                    return 1
                continue
            self.live.close()
            if action == "preserve":
                self._keep(DomainState.CRASHED if reason.kind in CRASH_KINDS else DomainState.SHUTDOWN,
                           reason.message)
                return 0  # the registry keeps the row; `hypyr destroy` removes it
            self._cleanup()
            return 0

    def _keep(self, state: DomainState, reason: str) -> None:
        """on_*='preserve' (or a failed restart): the row stays, owned by no process."""
        self.state = state
        self.own(self.registry.release, state, reason)
        self._unlink_socket()

    def _action_for(self, reason: StopReason) -> str:
        if self.destroy_requested or self.orphaned or reason.kind is StopKind.DESTROYED:
            return "destroy"
        if self.reboot_requested or reason.kind is StopKind.REBOOT:
            self.reboot_requested = False
            return self.cfg.on_reboot
        if reason.kind in CRASH_KINDS:
            return self.cfg.on_crash
        return self.cfg.on_poweroff  # poweroff, exit-status port, halt

    def _cleanup(self) -> None:
        self._unlink_socket()
        self.own(self.registry.remove)

    def _unlink_socket(self) -> None:
        """Remove our control socket, never one a newer domain bound at the same path."""
        try:
            st = self.sock_path.lstat()
            if (st.st_dev, st.st_ino) == self._sock_id:
                self.sock_path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _report(fd: int | None, error: HypyrError | None) -> None:
        """Tell `create` (on ``fd``) that the VM runs (``error`` None) or why it does not."""
        if fd is None:
            return
        report = {"ok": True} if error is None else {"ok": False, "error": str(error), "type": type_name(error)}
        try:
            os.write(fd, json.dumps(report).encode() + b"\n")
            os.close(fd)
        except OSError:
            pass

    # -- operations (the control socket's: hypyr.toolstack.control) ------------------------------
    def operate(self, op: str, req: dict, progress) -> tuple[dict, str | None]:
        """Do the control operation ``op`` (hypyr.toolstack.domain_ops)."""
        return domain_ops.operate(self, op, req, progress)

    def stop_after_answer(self, why: str) -> None:
        self.destroy_requested = True
        self.live.machine.stop(StopReason(StopKind.DESTROYED, why))

    def console_attach(self, conn: socket.socket) -> None:
        self.console.attach(conn)

    def console_detach(self, conn: socket.socket) -> None:
        self.console.detach(conn)

    def console_input(self, data: bytes) -> int:
        return self.live.console.enqueue_input(data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    domid = int(argv[0])
    ready_fd = int(argv[1]) if len(argv) > 1 else None
    uuid = os.environ.pop("HYPYR_DOMAIN_UUID", "")
    os.umask(0o077)   # console.log and everything else this process creates: 0600
    procmem.one_malloc_arena()
    vmmlog.log_to_vmm_log(domid)
    tap_fds = [int(x) for x in os.environ.pop("HYPYR_TAP_FDS", "").split(",") if x]
    restore = os.environ.pop("HYPYR_RESTORE_FILE", "") or None
    incoming = os.environ.pop("HYPYR_MIGRATE_FD", "")
    watch = os.environ.pop("HYPYR_MIGRATE_WATCH_FD", "")
    incoming_fd, watch_fd = (int(incoming) if incoming else None), (int(watch) if watch else None)
    for fd in (incoming_fd, watch_fd):
        if fd is not None:
            os.set_inheritable(fd, False)
    restore_paused = os.environ.pop("HYPYR_RESTORE_PAUSED", "") == "1"
    for fd in tap_fds:
        os.set_inheritable(fd, False)   # ours alone: never leaked into anything we start
    with Registry() as reg:
        try:
            dom = Domain(domid, uuid, reg, tap_fds, restore=restore, restore_paused=restore_paused,
                         incoming_fd=incoming_fd, watch_fd=watch_fd)
        except HypyrError as e:
            Domain._report(ready_fd, e)
            return 1
        if dom.wants_jail():
            reg.close()         # the supervisor opens its own; the jailed VMM never sees it
            return dom.run_jailed(ready_fd)
        return dom.run(ready_fd)


if __name__ == "__main__":
    sys.exit(main())
