"""HTTP/1.1 on a unix socket, for an ``app.App``: framing, limits and the socket file.

A threading server (one thread per connection, keep-alive): a slow operation (``shutdown`` with
``wait``) holds only its own connection.  The socket is born mode 0600 (whoever can connect can
create and destroy domains, like whoever can run `hypyr` as that user); a socket file left by a
server that died is replaced, a live one refused.  Bodies: a Content-Length is needed (chunked:
411), at most MAX_BODY bytes (413; an oversized body up to DRAIN_LIMIT is read and dropped so that
the client sees the 413, beyond it the connection is closed); every answer, including those to
requests http.server itself refuses, is JSON.  HEAD is GET without the body.
"""

from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import stat
import struct
import threading
from collections.abc import Callable

from hypyr.errors import HypyrError
from hypyr.toolstack.server.app import App, HttpError
from hypyr.toolstack.server.bodies import encode

log = logging.getLogger("hypyr.toolstack.server")

MAX_BODY = 1 << 20          # bytes; larger request bodies get 413
DRAIN_LIMIT = 16 << 20      # an oversized body up to this is read and dropped, so the client sees the 413
IDLE_TIMEOUT = 120.0        # seconds a keep-alive connection may sit idle / a body may trickle in


def _too_large(n: int) -> str:
    return f"the request body is {n} bytes; the limit is {MAX_BODY} bytes (1 MiB)"


class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hypyr-serve"
    timeout = IDLE_TIMEOUT
    error_content_type = "application/json"
    server: ApiServer   # (socketserver sets it: the server that accepted this connection)

    def __getattr__(self, name: str):
        # every method goes to the app, which answers 405 (with Allow) for one a path does not take;
        # http.server would answer 501 for a method it has no do_<METHOD> for
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    # client_address is a string on a unix socket (often empty): never index into it
    def address_string(self) -> str:
        return self.client_address if isinstance(self.client_address, str) and self.client_address else "unix"

    def log_message(self, format: str, *args) -> None:   # noqa: A002 - BaseHTTPRequestHandler's name
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """For errors http.server finds itself (bad request line, header too long, ...): JSON too."""
        text = message or self.responses.get(code, ("error",))[0]
        self.close_connection = True
        if self.request_version == "HTTP/0.9":   # unparseable request line: still answer with a status line
            self.request_version = self.protocol_version
        self._send(code, encode({"error": text[:1].lower() + text[1:]}))

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        if status in (204, 304):
            payload = b""
        self.send_response(status)
        if status not in (204, 304):
            if payload:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "send the request body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"Content-Length {length!r} is not a byte count") from None
        if n > MAX_BODY:
            self._drain(n)
            raise HttpError(413, _too_large(n))
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise HttpError(400, "the request body is shorter than its Content-Length")
        return data

    def _drain(self, n: int) -> None:
        """Drop an oversized body: a client still writing it would otherwise get EPIPE, not our 413.
        Past DRAIN_LIMIT, give up and close the connection instead."""
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                self.close_connection = True
                return
            n -= len(chunk)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` with an oversized body: answer 413 instead of inviting the body."""
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = 0
        if n > MAX_BODY:
            self.close_connection = True
            self._send(413, encode({"error": _too_large(n)}))
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        try:
            body = self._read_body()    # first, so that a 404/405 leaves the connection reusable
        except HttpError as e:
            self._send(e.status, encode({"error": e.message}), e.headers)
            return
        except OSError:                 # the client went away or stalled mid-body
            self.close_connection = True
            return
        reply, payload = self.server.app.handle(self.command, self.path, body)
        self._send(reply.status, payload, reply.headers)


def _peer(sock: socket.socket) -> str:
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        return f"pid={pid},uid={uid}"
    except (OSError, AttributeError, struct.error):
        return "unix"


class ApiServer(http.server.ThreadingHTTPServer):
    """``app`` served on the unix socket ``socket_path`` (bound, not yet serving)."""

    address_family = socket.AF_UNIX
    allow_reuse_address = False
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, socket_path: str, app: App):
        self.app = app
        self.socket_path = socket_path
        _prepare_socket_path(socket_path)
        try:
            # typeshed types a TCPServer's address as (host, port); an AF_UNIX one is a path
            super().__init__(socket_path, RequestHandler)  # type: ignore[arg-type]
        except OSError as e:
            raise HypyrError(f"cannot listen on {socket_path}: {e.strerror or e}") from None

    def server_bind(self) -> None:
        # HTTPServer.server_bind would split server_address as (host, port) and do a DNS lookup
        path = self.socket_path
        old = os.umask(0o177)        # the socket is born 0600, no window where others can connect
        try:
            self.socket.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = "localhost", 0
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)

    def get_request(self):
        sock, addr = self.socket.accept()
        return sock, addr or _peer(sock)

    def handle_error(self, request, client_address) -> None:
        log.exception("unhandled error serving %s", client_address or "unix")

    def remove_socket(self) -> None:
        """Unlink the socket file if it is still ours (not one a later server bound)."""
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == getattr(self, "_inode", None):
                os.unlink(self.socket_path)
        except OSError:
            pass


def _prepare_socket_path(path: str) -> None:
    if len(os.fsencode(path)) >= 108:
        raise HypyrError(f"socket path {path} is too long for a unix socket (at most 107 bytes)")
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as e:
        raise HypyrError(f"cannot create directory {parent}: {e.strerror or e}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HypyrError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)          # left behind by a server that died: reuse the name
        return
    finally:
        probe.close()
    raise HypyrError(f"another hypyr serve is already listening on {path}")


def serve(server: ApiServer, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``server.shutdown()``); remove the socket on the way out."""
    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: stopping", signum)
            # shutdown() waits for serve_forever(), which runs in this very thread: ask from another
            threading.Thread(target=server.shutdown, name="hypyr-serve-stop", daemon=True).start()

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, stop)
    try:
        log.info("serving the hypyr API on %s", server.socket_path)
        if ready:
            ready(server.socket_path)
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        server.server_close()
        server.remove_socket()
