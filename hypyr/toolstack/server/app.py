"""The API without the HTTP: a request (method, target, body bytes) → its operation → a reply.

``App.handle`` routes the request (404 for an unknown path, 405 with an Allow header for a method
the path does not take), checks the path parameters and the body against the document's schemas,
calls the operation's handler and turns what it raises into a status: ``STATUS`` maps each kind
of error to one code, and a handler never picks a status for an error itself.  Anything else a
handler raises is a bug: 500, with the traceback in the log and not in the answer.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypyr.errors import Conflict, HypyrError, InvalidInput, NotFound, NotSupported, OperationTimeout, Unavailable
from hypyr.toolstack.server import bodies, openapi

log = logging.getLogger("hypyr.toolstack.server")

INTERNAL_ERROR = "internal error in hypyr serve (the details are in the server's log)"

# The one mapping from an error's kind to an HTTP status (the most specific class in an error's
# MRO wins).  A HypyrError of no kind is something the user can fix: 400.
STATUS: dict[type[BaseException], int] = {
    HypyrError: 400,
    InvalidInput: 400,
    NotFound: 404,
    Conflict: 409,
    NotSupported: 501,
    Unavailable: 503,
    OperationTimeout: 504,
}


def status_of(e: HypyrError) -> int:
    return next(STATUS[cls] for cls in type(e).__mro__ if cls in STATUS)


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]             # path parameters, already checked against their schemas
    query: dict[str, list[str]]
    body: dict                         # the JSON body, checked against the operation's schema ({} if none)


@dataclass
class Reply:
    status: int = 200
    data: Any = None                   # JSON-able; None for no body
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """An answer decided by the HTTP layer itself (no such path, wrong method, body too large)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Operation:
    """One method on one path: its handler and everything the OpenAPI document says about it."""

    handler: Callable[[Request], Reply]
    op_id: str
    summary: str
    ok: dict[str, dict]                # status → {"schema": ..., "description": ..., "headers": ...}
    errors: tuple[int, ...] = ()       # error statuses it can answer (500, and 400/411/413 with a body, are added)
    body: str | None = None            # the name of its request body's schema
    body_required: bool = True
    query: tuple[str, ...] = ()        # names of its query parameters (openapi.PARAMETERS)
    tag: str = "domains"

    @staticmethod
    def path_params(template: str) -> list[str]:
        return re.findall(r"\{(\w+)\}", template)


class App:
    """The route table ``routes`` (path template → {METHOD: Operation}) as a request handler."""

    def __init__(self, routes: dict[str, dict[str, Operation]]):
        self.routes = routes
        self._compiled = [(self._compile(t), t, methods) for t, methods in routes.items()]

    @staticmethod
    def _compile(template: str) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", template)
        return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
                          + r"\Z")

    def match(self, path: str) -> tuple[str, dict[str, Operation], dict[str, str]] | None:
        """(template, its operations, the path parameters) of ``path``, or None."""
        if len(path) > 1:
            path = path.rstrip("/")
        for rx, template, methods in self._compiled:
            m = rx.match(path)
            if m:
                return template, methods, {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
        return None

    @staticmethod
    def allowed(methods: dict[str, Operation], options: bool = False) -> str:
        """The Allow header of a path: its methods, HEAD where GET is, OPTIONS if asked."""
        names = set(methods) | ({"HEAD"} if "GET" in methods else set()) | ({"OPTIONS"} if options else set())
        return ", ".join(sorted(names))

    def handle(self, method: str, target: str, body: bytes) -> tuple[Reply, bytes]:
        """Answer one request: the Reply and its encoded body (b"" for none)."""
        try:
            reply = self._handle(method, target, body)
            return reply, b"" if reply.data is None else bodies.encode(reply.data)   # fails here, not mid-send
        except HttpError as e:
            reply = Reply(e.status, {"error": e.message}, e.headers)
        except HypyrError as e:
            reply = Reply(status_of(e), {"error": str(e) or "the request failed"})
        except Exception:
            log.exception("%s %s failed", method, target)
            reply = Reply(500, {"error": INTERNAL_ERROR})
        return reply, bodies.encode(reply.data)

    def _handle(self, method: str, target: str, body: bytes) -> Reply:
        split = urllib.parse.urlsplit(target)
        found = self.match(split.path)
        if found is None:
            raise HttpError(404, f"there is no {split.path} in this API (see GET /openapi.json)")
        _template, methods, params = found
        if method == "OPTIONS":
            return Reply(204, None, {"Allow": self.allowed(methods, options=True)})
        op = methods.get("GET" if method == "HEAD" else method)
        if op is None:
            allow = self.allowed(methods)
            raise HttpError(405, f"{method} is not allowed on {split.path} (allowed: {allow})", {"Allow": allow})
        components = openapi.schemas()
        for name, value in params.items():
            schema = openapi.PARAMETERS[name]["schema"]
            bodies.check(value, schema, f"the path's {name}", components)
        data: Any = {}
        if op.body is not None:
            if body.strip():
                data = bodies.decode(body)
            elif op.body_required:
                raise bodies.BadRequest(f"{method} {split.path} needs a JSON object in the request body")
            bodies.check(data, openapi.ref(op.body), "the request body", components)
        return op.handler(Request(method, split.path, params, urllib.parse.parse_qs(split.query), data))
