"""`hypyr serve`: the toolstack's REST API, HTTP/1.1 + JSON on a unix socket.

Every endpoint mirrors a CLI command and calls the same Python API (`hypyr.toolstack.api`),
so the API and the CLI cannot disagree.  The socket is created mode 0600: whoever can connect
can create and destroy domains, exactly like whoever can run `hypyr` as that user.

    GET    /openapi.json                            this API, as an OpenAPI 3.0 document
    GET    /host                                    CPUs, memory, KVM backend, hypyr version
    GET    /domains[?name=N]                        `hypyr list [N...]`
    POST   /domains                                 `hypyr create`: {"config": "<xl.cfg>"} or {"path": "/abs.cfg"}
    GET    /domains/{domain}                        one domain (name or id)
    DELETE /domains/{domain}                        `hypyr destroy`
    POST   /domains/{domain}/pause|unpause|reboot|destroy
    POST   /domains/{domain}/shutdown               optional {"wait": true}
    GET    /domains/{domain}/vcpus                  `hypyr vcpu-list`
    PUT    /domains/{domain}/vcpus/{vcpu}/affinity  `hypyr vcpu-pin`: {"cpus": "0-1"}
    GET    /domains/{domain}/sched                  credit-scheduler weight and cap
    PUT    /domains/{domain}/sched                  {"weight": 512, "cap": 25}

Errors are `{"error": "<one sentence>"}`: 400 bad input (including every HypyrError), 404 unknown
domain or path, 405 wrong method (with an Allow header), 409 a domain of that name exists,
411/413 body without a length / over 1 MiB, 500 a hypyr bug (the traceback goes to the log,
never to the client), 501 a toolstack part this hypyr does not have.

Domain objects are those of `hypyr list --json`: name, domid, uuid (never reused, unlike the
domid), memory, vcpus, state (xl's letters), cpu_time, status.  A body that is not JSON, or JSON
nested too deeply to parse, is a 400.

`ApiClient` is a small client for scripts and tests:

    c = ApiClient("/run/hypyr/api.sock")
    c.post("/domains", {"path": "/etc/hypyr/web.cfg"})
    c.post("/domains/web/pause")
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import http.server
import importlib
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from hypyr.errors import HypyrError

log = logging.getLogger("hypyr.toolstack.server")

MAX_BODY = 1 << 20          # bytes; larger request bodies get 413
DRAIN_LIMIT = 16 << 20      # an oversized body up to this is read and dropped, so the client sees the 413
IDLE_TIMEOUT = 120.0        # seconds a keep-alive connection may sit idle / a body may trickle in
SOCKET_NAME = "api.sock"
INTERNAL_ERROR = "internal error in hypyr serve (the details are in the server's log)"


# -- where things are ----------------------------------------------------------------------------
def default_socket_path() -> str:
    try:
        from hypyr.toolstack import paths
        return str(Path(paths.state_dir()) / SOCKET_NAME)
    except (ImportError, AttributeError):
        return os.path.join(os.environ.get("HYPYR_STATE_DIR") or "/run/hypyr", SOCKET_NAME)


def _module(name: str):
    """Import a toolstack module at call time (so tests can swap it, and a missing part of the
    toolstack costs only its own endpoints)."""
    return importlib.import_module(name)


def _api():
    return _module("hypyr.toolstack.api")


def _xlcfg():
    return _module("hypyr.toolstack.xlcfg")


# -- errors ------------------------------------------------------------------------------------------
class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _status_of(e: HypyrError) -> int:
    """A HypyrError is the user's to fix: 400, or 404 when the registry no longer knows the domain
    (it went away between our lookup and the operation)."""
    return 404 if str(e).startswith(("no domain named ", "no domain with id ")) else 400


# -- JSON ----------------------------------------------------------------------------------------
def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _as_dict(o: Any) -> dict:
    if isinstance(o, dict):
        return dict(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "_asdict"):
        return dict(o._asdict())
    return {k: v for k, v in vars(o).items() if not k.startswith("_")}


def _dumps(o: Any) -> bytes:
    return (json.dumps(o, default=_default, indent=2) + "\n").encode()


# -- CPU lists ---------------------------------------------------------------------------------------
def _parse_cpus(value: Any) -> set[int]:
    ncpu = os.cpu_count() or 1
    if isinstance(value, list):
        if not value or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
            raise HttpError(400, "'cpus' must be a CPU list string like \"0-1\" or a non-empty list of CPU numbers")
        return set(value)
    if not isinstance(value, str) or not value.strip():
        raise HttpError(400, "'cpus' must be a CPU list string like \"0-1\" or a non-empty list of CPU numbers")
    return set(_xlcfg().parse_cpulist(value, ncpu))     # xl's syntax: "0-3,^1", "all"; HypyrError → 400


# -- the endpoints ---------------------------------------------------------------------------------
Handler = Callable[["Request"], "Reply"]


@dataclasses.dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    headers: Any

    def json(self, required: bool = False) -> dict:
        """The body as a JSON object ({} when there is none and none is required)."""
        if not self.body.strip():
            if required:
                raise HttpError(400, f"{self.method} {self.path} needs a JSON object in the request body")
            return {}
        try:
            data = json.loads(self.body)
        except UnicodeDecodeError:
            raise HttpError(400, "the request body is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise HttpError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} "
                                 f"column {e.colno})") from None
        except RecursionError:
            raise HttpError(400, "the request body is JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return data


@dataclasses.dataclass
class Reply:
    status: int = 200
    data: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _find_domain(ident: str):
    """The DomainInfo of the domain named (or numbered) `ident`, or 404."""
    for d in _api().list_domains(None):
        if d.name == ident or str(d.domid) == ident:
            return d
    raise HttpError(404, f"there is no domain {ident}")


def _check_keys(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        what = f"allowed: {', '.join(sorted(allowed))}" if allowed else "this request takes none"
        raise HttpError(400, f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} ({what})")


def ep_openapi(req: Request) -> Reply:
    return Reply(200, openapi_document())


def ep_host(req: Request) -> Reply:
    import hypyr
    from hypyr.doctor import kvm_backend
    mem: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable", "MemFree"):
                    mem[key] = int(rest.split()[0]) // 1024
    except OSError:
        pass
    return Reply(200, {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or 1,
        "memory_total_mib": mem.get("MemTotal", 0),
        "memory_free_mib": mem.get("MemAvailable", mem.get("MemFree", 0)),
        "kvm_device": os.path.exists("/dev/kvm"),
        "kvm_backend": kvm_backend(),
        "version": hypyr.__version__,
    })


def ep_list_domains(req: Request) -> Reply:
    doms = _api().list_domains(None)
    wanted = [n for v in req.query.get("name", []) for n in v.split(",") if n]
    if wanted:
        picked = []
        for ident in wanted:
            match = [d for d in doms if d.name == ident or str(d.domid) == ident]
            if not match:
                raise HttpError(404, f"there is no domain {ident}")
            picked += [d for d in match if d not in picked]
        doms = picked
    return Reply(200, [_as_dict(d) for d in doms])


def _config_from_body(body: dict):
    _check_keys(body, {"config", "path"})
    if ("config" in body) == ("path" in body):
        raise HttpError(400, "give exactly one of 'config' (the xl.cfg text) or 'path' (an absolute file name)")
    xlcfg = _xlcfg()
    try:
        if "config" in body:
            text = body["config"]
            if not isinstance(text, str):
                raise HttpError(400, "'config' must be a string holding the xl.cfg text")
            # parse, then validate into a DomainConfig; errors read "<request>:LINE: sentence"
            cfg = xlcfg.build(xlcfg.parse(text, "<request>"))
        else:
            path = body["path"]
            if not isinstance(path, str) or not os.path.isabs(path):
                raise HttpError(400, "'path' must be an absolute file name")
            cfg = xlcfg.load(path)
    except HypyrError as e:
        raise HttpError(400, str(e)) from None
    except ValueError as e:   # a parser's ValueError is about the text it was given
        raise HttpError(400, str(e) or "the domain configuration is not valid") from None
    return cfg


def ep_create_domain(req: Request) -> Reply:
    cfg = _config_from_body(req.json(required=True))
    api = _api()
    name = getattr(cfg, "name", None)
    if name and any(d.name == name for d in api.list_domains(None)):
        raise HttpError(409, f"a domain named {name} already exists")
    try:
        rec = api.create(cfg)
    except HypyrError as e:        # lost a race with another create of the same name
        if "already exists" in str(e):
            raise HttpError(409, str(e)) from None
        raise
    rec_name = getattr(rec, "name", name)
    rec_id = getattr(rec, "domid", None)
    data = None
    for d in api.list_domains(None):
        if (rec_id is not None and d.domid == rec_id) or (rec_id is None and d.name == rec_name):
            data = _as_dict(d)
            break
    if data is None:   # it already went away again; say what we know
        data = {"name": rec_name, "domid": rec_id, "status": getattr(rec, "state", None)}
    warnings = list(getattr(cfg, "warnings", None) or [])
    if warnings:
        data["warnings"] = warnings
    where = urllib.parse.quote(str(rec_name if rec_name is not None else rec_id), safe="")
    return Reply(201, data, {"Location": f"/domains/{where}"})


def ep_get_domain(req: Request) -> Reply:
    return Reply(200, _as_dict(_find_domain(req.params["domain"])))


def _action(op: str) -> Handler:
    def ep(req: Request) -> Reply:
        body = req.json()
        _check_keys(body, {"wait"} if op == "shutdown" else set())
        wait = body.get("wait", False)
        if not isinstance(wait, bool):
            raise HttpError(400, "'wait' must be true or false")
        d = _find_domain(req.params["domain"])
        api = _api()
        if op == "shutdown":
            api.shutdown(d.name, wait=wait)
        else:
            getattr(api, op)(d.name)
        if op == "destroy":
            return Reply(204)
        return Reply(200, {"name": d.name, "domid": d.domid, "action": op})
    ep.__name__ = f"ep_{op}"
    return ep


def ep_vcpus(req: Request) -> Reply:
    d = _find_domain(req.params["domain"])
    return Reply(200, _api().vcpu_list(d.name))


def ep_vcpu_affinity(req: Request) -> Reply:
    vcpu = req.params["vcpu"]
    if vcpu != "all" and not vcpu.isdigit():
        raise HttpError(400, f"'{vcpu}' is not a vCPU number (or 'all')")
    body = req.json(required=True)
    _check_keys(body, {"cpus"})
    if "cpus" not in body:
        raise HttpError(400, "give the host CPUs as 'cpus', e.g. {\"cpus\": \"0-1\"}")
    cpus = _parse_cpus(body["cpus"])
    d = _find_domain(req.params["domain"])
    _api().vcpu_pin(d.name, vcpu if vcpu == "all" else str(int(vcpu)), cpus)
    return Reply(200, {"name": d.name, "domid": d.domid, "vcpu": vcpu if vcpu == "all" else int(vcpu),
                       "cpus": sorted(cpus)})


def _sched():
    try:
        return _module("hypyr.toolstack.sched")
    except ImportError:
        raise HttpError(501, "scheduler parameters are not available in this hypyr") from None


def _sched_reply(d, params: Any) -> Reply:
    if isinstance(params, (tuple, list)):          # sched's (weight, cap)
        weight, cap = params
    else:
        p = _as_dict(params) if params is not None else {}
        weight, cap = p.get("weight"), p.get("cap")
    return Reply(200, {"name": d.name, "domid": d.domid, "weight": weight, "cap": cap})


def ep_get_sched(req: Request) -> Reply:
    d = _find_domain(req.params["domain"])
    return _sched_reply(d, _sched().get_params(d))


def ep_put_sched(req: Request) -> Reply:
    body = req.json(required=True)
    _check_keys(body, {"weight", "cap"})
    if body.get("weight") is None and body.get("cap") is None:
        raise HttpError(400, "give 'weight', 'cap' or both")
    for key in ("weight", "cap"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise HttpError(400, f"'{key}' must be a whole number")
    d = _find_domain(req.params["domain"])
    sched = _sched()
    now = sched.set_params(d, weight=body.get("weight"), cap=body.get("cap"))
    return _sched_reply(d, now if now is not None else sched.get_params(d))


# path template → {method: handler}; the OpenAPI document must describe exactly these
ROUTES: dict[str, dict[str, Handler]] = {
    "/openapi.json": {"GET": ep_openapi},
    "/host": {"GET": ep_host},
    "/domains": {"GET": ep_list_domains, "POST": ep_create_domain},
    "/domains/{domain}": {"GET": ep_get_domain, "DELETE": _action("destroy")},
    **{f"/domains/{{domain}}/{op}": {"POST": _action(op)}
       for op in ("pause", "unpause", "reboot", "shutdown", "destroy")},
    "/domains/{domain}/vcpus": {"GET": ep_vcpus},
    "/domains/{domain}/vcpus/{vcpu}/affinity": {"PUT": ep_vcpu_affinity},
    "/domains/{domain}/sched": {"GET": ep_get_sched, "PUT": ep_put_sched},
}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(rx + r"\Z")


_COMPILED = [(_compile(t), t, methods) for t, methods in ROUTES.items()]


def _match(path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
    if len(path) > 1:
        path = path.rstrip("/")
    for rx, _template, methods in _COMPILED:
        m = rx.match(path)
        if m:
            return methods, {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
    return None


def _allowed(methods: dict[str, Handler]) -> set[str]:
    return set(methods) | ({"HEAD"} if "GET" in methods else set())


def _no_such_path(path: str) -> str:
    return f"there is no {path} in this API (see GET /openapi.json)"


def route(method: str, path: str) -> tuple[Handler, dict[str, str]]:
    """Find the handler of `method path` (path already split from its query), or raise 404/405."""
    found = _match(path)
    if found is None:
        raise HttpError(404, _no_such_path(path))
    methods, params = found
    handler = methods.get("GET" if method == "HEAD" else method)
    if handler is None:
        allow = ", ".join(sorted(_allowed(methods)))
        raise HttpError(405, f"{method} is not allowed on {path} (allowed: {allow})", {"Allow": allow})
    return handler, params


# -- the OpenAPI document -----------------------------------------------------------------------
def openapi_document() -> dict:
    """The OpenAPI 3.0 description of every route in ROUTES."""
    import hypyr

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def js(schema: dict, description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def err(description: str) -> dict:
        return js(ref("Error"), description)

    def body(schema: dict, required: bool = True) -> dict:
        return {"required": required, "content": {"application/json": {"schema": schema}}}

    domain_param = {"name": "domain", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": "the domain's name or numeric id"}
    e400, e404, e500 = err("bad input; the message says what to fix"), err("no such domain"), \
        err("a bug in hypyr; the details are in the server's log")

    def op(op_id: str, summary: str, ok: dict, *, params=(), request=None, errors=None, tags=("domains",)):
        o = {"operationId": op_id, "summary": summary, "tags": list(tags),
             "responses": {**ok, **(errors or {}), "500": e500}}
        if params:
            o["parameters"] = list(params)
        if request:
            o["requestBody"] = request
        return o

    def action(op_name: str, summary: str, request=None) -> dict:
        return {"post": op(f"{op_name}Domain", summary,
                           {"204": {"description": "done"}} if op_name == "destroy"
                           else {"200": js(ref("ActionResult"), "done")},
                           params=[domain_param], request=request, errors={"400": e400, "404": e404})}

    paths = {
        "/openapi.json": {"get": op("getOpenApi", "This document", {"200": js({"type": "object"},
                                                                                 "the OpenAPI document")},
                                    tags=("meta",))},
        "/host": {"get": op("getHost", "Host CPUs, memory, KVM backend and hypyr version",
                            {"200": js(ref("Host"), "host information")}, tags=("host",))},
        "/domains": {
            "get": op("listDomains", "List domains (like `hypyr list`)",
                      {"200": js({"type": "array", "items": ref("Domain")}, "the domains")},
                      params=[{"name": "name", "in": "query", "required": False, "style": "form",
                               "explode": True, "schema": {"type": "array", "items": {"type": "string"}},
                               "description": "only these domains (names or ids; repeat or comma-separate)"}],
                      errors={"404": e404}),
            "post": op("createDomain", "Create and start a domain (like `hypyr create`)",
                       {"201": {**js(ref("Domain"), "the domain is running"),
                                "headers": {"Location": {"schema": {"type": "string"},
                                                         "description": "/domains/{name}"}}}},
                       request=body(ref("CreateDomain")),
                       errors={"400": e400, "409": err("a domain of that name exists"),
                               "411": err("the body has no Content-Length"),
                               "413": err("the body is over 1 MiB")}),
        },
        "/domains/{domain}": {
            "get": op("getDomain", "One domain", {"200": js(ref("Domain"), "the domain")},
                      params=[domain_param], errors={"404": e404}),
            "delete": op("deleteDomain", "Destroy a domain (same as POST .../destroy)",
                         {"204": {"description": "the domain is gone"}},
                         params=[domain_param], errors={"400": e400, "404": e404}),
        },
        "/domains/{domain}/pause": action("pause", "Pause every vCPU (like `hypyr pause`)"),
        "/domains/{domain}/unpause": action("unpause", "Resume a paused domain (like `hypyr unpause`)"),
        "/domains/{domain}/reboot": action("reboot", "Ask the guest to reboot (like `hypyr reboot`)"),
        "/domains/{domain}/shutdown": action("shutdown", "Ask the guest to shut down (like `hypyr shutdown`)",
                                             body(ref("ShutdownRequest"), required=False)),
        "/domains/{domain}/destroy": action("destroy", "Kill a domain at once (like `hypyr destroy`)"),
        "/domains/{domain}/vcpus": {
            "get": op("listVcpus", "The domain's vCPUs (like `hypyr vcpu-list`)",
                      {"200": js({"type": "array", "items": ref("Vcpu")}, "one row per vCPU")},
                      params=[domain_param], errors={"400": e400, "404": e404}),
        },
        "/domains/{domain}/vcpus/{vcpu}/affinity": {
            "put": op("pinVcpu", "Set a vCPU's host CPU affinity (like `hypyr vcpu-pin`)",
                      {"200": js(ref("AffinityResult"), "the new affinity")},
                      params=[domain_param, {"name": "vcpu", "in": "path", "required": True,
                                             "schema": {"type": "string", "pattern": r"^(\d+|all)$"},
                                             "description": "a vCPU number, or 'all'"}],
                      request=body(ref("AffinityRequest")), errors={"400": e400, "404": e404}),
        },
        "/domains/{domain}/sched": {
            "get": op("getSched", "Credit-scheduler weight and cap", {"200": js(ref("Sched"), "the parameters")},
                      params=[domain_param], errors={"400": e400, "404": e404,
                                                     "501": err("no scheduler support in this hypyr")}),
            "put": op("setSched", "Set weight and/or cap", {"200": js(ref("Sched"), "the new parameters")},
                      params=[domain_param], request=body(ref("SchedRequest")),
                      errors={"400": e400, "404": e404, "501": err("no scheduler support in this hypyr")}),
        },
    }
    integer, number, string = {"type": "integer"}, {"type": "number"}, {"type": "string"}
    schemas = {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
                  "properties": {"error": {**string, "description": "one sentence"}}},
        "Host": {"type": "object", "required": ["cpus", "memory_total_mib", "memory_free_mib", "kvm_backend",
                                                "version"],
                 "properties": {"hostname": string, "cpus": integer, "memory_total_mib": integer,
                                "memory_free_mib": {**integer, "description": "MemAvailable"},
                                "kvm_device": {"type": "boolean"},
                                "kvm_backend": {"type": "string", "enum": ["VT-x", "AMD-V", "PVM", "unknown"]},
                                "version": string}},
        "Domain": {"type": "object", "required": ["name", "domid"],
                   "properties": {"name": string, "domid": integer,
                                  "uuid": {**string, "format": "uuid",
                                           "description": "the domain's UUID (domids are reused, UUIDs never)"},
                                  "memory": {**integer, "description": "MiB"}, "vcpus": integer,
                                  "state": {**string, "description": "xl's letters, e.g. -b----"},
                                  "cpu_time": {**number, "description": "seconds"},
                                  "status": {**string, "description": "registry state, e.g. running, paused"},
                                  "warnings": {"type": "array", "items": string,
                                               "description": "only when created: the config's warnings"}}},
        "CreateDomain": {"oneOf": [
            {"type": "object", "required": ["config"], "additionalProperties": False,
             "properties": {"config": {**string, "description": "xl.cfg text"}}},
            {"type": "object", "required": ["path"], "additionalProperties": False,
             "properties": {"path": {**string, "description": "absolute name of an xl.cfg file on the host"}}},
        ]},
        "ShutdownRequest": {"type": "object", "additionalProperties": False,
                            "properties": {"wait": {"type": "boolean", "default": False,
                                                    "description": "answer only once the domain has gone"}}},
        "ActionResult": {"type": "object", "required": ["name", "domid", "action"],
                         "properties": {"name": string, "domid": integer, "action": string}},
        "Vcpu": {"type": "object",
                 "properties": {"name": string, "domid": integer, "vcpu": integer,
                                "cpu": {**integer, "nullable": True}, "tid": {**integer, "nullable": True},
                                "state": string, "time": number,
                                "affinity": {"type": "array", "items": integer}}},
        "AffinityRequest": {"type": "object", "required": ["cpus"], "additionalProperties": False,
                            "properties": {"cpus": {"oneOf": [
                                {**string, "description": "xl CPU list, e.g. 0-1, 0-3,^2 or all"},
                                {"type": "array", "items": integer, "minItems": 1}]}}},
        "AffinityResult": {"type": "object",
                           "properties": {"name": string, "domid": integer,
                                          "vcpu": {"oneOf": [integer, string]},
                                          "cpus": {"type": "array", "items": integer}}},
        "Sched": {"type": "object",
                  "properties": {"name": string, "domid": integer, "weight": {**integer, "nullable": True},
                                 "cap": {**integer, "nullable": True,
                                         "description": "percent of one CPU; 0 = no cap"}}},
        "SchedRequest": {"type": "object", "additionalProperties": False, "minProperties": 1,
                         "properties": {"weight": {**integer, "minimum": 1, "maximum": 65535},
                                        "cap": {**integer, "minimum": 0}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "hypyr toolstack API", "version": hypyr.__version__,
                 "description": "The REST API of `hypyr serve`: HTTP/1.1 and JSON on a unix socket. "
                                "Errors are {\"error\": \"<one sentence>\"}."},
        "servers": [{"url": "http://localhost", "description": "over the unix socket (default "
                                                              "$HYPYR_STATE_DIR/api.sock)"}],
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _too_large(n: int) -> str:
    return f"the request body is {n} bytes; the limit is {MAX_BODY} bytes (1 MiB)"


# -- HTTP ------------------------------------------------------------------------------------------
class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hypyr-serve"
    timeout = IDLE_TIMEOUT
    error_content_type = "application/json"

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
        self._send(code, {"error": text[:1].lower() + text[1:]})

    def _send(self, status: int, data: Any = None, headers: dict[str, str] | None = None,
              payload: bytes | None = None) -> None:
        if payload is None:
            payload = b"" if data is None else _dumps(data)
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
            self._send(413, {"error": _too_large(n)})
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        try:
            body = self._read_body()    # first, so that a 404/405 leaves the connection reusable
        except HttpError as e:
            self._send(e.status, {"error": e.message}, e.headers)
            return
        except OSError:                 # the client went away or stalled mid-body
            self.close_connection = True
            return
        try:
            split = urllib.parse.urlsplit(self.path)
            handler, params = route(self.command, split.path)
            req = Request(self.command, split.path, params, urllib.parse.parse_qs(split.query), body, self.headers)
            reply = handler(req)
            payload = b"" if reply.data is None else _dumps(reply.data)   # fails here, not mid-send
        except HttpError as e:
            reply = Reply(e.status, {"error": e.message}, e.headers)
        except HypyrError as e:
            reply = Reply(_status_of(e), {"error": str(e) or "the request failed"})
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            reply = Reply(500, {"error": INTERNAL_ERROR})
        else:
            self._send(reply.status, None, reply.headers, payload)
            return
        self._send(reply.status, reply.data, reply.headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def do_OPTIONS(self) -> None:
        try:
            self._read_body()
        except HttpError as e:
            self._send(e.status, {"error": e.message}, e.headers)
            return
        path = urllib.parse.urlsplit(self.path).path
        found = _match(path)
        if found is None:
            self._send(404, {"error": _no_such_path(path)})
            return
        self._send(204, None, {"Allow": ", ".join(sorted(_allowed(found[0]) | {"OPTIONS"}))})


def _peer(sock: socket.socket) -> str:
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        return f"pid={pid},uid={uid}"
    except (OSError, AttributeError, struct.error):
        return "unix"


class UnixHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer on an AF_UNIX stream socket."""

    address_family = socket.AF_UNIX
    allow_reuse_address = False
    daemon_threads = True
    request_queue_size = 64

    def server_bind(self) -> None:
        # HTTPServer.server_bind would split server_address as (host, port) and do a DNS lookup
        path = self.server_address
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
            st = os.stat(self.server_address)
            if (st.st_dev, st.st_ino) == getattr(self, "_inode", None):
                os.unlink(self.server_address)
        except OSError:
            pass


