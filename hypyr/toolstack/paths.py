"""Where the toolstack keeps its state: the domain registry, per-domain directories, logs.

The state directory is ``$HYPYR_STATE_DIR``, else ``/run/hypyr`` as root, else
``$XDG_RUNTIME_DIR/hypyr``, else ``~/.local/state/hypyr``; it must be the user's own, is kept
mode 0700 and its files are 0600.  Its layout: docs/toolstack.md, "State directory".  Every
helper takes an optional ``base`` (a state directory; default :func:`state_dir`).  AF_UNIX
socket paths are limited to 107 bytes: a deep ``$HYPYR_STATE_DIR`` may be too long for
``control.sock``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypyr.errors import HypyrError

REGISTRY_FILE = "domains.sqlite"
API_SOCKET = "api.sock"
DOMAINS_DIR = "domains"
LOGS_DIR = "logs"
JAIL_DIR = "jail"
LOG_MAX_BYTES = 1 << 20  # default size at which console.log and vmm.log are rotated


def _ensure(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise HypyrError(f"cannot create the hypyr state directory {path}: {e.strerror or e}") from None
    return path


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter: created 0700, a looser mode tightened,
    refused (HypyrError) when it is not a directory or belongs to another user."""
    _ensure(path)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise HypyrError(f"the hypyr state directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise HypyrError(f"the hypyr state directory {path} belongs to uid {st.st_uid}, not to this user "
                         f"(uid {os.geteuid()}); remove it or set HYPYR_STATE_DIR")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def create_private(path: Path) -> None:
    """Create the file ``path`` with mode 0600 if it does not exist (an existing one is made 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def state_dir() -> Path:
    """The toolstack's state directory (see the module docstring for its checks)."""
    env = os.environ.get("HYPYR_STATE_DIR")
    if env:
        return private_dir(Path(env).expanduser())
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return private_dir(Path("/run/hypyr"))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return private_dir(Path(xdg) / "hypyr")
    return private_dir(Path.home() / ".local" / "state" / "hypyr")


def registry_path(base: Path | None = None) -> Path:
    """The registry database: ``state_dir()/domains.sqlite``."""
    return (base if base is not None else state_dir()) / REGISTRY_FILE


def api_socket(base: Path | None = None) -> Path:
    """Where `hypyr serve` listens by default: ``state_dir()/api.sock``."""
    return (base if base is not None else state_dir()) / API_SOCKET


def domain_dir(domid: int, base: Path | None = None) -> Path:
    """The directory of domain ``domid``: ``state_dir()/domains/<domid>/`` (not created here)."""
    return (base if base is not None else state_dir()) / DOMAINS_DIR / str(int(domid))


def jail_dir(base: Path | None = None) -> Path:
    """``state_dir()/jail/``: an empty directory each jailed VMM mounts its own root on, in its
    own mount namespace (hypyr.toolstack.jail); created here."""
    return private_dir((base if base is not None else state_dir()) / JAIL_DIR)


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


def log_max_bytes() -> int:
    """The size at which a domain's logs are rotated: ``$HYPYR_LOG_MAX_BYTES`` if it is a positive
    number of bytes, else LOG_MAX_BYTES (1 MiB)."""
    try:
        n = int(os.environ.get("HYPYR_LOG_MAX_BYTES", ""))
    except ValueError:
        return LOG_MAX_BYTES
    return n if n > 0 else LOG_MAX_BYTES


def rotated_log(path: Path) -> Path:
    """Where the previous part of a rotated log goes: ``<path>.1``."""
    return path.with_name(path.name + ".1")
