"""Credit-scheduler knobs (hypyr.toolstack.sched) against fake cgroup trees, plus one real check."""

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hypyr.errors import HypyrError
from hypyr.toolstack import sched


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test touches the real state dir, and the environment does not pick the cgroup root."""
    monkeypatch.delenv(sched.ENV_ROOT, raising=False)
    for domid in range(16):
        (tmp_path / "state" / str(domid)).mkdir(parents=True)
    monkeypatch.setattr(sched, "_state_file", lambda domid: tmp_path / "state" / str(domid) / "sched.json")
    monkeypatch.setattr(sched, "host_cpus", lambda: 4)


def fake_v2(root: Path, controllers="cpuset cpu io memory pids", subtree="") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text(subtree + "\n")
    (root / "cgroup.procs").write_text("1\n")
    return root


def fake_v1(root: Path) -> Path:
    cpu = root / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    (cpu / "cpu.shares").write_text("1024\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cgroup.procs").write_text("1\n")
    (cpu / "tasks").write_text("1\n")
    return root


def D(domid: int, name: str, salt: str = "") -> sched.Dom:
    """A domain with a UUID that depends on its domid, name and ``salt``."""
    return sched.Dom(domid, name, str(uuid.uuid5(uuid.NAMESPACE_OID, f"{domid}/{name}/{salt}")))


def kplace(dom, pid, root):
    """sched.place, then the files the kernel would create in the new group (at their defaults)."""
    path = sched.place(dom, pid, root=root)
    defaults = ({"cpu.weight": "100", "cpu.max": "max 100000"} if (path / "../../cgroup.controllers").exists()
                else {"cpu.shares": "1024", "cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"})
    for f, v in defaults.items():
        if not (path / f).exists():
            (path / f).write_text(v + "\n")
    return path


@pytest.fixture
def v2(tmp_path):
    return fake_v2(tmp_path / "cg2")


@pytest.fixture
def v1(tmp_path):
    return fake_v1(tmp_path / "cg1")


# -- mapping and validation -------------------------------------------------------------------------
@pytest.mark.parametrize("weight,expect", [(256, 100), (512, 200), (128, 50), (1, 1), (2, 1), (4, 2),
                                           (25600, 10000), (65535, 10000)])
def test_v2_weight_mapping(weight, expect):
    assert sched.v2_weight(weight) == expect


def test_v2_weight_keeps_ratio_512_256():
    assert sched.v2_weight(512) / sched.v2_weight(256) == 2.0


@pytest.mark.parametrize("weight,expect", [(256, 1024), (512, 2048), (1, 4), (65535, 262140)])
def test_v1_shares_mapping(weight, expect):
    assert sched.v1_shares(weight) == expect


@pytest.mark.parametrize("cap,v2,v1", [(0, "max 100000", -1), (25, "25000 100000", 25000),
                                       (50, "50000 100000", 50000), (200, "200000 100000", 200000),
                                       (1, "1000 100000", 1000)])
def test_cap_mapping(cap, v2, v1):
    assert sched.v2_max(cap) == v2
    assert sched.v1_quota(cap) == v1


@pytest.mark.parametrize("weight", [0, 70000, -1, 65536, 1.5, "256", True, None])
def test_bad_weight(weight):
    with pytest.raises(HypyrError, match="weight must be a whole number from 1 to 65535"):
        sched.check_weight(weight)


@pytest.mark.parametrize("cap", [-1, 401, 1000, 2.5, "50"])
def test_bad_cap(cap):
    with pytest.raises(HypyrError, match=r"cap must be 0 .* from 1 to 400"):
        sched.check_cap(cap)


@pytest.mark.parametrize("cap", [0, 1, 100, 400])
def test_good_cap(cap):
    assert sched.check_cap(cap) == cap


def test_set_params_validates_before_touching_anything(v2):
    sched.place(D(1, "vm"), 1234, root=v2)
    for kw in ({"weight": 0}, {"weight": 70000}, {"cap": -1}, {"cap": 401}):
        with pytest.raises(HypyrError):
            sched.set_params(D(1, "vm"), root=v2, **kw)
    assert not (v2 / "hypyr" / sched.group_name(D(1, "vm")) / "cpu.weight").exists()


def test_group_name_is_domid_and_uuid():
    dom = D(3, "web")
    assert sched.group_name(dom) == f"dom-3-{dom.uuid}"
    assert sched.group_name(sched.Dom(3, "web", dom.uuid.upper())) == f"dom-3-{dom.uuid}"
    for bad in ("../../x", "", None):
        with pytest.raises(HypyrError, match="domain web has no valid uuid"):
            sched.group_name(sched.Dom(3, "web", bad))


# -- detection ---------------------------------------------------------------------------------------
def test_detect_v2_dir(v2):
    info = sched.cgroup_root(v2)
    assert (info.version, info.root, info.parent) == (2, v2, v2 / "hypyr")


def test_detect_v1_dir(v1):
    info = sched.cgroup_root(v1)
    assert (info.version, info.root, info.parent) == (1, v1 / "cpu", v1 / "cpu" / "hypyr")
    assert sched.cgroup_root(v1 / "cpu") == info


def test_detect_from_env(v2, monkeypatch):
    monkeypatch.setenv(sched.ENV_ROOT, str(v2))
    assert sched.cgroup_root() == sched.CgroupInfo(2, v2)


def test_detect_v2_without_cpu(tmp_path):
    root = fake_v2(tmp_path / "cg", controllers="memory pids")
    with pytest.raises(HypyrError, match="no cpu controller"):
        sched.cgroup_root(root)


def test_detect_not_a_cgroup(tmp_path):
    with pytest.raises(HypyrError, match="is not a cgroup v2 hierarchy or a v1 cpu controller"):
        sched.cgroup_root(tmp_path)


def test_detect_nothing_on_host(tmp_path, monkeypatch):
    monkeypatch.setattr(sched, "UNIFIED", tmp_path / "nothing")
    mi = tmp_path / "mountinfo"
    mi.write_text("22 1 0:21 / /proc rw - proc proc rw\n")
    with pytest.raises(HypyrError) as e:
        sched.cgroup_root(mountinfo=mi)
    assert str(e.value) == sched.NO_CGROUPS
    assert "mount cgroup2 on /sys/fs/cgroup" in str(e.value)


def test_detect_host_v2_first(tmp_path, monkeypatch):
    root = fake_v2(tmp_path / "unified")
    monkeypatch.setattr(sched, "UNIFIED", root)
    assert sched.cgroup_root(mountinfo=tmp_path / "absent") == sched.CgroupInfo(2, root)


def test_detect_host_v1_from_mountinfo(tmp_path, monkeypatch):
    v1 = fake_v1(tmp_path / "fs")
    # A hybrid host: /sys/fs/cgroup is a tmpfs, cgroup2 (without cpu) sits at .../unified.
    unified = fake_v2(tmp_path / "fs" / "unified", controllers="")
    monkeypatch.setattr(sched, "UNIFIED", tmp_path / "fs")
    mi = tmp_path / "mountinfo"
    mi.write_text(f"30 25 0:26 / {tmp_path}/fs rw - tmpfs tmpfs rw,mode=755\n"
                  f"31 30 0:27 / {unified} rw shared:9 - cgroup2 cgroup2 rw\n"
                  f"36 30 0:31 / {tmp_path}/fs/cpuacct rw - cgroup cgroup rw,cpuacct\n"
                  f"37 30 0:32 / {v1}/cpu rw shared:15 - cgroup cgroup rw,cpu\n")
    assert sched.cgroup_root(mountinfo=mi) == sched.CgroupInfo(1, v1 / "cpu")


def test_detect_host_other_cgroup2_with_cpu(tmp_path, monkeypatch):
    other = fake_v2(tmp_path / "elsewhere")
    monkeypatch.setattr(sched, "UNIFIED", tmp_path / "nothing")
    mi = tmp_path / "mountinfo"
    mi.write_text(f"31 25 0:27 / {other} rw - cgroup2 cgroup2 rw\n")
    assert sched.cgroup_root(mountinfo=mi) == sched.CgroupInfo(2, other)


# -- v2 ---------------------------------------------------------------------------------------------
def test_v2_place_enables_cpu_and_writes_pid(v2):
    path = kplace(D(7, "web"), 4321, root=v2)
    assert path == v2 / "hypyr" / f"dom-7-{D(7, 'web').uuid}"
    assert (path / "cgroup.procs").read_text() == "4321\n"
    assert (v2 / "cgroup.subtree_control").read_text().split() == ["+cpu"]
    assert (v2 / "hypyr" / "cgroup.subtree_control").read_text().split() == ["+cpu"]
    assert not (v2 / "hypyr" / "cgroup.procs").exists()   # hypyr's own group holds no processes


def test_v2_place_leaves_enabled_cpu_alone(tmp_path):
    root = fake_v2(tmp_path / "cg", subtree="cpu memory")
    kplace(D(7, "web"), 4321, root=root)
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory\n"


def test_v2_set_get_round_trip(v2):
    path = kplace(D(2, "db"), 100, root=v2)
    assert sched.set_params(D(2, "db"), weight=512, cap=50, root=v2) == (512, 50)
    assert (path / "cpu.weight").read_text() == "200\n"
    assert (path / "cpu.max").read_text() == "50000 100000\n"
    assert sched.get_params(D(2, "db"), root=v2) == (512, 50)
    # None leaves a value alone; cap 0 lifts the cap.
    assert sched.set_params(D(2, "db"), cap=0, root=v2) == (512, 0)
    assert (path / "cpu.max").read_text() == "max 100000\n"
    assert (path / "cpu.weight").read_text() == "200\n"


def test_v2_exact_weight_from_state(v2, monkeypatch):
    kplace(D(2, "db"), 100, root=v2)
    sched.set_params(D(2, "db"), weight=257, cap=0, root=v2)   # cpu.weight 100, same as 256
    assert sched.get_params(D(2, "db"), root=v2) == (257, 0)
    monkeypatch.setattr(sched, "_state_file", lambda domid: None)   # no paths module
    assert sched.get_params(D(2, "db"), root=v2) == (256, 0)


def test_v2_state_ignored_when_cgroup_changed(v2):
    path = kplace(D(2, "db"), 100, root=v2)
    sched.set_params(D(2, "db"), weight=257, root=v2)
    (path / "cpu.weight").write_text("300\n")   # changed behind hypyr's back
    assert sched.get_params(D(2, "db"), root=v2)[0] == 768


def test_v2_derived_values(v2, monkeypatch):
    monkeypatch.setattr(sched, "_state_file", lambda domid: None)
    path = kplace(D(3, "x"), 1, root=v2)
    (path / "cpu.weight").write_text("100\n")
    (path / "cpu.max").write_text("200000 100000\n")
    assert sched.get_params(D(3, "x"), root=v2) == (256, 200)
    (path / "cpu.weight").write_text("10000\n")
    (path / "cpu.max").write_text("max 100000\n")
    assert sched.get_params(D(3, "x"), root=v2) == (25600, 0)


def test_state_needs_the_domain_dir(v2, tmp_path, monkeypatch):
    monkeypatch.setattr(sched, "_state_file", lambda domid: tmp_path / "nodir" / "sched.json")
    kplace(D(2, "db"), 100, root=v2)
    assert sched.set_params(D(2, "db"), weight=257, root=v2) == (256, 0)   # derived from cpu.weight
    assert not (tmp_path / "nodir").exists()


def test_state_file_contents(v2, tmp_path):
    kplace(D(2, "db"), 100, root=v2)
    sched.set_params(D(2, "db"), weight=300, root=v2)
    sched.set_params(D(2, "db"), cap=10, root=v2)

    f = tmp_path / "state" / "2" / "sched.json"
    assert json.loads(f.read_text()) == {"uuid": D(2, "db").uuid, "weight": 300, "cap": 10}
    assert f.stat().st_mode & 0o777 == 0o600
    assert sched.get_params(D(2, "db"), root=v2) == (300, 10)
    kplace(D(2, "db", "newer"), 100, root=v2)          # domid 2 reused: the old state is not its
    assert sched.get_params(D(2, "db", "newer"), root=v2) == (256, 0)


def test_set_params_needs_group(v2):
    with pytest.raises(HypyrError, match="domain ghost has no scheduler group"):
        sched.set_params(D(9, "ghost"), weight=256, root=v2)
    with pytest.raises(HypyrError, match="no scheduler group"):
        sched.get_params(D(9, "ghost"), root=v2)


def test_renamed_domain_keeps_its_group(v2):
    old = D(4, "old")
    kplace(old, 1, root=v2)
    sched.set_params(old._replace(name="new"), weight=1024, root=v2)
    assert (v2 / "hypyr" / sched.group_name(old) / "cpu.weight").read_text() == "400\n"
    assert sched.get_params(old._replace(name="new"), root=v2)[0] == 1024


def test_stale_group_of_a_reused_domid_is_not_the_new_domains(v2):
    """A group left by a domain that is gone (same domid, even the same name) is not the new domain's."""
    kplace(D(4, "web"), 1, root=v2)
    sched.set_params(D(4, "web"), weight=512, root=v2)
    new = D(4, "web", "newer")
    with pytest.raises(HypyrError, match="domain web has no scheduler group"):
        sched.set_params(new, weight=1024, root=v2)
    with pytest.raises(HypyrError, match="no scheduler group"):
        sched.get_params(new, root=v2)
    assert (v2 / "hypyr" / sched.group_name(D(4, "web")) / "cpu.weight").read_text() == "200\n"


