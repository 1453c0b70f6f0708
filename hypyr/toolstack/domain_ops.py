"""The domain process's control operations (hypyr.toolstack.control reads them off the socket):
info, pause, unpause, shutdown, reboot, destroy, trigger, registers, rename, save, migrate, and
the test hooks.  Each takes the Domain and the request, and answers with a JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

from hypyr.errors import InvalidInput
from hypyr.toolstack.domrecord import DomainState
from hypyr.toolstack.errors import DomainStateError, MigrationFailed, SaveFileError
from hypyr.vmm import seccomp
from hypyr.vmm.stop import StopKind, StopReason, vcpu_report

if TYPE_CHECKING:
    from hypyr.toolstack.domain import Domain

log = logging.getLogger("hypyr.domain")

TRIGGERS = ("nmi",)   # what `hypyr trigger` can send (Xen's `xl trigger` also has reset, init, power, ...)


def operate(dom: Domain, op: str, req: dict, progress) -> tuple[dict, str | None]:
    """Do the control operation ``op``; its reply, and why the domain stops once the reply
    is sent (a save that does not keep it running, a migration), or None."""
    if op == "save":
        reply = save(dom, progress, req)
        return reply, None if reply["keep_running"] else f"saved to {reply['file']}"
    if op == "migrate":
        reply = migrate(dom, progress, req)
        return reply, f"migrated to {reply['to']}"
    if op == "rename":
        return rename(dom, req), None
    return handle(dom, op, req), None


def migrate(dom: Domain, progress, req: dict) -> dict:
    """The ``migrate`` operation (source side); the caller stops the VM after answering."""
    from hypyr.errors import MigrationError
    from hypyr.vmm import migration
    host, port = req.get("host"), req.get("port")
    downtime, iterations = req.get("downtime_ms", 300), req.get("max_iterations", 30)
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int) \
            or not 1 <= port <= 65535 or isinstance(downtime, bool) or not isinstance(downtime, (int, float)) \
            or downtime < 0 or isinstance(iterations, bool) or not isinstance(iterations, int) \
            or not 1 <= iterations <= 10_000:
        raise InvalidInput("migrate takes a host, a port 1-65535, downtime_ms >= 0 and max_iterations 1-10000")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with dom.running_vm() as vm:
        try:
            sock = socket.create_connection((host, port), timeout=10)
        except OSError as e:
            raise MigrationFailed(f"cannot connect to {where} ({e.strerror or e}); "
                                  f"domain {dom.name} runs on here") from None
        try:
            stats = migration.migrate_send(vm, sock, downtime_ms=downtime, max_iterations=iterations,
                                           progress=progress, extra=dom.save_extra())
        except MigrationError as e:
            sock.close()
            if vm.machine.paused and dom.state is DomainState.RUNNING:
                dom.set_state(DomainState.PAUSED)   # left paused (it may run there): say so in the list
            raise MigrationFailed(f"migration of {dom.name} to {where} failed: {e}") from None
        except BaseException:
            sock.close()
            raise
        dom.migration_sock = sock       # closed when this process exits: "the source has gone"
        log.info("domain %s migrated to %s in %.2f s (%d iterations, downtime %s ms); destroying it here",
                 dom.name, where, stats.seconds, stats.iterations, stats.downtime_ms)
        return {"ok": True, "to": where, **dataclasses.asdict(stats)}


def rename(dom: Domain, req: dict) -> dict:
    name = req.get("name")
    if not isinstance(name, str):
        raise InvalidInput("rename takes a name")
    dom.own(dom.registry.rename, name)
    if not dom.orphaned:
        old, dom.name = dom.name, name
        dom.cfg = dataclasses.replace(dom.cfg, name=name)
        log.info("domain %s is now called %s", old, name)
    return {"ok": True, "name": dom.name}


def save(dom: Domain, progress, req: dict) -> dict:
    """The ``save`` operation: write the VM to ``req["file"]``; the caller stops the domain
    afterwards unless ``keep_running``."""
    from hypyr.errors import SnapshotError
    from hypyr.vmm import snapshot
    path, keep = req.get("file"), req.get("keep_running", False)
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path or not isinstance(keep, bool):
        raise InvalidInput("save takes an absolute file name and keep_running true or false")
    with dom.running_vm() as vm:
        fd, tmp = dom.save_files.create(path)
        was_paused = vm.machine.paused
        saved = False
        try:
            with os.fdopen(fd, "wb") as f:
                stats = snapshot.save(vm, f, keep_running=keep, progress=progress,
                                      extra=dom.save_extra())
                saved = True
                f.flush()
                os.fsync(f.fileno())
            dom.save_files.commit(tmp)
        except BaseException as e:
            dom.save_files.discard(tmp)
            if saved and not keep:      # saved but not safely on disk: the domain runs on
                snapshot.resume_running(vm, was_paused)
            if isinstance(e, OSError):
                raise SaveFileError(f"cannot write the save file {path}: {e.strerror or e}") from None
            if isinstance(e, SnapshotError):
                raise SaveFileError(str(e)) from None
            raise
        log.info("domain %s saved to %s (%d bytes in %.2f s)%s", dom.name, path, stats.bytes, stats.seconds,
                 "" if keep else "; destroying it")
        return {"ok": True, "file": path, "seconds": stats.seconds, "bytes": stats.bytes,
                "pages_data": stats.pages_data, "pages_zero": stats.pages_zero, "keep_running": keep}


def handle(dom: Domain, op: str, req: dict) -> dict:
    vm = dom.live
    machine = vm.machine
    if op == "info":
        return {"ok": True, "state": dom.state, "domid": dom.domid, "name": dom.name,
                "pid": os.getpid(), "memory": dom.cfg.memory, "seccomp": dom.cfg.seccomp,
                "jail": dom.jail.describe() if dom.jail is not None else None,
                "vcpus": [{"vcpu": vt.vcpu.id, "tid": vt.thread.native_id if vt.thread else None,
                           "state": vt.state.value, "exits": vt.exits} for vt in machine.vcpus],
                "virtio": vm.virtio_report()}
    if op == "pause":
        with dom.pause_lock:
            machine.pause()
        dom.set_state(DomainState.PAUSED)
        return {"ok": True}
    if op == "unpause":
        if dom.busy.locked():   # a save or migration paused it, and will end its pause itself
            raise DomainStateError(f"domain {dom.name} is being saved or migrated: it runs on by itself "
                                   "if it is to")
        with dom.pause_lock:
            machine.resume()
        dom.set_state(DomainState.RUNNING)
        return {"ok": True}
    if op == "shutdown":
        if machine.paused:
            raise DomainStateError(f"domain {dom.name} is paused: unpause it first")
        sent = vm.request_poweroff()
        if not sent:
            raise DomainStateError(f"domain {dom.name} listens neither to the ACPI power button nor to "
                                   "Ctrl-Alt-Del (its kernel has not set up either yet)")
        log.info("shutdown: sent %s to the guest", sent)
        dom.set_state(DomainState.SHUTDOWN)
        return {"ok": True}
    if op == "trigger":
        return trigger(machine, req)
    if op == "registers":
        return registers(dom)
    if op == "reboot":
        dom.reboot_requested = True
        machine.stop(StopReason(StopKind.REBOOT, "rebooted by the toolstack"))
        return {"ok": True}
    if op == "destroy":
        dom.destroy_requested = True
        machine.stop(StopReason(StopKind.DESTROYED, "destroyed by the toolstack"))
        return {"ok": True}
    if op == "test-forbidden-syscall" and dom.test_hooks:
        return forbidden_syscall(dom, req.get("kind"))
    if op == "test-open" and dom.test_hooks:
        return test_open(req.get("path"), req.get("write") is True)
    raise InvalidInput(f"unknown operation {op!r}")


def registers(dom: Domain) -> dict:
    """`hypyr info DOMAIN --registers`: each vCPU's report, the domain paused for the
    instant (not during a save or migration, whose own pause it would end)."""
    with dom.running_vm() as vm, dom.pause_lock:
        machine = vm.machine
        was_paused = machine.paused
        machine.pause()
        try:
            return {"ok": True, "vcpus": [vcpu_report(vt.vcpu) for vt in machine.vcpus]}
        finally:
            if not was_paused:
                machine.resume()


def trigger(machine, req: dict) -> dict:
    """`hypyr trigger DOMAIN nmi [VCPU]`: an NMI to one vCPU (vCPU 0 by default)."""
    what, vcpu = req.get("what"), req.get("vcpu", 0)
    if what not in TRIGGERS:
        raise InvalidInput(f"trigger takes one of {', '.join(TRIGGERS)}, not {what!r}")
    if type(vcpu) is not int:
        raise InvalidInput("the vCPU is a number")
    machine.inject_nmi(vcpu)
    log.info("trigger: NMI sent to vCPU %d", vcpu)
    return {"ok": True, "trigger": what, "vcpu": vcpu}


def test_open(path: object, write: bool) -> dict:
    """The test hook (HYPYR_TEST_HOOKS=1): may this VMM open ``path``?  (Its jail's test.)"""
    if not isinstance(path, str):
        raise InvalidInput("test-open takes a path")
    try:
        os.close(os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC))
    except OSError as e:
        return {"ok": True, "opened": False, "errno": errno.errorcode.get(e.errno or 0, str(e.errno))}
    return {"ok": True, "opened": True}


def forbidden_syscall(dom: Domain, kind: object) -> dict:
    """The test hook (only with HYPYR_TEST_HOOKS=1 in this process's environment): a thread
    of ``kind`` makes a syscall no filter allows; under ``seccomp = "kill"`` this process
    dies of SIGSYS (the answer may never come)."""
    machine = dom.live.machine
    if kind == "control":
        seccomp.forbidden_syscall()
    elif kind == "vcpu":
        machine.pause()
        dom.set_state(DomainState.PAUSED)
        machine.call_on_parked_vcpu(seccomp.forbidden_syscall)
    elif kind == "io":
        io = next(s for s in machine.services if hasattr(s, "add_eventfd"))
        os.eventfd_write(io.add_eventfd(seccomp.forbidden_syscall), 1)
    elif kind == "main":
        dom.main_call = seccomp.forbidden_syscall
        machine.stop(StopReason(StopKind.DESTROYED, "test hook: a forbidden syscall on the main thread"))
    else:
        raise InvalidInput(f"kind must be one of {', '.join(seccomp.KINDS)}")
    return {"ok": True, "kind": kind}
