"""The OpenAPI 3.0 document of `hypyr serve`, and the JSON schemas it holds.

The schemas are the one description of what the API takes and gives: the server validates
request bodies and path parameters against them (``app``, ``bodies``), and ``document()`` publishes
them.  What a schema cannot say (that an xl.cfg text is a valid domain, that the CPUs of a CPU list
exist on this host) is checked by the toolstack, which answers 400 with a sentence.  Limits that
depend on the host (its CPUs) are written into the document when it is served.
"""

from __future__ import annotations

import os
from typing import Any

from hypyr.toolstack.domrecord import DomainState

MAX_WEIGHT = 65535                   # as hypyr.toolstack.sched (not imported: `hypyr serve` needs no cgroups)

# An xl CPU list ("0-3", "all,^1", "^0") as hypyr.toolstack.domconfig.parse_cpulist reads it.  ASCII
# classes only: the pattern means the same in Python's re and in ECMA-262 (JSON Schema).
_CPU_ITEM = r"(all|\^?[ ]*[0-9]{1,6}([ ]*-[ ]*[0-9]{1,6})?)"
CPU_LIST_PATTERN = rf"^[ ]*{_CPU_ITEM}[ ]*(,[ ]*{_CPU_ITEM}[ ]*)*$"

_integer, _number, _string, _boolean = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict, required=(), **more) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            **({"required": list(required)} if required else {}), **more}


