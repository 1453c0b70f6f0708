"""The toolstack's errors: one type per thing that can go wrong, under the kinds of
``hypyr.errors`` (InvalidInput, NotFound, Conflict, Unavailable, OperationTimeout, NotSupported).

The CLI prints any of them as one sentence; the REST API answers with the status code of the
kind (``hypyr.toolstack.server.app.STATUS``).  Nothing anywhere looks at the sentence to decide
what happened.
"""

from __future__ import annotations

from hypyr.errors import Conflict, HypyrError, InvalidInput, NotFound, NotSupported, OperationTimeout, Unavailable


class InvalidConfig(InvalidInput):
    """A domain configuration (xl.cfg text or file, a domain name, a kernel or disk that is not
    there) that cannot be used."""


class ConfigValueError(InvalidConfig):
    """A bad value for ``key``, found without knowing the file (e.g. building a DomainConfig).

    For a list key (``disk``, ``vif``, ``cpus``) ``item`` is the index of the bad item and
    ``other`` that of an earlier item it clashes with, if any."""

    def __init__(self, key: str, message: str, item: int | None = None, other: int | None = None):
        self.key, self.message, self.item, self.other = key, message, item, other
        super().__init__(message)


class DomainNotFound(NotFound):
    """No domain of that name or id (or it is Domain-0, the host)."""


class StaleDomainError(DomainNotFound):
    """A domain process named a registry row that is no longer its own (another uuid, or removed)."""


class VcpuNotFound(NotFound):
    """The domain has no vCPU of that number."""


class DomainExists(Conflict):
    """A domain of that name already exists."""


class DomainStateError(Conflict):
    """The domain is not in a state that allows the operation (not running, paused, no scheduler
    group, neither the power button nor Ctrl-Alt-Del listened to)."""


class RegistryBusy(Unavailable):
    """The registry stayed locked longer than its busy timeout."""


class InsufficientResources(Unavailable):
    """The host has not enough of something now: free memory, free domain ids."""


class DomainUnreachable(Unavailable):
    """The domain's process does not answer on its control socket, or answered nonsense."""


class DomainTimeout(OperationTimeout):
    """A domain did not do something within its time limit (answer an operation, shut down, die)."""


class SaveFileError(InvalidInput):
    """A save file that cannot be written, read or restored: missing, truncated, corrupt, of
    another format version, not made by `hypyr save`, from a CPU this host cannot offer."""


def save_file_sentence(path: str, e: BaseException) -> str:
    """A SnapshotError's sentence about "the save file", naming the file."""
    text = str(e)
    if text.startswith("the save file"):
        return text.replace("the save file", f"the save file {path}", 1)
    return f"the save file {path}: {text}"


class MigrationFailed(Unavailable):
    """A live migration that did not happen: the destination refused or could not be reached,
    the link dropped; the sentence says where the domain runs now."""


class SchedulerUnavailable(NotSupported):
    """No cgroup with the cpu controller on this host: no weights or caps."""


# -- across a process boundary -----------------------------------------------------------------------
# A domain process reports an error to `hypyr create` and over its control socket as a sentence
# and the name of its type; these are the names understood on the other side.
_BY_NAME = {cls.__name__: cls for cls in (
    HypyrError, InvalidInput, NotFound, Conflict, Unavailable, OperationTimeout, NotSupported,
    InvalidConfig, DomainNotFound, StaleDomainError, VcpuNotFound, DomainExists, DomainStateError,
    RegistryBusy, InsufficientResources, DomainUnreachable, DomainTimeout, SchedulerUnavailable,
    SaveFileError, MigrationFailed)}


def type_name(e: BaseException) -> str:
    """The name ``e`` is reported under: its own class's, or that of its nearest known ancestor."""
    for cls in type(e).__mro__:
        if _BY_NAME.get(cls.__name__) is cls:
            return cls.__name__
    return HypyrError.__name__


def from_report(name: object, message: str) -> HypyrError:
    """The error a peer reported as (``name``, ``message``); an unknown name gives a HypyrError."""
    return _BY_NAME.get(name if isinstance(name, str) else "", HypyrError)(message)
