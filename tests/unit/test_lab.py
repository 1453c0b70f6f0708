import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypyr.errors import HypyrError
from hypyr.lab import job, parts


def test_job_env_contents(tmp_path):
    host = {"PATH": "/usr/bin:/bin", "HOME": "/root", "SECRET": "x", "HYPYR_FOO": "1", "LANG": "C.UTF-8",
            "HYPYR_LAB_KEEP": "1", "PYTHONPATH": "/src"}
    env = job.job_env(host, tmp_path, {"EXTRA": "a b", "PATH": "/opt/bin:/usr/bin"})
    assert env["HYPYR_FOO"] == "1" and env["LANG"] == "C.UTF-8" and env["PYTHONPATH"] == "/src"
    assert "SECRET" not in env and "HYPYR_LAB_KEEP" not in env
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == "/tmp/.pycache"
    assert env["HYPYR_IN_LAB"] == "1"
    assert env["HYPYR_LAB_SCRATCH"] == str(tmp_path / "scratch")
    assert env["EXTRA"] == "a b" and env["PATH"] == "/opt/bin:/usr/bin"  # extra_env wins
    with pytest.raises(HypyrError):
        job.job_env(host, tmp_path, {"BAD-NAME": "1"})


def test_job_script_quotes_and_runs(tmp_path):
    cmd = [sys.executable, "-c", "import os,sys; print(sys.argv[1:]); print(os.getcwd()); print(os.environ['W'])",
           "a b", "$HOME", "it's", "*", ""]
    env = {"W": "x'y \"z\" $v", "PATH": os.environ["PATH"]}
    script = job.job_script(cmd, tmp_path, env)
    assert script.startswith("#!/bin/sh\n")
    assert script.splitlines()[-1].startswith("exec ")
    f = tmp_path / "job.sh"
    f.write_text(script)
    r = subprocess.run(["sh", str(f)], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == repr(["a b", "$HOME", "it's", "*", ""])
    assert lines[1] == str(tmp_path)
    assert lines[2] == "x'y \"z\" $v"


def test_job_script_exit_status_and_bad_cwd(tmp_path):
    f = tmp_path / "job.sh"
    f.write_text(job.job_script(["sh", "-c", "exit 7"], tmp_path, {}))
    assert subprocess.run(["sh", str(f)]).returncode == 7
    f.write_text(job.job_script(["true"], tmp_path / "missing", {}))
    assert subprocess.run(["sh", str(f)], capture_output=True).returncode == job.EXIT_LAB_FAILED
    with pytest.raises(HypyrError):
        job.job_script([], tmp_path, {})


def test_kernel_cmdline():
    c = job.kernel_cmdline("/root/.cache/hypyr/lab/jobs/job-abc")
    assert c.split() == ["console=ttyS0", "quiet", "loglevel=1", "panic=-1", "softlockup_panic=1", "nokaslr",
                         "hypyr.job=/root/.cache/hypyr/lab/jobs/job-abc"]
    assert job.kernel_cmdline("/j", "cache=none").endswith(" hypyr.9p=cache=none")
    with pytest.raises(HypyrError):
        job.kernel_cmdline("/home/a b/jobs/job-1")
    with pytest.raises(HypyrError):
        job.kernel_cmdline("relative/path")


def test_qemu_args(tmp_path):
    c = job.QemuConfig(Path("/usr/bin/qemu-system-x86_64"), Path("/k"), Path("/i"), tmp_path, 2, "4G")
    a = job.qemu_args(c)
    s = " ".join(a)
    assert a[0] == "/usr/bin/qemu-system-x86_64"
    assert "-cpu EPYC,+svm" in s and "-accel tcg,thread=multi" in s and "-no-reboot" in s
    assert "-m 4G" in s and "-smp 2" in s and "-kernel /k" in s and "-initrd /i" in s
    assert a[a.index("-append") + 1] == job.kernel_cmdline(tmp_path)
    assert "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" in a
    assert f"local,path={tmp_path},mount_tag=hypyrjob,security_model=none,multidevs=remap" in a
    with pytest.raises(HypyrError):
        job.qemu_args(job.QemuConfig(Path("q"), Path("k"), Path("i"), Path("/a,b")))
    assert not any("hypyrshare" in x for x in a)
    a = job.qemu_args(job.QemuConfig(Path("q"), Path("k"), Path("i"), tmp_path, share=Path("/srv/state")))
    assert "local,path=/srv/state,mount_tag=hypyrshare,security_model=none,multidevs=remap" in a


def test_share_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "st").mkdir()
    assert job.share_path("st") == tmp_path / "st"
    for bad in ("missing", "/"):
        with pytest.raises(HypyrError):
            job.share_path(bad)
    (tmp_path / "a b").mkdir()
    with pytest.raises(HypyrError, match="plain path"):
        job.share_path(tmp_path / "a b")


