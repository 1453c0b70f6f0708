"""Where the toolstack keeps its state: the domain registry, per-domain directories, logs.

The state directory is, in order of preference:

1. ``$HYPYR_STATE_DIR`` if set (tests and unusual setups);
2. ``/run/hypyr`` when running as root and ``/run`` is writable (like Xen's ``/var/run/xen``);
3. ``$XDG_RUNTIME_DIR/hypyr`` when ``$XDG_RUNTIME_DIR`` names an existing directory;
4. ``~/.local/state/hypyr`` otherwise.

It is created on first use with mode 0700 (an existing directory's mode is left alone).
Its layout::

    domains.sqlite        the registry (plus its -wal and -shm files): one row per domain
    domains/<domid>/      one directory per domain, created fresh by Registry.reserve():
        control.sock      the domain process's control socket
        console.log       the guest's console output
        vmm.log           the domain process's own log (stdout/stderr)
    logs/                 logs kept after a domain is gone: <name>.console.log, <name>.vmm.log
                          (the newest domain of that name wins; see Registry.remove)

Every helper takes an optional ``base`` (a state directory) so that a registry opened at
an explicit path keeps its domain directories next to it; by default it is ``state_dir()``.
Note that AF_UNIX socket paths are limited to 107 bytes, so a deep ``$HYPYR_STATE_DIR``
may be too long for ``control.sock``.
"""

from __future__ import annotations

import os
from pathlib import Path

REGISTRY_FILE = "domains.sqlite"
DOMAINS_DIR = "domains"
LOGS_DIR = "logs"


def _ensure(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """The toolstack's state directory (created with mode 0700 if missing)."""
    env = os.environ.get("HYPYR_STATE_DIR")
    if env:
        return _ensure(Path(env).expanduser())
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return _ensure(Path("/run/hypyr"))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return _ensure(Path(xdg) / "hypyr")
    return _ensure(Path.home() / ".local" / "state" / "hypyr")


def registry_path(base: Path | None = None) -> Path:
    """The registry database: ``state_dir()/domains.sqlite``."""
    return (base if base is not None else state_dir()) / REGISTRY_FILE


def domain_dir(domid: int, base: Path | None = None) -> Path:
    """The directory of domain ``domid``: ``state_dir()/domains/<domid>/`` (not created here)."""
    return (base if base is not None else state_dir()) / DOMAINS_DIR / str(int(domid))


def control_socket(domid: int, base: Path | None = None) -> Path:
    return domain_dir(domid, base) / "control.sock"


def console_log(domid: int, base: Path | None = None) -> Path:
    return domain_dir(domid, base) / "console.log"


def vmm_log(domid: int, base: Path | None = None) -> Path:
    return domain_dir(domid, base) / "vmm.log"


def log_dir(base: Path | None = None) -> Path:
    """Where logs of domains that are gone are kept: ``state_dir()/logs/`` (created if missing)."""
    return _ensure((base if base is not None else state_dir()) / LOGS_DIR)


def kept_log(name: str, kind: str, base: Path | None = None) -> Path:
    """Where a gone domain's log ``kind`` ("console" or "vmm") is kept: ``log_dir()/<name>.<kind>.log``."""
    return log_dir(base) / f"{name}.{kind}.log"
