"""A domain's console, both ends: ``ConsoleHub`` in the domain process fans the guest's output
out to ``console.log`` and to attached clients; ``attach`` is `hypyr console NAME`, which joins
this terminal to it (Ctrl-] detaches).

Neither end lets a slow reader stall the other side: the hub gives each client an
``OutputQueue`` (bounded, drained by its own thread; bytes a client cannot take are dropped and
counted), so a vCPU writing to the UART never waits for a client; ``console.log`` is rotated at
``paths.log_max_bytes()`` (one old file, ``console.log.1``, is kept).
``attach`` holds input the domain does not take yet instead of blocking on it, so output keeps
flowing.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from pathlib import Path

from hypyr.console import ESCAPE, OutputQueue, Terminal, write_all
from hypyr.toolstack import paths

INPUT_LIMIT = 64 << 10  # typed or piped bytes `hypyr console` holds for a domain not taking input
CLOSE_FLUSH_S = 0.1     # seconds each client gets for its last output when the domain's console closes


class RotatingLog:
    """An append-only byte log that stays under ``max_bytes``: when a write would pass it, the
    file becomes ``<path>.1`` (replacing the previous one) and a new file starts.  Not thread-safe."""

    def __init__(self, path: str | os.PathLike, max_bytes: int | None = None):
        self.path = Path(path)
        self.max_bytes = paths.log_max_bytes() if max_bytes is None else max_bytes
        self._f = open(self.path, "ab")  # noqa: SIM115 - held for the log's life, closed by close()
        self._size = os.fstat(self._f.fileno()).st_size

    def write(self, data: bytes) -> None:
        """Append ``data`` (errors are ignored: the log must not stop the guest)."""
        try:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._f.write(data)
            self._f.flush()
            self._size += len(data)
        except (OSError, ValueError):
            pass

    def _rotate(self) -> None:
        self._f.close()
        try:
            os.replace(self.path, paths.rotated_log(self.path))
        except FileNotFoundError:
            pass
        self._f = open(self.path, "ab")  # noqa: SIM115 - held for the log's life, closed by close()
        self._size = 0

    def close(self) -> None:
        self._f.close()


class ConsoleHub:
    """Fans guest console output out to the log file and attached clients; ``write`` (called by
    vCPU threads) never blocks on a client."""

    def __init__(self, log_path: str | os.PathLike, max_bytes: int | None = None, client_limit: int | None = None):
        self._log = RotatingLog(log_path, max_bytes)
        self._client_limit = client_limit
        self._clients: dict[socket.socket, OutputQueue] = {}
        self._lock = threading.Lock()
        self._gone_dropped = 0  # bytes dropped for clients that have detached

    def write(self, data: bytes) -> None:
        with self._lock:
            self._log.write(data)
            for conn, q in list(self._clients.items()):
                q.write(data)
                if q.failed:
                    self._remove(conn)

    def attach(self, conn: socket.socket) -> None:
        """Send console output to ``conn`` from now on (through its own bounded queue)."""
        kw = {} if self._client_limit is None else {"limit": self._client_limit}
        q = OutputQueue(conn.sendall, name=f"console client {conn.fileno()}", **kw)
        with self._lock:
            self._clients[conn] = q

    def detach(self, conn: socket.socket) -> None:
        """Send ``conn`` nothing more (its side for sending is shut down)."""
        with self._lock:
            self._remove(conn)

    def _remove(self, conn: socket.socket, flush: float = 0.0) -> None:
        q = self._clients.pop(conn, None)
        if q is not None:
            q.close(timeout=flush)
            self._gone_dropped += q.dropped
            try:
                conn.shutdown(socket.SHUT_WR)  # ends a send blocked on a client that stopped reading
            except OSError:
                pass

    def stats(self) -> dict:
        """Attached clients, bytes waiting for them, bytes dropped for clients that did not keep up."""
        with self._lock:
            qs = list(self._clients.values())
            return {"clients": len(qs), "pending": sum(q.pending for q in qs),
                    "dropped": self._gone_dropped + sum(q.dropped for q in qs)}

    def close(self) -> None:
        """End the log and every client, each given CLOSE_FLUSH_S for the output it still holds
        (the guest's last lines, gathered into a burst)."""
        with self._lock:
            for conn in list(self._clients):
                self._remove(conn, flush=CLOSE_FLUSH_S)
            self._log.close()


# -- `hypyr console NAME` ------------------------------------------------------------------------
def attach(name: str) -> int:
    from hypyr.toolstack.client import Control
    from hypyr.toolstack.domrecord import is_alive
    from hypyr.toolstack.errors import DomainStateError
    from hypyr.toolstack.registry import Registry
    with Registry() as reg:
        rec = reg.get(name)
    if not is_alive(rec):
        raise DomainStateError(f"domain {rec.name} is not running (state {rec.state})")
    ctl = Control(rec, timeout=None)
    ctl.call("console")
    inp = sys.stdin.fileno()
    if sys.stderr.isatty():
        sys.stderr.write(f"hypyr: attached to {rec.name}'s console; Ctrl-] detaches\r\n")
    with Terminal(inp) as term:
        try:
            relay(ctl.sock, inp, sys.stdout.fileno(), escape=term.is_tty)
        except KeyboardInterrupt:
            pass
        finally:
            ctl.close()
    return 0


def relay(sock: socket.socket, inp: int, out: int, escape: bool = True) -> None:
    """Copy the domain's output from ``sock`` to ``out`` and ``inp`` to ``sock`` until the domain
    closes the connection or (with ``escape``) Ctrl-] is typed.  Input the domain does not take
    yet waits here (up to INPUT_LIMIT bytes; then ``inp`` is not read) so output keeps flowing."""
    pending = bytearray()
    reading = True
    while True:
        rlist = [sock] + ([inp] if reading and len(pending) < INPUT_LIMIT else [])
        ready, writable, _ = select.select(rlist, [sock] if pending else [], [])
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return  # the domain went away
            write_all(out, data)
        if sock in writable:
            _send_some(sock, pending)
        if inp in ready:
            data = os.read(inp, 4096)
            if not data:
                reading = False  # stdin closed: keep showing output
            elif escape and ESCAPE in data:
                pending += data[:data.index(ESCAPE)]
                _send_some(sock, pending)  # what was typed before Ctrl-], if the domain takes it now
                return
            else:
                pending += data


def _send_some(sock: socket.socket, buf: bytearray) -> None:
    """Send what ``sock`` takes now of ``buf`` without blocking; remove it from ``buf``."""
    try:
        del buf[:sock.send(buf, socket.MSG_DONTWAIT)]
    except (BlockingIOError, InterruptedError):
        pass
