"""The save/restore contract every device implements (see docs/save-restore.md).

A device's state is a dict of plain data (ints, strs, bools, None, bytes, lists and dicts of
them) with ``"kind"`` (which device model) and ``"v"`` (the format version of that model's
state).  The life cycle, the same for every device::

    source:       quiesce() -> save_state() -> resume() (the VM carries on) or discard the device
    destination:  fresh device, built from the same configuration -> load_state(s) -> resume()

* :meth:`Stateful.quiesce` finishes or hands back all asynchronous work (requests in flight,
  chains a device holds) and stops the device taking new work from the guest or the host
  until :meth:`Stateful.resume`; nothing the guest or the user handed over is lost or done
  twice.  Call it with the vCPUs paused.  May raise :class:`StateError` when the device cannot
  reach a state that can be saved.
* :meth:`Stateful.save_state` returns the state; for some devices only after ``quiesce()``
  (they raise :class:`StateError` otherwise).
* :meth:`Stateful.load_state` validates *everything* first (a state file is untrusted input, like
  the guest: anything missing, of the wrong type, out of range or not fitting this device is a
  :class:`StateError`, and nothing else is ever raised), then applies it.  The device is left
  quiesced; :meth:`Stateful.resume` starts it.
"""

from __future__ import annotations

import threading
from typing import Any, Literal, Protocol, overload, runtime_checkable

from hypyr.errors import StateError, show_untrusted

__all__ = ["HostInputGate", "QuiesceFree", "StateError", "StateReader", "Stateful"]


@runtime_checkable
class Stateful(Protocol):
    def quiesce(self) -> None: ...

    def resume(self) -> None: ...

    def save_state(self) -> dict: ...

    def load_state(self, state: dict) -> None: ...


class QuiesceFree:
    """For devices with no asynchronous work and no host input: quiesce and resume are no-ops."""

    def quiesce(self) -> None:
        pass

    def resume(self) -> None:
        pass


class HostInputGate:
    """For devices whose only work from outside is host input (serial input, Ctrl-Alt-Del): quiesce
    sets ``_quiesced`` under the device's ``_lock`` and the device refuses that input until
    resume.  The device initialises both attributes."""

    _lock: threading.Lock
    _quiesced: bool

    def quiesce(self) -> None:
        with self._lock:
            self._quiesced = True

    def resume(self) -> None:
        with self._lock:
            self._quiesced = False


class StateReader:
    """Reads the fields of an untrusted state dict; every problem is a :class:`StateError` naming
    the field.  ``kind``/``version`` check the ``"kind"`` and ``"v"`` fields; :meth:`done` refuses
    fields nobody read (a garbled or foreign state)."""

    def __init__(self, state: object, where: str, kind: str | None = None, version: int | None = None):
        self._where = where
        if not isinstance(state, dict):
            raise StateError(f"{where}: the state must be a dict, not {type(state).__name__}")
        if not all(isinstance(k, str) for k in state):
            raise StateError(f"{where}: the state's field names must be strings")
        self._d = state
        self._unread = set(state)
        if kind is not None:
            got = self.text("kind", 64)
            if got != kind:
                raise StateError(f"{where}: this is the state of a {show_untrusted(got)} device, not of a {kind!r}")
        if version is not None:
            v = self.integer("v", 0, 1 << 31)
            if v != version:
                raise StateError(f"{where}: state format version {v} is not supported (this hypyr reads "
                                 f"version {version})")

    def _get(self, name: str) -> Any:
        if name not in self._d:
            raise StateError(f"{self._where}: field {name!r} is missing")
        self._unread.discard(name)
        return self._d[name]

    def _fail(self, name: str, what: str) -> StateError:
        return StateError(f"{self._where}.{name}: {what}")

    @overload
    def integer(self, name: str, lo: int, hi: int, *, optional: Literal[False] = False) -> int: ...
    @overload
    def integer(self, name: str, lo: int, hi: int, *, optional: bool) -> int | None: ...

    def integer(self, name: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
        v = self._get(name)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(name, f"must be an integer{' or None' if optional else ''}, not {type(v).__name__}")
        v = int(v)
        if not lo <= v <= hi:
            raise self._fail(name, f"{show_untrusted(v)} is out of range {lo}..{hi}")
        return v

    def flag(self, name: str) -> bool:
        v = self._get(name)
        if not isinstance(v, bool):
            raise self._fail(name, f"must be a bool, not {type(v).__name__}")
        return v

    def blob(self, name: str, max_len: int, min_len: int = 0) -> bytes:
        v = self._get(name)
        if not isinstance(v, (bytes, bytearray)):
            raise self._fail(name, f"must be bytes, not {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            want = max_len if min_len == max_len else f"{min_len}..{max_len}"
            raise self._fail(name, f"has {len(v)} bytes, not {want}")
        return bytes(v)

    @overload
    def text(self, name: str, max_len: int, *, optional: Literal[False] = False) -> str: ...
    @overload
    def text(self, name: str, max_len: int, *, optional: bool) -> str | None: ...

    def text(self, name: str, max_len: int, *, optional: bool = False) -> str | None:
        v = self._get(name)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self._fail(name, f"must be a string{' or None' if optional else ''}, not {type(v).__name__}")
        if len(v) > max_len:
            raise self._fail(name, f"is longer than {max_len} characters")
        return str(v)

    def items(self, name: str, max_len: int, min_len: int = 0) -> list:
        v = self._get(name)
        if not isinstance(v, (list, tuple)):
            raise self._fail(name, f"must be a list, not {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            want = max_len if min_len == max_len else f"{min_len}..{max_len}"
            raise self._fail(name, f"has {len(v)} entries, not {want}")
        return list(v)

    def nested(self, name: str) -> StateReader:
        """The dict in field ``name``, as a reader of its own (no kind or version)."""
        return StateReader(self._get(name), f"{self._where}.{name}")

    def raw(self, name: str) -> Any:
        """Field ``name`` unchecked (for a nested device state that its device checks)."""
        return self._get(name)

    def done(self) -> None:
        if self._unread:
            names = ", ".join(show_untrusted(n) for n in sorted(self._unread)[:4])
            raise StateError(f"{self._where}: unknown field(s) {names}")