def test_list_params(v2):
    assert sched.list_params(root=v2) == []
    kplace(D(5, "b"), 1, root=v2)
    kplace(D(3, "a"), 2, root=v2)
    sched.set_params(D(5, "b"), weight=512, cap=150, root=v2)
    sched.set_params(D(3, "a"), weight=256, cap=0, root=v2)
    (v2 / "hypyr" / "not-a-domain").mkdir()
    (v2 / "hypyr" / "dom-6-web").mkdir()                # an old hypyr's name: not a domain group
    assert sched.list_params(root=v2) == [(3, D(3, "a").uuid, 256, 0), (5, D(5, "b").uuid, 512, 150)]


def test_remove(v2, tmp_path):
    kplace(D(6, "gone"), 1, root=v2)
    sched.set_params(D(6, "gone"), weight=512, root=v2)
    path = v2 / "hypyr" / sched.group_name(D(6, "gone"))
    sched.remove(D(6, "gone"), root=v2)   # fake tree: files in it, like a busy group → left alone
    assert path.is_dir()
    for f in path.iterdir():
        f.unlink()
    sched.remove(D(6, "gone"), root=v2)
    assert not path.exists()
    assert not (tmp_path / "state" / "6" / "sched.json").exists()
    sched.remove(D(6, "gone"), root=v2)   # absent: fine
    sched.remove(D(6, "gone"), root=tmp_path / "not-a-cgroup")   # no cgroups at all: fine


