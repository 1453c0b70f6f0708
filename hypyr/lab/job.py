"""The pure parts of a lab run: the job script, lab.conf, the kernel command line, the QEMU
argument list, and reading the exit status back. No QEMU or file system access here except
where a function says so, so all of it is unit-testable."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hypyr.errors import HypyrError

# Host variables carried into the job (plus every HYPYR_* variable).
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "VIRTUAL_ENV", "PYTHONPATH", "LANG", "LC_ALL",
              "TERM", "CI")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@%:=,-]*\Z")

EXIT_LAB_FAILED = 125
PYCACHE = "/tmp/.pycache"  # in L1 (tmpfs)


def job_env(host_env: Mapping[str, str], jobdir: Path, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the command sees inside L1."""
    env = {k: host_env[k] for k in PASSED_ENV if k in host_env}
    env.update({k: v for k, v in host_env.items() if k.startswith("HYPYR_")})
    # the shared root is read-only: bytecode goes to L1's tmpfs, so each module is compiled once
    # per lab boot rather than in every Python process (each hypyr command, each domain's VMM)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env["HYPYR_IN_LAB"] = "1"
    env["HYPYR_LAB_SCRATCH"] = str(Path(jobdir) / "scratch")
    env.pop("HYPYR_LAB_KEEP", None)
    if extra_env:
        env.update({str(k): str(v) for k, v in extra_env.items()})
    for k in env:
        if not _NAME.match(k):
            raise HypyrError(f"The environment variable name {k!r} cannot be passed into the lab.")
    return env


