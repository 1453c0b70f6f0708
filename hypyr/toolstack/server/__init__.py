"""`hypyr serve`: the toolstack's REST API, HTTP/1.1 + JSON on a unix socket (docs/api.md has
the routes).  One concern per module: ``openapi`` (the document and its schemas: what is taken
and given), ``bodies`` (JSON in, checked against them, and out), ``app`` (routing, 404/405, and
``STATUS``, the one map from an error kind to a status; 500 is a bug), ``routes`` (the
operations, calling ``hypyr.toolstack.api`` as the CLI does), ``transport`` (HTTP/1.1 on the
socket, body limits) and ``client`` (``ApiClient``, for scripts and tests).
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
    """Serve the API until SIGTERM/SIGINT; remove the socket on the way out.  Domain processes are
    forked by a fork server started here (hypyr.toolstack.forkserver)."""
    from hypyr.toolstack import spawn
    from hypyr.toolstack.forkserver import ForkServer
    from hypyr.toolstack.server import transport
    server = make_server(socket_path)
    forks = ForkServer.start()       # while this process has one thread: serve_forever() adds more
    spawn.use_fork_server(forks)
    try:
        transport.serve(server, ready)
    finally:
        spawn.use_fork_server(None)
        if forks is not None:
            forks.close()


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