def schemas(ncpus: int | None = None) -> dict[str, dict]:
    """The components/schemas of the document, for a host with ``ncpus`` CPUs (default: this one)."""
    n = ncpus or os.cpu_count() or 1
    domain_fields = {
        "name": _string, "domid": {**_integer, "minimum": 1},
        "uuid": {**_string, "format": "uuid", "description": "the domain's UUID (domids are reused, UUIDs never)"},
        "memory": {**_integer, "description": "MiB"}, "vcpus": _integer,
        "state": {**_string, "pattern": "^[r-][b-][p-][s-][c-][d-]$", "description": "xl's letters, e.g. -b----"},
        "cpu_time": {**_number, "description": "seconds"},
        "status": {**_string, "enum": [s.value for s in DomainState], "description": "the registry's state"},
        "seccomp": {**_string, "enum": ["kill", "log", "off"],
                    "description": "the VMM's seccomp filter mode (docs/confinement.md)"},
        "jail_uid": {**_integer, "nullable": True,
                     "description": "the uid its jailed VMM runs as; null when not jailed (docs/confinement.md)"},
    }
    return {
        "Error": _object({"error": {**_string, "description": "one sentence"}}, ["error"]),
        "Host": _object({"hostname": _string, "cpus": {**_integer, "minimum": 1},
                         "memory_total_mib": _integer,
                         "memory_free_mib": {**_integer, "description": "MemAvailable"},
                         "kvm_device": {**_boolean, "description": "/dev/kvm exists"},
                         "kvm_backend": {**_string, "enum": ["VT-x", "AMD-V", "PVM", "unknown"]},
                         "version": _string},
                        ["hostname", "cpus", "memory_total_mib", "memory_free_mib", "kvm_device", "kvm_backend",
                         "version"]),
        "Domain": _object(domain_fields, list(domain_fields)),
        "CreatedDomain": _object({**domain_fields,
                                  "warnings": {"type": "array", "items": _string,
                                               "description": "the configuration's warnings, if any"}},
                                 list(domain_fields)),
        "CreateDomain": _object(
            {"config": {**_string, "description": "the xl.cfg text"},
             "path": {**_string, "pattern": "^/[^\\u0000]*$",
                      "description": "an absolute file name of an xl.cfg file on the host"}},
            minProperties=1, maxProperties=1,
            description="exactly one of config (the xl.cfg text) or path (an xl.cfg file on the host)"),
        "NoOptions": _object({}, description="this request takes no fields (an empty object, or no body)"),
        "ShutdownRequest": _object({"wait": {**_boolean, "default": False,
                                             "description": "answer only once the domain has gone"}}),
        "ActionResult": _object({"name": _string, "domid": _integer,
                                 "action": {**_string, "enum": ["pause", "unpause", "reboot", "shutdown"]}},
                                ["name", "domid", "action"]),
        "SaveRequest": _object(
            {"file": {**_string, "pattern": "^/[^\\u0000]*$",
                      "description": "an absolute file name on the host (written by the domain's process)"},
             "keep_running": {**_boolean, "default": False,
                              "description": "keep the domain running (`hypyr save -c`); else it is destroyed"}},
            ["file"]),
        "SaveResult": _object({"name": _string, "domid": _integer, "file": _string, "keep_running": _boolean,
                               "seconds": _number, "bytes": {**_integer, "minimum": 0},
                               "pages_data": {**_integer, "minimum": 0, "description": "pages written with data"},
                               "pages_zero": {**_integer, "minimum": 0, "description": "zero pages (no data)"}},
                              ["name", "domid", "file", "keep_running", "seconds", "bytes", "pages_data",
                               "pages_zero"]),
        "TriggerRequest": _object(
            {"trigger": {**_string, "enum": ["nmi"], "description": "what to send (`hypyr trigger DOMAIN nmi`)"},
             "vcpu": {**_integer, "minimum": 0, "maximum": 4095, "default": 0, "description": "the vCPU"}},
            ["trigger"]),
        "TriggerResult": _object({"name": _string, "domid": _integer, "trigger": _string, "vcpu": _integer},
                                 ["name", "domid", "trigger", "vcpu"]),
        "RestoreRequest": _object(
            {"file": {**_string, "pattern": "^/[^\\u0000]*$",
                      "description": "an absolute file name on the host of a file made by save"},
             "paused": {**_boolean, "default": False, "description": "leave its vCPUs paused (`hypyr restore -p`)"}},
            ["file"]),
        "MigrateRequest": _object(
            {"host": {**_string, "minLength": 1, "pattern": "^[^ \\t\\r\\n/\\[\\]]+$",
                      "description": "the destination's host name or address (IPv6 without brackets)"},
             "port": {**_integer, "minimum": 1, "maximum": 65535, "default": 8002,
                      "description": "where `hypyr migrate-receive` listens"},
             "downtime_ms": {**_number, "minimum": 0, "maximum": 3600000, "default": 300,
                             "description": "stop and copy once the rest fits in this many ms"},
             "max_iterations": {**_integer, "minimum": 1, "maximum": 10000, "default": 30,
                                "description": "at most this many pre-copy passes"}},
            ["host"]),
        "MigrationResult": _object(
            {"name": _string, "domid": {**_integer, "description": "its id here, before it went"},
             "to": {**_string, "description": "HOST:PORT"}, "seconds": _number,
             "downtime_ms": {**_number, "nullable": True,
                             "description": "last vCPU paused here to first vCPU running there; null if it was "
                                            "paused"},
             "downtime_clock": {**_string, "enum": ["monotonic", "realtime"]},
             "iterations": _integer, "pages_data": _integer, "pages_zero": _integer, "final_pages": _integer,
             "bytes": _integer, "bandwidth": {**_number, "description": "bytes/s in the last pre-copy pass"}},
            ["name", "domid", "to", "seconds", "downtime_ms", "downtime_clock", "iterations", "pages_data",
             "pages_zero", "final_pages", "bytes", "bandwidth"]),
        "Vcpu": _object({"name": _string, "domid": _integer, "vcpu": {**_integer, "minimum": 0},
                         "cpu": {**_integer, "nullable": True, "description": "the host CPU it last ran on"},
                         "tid": {**_integer, "nullable": True},
                         "state": {**_string, "enum": ["r", "b", "p"]},
                         "time": {**_number, "description": "seconds of CPU time"},
                         "affinity": {"type": "array", "items": _integer}},
                        ["name", "domid", "vcpu", "cpu", "tid", "state", "time", "affinity"]),
        "AffinityRequest": _object({"cpus": {
            "description": f"the host CPUs, as an xl CPU list such as \"0-1\" or \"all,^0\", or as a "
                           f"non-empty list of CPU numbers from 0 to {n - 1}",
            "oneOf": [{**_string, "pattern": CPU_LIST_PATTERN},
                      {"type": "array", "minItems": 1, "items": {**_integer, "minimum": 0, "maximum": n - 1}}]}},
            ["cpus"]),
        "AffinityResult": _object({"name": _string, "domid": _integer,
                                   "vcpu": {"oneOf": [{**_integer, "minimum": 0}, {**_string, "enum": ["all"]}]},
                                   "cpus": {"type": "array", "items": _integer}},
                                  ["name", "domid", "vcpu", "cpus"]),
        "Sched": _object({"name": _string, "domid": _integer,
                          "weight": {**_integer, "minimum": 1, "maximum": MAX_WEIGHT},
                          "cap": {**_integer, "minimum": 0, "description": "percent of one CPU; 0 = no cap"}},
                         ["name", "domid", "weight", "cap"]),
        "SchedRequest": _object({"weight": {**_integer, "minimum": 1, "maximum": MAX_WEIGHT,
                                            "description": "the credit scheduler's weight (default 256)"},
                                 "cap": {**_integer, "minimum": 0, "maximum": 100 * n,
                                         "description": "percent of one host CPU, 0 for no cap"}},
                                minProperties=1, description="weight, cap or both"),
    }