def job_script(cmd: list[str], cwd: str | Path, env: Mapping[str, str]) -> str:
    """The shell script L1 runs (chrooted into the host's root) for one command."""
    if not cmd:
        raise HypyrError("The lab needs a command to run.")
    lines = [
        "#!/bin/sh",
        "# written by hypyr.lab: runs one command inside the L1 VM",
        f"cd {shlex.quote(str(cwd))} || {{ echo 'hypyr lab: cannot enter the working directory "
        f"inside the VM' >&2; exit {EXIT_LAB_FAILED}; }}",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append("exec " + " ".join(shlex.quote(str(a)) for a in cmd))
    return "\n".join(lines) + "\n"


def keep_paths(cwd: str | Path, env: Mapping[str, str]) -> list[str]:
    """Host paths under /tmp that the job needs; L1 keeps them visible through its tmpfs /tmp."""
    cands = [str(cwd), env.get("VIRTUAL_ENV", "")] + env.get("PYTHONPATH", "").split(":")
    cands += [v for k, v in env.items() if k.startswith("HYPYR_") and k.endswith(("_DIR", "_CACHE"))]
    out: list[str] = []
    for p in cands:
        if not p or not os.path.isabs(p):
            continue
        p = os.path.normpath(p)
        if (p.startswith("/tmp/") and os.path.isdir(p) and _SAFE_PATH.match(p)
                and not any(p == k or p.startswith(k + "/") for k in out)):
            out = [k for k in out if not k.startswith(p + "/")] + [p]
    return sorted(out)


def lab_conf(stdin_tty: bool, stdout_tty: bool, keep: list[str], share: str | Path | None = None,
             want_kallsyms: bool = False) -> str:
    """Settings for L1's init, sourced by it from the job directory."""
    flags = []
    if not stdin_tty:
        flags.append("-echo")  # input is not typed: do not echo it into the output
    if not stdout_tty:
        flags.append("-onlcr")  # output goes to a file or pipe: keep \n as \n
    return (f"STTY={shlex.quote(' '.join(flags))}\nKEEP={shlex.quote(' '.join(keep))}\n"
            f"SHARE={shlex.quote(str(share or ''))}\nKALLSYMS={int(want_kallsyms)}\n")


def share_path(path: str | Path) -> Path:
    """A host directory to export read-write into L1 (at the same path), checked."""
    p = Path(os.path.abspath(path))
    if not p.is_dir():
        raise HypyrError(f"The directory {path} to share with the lab does not exist.")
    if not _SAFE_PATH.match(str(p)) or p == Path("/"):
        raise HypyrError(f"The directory {p} cannot be shared with the lab: use a plain path "
                         f"(letters, digits and ._/+@%:=- only) other than /.")
    return p


def kernel_cmdline(jobdir: str | Path, ninep_opts: str = "") -> str:
    """The L1 kernel command line."""
    jobdir = str(jobdir)
    if not _SAFE_PATH.match(jobdir):
        raise HypyrError(f"The lab job directory {jobdir} has characters the kernel command line "
                         f"cannot carry; set HYPYR_LAB_DIR to a plain path.")
    # softlockup_panic: a CPU stuck in the kernel (the way nested KVM under TCG wedges L1) panics
    # L1 at once, and panic=-1 then ends QEMU: a lab failure in ~20 s instead of at --timeout
    # nokaslr: L1's kernel addresses are the same every boot, so the runner can name the function
    # a wedged CPU was in (from a copy of /proc/kallsyms L1 leaves once per kernel release)
    args = ["console=ttyS0", "quiet", "loglevel=1", "panic=-1", "softlockup_panic=1", "nokaslr",
            f"hypyr.job={jobdir}"]
    if ninep_opts:
        args.append(f"hypyr.9p={ninep_opts}")
    return " ".join(args)


@dataclass(frozen=True)
class QemuConfig:
    qemu: Path
    kernel: Path
    initrd: Path
    jobdir: Path
    cpus: int = 2
    memory: str = "4G"
    tcg_thread: str = "multi"
    ninep_opts: str = ""
    share: Path | None = None
    monitor: Path | None = None  # a unix socket for QEMU's human monitor


def qemu_args(c: QemuConfig) -> list[str]:
    """The QEMU command line for one lab run (serial console on QEMU's stdio)."""
    if "," in str(c.jobdir):
        raise HypyrError(f"The lab job directory {c.jobdir} contains a comma, which QEMU cannot take.")
    args = [
        str(c.qemu),
        "-accel", f"tcg,thread={c.tcg_thread}",
        "-cpu", "EPYC,+svm",
        "-m", str(c.memory),
        "-smp", str(c.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", "stdio,id=con0,signal=off,mux=off",
        "-serial", "chardev:con0",
        "-monitor", f"unix:{c.monitor},server=on,wait=off" if c.monitor else "none",
        "-kernel", str(c.kernel),
        "-initrd", str(c.initrd),
        "-append", kernel_cmdline(c.jobdir, c.ninep_opts),
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={c.jobdir},mount_tag=hypyrjob,security_model=none,multidevs=remap",
    ]
    if c.share is not None:
        if "," in str(c.share):
            raise HypyrError(f"The shared directory {c.share} contains a comma, which QEMU cannot take.")
        args += ["-virtfs", f"local,path={c.share},mount_tag=hypyrshare,security_model=none,multidevs=remap"]
    return args


def parse_exit_status(text: str | None) -> int | None:
    """The command's exit status from the exit-status file's text; None if absent or garbled."""
    if text is None:
        return None
    text = text.strip()
    if not re.fullmatch(r"\d{1,3}", text):
        return None
    rc = int(text)
    return rc if rc <= 255 else None


def read_exit_status(jobdir: Path) -> int | None:
    try:
        return parse_exit_status((Path(jobdir) / "exit-status").read_text())
    except (OSError, UnicodeDecodeError):
        return None


_QEMU_NOISE = re.compile(rb"TCG doesn't support requested feature|^\s*$")


def is_qemu_noise(line: bytes) -> bool:
    """QEMU stderr lines that are expected and harmless (TCG feature warnings for EPYC)."""
    return bool(_QEMU_NOISE.search(line))
