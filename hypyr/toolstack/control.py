"""A domain process's control socket: ``control.sock`` in the domain's directory, one JSON object
per line each way (docs/toolstack.md, "The domain process").  This module is the transport:
binding, one thread per connection, framing, errors as replies, progress lines and the console
session.  What each operation does is the domain's (:class:`Operations`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from hypyr.errors import HypyrError, InvalidInput
from hypyr.messages import json_object
from hypyr.toolstack.errors import type_name
from hypyr.vmm import seccomp

log = logging.getLogger("hypyr.domain")

Progress = Any   # a callable taking one progress record (a dataclass) of a save or migration


class Operations(Protocol):
    """What the control socket asks of its domain."""

    name: str

    def operate(self, op: str, req: dict, progress: Progress) -> tuple[dict, str | None]:
        """Do ``op``; its reply, and why the domain stops once the reply is sent (or None)."""

    def stop_after_answer(self, why: str) -> None:
        """Destroy the VM: the reply to an operation that ends it (save, migrate) has gone."""

    def console_attach(self, conn: socket.socket) -> None: ...

    def console_detach(self, conn: socket.socket) -> None: ...

    def console_input(self, data: bytes) -> int:
        """Queue what the client typed for the guest; how many bytes were taken."""


def bind(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on the control socket at ``path`` (mode 0600, replacing a stale one); the socket and
    its (st_dev, st_ino), by which its owner later removes it and never a successor's."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    os.chmod(path, 0o600)
    st = path.lstat()
    s.listen(8)
    return s, (st.st_dev, st.st_ino)


class ControlServer:
    """Serves one domain's control socket: ``accept_loop`` runs on the control thread, which
    confines itself first (seccomp kind ``control``, inherited by the connections' threads)."""

    def __init__(self, domain: Operations, seccomp_mode: str):
        self.domain = domain
        self.seccomp_mode = seccomp_mode

    def accept_loop(self, server: socket.socket) -> None:
        seccomp.install("control", self.seccomp_mode)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=self.serve, args=(conn,), name="control-conn", daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        """Answer ``conn``'s requests, one reply line each, until it closes."""
        f = conn.makefile("rb")
        try:
            for line in f:
                stop_why = None
                try:
                    op, req = parse_request(line)
                    if op == "console":
                        send(conn, {"ok": True})
                        self._console_session(conn, f)
                        return
                    reply, stop_why = self.domain.operate(op, req, progress_to(conn))
                except HypyrError as e:
                    reply = {"ok": False, "error": str(e), "type": type_name(e)}
                except Exception as e:  # a bug of ours: say so, with its traceback in the log
                    log.exception("control request %.60r failed", line)
                    reply = {"ok": False, "error": f"internal error in domain {self.domain.name}'s VMM: "
                             f"{type(e).__name__}: {e} (traceback in its log)", "type": HypyrError.__name__}
                try:
                    send(conn, reply)
                finally:   # the answer first: stopping ends this process
                    if stop_why is not None:
                        self.domain.stop_after_answer(stop_why)
        except OSError:
            pass
        finally:
            f.close()       # (a logged traceback may keep this frame, and so f, alive)
            conn.close()

    def _console_session(self, conn: socket.socket, f) -> None:
        """`hypyr console`: the guest's output to ``conn`` from now on, its input from it."""
        self.domain.console_attach(conn)
        try:
            while True:
                data = f.read1(4096) if hasattr(f, "read1") else conn.recv(4096)
                if not data:
                    return
                while data:
                    n = self.domain.console_input(data)
                    data = data[n:]
                    if data:
                        time.sleep(0.01)
        except OSError:
            return
        finally:
            self.domain.console_detach(conn)


def send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def progress_to(conn: socket.socket) -> Progress:
    """A progress callback that sends ``{"progress": {...}}`` lines on ``conn`` (best effort: a
    CLI that went away does not stop the operation)."""
    def progress(p) -> None:
        try:
            send(conn, {"progress": dataclasses.asdict(p)})
        except OSError:
            pass
    return progress


def parse_request(line: bytes) -> tuple[str, dict]:
    """One control request, a JSON object on one line with a string ``op``: (op, the object).
    InvalidInput otherwise."""
    req = json_object(line)
    if req is None or not isinstance(req.get("op"), str):
        raise InvalidInput("malformed request: one JSON object with an \"op\" per line expected")
    return req["op"], req
