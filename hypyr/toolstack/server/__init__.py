"""`hypyr serve`: the toolstack's REST API, HTTP/1.1 + JSON on a unix socket.

    GET    /openapi.json                            this API, as an OpenAPI 3.0 document
    GET    /host                                    CPUs, memory, KVM backend, hypyr version
    GET    /domains[?name=N]                        `hypyr list [N...]`
    POST   /domains                                 `hypyr create`: {"config": "<xl.cfg>"} or {"path": "/abs.cfg"}
    GET    /domains/{domain}                        one domain (name or id)
    DELETE /domains/{domain}                        `hypyr destroy`
    POST   /domains/{domain}/pause|unpause|reboot|destroy
    POST   /domains/{domain}/shutdown               optional {"wait": true}
    GET    /domains/{domain}/vcpus                  `hypyr vcpu-list`
    PUT    /domains/{domain}/vcpus/{vcpu}/affinity  `hypyr vcpu-pin`: {"cpus": "0-1"} or {"cpus": [0, 1]}
    GET    /domains/{domain}/sched                  credit-scheduler weight and cap
    PUT    /domains/{domain}/sched                  {"weight": 512, "cap": 25}

The parts, one concern each:

* ``openapi``: the document and its schemas, the one description of what is taken and given;
* ``bodies``: JSON in (decoded, checked against those schemas) and out;
* ``app``: routing (404, 405 with Allow), dispatch, and ``STATUS``, the one mapping from a kind of
  error (``hypyr.errors``) to a status: 400 bad input, 404 not found, 409 conflict, 501 not
  supported, 503 unavailable, 504 timed out; 500 is a bug (the traceback goes to the log, never
  to the client);
* ``routes``: the operations, each calling ``hypyr.toolstack.api`` as the CLI does;
* ``transport``: HTTP/1.1 on the unix socket (0600), body limits (411, 413), JSON for every answer;
* ``client``: ``ApiClient``, for scripts and tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from hypyr.errors import HypyrError
from hypyr.toolstack import logs, paths
from hypyr.toolstack.server.app import INTERNAL_ERROR, STATUS, App, Operation, Reply, Request, status_of
from hypyr.toolstack.server.client import ApiClient, ApiError, Response, UnixHTTPConnection
from hypyr.toolstack.server.openapi import document
from hypyr.toolstack.server.routes import ROUTES
from hypyr.toolstack.server.transport import MAX_BODY, ApiServer

__all__ = ["ApiClient", "ApiError", "ApiServer", "App", "INTERNAL_ERROR", "MAX_BODY", "Operation", "ROUTES",
           "Reply", "Request", "Response", "STATUS", "UnixHTTPConnection", "cli_main", "default_socket_path",
           "main", "make_server", "openapi_document", "serve", "status_of"]


def default_socket_path() -> str:
    return str(paths.api_socket())


def openapi_document() -> dict:
    """The OpenAPI document the server serves at /openapi.json."""
    import hypyr
    return document(ROUTES, hypyr.__version__)


def make_server(socket_path: str | None = None) -> ApiServer:
    """Bind the API socket (not yet serving): run `serve_forever()` on the result."""
    return ApiServer(socket_path or default_socket_path(), App(ROUTES))


def serve(socket_path: str | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Serve the API until SIGTERM/SIGINT; remove the socket on the way out."""
    from hypyr.toolstack.server import transport
    transport.serve(make_server(socket_path), ready)


def cli_main(socket_path: str | None = None) -> int:
    """`hypyr serve [--socket PATH]`; a HypyrError (e.g. the socket is in use) propagates to the CLI."""
    serve(socket_path, ready=lambda p: print(f"hypyr: serving the API on {p}", file=sys.stderr, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hypyr.toolstack.server``: the same as `hypyr serve`, logging at INFO."""
    p = argparse.ArgumentParser(prog="hypyr serve", description="Serve the toolstack's REST API on a unix socket.")
    p.add_argument("--socket", metavar="PATH", default=None, help="unix socket to listen on "
                                                                   "(default: <state dir>/api.sock)")
    args = p.parse_args(argv)
    logs.setup(logging.INFO)
    try:
        return cli_main(args.socket)
    except HypyrError as e:
        print(f"hypyr: error: {e}", file=sys.stderr)
        return 1
