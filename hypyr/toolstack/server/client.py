"""``ApiClient``: a small client of `hypyr serve`, for scripts and tests.

    c = ApiClient("/run/hypyr/api.sock")
    c.post("/domains", {"path": "/etc/hypyr/web.cfg"})
    c.post("/domains/web/pause")
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
from typing import Any

from hypyr.errors import HypyrError
from hypyr.toolstack import paths


class ApiError(HypyrError):
    """An error answer from `hypyr serve`: str() is the server's sentence, .status its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise
        self.sock = s


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]        # names in lower case
    body: bytes

    @property
    def data(self) -> Any:
        return json.loads(self.body) if self.body else None


class ApiClient:
    """A client of `hypyr serve`.  get/post/put/delete return the decoded JSON answer (None for 204)
    and raise ApiError for an error answer; request() returns the raw Response and never raises for
    an HTTP status.  One connection per request, so an ApiClient may be shared between threads."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 600.0):
        self.socket_path = str(socket_path or paths.api_socket())
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        hdrs = {"Accept": "application/json", **(headers or {})}
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        try:
            try:
                conn.request(method, path, body=data, headers=hdrs)
            except (FileNotFoundError, ConnectionRefusedError):
                raise HypyrError(f"hypyr serve is not running on {self.socket_path}") from None
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.request(method, path, body)
        if r.status >= 400:
            try:
                msg = r.data["error"]
            except (ValueError, TypeError, KeyError):
                msg = f"hypyr serve answered {r.status}"
            raise ApiError(r.status, msg)
        return r.data

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.call("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)
