"""The toolstack's typed errors, domain-state enum, name rule and logging setup."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sqlite3
import threading

import pytest

from hypyr.errors import Conflict, HypyrError, InvalidInput, NotFound, NotSupported, OperationTimeout, Unavailable
from hypyr.toolstack import api, errors, logs, paths
from hypyr.toolstack.domrecord import DomainState
from hypyr.toolstack.errors import (
    ConfigValueError,
    DomainExists,
    DomainNotFound,
    DomainStateError,
    DomainTimeout,
    DomainUnreachable,
    InvalidConfig,
    RegistryBusy,
    StaleDomainError,
    from_report,
    type_name,
)
from hypyr.toolstack.names import DOMAIN0_NAME, name_problem
from hypyr.toolstack.registry import Registry
from hypyr.toolstack.xlcfg import XlCfgError, loads


# -- errors ---------------------------------------------------------------------------------------
def test_every_toolstack_error_is_a_kind():
    kinds = (InvalidInput, NotFound, Conflict, Unavailable, NotSupported)
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, HypyrError) and cls.__module__ == errors.__name__:
            assert issubclass(cls, kinds), cls
    assert issubclass(OperationTimeout, Unavailable)
    assert issubclass(XlCfgError, InvalidConfig) and issubclass(ConfigValueError, InvalidConfig)


def test_errors_cross_a_process_boundary_by_type_name():
    for cls in (DomainStateError, DomainTimeout, DomainNotFound, InvalidConfig, NotSupported, HypyrError):
        e = from_report(type_name(cls("it went wrong")), "it went wrong")
        assert type(e) is cls and str(e) == "it went wrong"
    assert type_name(XlCfgError("vm.cfg", 3, "bad")) == "InvalidConfig"      # the nearest known class
    assert type(from_report("NoSuchError", "x")) is HypyrError
    assert type(from_report(None, "x")) is HypyrError


def test_registry_errors_are_typed(reg):
    reg.reserve("web", {})
    with pytest.raises(DomainExists, match=r"^a domain named web already exists"):
        reg.reserve("web", {})
    with pytest.raises(DomainNotFound, match=r"^no domain named nope$"):
        reg.get("nope")
    with pytest.raises(DomainNotFound, match=r"^no domain with id 99$"):
        reg.get(99)
    with pytest.raises(DomainNotFound, match=r"^no domain with id 99$"):
        reg.get("0099")
    with pytest.raises(DomainNotFound, match=r"^no domain with id 9{5000}$"):
        reg.get("9" * 5000)                   # more digits than int() converts: not a traceback
    with pytest.raises(DomainNotFound, match="the host"):
        reg.get(DOMAIN0_NAME)
    with pytest.raises(InvalidConfig):
        reg.reserve("12", {})
    rec = reg.get("web")
    with pytest.raises(StaleDomainError):
        reg.update_state(rec.domid, DomainState.PAUSED, uuid="00000000-0000-0000-0000-000000000001")
    assert issubclass(StaleDomainError, DomainNotFound)


def test_a_registry_locked_too_long_is_registry_busy(state):
    with Registry() as first:
        first.reserve("web", {})
        blocker = sqlite3.connect(first.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with Registry(first.path, timeout=0.2) as second, pytest.raises(RegistryBusy, match="stayed locked"):
                second.reserve("db", {})
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


def _serve_control(path: str, reply: dict | bytes) -> socket.socket:
    """A domain process's control socket that answers every operation with ``reply`` (a dict as
    its JSON line; bytes as they are)."""
    line = reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                for _line in f:
                    conn.sendall(line)
    threading.Thread(target=loop, daemon=True).start()
    return srv


@pytest.mark.parametrize("reply,error", [
    ({"ok": False, "error": "domain web is paused: unpause it first", "type": "DomainStateError"}, DomainStateError),
    ({"ok": False, "error": "something odd"}, HypyrError),
    ({"ok": False, "error": "odd", "type": "Exception"}, HypyrError),
])
def test_a_domain_process_refusal_keeps_its_type(reg, reply, error):
    rec = reg.reserve("web", {})
    sock = paths.control_socket(rec.domid)
    srv = _serve_control(str(sock), reply)
    try:
        reg.set_running(rec.domid, os.getpid(), sock, uuid=rec.uuid)
        with pytest.raises(error) as e:
            api.shutdown("web")
        assert type(e.value) is error and str(e.value) == reply["error"]
    finally:
        srv.close()


@pytest.mark.parametrize("line", [b"not json\n", b"[" * 5000 + b"\n", b"[1]\n"], ids=["text", "nested", "list"])
def test_a_domain_process_answer_that_is_not_a_json_object_is_unreachable(reg, line):
    """The control socket is served by the jailed VMM: whatever it answers, the CLI says one sentence."""
    rec = reg.reserve("web", {})
    sock = paths.control_socket(rec.domid)
    srv = _serve_control(str(sock), line)
    try:
        reg.set_running(rec.domid, os.getpid(), sock, uuid=rec.uuid)
        with pytest.raises(DomainUnreachable, match=r"^domain web answered pause with something that is not a JSON "
                                                    r"object$"):
            api.pause("web")
    finally:
        srv.close()


def test_control_errors(reg):
    rec = reg.reserve("web", {})
    with pytest.raises(DomainStateError, match=r"^domain web has no control socket \(state creating\)$"):
        api.pause("web")
    with pytest.raises(DomainNotFound):
        api.pause("ghost")
    reg.set_running(rec.domid, os.getpid(), paths.control_socket(rec.domid), uuid=rec.uuid)
    with pytest.raises(DomainUnreachable, match="not answering"):   # nothing listens on its socket
        api.pause("web")


# -- states -------------------------------------------------------------------------------------------
def test_domain_states_are_the_strings_they_always_were(reg):
    assert [s.value for s in DomainState] == ["creating", "running", "paused", "shutdown", "crashed", "dying",
                                              "dead"]
    rec = reg.reserve("web", {"memory": 64})
    assert rec.state is DomainState.CREATING and rec.state == "creating"
    reg.set_running(rec.domid, os.getpid(), None, uuid=rec.uuid)
    reg.update_state(rec.domid, "paused", uuid=rec.uuid)              # a plain str still does
    got = reg.get("web")
    assert got.state is DomainState.PAUSED and f"{got.state}" == "paused"
    stored = sqlite3.connect(reg.path).execute("SELECT state, typeof(state) FROM domains").fetchone()
    assert stored == ("paused", "text")
    info = api.domain_info("web")
    assert info.status is DomainState.PAUSED and info.state == "--p---"
    assert json.loads(json.dumps(dataclasses.asdict(info)))["status"] == "paused"
    with pytest.raises(ValueError, match="unknown domain state"):
        reg.update_state(rec.domid, "sleeping", uuid=rec.uuid)


def test_domain_info_of_a_gone_domain_is_not_found(reg):
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    reg.reserve("gone", {}, pid=dead.pid)        # its `hypyr create` died
    with pytest.raises(DomainNotFound):
        api.domain_info("gone")


# -- names ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "Web-01", "db_2.prod", "0day", "x" * 64, "", "-x", "_x", "a b", "x" * 65,
                                  "dom/0", "12", "naïve", "a:b", "a+b", "a@b", "Domain-0", ".."])
def test_one_name_rule_for_configs_and_the_registry(reg, name):
    """xl.cfg and the registry accept exactly the same names (they once had two rules)."""
    ok = name_problem(name) is None
    try:
        loads(f"name = '{name}'\nkernel = '/k'\n")
        cfg_ok = True
    except XlCfgError as e:
        assert e.message == name_problem(name)
        cfg_ok = False
    try:
        reg.reserve(name, {})
        reg_ok = True
    except InvalidConfig as e:
        assert str(e) == name_problem(name)
        reg_ok = False
    assert ok == cfg_ok == reg_ok, name


# -- logging ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,level", [(None, logging.INFO), ("debug", logging.DEBUG), ("ERROR", logging.ERROR),
                                       ("bogus", logging.INFO), ("", logging.INFO), ("Level 5", logging.INFO)])
def test_log_level_from_hypyr_log(monkeypatch, env, level):
    if env is None:
        monkeypatch.delenv("HYPYR_LOG", raising=False)
    else:
        monkeypatch.setenv("HYPYR_LOG", env)
    assert logs.level(logging.INFO) == level
