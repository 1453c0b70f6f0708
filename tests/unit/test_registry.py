"""The domain registry: domid allocation, names, liveness, reaping, and concurrent use."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import socket
import sqlite3
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hypyr.errors import HypyrError
from hypyr.toolstack import paths, sched
from hypyr.toolstack.domrecord import STATES, DomainRecord, host_record, is_alive, proc_start_time
from hypyr.toolstack.registry import Registry, StaleDomainError


def _exited_child() -> subprocess.Popen:
    """A `sleep 0` child, left a zombie (its /proc entry is still readable)."""
    return subprocess.Popen(["sleep", "0"])


def _set_pid_start(reg: Registry, domid: int, value: str) -> None:
    with sqlite3.connect(reg.path) as db:
        db.execute("UPDATE domains SET pid_start = ? WHERE domid = ?", (value, domid))
    db.close()


# -- paths ----------------------------------------------------------------------------------------
def test_state_dir_from_env(state):
    assert paths.state_dir() == state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert paths.registry_path() == state / "domains.sqlite"
    assert paths.domain_dir(3) == state / "domains" / "3"
    assert paths.log_dir() == state / "logs" and (state / "logs").is_dir()


def test_state_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("HYPYR_STATE_DIR", raising=False)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if p == "/run" else real_access(p, m))  # not /run/hypyr
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir()
    assert paths.state_dir() == tmp_path / "xdg" / "hypyr"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.state_dir() == tmp_path / "home" / ".local" / "state" / "hypyr"
    assert stat.S_IMODE(paths.state_dir().stat().st_mode) == 0o700


# -- basics ---------------------------------------------------------------------------------------
def test_reserve_get_list_remove(reg, state):
    cfg = json.dumps({"memory": 256, "vcpus": 2})
    rec = reg.reserve("web", cfg)
    assert isinstance(rec, DomainRecord)
    assert (rec.domid, rec.name, rec.state, rec.restarts) == (1, "web", "creating", 0)
    assert rec.pid == os.getpid() and rec.pid_start == proc_start_time(os.getpid())
    assert rec.config_dict() == {"memory": 256, "vcpus": 2}
    assert (state / "domains" / "1").is_dir()
    assert reg.get("web") == rec
    assert reg.list() == [rec]

    sock = paths.control_socket(1)
    reg.set_running(1, os.getpid(), sock, uuid=rec.uuid)
    got = reg.get("web")
    assert (got.state, got.socket, got.pid) == ("running", str(sock), os.getpid())
    assert got.started is not None
    reg.update_state(1, "paused", uuid=rec.uuid)
    assert reg.get("1").state == "paused"
    assert reg.bump_restarts(1, uuid=rec.uuid) == 1 and reg.get("web").restarts == 1

    assert reg.remove(1, uuid=rec.uuid) is True
    assert reg.list() == []
    assert not (state / "domains" / "1").exists()
    assert reg.remove(1) is False


def test_get_by_id_string_and_name(reg):
    a = reg.reserve("alpha", "{}")
    b = reg.reserve("beta", "{}")
    assert reg.get("2") == b and reg.get(2) == b and reg.get("beta") == b
    assert reg.get(" 1 ") == a and reg.get("alpha") == a


@pytest.mark.parametrize("key, message", [("nosuch", "no domain named nosuch"),
                                          ("42", "no domain with id 42")])
def test_unknown_domain_is_one_sentence(reg, key, message):
    reg.reserve("alpha", "{}")
    with pytest.raises(HypyrError) as e:
        reg.get(key)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_domain0_is_synthesised_not_stored(reg):
    assert host_record().domid == 0 and host_record().name == "Domain-0"
    with pytest.raises(HypyrError, match="reserved for the host"):
        reg.reserve("Domain-0", "{}")
    with pytest.raises(HypyrError, match="the host"):
        reg.get("0")
    assert reg.reserve("x", "{}").domid == 1


@pytest.mark.parametrize("name", ["", "12", "a b", "a/b", "-x", ".", "x" * 65, "tab\t"])
def test_bad_names_refused(reg, name):
    with pytest.raises(HypyrError):
        reg.reserve(name, "{}")


def test_domid_reuses_smallest_free(reg):
    for n in "abcde":
        reg.reserve(n, "{}")
    reg.remove(2)
    reg.remove(4)
    assert reg.reserve("f", "{}").domid == 2
    assert reg.reserve("g", "{}").domid == 4
    assert reg.reserve("h", "{}").domid == 6
    assert [r.domid for r in reg.list()] == [1, 2, 3, 4, 5, 6]


def test_duplicate_name_refused(reg):
    reg.reserve("web", "{}")
    with pytest.raises(HypyrError) as e:
        reg.reserve("web", "{}")
    assert str(e.value) == "a domain named web already exists (id 1)"
    assert len(reg.list()) == 1


def test_state_validated_and_missing_rows(reg):
    a = reg.reserve("a", "{}")
    with pytest.raises(ValueError):
        reg.update_state(1, "sleepy", uuid=a.uuid)
    with pytest.raises(HypyrError, match="no domain with id 9"):
        reg.update_state(9, "running", uuid=a.uuid)
    with pytest.raises(HypyrError, match="no domain with id 9"):
        reg.set_running(9, os.getpid(), None, uuid=a.uuid)
    with pytest.raises(HypyrError, match="no domain with id 9"):
        reg.bump_restarts(9, uuid=a.uuid)
    for s in STATES:
        reg.update_state(1, s, uuid=a.uuid)


def test_schema_versioned_and_reopened(reg, state):
    reg.reserve("a", "{}")
    reg.close()
    with sqlite3.connect(state / "domains.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = Registry()
    assert again.get("a").domid == 1
    again.close()


def test_newer_schema_refused(state):
    state.mkdir(parents=True)
    with sqlite3.connect(state / "domains.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(HypyrError, match="newer hypyr"):
        Registry()


# -- liveness and reaping -------------------------------------------------------------------------
def test_dead_process_reaped_and_socket_removed(reg, state):
    rec = reg.reserve("web", "{}")
    d = state / "domains" / str(rec.domid)
    sock_path = d / "control.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()
    (d / "console.log").write_text("guest said hi\n")
    (d / "vmm.log").write_text("vmm said hi\n")

    child = _exited_child()
    reg.set_running(rec.domid, child.pid, sock_path, uuid=rec.uuid)
    child.wait()  # gone for good
    assert not is_alive(reg.get("web"))
    assert reg.get("web").state == "dead"  # never reported running

    reaped = reg.reap()
    assert [(r.name, r.state) for r in reaped] == [("web", "dead")]
    assert reaped[0].exit_reason
    assert not sock_path.exists() and not d.exists()
    assert paths.kept_log("web", "console").read_text() == "guest said hi\n"
    assert paths.kept_log("web", "vmm").read_text() == "vmm said hi\n"
    assert reg.list() == []
    assert reg.reap() == []


def test_kept_logs_include_the_rotated_part_and_drop_an_older_domains(reg, state):
    paths.log_dir().mkdir(parents=True, exist_ok=True)
    paths.rotated_log(paths.kept_log("web", "vmm")).write_text("an older web's vmm log\n")
    rec = reg.reserve("web", "{}")
    d = state / "domains" / str(rec.domid)
    (d / "console.log").write_text("newest\n")
    (d / "console.log.1").write_text("older part\n")
    (d / "vmm.log").write_text("vmm\n")
    reg.remove(rec.domid, uuid=rec.uuid)
    assert paths.kept_log("web", "console").read_text() == "newest\n"
    assert paths.rotated_log(paths.kept_log("web", "console")).read_text() == "older part\n"
    assert not paths.rotated_log(paths.kept_log("web", "vmm")).exists()


def test_zombie_counts_as_dead(reg):
    rec = reg.reserve("web", "{}")
    child = _exited_child()
    try:
        for _ in range(200):
            st = Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0]
            if st == "Z":
                break
            time.sleep(0.01)
        reg.set_running(rec.domid, child.pid, None, uuid=rec.uuid)
        assert reg.get("web").pid_start is not None
        assert not is_alive(reg.get("web"))
        assert reg.list() == []
    finally:
        child.wait()


def test_list_reaps_dead_but_keeps_live(reg):
    reg.reserve("live", "{}")
    dead = reg.reserve("dead", "{}")
    child = _exited_child()
    reg.set_running(dead.domid, child.pid, None, uuid=dead.uuid)
    child.wait()
    assert [(r.name, r.state) for r in reg.list()] == [("live", "creating")]


def test_pid_reuse_detected(reg):
    rec = reg.reserve("web", "{}")
    reg.set_running(rec.domid, os.getpid(), None, uuid=rec.uuid)
    assert is_alive(reg.get("web")) and reg.is_alive(reg.get("web"))
    _set_pid_start(reg, rec.domid, "1")  # the pid now belongs to a process started at another time
    assert not reg.is_alive(reg.get("web"))
    assert reg.get("web").state == "dead"
    assert reg.list() == []


def test_crashed_rows_kept_until_removed(reg, state):
    rec = reg.reserve("web", "{}")
    child = _exited_child()
    reg.set_running(rec.domid, child.pid, None, uuid=rec.uuid)
    reg.update_state(rec.domid, "crashed", exit_reason="triple fault", uuid=rec.uuid)
    child.wait()
    assert reg.reap() == []
    [got] = reg.list()
    assert (got.name, got.state, got.exit_reason) == ("web", "crashed", "triple fault")
    with pytest.raises(HypyrError, match="already exists"):
        reg.reserve("web", "{}")
    assert reg.remove(rec.domid)
    assert reg.reserve("web", "{}").domid == 1


def test_dead_duplicate_is_replaced(reg, state):
    old = reg.reserve("web", "{}")
    child = _exited_child()
    reg.set_running(old.domid, child.pid, None, uuid=old.uuid)
    child.wait()
    reg.reserve("other", "{}")
    new = reg.reserve("web", '{"memory": 1}')
    assert new.domid == 1 and new.state == "creating" and new.config_dict() == {"memory": 1}
    assert [r.name for r in reg.list()] == ["web", "other"]


def test_explicit_dead_state_is_reaped(reg):
    rec = reg.reserve("web", "{}")
    reg.update_state(rec.domid, "dead", exit_reason="powered off", uuid=rec.uuid)
    [gone] = reg.reap()
    assert (gone.name, gone.exit_reason) == ("web", "powered off")


def test_creating_row_owned_by_given_pid(reg):
    child = _exited_child()
    child.wait()
    reg.reserve("orphan", "{}", pid=child.pid)  # its `hypyr create` died before the domain ran
    assert reg.list() == []


# -- concurrency ----------------------------------------------------------------------------------
def _reserver(state_dir: str, owner: int, names: list[str], go, out) -> None:
    os.environ["HYPYR_STATE_DIR"] = state_dir
    results = []
    try:
        go.wait(30)
        reg = Registry()
        for n in names:
            try:
                rec = reg.reserve(n, json.dumps({"name": n}), pid=owner)
                results.append(("ok", n, rec.domid))
            except HypyrError as e:
                results.append(("dup", n, str(e)))
            reg.list()  # readers interleave with writers
        reg.close()
    except BaseException as e:  # noqa: BLE001 - anything else is a failure the parent reports
        results.append(("error", type(e).__name__, str(e)))
    out.put(results)


def test_concurrent_reservations(state):
    """8 processes x 10 names, starting together on a registry that does not exist yet."""
    assert not state.exists()
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    rng = random.Random(1234)
    procs = []
    for i in range(8):
        names = [f"vm{(i % 4) * 10 + j}" for j in range(10)]  # every name wanted by 2 processes
        rng.shuffle(names)
        p = ctx.Process(target=_reserver, args=(str(state), os.getpid(), names, go, out))
        p.start()
        procs.append(p)
    go.set()
    results = [r for _ in procs for r in out.get(timeout=120)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0

    errors = [r for r in results if r[0] == "error"]
    assert errors == []
    oks = [r for r in results if r[0] == "ok"]
    dups = [r for r in results if r[0] == "dup"]
    assert len(oks) == 40 and len(dups) == 40
    assert sorted(r[1] for r in oks) == sorted(f"vm{k}" for k in range(40))
    assert sorted(r[1] for r in dups) == sorted(f"vm{k}" for k in range(40))  # each refused once
    assert sorted(r[2] for r in oks) == list(range(1, 41))  # distinct, dense domids
    by_name = {n: d for _, n, d in oks}
    for _, n, msg in dups:
        assert msg == f"a domain named {n} already exists (id {by_name[n]})"
    with Registry() as reg:
        listed = reg.list()
    assert [(r.domid, r.name) for r in listed] == sorted((d, n) for n, d in by_name.items())
    assert all(r.state == "creating" for r in listed)


# -- uuids (issue #13, 7) -------------------------------------------------------------------------
def test_every_domain_has_its_own_uuid(reg):
    a = reg.reserve("a", "{}")
    assert str(uuid.UUID(a.uuid)) == a.uuid and reg.get("a").uuid == a.uuid
    reg.remove(a.domid)
    b = reg.reserve("b", "{}")
    assert b.domid == a.domid and b.uuid != a.uuid       # domids are reused, uuids never
    assert host_record().uuid == "00000000-0000-0000-0000-000000000000"


def test_orphan_cannot_take_over_a_reused_domid(reg, state):
    """a's `create` died, so a's row was reaped while a's domain process still ran; b got the
    domid.  Every update a's process makes is refused, and b's row stays b's."""
    dead = _exited_child()
    dead.wait()
    a = reg.reserve("a", "{}", pid=dead.pid)
    assert reg.list() == []                               # reaped: its owner is gone
    b = reg.reserve("b", "{}")
    assert b.domid == a.domid
    updates = [lambda: reg.set_running(a.domid, os.getpid(), paths.control_socket(a.domid), uuid=a.uuid),
               lambda: reg.update_state(a.domid, "paused", uuid=a.uuid),
               lambda: reg.bump_restarts(a.domid, uuid=a.uuid),
               lambda: reg.release(a.domid, "shutdown", "powered off", uuid=a.uuid),
               lambda: reg.remove(a.domid, uuid=a.uuid)]
    for update in updates:
        with pytest.raises(StaleDomainError) as e:
            update()
        assert str(e.value) == (f"domain id {a.domid} now belongs to another domain (b, uuid {b.uuid}), "
                                f"not to uuid {a.uuid}")
    assert reg.get("b") == b
    reg.remove(b.domid)
    with pytest.raises(StaleDomainError, match=f"^no domain with id {a.domid} \\(its row was removed\\)$"):
        reg.update_state(a.domid, "running", uuid=a.uuid)