@pytest.mark.parametrize("text,rc", [("0\n", 0), ("7", 7), ("255\n", 255), ("", None), (None, None),
                                     ("256", None), ("abc", None), ("-1", None), ("1\n2\n", None)])
def test_parse_exit_status(text, rc):
    assert job.parse_exit_status(text) == rc


def test_read_exit_status(tmp_path):
    assert job.read_exit_status(tmp_path) is None
    (tmp_path / "exit-status").write_text("42\n")
    assert job.read_exit_status(tmp_path) == 42


def test_lab_conf_flags():
    conf = job.lab_conf(stdin_tty=False, stdout_tty=False, keep=["/tmp/a", "/tmp/b"])
    vals = dict(l.split("=", 1) for l in conf.splitlines())
    assert shlex.split(vals["STTY"]) == ["-echo -onlcr"] and shlex.split(vals["KEEP"]) == ["/tmp/a /tmp/b"]
    vals = dict(l.split("=", 1) for l in job.lab_conf(True, True, []).splitlines())
    assert shlex.split(vals["STTY"]) == [""] and shlex.split(vals["SHARE"]) == [""]
    vals = dict(l.split("=", 1) for l in job.lab_conf(True, True, [], Path("/srv/st")).splitlines())
    assert shlex.split(vals["SHARE"]) == ["/srv/st"]


def test_keep_paths(tmp_path):
    base = Path("/tmp") / f"hypyr-test-keep-{os.getpid()}"
    (base / "repo" / "sub").mkdir(parents=True, exist_ok=True)
    try:
        keep = job.keep_paths(base / "repo" / "sub", {"PYTHONPATH": f"{base}/repo:/usr/lib", "VIRTUAL_ENV": ""})
        assert keep == [str(base / "repo")]
        assert job.keep_paths("/work/x", {}) == []
    finally:
        import shutil
        shutil.rmtree(base)


def test_qemu_noise_filter():
    assert job.is_qemu_noise(b"qemu-system-x86_64: warning: TCG doesn't support requested feature: "
                             b"CPUID.01H:ECX.fma [bit 12]\n")
    assert not job.is_qemu_noise(b"qemu: tcg_handle_interrupt: assertion failed\n")


def test_lab_init_script():
    init = parts.init_script().decode()
    r = subprocess.run(["sh", "-n"], input=init.encode(), capture_output=True)
    assert r.returncode == 0, r.stderr
    for needle in ("hostroot", "hypyrjob", "hypyr.job=", "exit-status", "poweroff -f", "chroot /newroot",
                   "/proc/self/fd", "lab.conf", "hypyrshare", "/job/heartbeat", "ip link set lo up"):
        assert needle in init


def test_l1_modules_for_networking():
    mods = parts.L1_MODULES
    for m in ("tun", "bridge", "vhost_net", "veth", "nf_tables", "nft_chain_nat", "nft_masq"):
        assert m in mods
    # listed dependencies first (insmod order)
    for dep, mod in (("llc", "bridge"), ("stp", "bridge"), ("vhost_iotlb", "vhost"), ("vhost", "vhost_net"),
                     ("tap", "vhost_net"), ("tun", "vhost_net"), ("crc32c_generic", "libcrc32c"),
                     ("nfnetlink", "nf_tables"), ("nf_conntrack", "nf_nat"), ("nf_nat", "nft_masq")):
        assert mods.index(dep) < mods.index(mod)
    assert len(set(mods)) == len(mods)