# Path and query parameters, by name.
PARAMETERS: dict[str, dict] = {
    "domain": {"name": "domain", "in": "path", "required": True, "schema": _string,
               "description": "the domain's name or numeric id"},
    "vcpu": {"name": "vcpu", "in": "path", "required": True,
             "schema": {**_string, "pattern": "^([0-9]+|all)$", "description": "a vCPU number, or all"},
             "description": "a vCPU number, or all"},
    "name": {"name": "name", "in": "query", "required": False, "style": "form", "explode": True,
             "schema": {"type": "array", "items": _string},
             "description": "only these domains, in this order (names or ids; repeat the parameter or "
                            "separate them with commas)"},
}

# What each error status means, for the document.
ERRORS: dict[int, str] = {
    400: "bad input: the body or a parameter is not what this operation takes (see the schemas), or the "
         "toolstack refused a value the schema cannot judge (an xl.cfg text with an error, CPUs this host "
         "does not have); the sentence says what to fix",
    404: "no such domain (or vCPU)",
    409: "the domain is not in a state that allows this (not running, paused, ...), or a domain of that "
         "name exists",
    411: "the body was sent chunked: send it with a Content-Length",
    413: "the body is over 1 MiB",
    500: "a bug in hypyr: the details are in the server's log, not in the answer",
    501: "this host cannot do it (no cgroups with the cpu controller, for the scheduler)",
    503: "the toolstack cannot do it now: the registry stayed locked, the domain's process does not answer, "
         "not enough free host memory; it may work later",
    504: "the domain did not do it in time (answer, shut down, stop)",
}
BODY_ERRORS = (400, 411, 413)        # any operation with a request body can answer these

DESCRIPTION = (
    "The REST API of `hypyr serve`: HTTP/1.1 and JSON on a unix socket (mode 0600). Every operation "
    "mirrors a `hypyr` command and calls the same Python API. Errors are {\"error\": \"<one sentence>\"} "
    "with the status of the error's kind. Besides the operations listed, HEAD is answered wherever GET "
    "is and OPTIONS everywhere (204 with an Allow header); any other method on a known path gets 405 "
    "with an Allow header, an unknown path 404. A request body is read only by operations that "
    "document one, and must be JSON; bodies over 1 MiB get 413.")


def document(routes: dict[str, dict[str, Any]], version: str, ncpus: int | None = None) -> dict:
    """The OpenAPI 3.0 document of ``routes`` (path template → {METHOD: app.Operation})."""
    def response(status: str, what: dict) -> dict:
        r = {"description": what["description"]}
        if what.get("schema") is not None:
            r["content"] = {"application/json": {"schema": what["schema"]}}
        if what.get("headers"):
            r["headers"] = what["headers"]
        return r

    paths: dict[str, dict] = {}
    for template, methods in routes.items():
        item: dict[str, dict] = {}
        for method, op in methods.items():
            errors = set(op.errors) | {500} | (set(BODY_ERRORS) if op.body else set())
            o: dict[str, Any] = {"operationId": op.op_id, "summary": op.summary, "tags": [op.tag],
                                 "responses": {**{s: response(s, w) for s, w in op.ok.items()},
                                               **{str(e): response(str(e), {"schema": ref("Error"),
                                                                            "description": ERRORS[e]})
                                                  for e in sorted(errors)}}}
            params = [PARAMETERS[p] for p in op.path_params(template)] + [PARAMETERS[q] for q in op.query]
            if params:
                o["parameters"] = params
            if op.body:
                o["requestBody"] = {"required": op.body_required,
                                    "content": {"application/json": {"schema": ref(op.body)}}}
            item[method.lower()] = o
        paths[template] = item
    return {
        "openapi": "3.0.3",
        "info": {"title": "hypyr toolstack API", "version": version, "description": DESCRIPTION},
        "servers": [{"url": "http://localhost",
                     "description": "over the unix socket (default $HYPYR_STATE_DIR/api.sock)"}],
        "paths": paths,
        "components": {"schemas": schemas(ncpus)},
    }