def test_errors_are_one_sentence(tmp_path):
    root = fake_v2(tmp_path / "cg")
    (root / "hypyr").write_text("a file where the group should be")
    with pytest.raises(HypyrError, match="cannot create the cgroup"):
        kplace(D(1, "vm"), 1, root=root)


# -- v1 ---------------------------------------------------------------------------------------------
def test_v1_place_and_params(v1):
    path = kplace(D(8, "old-host"), 555, root=v1)
    assert path == v1 / "cpu" / "hypyr" / sched.group_name(D(8, "old-host"))
    assert (path / "cgroup.procs").read_text() == "555\n"
    assert sched.set_params(D(8, "old-host"), weight=512, cap=25, root=v1) == (512, 25)
    assert (path / "cpu.shares").read_text() == "2048\n"
    assert (path / "cpu.cfs_quota_us").read_text() == "25000\n"
    assert (path / "cpu.cfs_period_us").read_text() == "100000\n"
    assert sched.get_params(D(8, "old-host"), root=v1) == (512, 25)
    assert sched.set_params(D(8, "old-host"), weight=1, cap=0, root=v1) == (1, 0)
    assert (path / "cpu.shares").read_text() == "4\n"
    assert (path / "cpu.cfs_quota_us").read_text() == "-1\n"
    assert sched.list_params(root=v1) == [(8, D(8, "old-host").uuid, 1, 0)]


