"""A jailed domain: the domain process splits into a privileged supervisor and its VMM child.

The supervisor keeps what needs privilege: the registry row, the cgroup, the disk images,
kernel and save files it opens for the VMM.  The child (a fork, so nothing is re-imported)
confines itself (hypyr.toolstack.jail), then builds and runs the VM as an unjailed domain
process does, asking the supervisor over a socketpair for every registry update and save file.
The supervisor answers for its own row only, whatever the child asks.  docs/confinement.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

from hypyr.errors import HypyrError
from hypyr.messages import json_object
from hypyr.toolstack.domrecord import PRESERVED_STATES, DomainState
from hypyr.toolstack.errors import SaveFileError, from_report, type_name
from hypyr.toolstack.registry import Registry, StaleDomainError

log = logging.getLogger("hypyr.supervisor")

MAX_MESSAGE = 64 << 10


# -- save files, the same way jailed or not ---------------------------------------------------------
class SaveFiles:
    """A save file is written to a temporary file next to it, then renamed over it."""

    def __init__(self) -> None:
        self._temps: dict[str, str] = {}    # temporary file -> the save file it becomes

    def create(self, path: object) -> tuple[int, str]:
        """(fd, name) of a new temporary file in ``path``'s directory; SaveFileError if not."""
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise SaveFileError("a save file needs an absolute file name")
        import tempfile  # only for a save: not every domain process's start
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.",
                                       suffix=".part")
        except OSError as e:
            raise SaveFileError(f"cannot write the save file {path}: {e.strerror or e}") from None
        self._temps[tmp] = path
        return fd, tmp

    def commit(self, tmp: str) -> None:
        """The temporary file ``tmp`` (written and synced) becomes its save file."""
        path = self._temps.pop(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:
            self._temps[tmp] = path
            raise SaveFileError(f"cannot write the save file {path}: {e.strerror or e}") from None

    def is_pending(self, tmp: str) -> bool:
        """Is ``tmp`` a temporary file :meth:`create` made and nothing has committed or discarded?"""
        return tmp in self._temps

    def discard(self, tmp: str) -> None:
        if self._temps.pop(tmp, None) is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# -- the child's side -----------------------------------------------------------------------------
class SupervisorLink:
    """The jailed VMM's registry and save files: the methods of Registry and SaveFiles the domain
    process uses, each a request to the supervisor (which ignores the domid and uuid given)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def _call(self, op: str, want_fd: bool = False, **args) -> tuple[dict, list[int]]:
        """Send one request, read its reply (with a file only if ``want_fd``: recvmsg is the
        control threads' alone; every thread kind may write and read, docs/confinement.md)."""
        fds: list[int] = []
        with self._lock:
            os.write(self.sock.fileno(), json.dumps({"op": op, **args}).encode())
            if want_fd:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
            else:
                data = os.read(self.sock.fileno(), MAX_MESSAGE)
        if not data:
            raise HypyrError("the domain's supervisor has gone")
        reply = json.loads(data)
        if reply.get("ok"):
            return reply, fds
        for fd in fds:
            os.close(fd)
        if reply.get("stale"):
            raise StaleDomainError(str(reply.get("error")))
        raise from_report(reply.get("type"), str(reply.get("error")))

    def set_running(self, domid: int, pid: int, socket: object, *, uuid: str) -> None:
        self._call("set_running")

    def update_state(self, domid: int, state: DomainState | str, exit_reason: str | None = None, *,
                     uuid: str) -> None:
        self._call("update_state", state=DomainState(state).value, reason=exit_reason)

    def release(self, domid: int, state: DomainState | str, exit_reason: str | None, *, uuid: str) -> None:
        self._call("release", state=DomainState(state).value, reason=exit_reason)

    def bump_restarts(self, domid: int, *, uuid: str) -> int:
        return int(self._call("bump_restarts")[0].get("result", 0))

    def rename(self, domid: int, name: str, *, uuid: str) -> None:
        self._call("rename", name=name)

    def remove(self, domid: int, *, uuid: str | None = None) -> bool:
        return bool(self._call("remove")[0].get("result"))

    def create(self, path: str) -> tuple[int, str]:
        reply, fds = self._call("save_create", want_fd=True, path=path)
        if len(fds) != 1:
            raise SaveFileError(f"cannot write the save file {path}: the supervisor sent no file")
        return fds[0], str(reply["result"])

    def commit(self, tmp: str) -> None:
        self._call("save_commit", tmp=tmp)

    def discard(self, tmp: str) -> None:
        self._call("save_discard", tmp=tmp)


# -- the supervisor's side ------------------------------------------------------------------------
def _reason(value: object) -> str | None:
    if value is None or (isinstance(value, str) and len(value) <= 4096):
        return value
    raise ValueError("a reason is a string of at most 4096 characters")


class Supervisor:
    """Answers one VMM child's requests for the row (``domid``, ``uuid``), until the child goes."""

    def __init__(self, sock: socket.socket, registry: Registry, domid: int, uuid: str, child_pid: int,
                 socket_path: str):
        self.sock, self.registry, self.domid, self.uuid = sock, registry, domid, uuid
        self.child_pid, self.socket_path = child_pid, socket_path
        self.files = SaveFiles()

    def _answer(self, req: dict) -> tuple[object, int | None]:
        """(result, file to send) for one request; ValueError/KeyError/TypeError if malformed."""
        op, reg, domid, uuid = req["op"], self.registry, self.domid, self.uuid
        if op == "set_running":
            reg.set_running(domid, self.child_pid, self.socket_path, uuid=uuid)
        elif op == "update_state":
            reg.update_state(domid, DomainState(req["state"]), _reason(req.get("reason")), uuid=uuid)
        elif op == "release":
            state = DomainState(req["state"])
            if state not in PRESERVED_STATES:
                raise ValueError("release keeps a row crashed or shut down")
            reg.release(domid, state, _reason(req.get("reason")), uuid=uuid)
        elif op == "bump_restarts":
            return reg.bump_restarts(domid, uuid=uuid), None
        elif op == "rename":
            if not isinstance(req.get("name"), str):
                raise ValueError("rename takes a name")
            reg.rename(domid, req["name"], uuid=uuid)
        elif op == "remove":
            return reg.remove(domid, uuid=uuid), None
        elif op == "save_create":
            fd, tmp = self.files.create(req.get("path"))
            return tmp, fd
        elif op == "save_commit":
            self.files.commit(self._temp(req))
        elif op == "save_discard":
            self.files.discard(self._temp(req))
        else:
            raise ValueError(f"no operation {op!r}")
        return None, None

    def _temp(self, req: dict) -> str:
        tmp = req.get("tmp")
        if not isinstance(tmp, str) or not self.files.is_pending(tmp):
            raise ValueError("not a save file this domain is writing")
        return tmp

    def serve(self) -> None:
        """Answer until the child closes its end (it exited)."""
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            fd = None
            try:
                req = json_object(data)
                if req is None:
                    raise ValueError("not a JSON object")
                result, fd = self._answer(req)
                reply: dict = {"ok": True, "result": result}
            except StaleDomainError as e:
                reply = {"ok": False, "stale": True, "error": str(e)}
            except HypyrError as e:
                reply = {"ok": False, "error": str(e), "type": type_name(e)}
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("domain %d: its VMM sent a malformed request to its supervisor", self.domid)
                reply = {"ok": False, "error": "malformed request to the supervisor", "type": "InvalidInput"}
            try:
                socket.send_fds(self.sock, [json.dumps(reply).encode()], [fd] if fd is not None else [])
            except OSError:
                return
            finally:
                if fd is not None:
                    os.close(fd)