class ApiServer(UnixHTTPServer):
    def __init__(self, socket_path: str):
        _prepare_socket_path(socket_path)
        try:
            super().__init__(socket_path, RequestHandler)
        except OSError as e:
            raise HypyrError(f"cannot listen on {socket_path}: {e.strerror or e}") from None


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


def make_server(socket_path: str | None = None) -> ApiServer:
    """Bind the API socket (not yet serving): run `serve_forever()` on the result."""
    return ApiServer(socket_path or default_socket_path())


def serve(socket_path: str | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Serve the API until SIGTERM/SIGINT (or until `server.shutdown()`); remove the socket on the way out."""
    server = make_server(socket_path)
    path = server.server_address
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
        log.info("serving the hypyr API on %s", path)
        if ready:
            ready(path)
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        server.server_close()
        server.remove_socket()


def cli_main(socket_path: str | None = None) -> int:
    """`hypyr serve [--socket PATH]`; a HypyrError (e.g. the socket is in use) propagates to the CLI."""
    serve(socket_path, ready=lambda p: print(f"hypyr: serving the API on {p}", file=sys.stderr, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hypyr serve", description="Serve the toolstack's REST API on a unix socket.")
    p.add_argument("--socket", metavar="PATH", default=None,
                   help=f"unix socket to listen on (default {default_socket_path()})")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("HYPYR_LOG", "INFO").upper(), stream=sys.stderr,
                            format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    try:
        return cli_main(args.socket)
    except HypyrError as e:
        print(f"hypyr: error: {e}", file=sys.stderr)
        return 1


# -- the client --------------------------------------------------------------------------------------
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
    headers: dict[str, str]
    body: bytes

    @property
    def data(self) -> Any:
        return json.loads(self.body) if self.body else None


class ApiClient:
    """A client of `hypyr serve`.  get/post/put/delete return the decoded JSON answer (None for 204)
    and raise ApiError for an error answer; request() returns the raw Response and never raises for
    an HTTP status.  One connection per request, so an ApiClient may be shared between threads."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 600.0):
        self.socket_path = socket_path or default_socket_path()
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


if __name__ == "__main__":
    sys.exit(main())