def test_v1_place_by_tasks(v1, tmp_path):
    """Without cgroup.procs (very old kernels), each thread goes into tasks."""
    parent = v1 / "cpu" / "hypyr"
    group = parent / sched.group_name(D(9, "t"))
    group.mkdir(parents=True)
    (group / "tasks").write_text("")
    sched.place(D(9, "t"), os.getpid(), root=v1)
    assert not (group / "cgroup.procs").exists()
    assert (group / "tasks").read_text().split()[-1] == str(max(int(t) for t in os.listdir("/proc/self/task")))


# -- the real thing -----------------------------------------------------------------------------------
def _real_root(version: int):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        info = sched.cgroup_root()
    except HypyrError as e:
        pytest.skip(str(e))
    if info.version != version:
        pytest.skip(f"this host's cpu controller is cgroup v{info.version}")
    if not os.access(info.root, os.W_OK):
        pytest.skip(f"{info.root} is not writable")
    return info


@pytest.mark.parametrize("version", [2, 1])
def test_real_cgroup(version):
    """A sleeping child in a real group: placed, weighted, capped, read back, removed.  Everything
    lives under a private test group standing in for the cgroup root, removed afterwards."""
    info = _real_root(version)
    top = info.root / f"hypyr-pytest-{uuid.uuid4().hex[:8]}"
    if version == 2:
        sched._enable_cpu(info.root)
    fake_root = sched.CgroupInfo(version, top)
    dom = D(11, "real")
    path = fake_root.parent / sched.group_name(dom)
    top.mkdir()
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert sched.place(dom, child.pid, root=fake_root) == path
        assert sched.set_params(dom, weight=512, cap=150, root=fake_root) == (512, 150)
        if version == 2:
            assert (path / "cpu.weight").read_text() == "200\n"
            assert (path / "cpu.max").read_text() == "150000 100000\n"
            assert f"0::/{path.relative_to(info.root)}" in Path(f"/proc/{child.pid}/cgroup").read_text()
        else:
            assert (path / "cpu.shares").read_text() == "2048\n"
            assert (path / "cpu.cfs_quota_us").read_text() == "150000\n"
        assert str(child.pid) in (path / "cgroup.procs").read_text().split()
        assert sched.get_params(dom, root=fake_root) == (512, 150)
        assert sched.list_params(root=fake_root) == [(11, dom.uuid, 512, 150)]
        sched.remove(dom, root=fake_root)   # busy: left alone
        assert path.is_dir()
        child.kill()
        child.wait()
        for _ in range(50):   # the group empties as soon as the child is reaped; allow a moment
            sched.remove(dom, root=fake_root)
            if not path.exists():
                break
            time.sleep(0.1)
        assert not path.exists()
    finally:
        child.kill()
        child.wait()
        for d in (path, fake_root.parent, top):
            try:
                d.rmdir()
            except OSError:
                pass
    assert not top.exists()
