"""The REST API's request handling in process (``App(ROUTES).handle(method, target, body)``, what
``hypyr serve`` calls for every HTTP request, without the socket) against the fake toolstack of
tests/unit/test_server.py (domains in a dict; xl.cfg text goes through the real parser).  save,
restore and migrate, which that fake leaves alone, are faked here too: no request may reach a
real domain, file or host.  Requests: a method, a path from the route table with fuzzed
parameters and query (or a raw target), and a body built from the schemas' keys with fuzzed
values (or raw bytes).  Oracles: handle() returns; never 500 (an internal error, logged with a
traceback); the encoded reply is JSON, an object with "error" for every error status."""

import dataclasses
import json

from _harness import FDP, check, check_rss, errors_logged, fuzz, instrumented

with instrumented():
    from hypyr.toolstack import api, sched, transfer
    from hypyr.toolstack.errors import DomainStateError
    from hypyr.toolstack.server.app import App
    from hypyr.toolstack.server.routes import ROUTES
from test_server import FakeToolstack

fake = FakeToolstack()
for _fn in ("list_domains", "domain_info", "describe", "create", "shutdown", "destroy", "vcpu_list", "vcpu_pin"):
    setattr(api, _fn, getattr(fake, _fn))
for _op in ("pause", "unpause", "reboot"):
    setattr(api, _op, fake._op(_op))
sched.get_params, sched.set_params = fake.get_params, fake.set_params


def _save(name, file, keep_running=False, progress=None):
    d = fake.domain_info(name)
    return transfer.SaveResult(d.name, d.domid, str(file), keep_running, 0.1, 4096, 1, 0)


def _restore(file, paused=False):
    raise DomainStateError(f"{file} is not a saved domain")


def _migrate(name, host, port=8002, *, downtime_ms=300, max_iterations=30, progress=None):
    d = fake.domain_info(name)
    fields = {f.name: 0 for f in dataclasses.fields(transfer.MigrationResult)}
    fields.update(name=d.name, domid=d.domid, to=f"{host}:{port}", downtime_clock="monotonic")
    return transfer.MigrationResult(**fields)


transfer.save, transfer.restore, transfer.migrate = _save, _restore, _migrate

app = App(ROUTES)
TEMPLATES = sorted(ROUTES)
METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")
KEYS = ("config", "path", "wait", "file", "keep_running", "paused", "host", "port", "downtime_ms",
        "max_iterations", "weight", "cap", "cpus", "x")
CFG = "name = 'fz'\nkernel = '/dev/null'\nmemory = 64\n"


def value(fdp, depth=0):
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 3 else 5)
    if kind == 0:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 1:
        return fdp.ConsumeInt(8) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-2, 70000)
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 5:
        return CFG + fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
    if kind == 6:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {KEYS[fdp.ConsumeIntInRange(0, len(KEYS) - 1)]: value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))}


def param(fdp):
    k = fdp.ConsumeIntInRange(0, 5)
    if k <= 2:
        return ("web", "db", "1", "2", "fz", "99999999999999999999")[fdp.ConsumeIntInRange(0, 5)]
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20)).replace("/", "%2F")


def one_input(data: bytes) -> None:
    fdp = FDP(data)
    fake.__init__()
    for _ in range(4):
        if fdp.remaining_bytes() == 0:
            break
        method = METHODS[fdp.ConsumeIntInRange(0, len(METHODS) - 1)]
        if fdp.ConsumeIntInRange(0, 7):
            target = TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)]
            for p in ("{domain}", "{vcpu}"):
                if p in target:
                    target = target.replace(p, param(fdp))
            if fdp.ConsumeIntInRange(0, 3) == 0:
                target += "?" + fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20))
        else:
            target = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
        if fdp.ConsumeIntInRange(0, 3):
            n = fdp.ConsumeIntInRange(0, 4)
            obj = {KEYS[fdp.ConsumeIntInRange(0, len(KEYS) - 1)]: value(fdp) for _ in range(n)}
            body = json.dumps(obj).encode()
        else:
            body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        reply, encoded = app.handle(method, target, body)
        check(reply.status != 500, f"{method} {target!r} {body[:200]!r}: 500 {encoded[:300]!r}")
        if encoded:
            out = json.loads(encoded)
            if reply.status >= 400:
                check(isinstance(out, dict) and isinstance(out.get("error"), str),
                      f"an error without a sentence: {out}")
    errors_logged()
    check_rss()


if __name__ == "__main__":
    fuzz(one_input)