def test_lab_dir_and_available(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPYR_LAB_DIR", str(tmp_path))
    assert parts.lab_dir() == tmp_path
    ok, why = parts.available()
    assert isinstance(ok, bool) and why


def test_ensure_qemu_not_root_is_clear(monkeypatch):
    monkeypatch.setattr(parts, "find_qemu", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HypyrError, match="apt-get install qemu-system-x86"):
        parts.ensure_qemu()
    assert parts.available()[0] is False


def _fake_lab(monkeypatch, tmp_path, script: str):
    """Make runner.run start SCRIPT (a shell script playing QEMU) instead of the real lab."""
    from hypyr.lab import runner
    fake_qemu = tmp_path / "qemu"
    fake_qemu.write_text("#!/bin/sh\n" + script)
    fake_qemu.chmod(0o755)
    monkeypatch.setenv("HYPYR_LAB_DIR", str(tmp_path / "lab"))
    monkeypatch.setattr(runner, "ensure_parts",
                        lambda: parts.LabParts(fake_qemu, tmp_path / "k", tmp_path / "i", "9.9"))
    return runner


# The part of a fake QEMU that finds the job directory on the kernel command line and reaches the job.
_FIND_JOB = ("for a; do case \"$a\" in *hypyr.job=*) job=${a##*hypyr.job=};; esac; done\n"
             "touch \"$job/started\"\n")


def test_run_reports_lab_failure(monkeypatch, tmp_path, capfd):
    """QEMU dying without an exit-status file gives 125 and a plain sentence."""
    runner = _fake_lab(monkeypatch, tmp_path, "echo \"qemu: TCG doesn't support requested feature: x\" >&2\n"
                       "echo 'qemu: tcg_handle_interrupt: assertion failed' >&2\nexit 134\n")
    rc = runner.run(["true"])
    err = capfd.readouterr().err
    assert rc == 125
    assert "failure of the lab, not of the command" in err and "134" in err
    assert "tcg_handle_interrupt" in err and "TCG doesn't support" not in err
    assert list((tmp_path / "lab" / "jobs").iterdir()) == []  # cleaned up


def test_run_reads_exit_status(monkeypatch, tmp_path, capfd):
    """A fake QEMU that plays L1: runs job.sh like L1 would and writes exit-status."""
    runner = _fake_lab(monkeypatch, tmp_path, _FIND_JOB + 'sh "$job/job.sh"; echo $? > "$job/exit-status"\n')
    monkeypatch.chdir(tmp_path)
    rc = runner.run(["sh", "-c", 'echo "in=$HYPYR_IN_LAB e=$E"; echo keep > "$HYPYR_LAB_SCRATCH/f"; exit 9'],
                    extra_env={"E": "v w"})
    out, err = capfd.readouterr()
    assert rc == 9
    assert "in=1 e=v w" in out
    kept = list((tmp_path / "lab" / "jobs").glob("*/scratch/f"))
    assert len(kept) == 1 and kept[0].read_text() == "keep\n" and str(kept[0].parent) in err
    assert not (kept[0].parent.parent / "job.sh").exists()


def test_watchdog(tmp_path):
    from hypyr.lab.runner import Watchdog
    w = Watchdog(tmp_path, t0=100.0, timeout=None, stall=30.0)
    assert w.check(110.0) is None
    assert "(boot) for 30 s" in w.check(130.0)  # never reached its job
    (tmp_path / "started").touch()
    w = Watchdog(tmp_path, t0=100.0, timeout=1000.0, stall=30.0)
    assert w.check(101.0) is None  # the first mark counts as a move
    assert w.check(130.0) is None
    hb = tmp_path / "heartbeat"
    hb.touch()
    os.utime(hb, ns=(1, 1))
    assert w.check(131.0) is None  # heartbeat appeared: a move
    os.utime(hb, ns=(2, 2))
    assert w.check(160.0) is None  # moved again
    assert w.check(189.0) is None
    assert "(heartbeat) for 30 s" in w.check(190.0)
    assert "after 1000 s" in w.check(1100.0)
    assert Watchdog(tmp_path, t0=0.0, timeout=None, stall=None).check(1e9) is None


def test_run_kills_a_silent_lab(monkeypatch, tmp_path, capfd):
    """A lab that reached its job but whose heartbeat stopped is killed as wedged: exit 125."""
    runner = _fake_lab(monkeypatch, tmp_path, _FIND_JOB + "exec sleep 60\n")
    monkeypatch.setattr(runner, "WATCH_PERIOD_S", 0.05)
    t0 = time.monotonic()
    rc = runner.run(["true"], stall=0.5)
    assert rc == 125 and time.monotonic() - t0 < 20
    assert "no sign of life (heartbeat) for 0.5 s and was killed as wedged" in capfd.readouterr().err


@pytest.mark.skipif(os.environ.get("HYPYR_TEST_LAB") != "1", reason="set HYPYR_TEST_LAB=1 (boots QEMU, ~15 s)")
def test_real_lab_run(capfd):
    from hypyr import lab
    rc = lab.run(["sh", "-c", "test -c /dev/kvm && uname -r; exit 3"])
    out = capfd.readouterr().out
    assert rc == 3 and "amd64" in out
