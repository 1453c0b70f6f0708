"""Talking to a domain's process: its registry row, and one operation on its control socket (one
JSON object per line each way, docs/toolstack.md).  A control operation that gets no answer within
``CONTROL_TIMEOUT`` seconds is a DomainTimeout."""

from __future__ import annotations

import json
import socket

from hypyr.messages import json_object
from hypyr.toolstack.domrecord import DomainRecord, is_alive
from hypyr.toolstack.errors import DomainStateError, DomainTimeout, DomainUnreachable, from_report
from hypyr.toolstack.registry import Registry

CONTROL_TIMEOUT = 30.0   # seconds a domain process may take to answer one control operation


class Control:
    """A connection to one domain process's control socket."""

    def __init__(self, rec: DomainRecord, timeout: float | None = None):
        self.rec = rec
        self.timeout = CONTROL_TIMEOUT if timeout is None else timeout
        if not rec.socket:
            raise DomainStateError(f"domain {rec.name} has no control socket (state {rec.state})")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(rec.socket)
        except OSError:
            self.sock.close()
            raise DomainUnreachable(f"domain {rec.name} is not answering on its control socket") from None
        self.file = self.sock.makefile("rb")

    def call(self, op: str, *, on_progress=None, **args) -> dict:
        """One operation; ``{"progress": {...}}`` lines before the answer (long operations: save,
        migrate) go to ``on_progress(dict)``, the timeout applying to each line."""
        name = self.rec.name
        try:
            self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while True:
                line = self.file.readline()
                if not line.startswith(b'{"progress"'):
                    break
                progress = (json_object(line) or {}).get("progress")
                if on_progress is not None and isinstance(progress, dict):
                    try:
                        on_progress(progress)
                    except (ValueError, KeyError, TypeError):   # fields of the wrong type or missing
                        pass
        except TimeoutError:
            raise DomainTimeout(f"domain {name} did not answer {op} within {self.timeout:g} s") from None
        except OSError as e:
            raise DomainUnreachable(f"lost the connection to domain {name} during {op} ({e.strerror or e})") from None
        if not line:
            raise DomainUnreachable(f"domain {name} closed its control socket")
        reply = json_object(line)
        if reply is None:
            raise DomainUnreachable(f"domain {name} answered {op} with something that is not a JSON object")
        if not reply.get("ok"):
            raise from_report(reply.get("type"), reply.get("error") or f"{op} failed")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def call(rec: DomainRecord, op: str, *, timeout: float | None = None, on_progress=None, **args) -> dict:
    """One control operation on the running domain ``rec``."""
    if not is_alive(rec):
        raise DomainStateError(f"domain {rec.name} is not running (state {rec.state})")
    c = Control(rec, timeout)
    try:
        return c.call(op, on_progress=on_progress, **args)
    finally:
        c.close()


def find(name: str) -> DomainRecord:
    with Registry() as reg:
        return reg.get(name)