def _v1_registry(path, rows):
    with sqlite3.connect(path) as db:
        db.execute("""CREATE TABLE domains (domid INTEGER PRIMARY KEY CHECK (domid >= 1), name TEXT UNIQUE NOT NULL,
            config TEXT, pid INTEGER, pid_start TEXT, socket TEXT, state TEXT NOT NULL, created REAL NOT NULL,
            started REAL, restarts INTEGER NOT NULL DEFAULT 0, exit_reason TEXT)""")
        for domid, name, state in rows:
            db.execute("INSERT INTO domains (domid, name, config, state, created) VALUES (?, ?, '{}', ?, 0)",
                       (domid, name, state))
        db.execute("PRAGMA user_version = 1")
    db.close()


def test_schema_1_registry_gets_uuids(state):
    state.mkdir(mode=0o700)
    _v1_registry(state / "domains.sqlite", [(1, "old", "crashed"), (2, "older", "crashed")])
    with Registry() as reg:
        old, older = reg.list()
        assert (old.name, old.state, older.name) == ("old", "crashed", "older")
        assert len({old.uuid, older.uuid}) == 2 and all(uuid.UUID(u) for u in (old.uuid, older.uuid))
        assert reg.reserve("new", "{}").uuid not in (old.uuid, older.uuid)
    with sqlite3.connect(state / "domains.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    with Registry() as reg:
        assert reg.get("old").uuid == old.uuid            # given once, kept


# -- a domain process that died (issue #13, 10) ----------------------------------------------------
@pytest.mark.parametrize("state_then, config, kept, reason", [
    ("shutdown", {"on_poweroff": "preserve"}, "shutdown", "its process exited while it was shutting down"),
    ("shutdown", {"on_poweroff": "destroy", "on_crash": "preserve"}, None, None),
    ("shutdown", {"on_poweroff": "restart"}, None, None),   # nothing is left to restart it
    ("running", {"on_crash": "preserve"}, "crashed", "its process exited unexpectedly"),
    ("paused", {"on_crash": "preserve"}, "crashed", "its process exited unexpectedly"),
    ("running", {"on_poweroff": "preserve"}, None, None),
])
def test_dead_process_gets_its_on_poweroff_or_on_crash_action(reg, state_then, config, kept, reason):
    rec = reg.reserve("web", config)
    child = _exited_child()
    reg.set_running(rec.domid, child.pid, None, uuid=rec.uuid)
    reg.update_state(rec.domid, state_then, uuid=rec.uuid)   # e.g. `hypyr shutdown` sent Ctrl-Alt-Del
    child.wait()                                              # ... then the VMM died
    assert reg.get("web").state == (kept or "dead")
    reaped = reg.reap()
    if kept is None:
        assert [r.name for r in reaped] == ["web"] and reg.list() == []
        return
    assert reaped == []
    [got] = reg.list()
    assert (got.state, got.exit_reason, got.pid, got.socket) == (kept, reason, None, None)
    assert reg.reap() == [] and reg.list() == [got]           # kept until destroyed
    with pytest.raises(HypyrError, match="already exists"):
        reg.reserve("web", "{}")
    assert reg.remove(rec.domid)


def test_released_row_is_kept_and_a_live_shutting_down_one_is_not_reaped(reg):
    rec = reg.reserve("web", {})
    reg.set_running(rec.domid, os.getpid(), None, uuid=rec.uuid)
    reg.update_state(rec.domid, "shutdown", uuid=rec.uuid)
    assert reg.reap() == [] and reg.get("web").state == "shutdown"   # still shutting down
    reg.release(rec.domid, "shutdown", "the guest powered off", uuid=rec.uuid)
    [got] = reg.list()
    assert (got.state, got.pid, got.exit_reason) == ("shutdown", None, "the guest powered off")
    with pytest.raises(ValueError):
        reg.release(rec.domid, "running", None, uuid=rec.uuid)


# -- cgroups go with the row (issue #13, 9) --------------------------------------------------------
@pytest.fixture
def cgroot(tmp_path, monkeypatch):
    """A fake cgroup v2 root (HYPYR_CGROUP_ROOT) with hypyr's parent group."""
    root = tmp_path / "cg"
    (root / "hypyr").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu\n")
    monkeypatch.setenv(sched.ENV_ROOT, str(root))
    return root / "hypyr"


def test_reaping_and_removing_delete_the_cgroup(reg, cgroot):
    kept = reg.reserve("kept", {"on_crash": "preserve"})
    gone = reg.reserve("gone", {})
    removed = reg.reserve("removed", {})
    for rec in (kept, gone):
        child = _exited_child()
        reg.set_running(rec.domid, child.pid, None, uuid=rec.uuid)
        child.wait()                                       # as after kill -9
    for rec in (kept, gone, removed):
        (cgroot / sched.group_name(rec)).mkdir()            # empty, as once the process is gone
    stale = cgroot / f"dom-{gone.domid}-{uuid.uuid4()}"     # an older domain's: not ours to remove
    stale.mkdir()
    reg.list()
    assert not (cgroot / sched.group_name(kept)).exists() and reg.get("kept").state == "crashed"
    assert not (cgroot / sched.group_name(gone)).exists()
    assert stale.is_dir()
    assert reg.remove(removed.domid)
    assert not (cgroot / sched.group_name(removed)).exists()


# -- file modes (issue #13, 12) --------------------------------------------------------------------
def test_state_files_are_0600(state, monkeypatch):
    old = os.umask(0o022)
    try:
        with Registry() as reg:
            reg.reserve("web", "{}")
            reg.list()
        files = sorted(state.glob("domains.sqlite*"))
        assert [f.name for f in files][:1] == ["domains.sqlite"]
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
        os.chmod(state / "domains.sqlite", 0o644)          # an older hypyr's file
        Registry().close()
        assert stat.S_IMODE((state / "domains.sqlite").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_state_dir_with_a_loose_mode_is_tightened(state):
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    assert paths.state_dir() == state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_state_dir_of_another_user_is_refused(state, monkeypatch):
    state.mkdir(mode=0o700)
    owner = state.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(HypyrError) as e:
        Registry()
    assert str(e.value) == (f"the hypyr state directory {state} belongs to uid {owner}, not to this user "
                            f"(uid {owner + 1}); remove it or set HYPYR_STATE_DIR")
    assert not (state / "domains.sqlite").exists()


def test_state_dir_that_is_a_file_is_refused(state):
    state.write_text("not a directory")
    with pytest.raises(HypyrError, match=r"^cannot create the hypyr state directory .*: File exists$"):
        paths.state_dir()


# -- bad ids (issue #13, 11) -----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["99999999999999999999", "32768", 2**70])
def test_huge_domid_is_no_such_domain(reg, key):
    with pytest.raises(HypyrError) as e:
        reg.get(key)
    assert str(e.value) == f"no domain with id {key}"
    assert reg.remove(int(key)) is False
