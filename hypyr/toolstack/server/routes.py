"""The operations of `hypyr serve`: each mirrors a `hypyr` command and calls the same Python API
(``hypyr.toolstack.api``, ``sched``), so the API and the CLI cannot disagree.

Handlers get bodies and path parameters already checked against the document's schemas; what
the toolstack refuses it raises as a typed error, and ``app.STATUS`` makes that a status.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.parse

import hypyr
from hypyr import procfs
from hypyr.toolstack import api, domconfig, sched, transfer, xlcfg
from hypyr.toolstack.server import openapi
from hypyr.toolstack.server.app import Operation, Reply, Request


def _find(req: Request) -> api.DomainInfo:
    return api.domain_info(req.params["domain"])


def ep_openapi(req: Request) -> Reply:
    return Reply(200, openapi.document(ROUTES, hypyr.__version__))


def ep_host(req: Request) -> Reply:
    total, available = procfs.memory_mib()
    return Reply(200, {"hostname": socket.gethostname(), "cpus": os.cpu_count() or 1, "memory_total_mib": total,
                       "memory_free_mib": available, "kvm_device": os.path.exists("/dev/kvm"),
                       "kvm_backend": procfs.kvm_backend(), "version": hypyr.__version__})


def ep_list_domains(req: Request) -> Reply:
    wanted = [n for v in req.query.get("name", []) for n in v.split(",") if n]
    if not wanted:
        return Reply(200, api.list_domains(None))
    picked: dict[int, api.DomainInfo] = {}
    for ident in wanted:                  # in the order asked for, each domain once
        d = api.domain_info(ident)
        picked.setdefault(d.domid, d)
    return Reply(200, list(picked.values()))


def ep_create_domain(req: Request) -> Reply:
    # errors of a config given inline read "<request>:LINE: sentence"
    cfg = xlcfg.loads(req.body["config"], "<request>") if "config" in req.body else xlcfg.load(req.body["path"])
    rec = api.create(cfg)
    data = dataclasses.asdict(api.describe(rec))
    if cfg.warnings:
        data["warnings"] = list(cfg.warnings)
    return Reply(201, data, {"Location": f"/domains/{urllib.parse.quote(rec.name, safe='')}"})


def ep_get_domain(req: Request) -> Reply:
    return Reply(200, _find(req))


def _action(op: str):
    def ep(req: Request) -> Reply:
        d = _find(req)
        if op == "shutdown":
            api.shutdown(d.name, wait=req.body.get("wait", False))
        else:
            getattr(api, op)(d.name)
        if op == "destroy":
            return Reply(204)
        return Reply(200, {"name": d.name, "domid": d.domid, "action": op})
    ep.__name__ = f"ep_{op}"
    return ep


def ep_save(req: Request) -> Reply:
    d = _find(req)
    r = transfer.save(d.name, req.body["file"], keep_running=req.body.get("keep_running", False))
    return Reply(200, r)


def ep_restore(req: Request) -> Reply:
    rec = transfer.restore(req.body["file"], paused=req.body.get("paused", False))
    return Reply(201, api.describe(rec), {"Location": f"/domains/{urllib.parse.quote(rec.name, safe='')}"})


def ep_migrate(req: Request) -> Reply:
    d = _find(req)
    b = req.body
    r = transfer.migrate(d.name, b["host"], b.get("port", transfer.MIGRATION_PORT),
                         downtime_ms=b.get("downtime_ms", 300), max_iterations=b.get("max_iterations", 30))
    return Reply(200, r)


def ep_trigger(req: Request) -> Reply:
    d = _find(req)
    what, vcpu = req.body["trigger"], req.body.get("vcpu", 0)
    api.trigger(d.name, what, vcpu)
    return Reply(200, {"name": d.name, "domid": d.domid, "trigger": what, "vcpu": vcpu})


def ep_vcpus(req: Request) -> Reply:
    return Reply(200, api.vcpu_list(_find(req).name))


def ep_vcpu_affinity(req: Request) -> Reply:
    value, vcpu = req.body["cpus"], req.params["vcpu"]
    cpus = set(value) if isinstance(value, list) else domconfig.parse_cpulist(value, os.cpu_count() or 1)
    d = _find(req)
    vcpu = vcpu if vcpu == "all" else vcpu.lstrip("0") or "0"   # digits, maybe too many for int()
    api.vcpu_pin(d.name, vcpu, cpus)                             # VcpuNotFound unless it exists
    return Reply(200, {"name": d.name, "domid": d.domid, "vcpu": vcpu if vcpu == "all" else int(vcpu),
                       "cpus": sorted(cpus)})


def _sched_reply(d: api.DomainInfo, params: tuple[int, int]) -> Reply:
    weight, cap = params
    return Reply(200, {"name": d.name, "domid": d.domid, "weight": weight, "cap": cap})


def ep_get_sched(req: Request) -> Reply:
    d = _find(req)
    return _sched_reply(d, sched.get_params(d))


def ep_put_sched(req: Request) -> Reply:
    d = _find(req)
    return _sched_reply(d, sched.set_params(d, weight=req.body.get("weight"), cap=req.body.get("cap")))


# -- the route table: what is served, and what the OpenAPI document says about it ------------------------
def _ok(status: str, schema: str | dict | None, description: str, **more) -> dict[str, dict]:
    return {status: {"schema": openapi.ref(schema) if isinstance(schema, str) else schema,
                     "description": description, **more}}


def _action_op(op: str, summary: str) -> Operation:
    return Operation(_action(op), f"{op}Domain", summary,
                     _ok("204", None, "the domain is gone") if op == "destroy"
                     else _ok("200", "ActionResult", "done"),
                     errors=(404, 503) if op == "destroy" else (404, 409, 503, 504),
                     body="ShutdownRequest" if op == "shutdown" else "NoOptions", body_required=False)


ROUTES: dict[str, dict[str, Operation]] = {
    "/openapi.json": {"GET": Operation(ep_openapi, "getOpenApi", "This document",
                                       _ok("200", {"type": "object"}, "the OpenAPI document"), tag="meta")},
    "/host": {"GET": Operation(ep_host, "getHost", "Host CPUs, memory, KVM backend and hypyr version",
                               _ok("200", "Host", "host information"), tag="host")},
    "/domains": {
        "GET": Operation(ep_list_domains, "listDomains", "List domains (like `hypyr list`)",
                         _ok("200", {"type": "array", "items": openapi.ref("Domain")}, "the domains"),
                         errors=(404, 503), query=("name",)),
        "POST": Operation(ep_create_domain, "createDomain", "Create and start a domain (like `hypyr create`)",
                          _ok("201", "CreatedDomain", "the domain is running",
                              headers={"Location": {"schema": {"type": "string"},
                                                    "description": "/domains/{name}"}}),
                          errors=(409, 501, 503, 504), body="CreateDomain"),
    },
    "/domains/{domain}": {
        "GET": Operation(ep_get_domain, "getDomain", "One domain", _ok("200", "Domain", "the domain"),
                         errors=(404, 503)),
        "DELETE": Operation(_action("destroy"), "deleteDomain", "Destroy a domain (same as POST .../destroy)",
                            _ok("204", None, "the domain is gone"), errors=(404, 503, 504)),
    },
    "/domains/{domain}/pause": {"POST": _action_op("pause", "Pause every vCPU (like `hypyr pause`)")},
    "/domains/{domain}/unpause": {"POST": _action_op("unpause", "Resume a paused domain (like `hypyr unpause`)")},
    "/domains/{domain}/reboot": {"POST": _action_op("reboot", "Reset the domain (like `hypyr reboot`)")},
    "/domains/{domain}/shutdown": {"POST": _action_op("shutdown", "Ask the guest to power off (like `hypyr "
                                                                  "shutdown`)")},
    "/domains/{domain}/destroy": {"POST": _action_op("destroy", "Stop a domain at once (like `hypyr destroy`)")},
    "/domains/{domain}/save": {
        "POST": Operation(ep_save, "saveDomain", "Save the domain to a file on the host, then destroy it unless "
                                                 "keep_running (like `hypyr save [-c]`)",
                          _ok("200", "SaveResult", "saved (and, without keep_running, destroyed)"),
                          errors=(404, 409, 503, 504), body="SaveRequest"),
    },
    "/domains/{domain}/migrate": {
        "POST": Operation(ep_migrate, "migrateDomain", "Migrate the domain live to a `hypyr migrate-receive` "
                                                       "(like `hypyr migrate`); answers once it runs there",
                          _ok("200", "MigrationResult", "the domain runs at the destination and is gone here"),
                          errors=(404, 409, 503, 504), body="MigrateRequest"),
    },
    "/domains/{domain}/trigger": {
        "POST": Operation(ep_trigger, "triggerDomain", "Send an NMI to one of the domain's vCPUs (like `hypyr "
                                                       "trigger`)",
                          _ok("200", "TriggerResult", "sent"), errors=(404, 409, 503, 504), body="TriggerRequest"),
    },
    "/restore": {
        "POST": Operation(ep_restore, "restoreDomain", "Restore a domain from a file made by save (like `hypyr "
                                                       "restore [-p]`)",
                          _ok("201", "Domain", "the domain runs (or is paused)",
                              headers={"Location": {"schema": {"type": "string"},
                                                    "description": "/domains/{name}"}}),
                          errors=(409, 503, 504), body="RestoreRequest"),
    },
    "/domains/{domain}/vcpus": {
        "GET": Operation(ep_vcpus, "listVcpus", "The domain's vCPUs (like `hypyr vcpu-list`)",
                         _ok("200", {"type": "array", "items": openapi.ref("Vcpu")}, "one row per vCPU"),
                         errors=(404, 503, 504)),
    },
    "/domains/{domain}/vcpus/{vcpu}/affinity": {
        "PUT": Operation(ep_vcpu_affinity, "pinVcpu", "Set a vCPU's host CPU affinity (like `hypyr vcpu-pin`)",
                         _ok("200", "AffinityResult", "the new affinity"), errors=(404, 409, 503, 504),
                         body="AffinityRequest"),
    },
    "/domains/{domain}/sched": {
        "GET": Operation(ep_get_sched, "getSched", "Credit-scheduler weight and cap",
                         _ok("200", "Sched", "the parameters"), errors=(404, 409, 501, 503)),
        "PUT": Operation(ep_put_sched, "setSched", "Set the weight, the cap or both (like `hypyr sched-credit`)",
                         _ok("200", "Sched", "the parameters now in force"), errors=(404, 409, 501, 503),
                         body="SchedRequest"),
    },
}
