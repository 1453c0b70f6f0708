class HypyrError(Exception):
    """An error the user can fix; str() is one sentence."""


# -- kinds of error -------------------------------------------------------------------------------
# What went wrong, as a type: callers (the REST API's status codes, scripts) branch on these,
# never on the sentence.  A HypyrError that is none of them is bad input of some other sort.
class InvalidInput(HypyrError):
    """A value that is wrong whatever the state of things: a bad name, a config that does not parse."""


class NotFound(HypyrError):
    """Something named in the request does not exist (a domain, a vCPU, a network)."""


class Conflict(HypyrError):
    """The request does not fit the current state: a name already taken, a domain that is not running."""


class Unavailable(HypyrError):
    """The host, or a part of hypyr, cannot serve the request just now (a lock held too long, a
    domain process not answering, not enough free memory); the same request may work later."""


class OperationTimeout(Unavailable):
    """An operation did not finish within its time limit."""


class NotSupported(HypyrError):
    """Something this host or this hypyr cannot do at all (e.g. no cgroups for the scheduler)."""


class VcpuCountError(HypyrError, ValueError):
    """A vCPU count that is not an integer from 1 to the most this host and hypyr allow."""


class StateError(HypyrError):
    """A saved device state that cannot be loaded (a field missing, of the wrong type or out of
    range, or state that does not fit the device), or a device that cannot be saved now."""


def show_untrusted(value: object) -> str:
    """A short description of an untrusted value for an error message (never a huge repr)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if -(1 << 64) < value < 1 << 64 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    return f"a {type(value).__name__}"


class SnapshotError(HypyrError):
    """A save file or migration stream that cannot be read or loaded (truncated, corrupt, another
    format version, saved on an incompatible CPU, state that does not fit), or a VM that cannot
    be saved now.  Nothing was created."""


class SnapshotTruncated(SnapshotError):
    """A save file or migration stream that ends early: a short file, or a link that closed (or
    data that has not all arrived yet)."""


class MigrationError(HypyrError):
    """A live migration that did not complete: the link dropped, or the other side refused or
    failed.  On the source the domain runs on (unless the message says otherwise)."""


class PeerClosed(MigrationError):
    """The other side of a migration closed the connection without saying why."""
