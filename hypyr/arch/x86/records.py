"""Frozen records that turn into plain data (ints, lists, dicts, bytes) and back, every field
checked on the way in: the machinery of the vCPU and VM state records
(:mod:`hypyr.arch.x86.vcpu_state`).  A record class lists its fields as ``name: type = uint(64)``
(or ``record``, ``blob``, ...); a :class:`KvmRecord` also mirrors a KVM struct, member by member."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from hypyr.errors import StateError, show_untrusted

MAX_MSRS = 4096   # entries of an "msrs" field

# -- plain data <-> records -------------------------------------------------------------------------
# Each record field says in its metadata what it looks like as plain data ("kind") and, for
# records mirroring a KVM struct, where it lives in that struct ("kvm", a dotted path).

class Meta(dict):
    """A record field's metadata, given as the field's value in the class body."""


def uint(bits: int, kvm: str | None = None, *, optional: bool = False) -> Any:
    return Meta(kind="uint", bits=bits, kvm=kvm, optional=optional)


def sint(bits: int, kvm: str | None = None) -> Any:
    return Meta(kind="sint", bits=bits, kvm=kvm)


def uints(bits: int, n: int, kvm: str | None = None) -> Any:
    return Meta(kind="uints", bits=bits, n=n, kvm=kvm)


def blob(min_len: int, max_len: int, multiple: int = 1) -> Any:
    return Meta(kind="bytes", min=min_len, max=max_len, multiple=multiple)


def record(cls: type, kvm: str | None = None, *, optional: bool = False) -> Any:
    return Meta(kind="record", cls=cls, kvm=kvm, optional=optional)


def records(cls: type, min_n: int, max_n: int, kvm: str | None = None) -> Any:
    return Meta(kind="records", cls=cls, min=min_n, max=max_n, kvm=kvm)


def custom(kind: str) -> Any:
    return Meta(kind=kind)


def check_int(value: object, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{where}: must be an integer, not {show_untrusted(value)}")
    if not lo <= value <= hi:
        raise StateError(f"{where}: {show_untrusted(value)} is out of range {lo}..{hi}")
    return int(value)


def check_list(value: object, lo: int, hi: int, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise StateError(f"{where}: must be a list, not {show_untrusted(value)}")
    if not lo <= len(value) <= hi:
        raise StateError(f"{where}: has {len(value)} entries, not {lo}..{hi}" if lo != hi
                         else f"{where}: has {len(value)} entries, not {lo}")
    return list(value)


def check_keys(data: object, names: list[str], where: str) -> dict:
    if not isinstance(data, dict):
        raise StateError(f"{where}: must be a dict, not {show_untrusted(data)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise StateError(f"{where}: field {missing[0]!r} is missing")
    extra = [k for k in data if k not in names]
    if extra:
        raise StateError(f"{where}: unknown field {show_untrusted(extra[0])}")
    return data


_Spec = tuple[tuple[str, Any, tuple[str, ...], int], ...]


def _fields(cls: type) -> _Spec:
    """(name, metadata, path of the KVM struct member, largest value or -1) of each field of a
    record class, worked out once, when the class is made (a migration's downtime converts every
    vCPU's records both ways).  The largest value is a plain unsigned integer field's: one that a
    good value passes with one comparison (the general path names the field only for a bad one)."""
    return cls._spec   # type: ignore[attr-defined]


def record_fields(cls: type) -> list[tuple[str, dict]]:
    """(name, metadata) of each field of a record class, in order."""
    return [(name, meta) for name, meta, _, _ in _fields(cls)]


class Record:
    """Base of the frozen state records: keyword (or positional) construction of every field,
    equality, hashing and repr over the fields, :meth:`replace`, :meth:`to_dict` and a validating
    :meth:`from_dict`.  A subclass lists its fields as ``name: type = uint(...)`` (or ``record``,
    ``blob``...).  Not dataclasses: making one compiles its methods, ~30 ms each in the lab."""

    _kind: ClassVar[str | None] = None  # top-level records carry "kind" and "v" (format version)
    _version: ClassVar[int] = 1
    _spec: ClassVar[_Spec] = ()
    _names: ClassVar[tuple[str, ...]] = ()
    _name_set: ClassVar[frozenset[str]] = frozenset()
    _keys: ClassVar[frozenset[str]] = frozenset()   # the keys of the plain form

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = [(name, meta) for name, meta in vars(cls).items() if isinstance(meta, Meta)]
        for name, _ in fields:
            delattr(cls, name)
        cls._spec = tuple((name, meta, tuple((meta.get("kvm") or name).split(".")),
                           (1 << meta["bits"]) - 1 if meta["kind"] == "uint" else -1) for name, meta in fields)
        cls._names = tuple(name for name, _ in fields)
        cls._name_set = frozenset(cls._names)
        cls._keys = cls._name_set | ({"kind", "v"} if cls._kind else set())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._names
        values = dict(zip(names, args))
        if len(args) > len(names) or not values.keys().isdisjoint(kwargs):
            raise TypeError(f"{type(self).__name__}: too many or repeated arguments")
        values.update(kwargs)
        if values.keys() != self._name_set:
            wrong = sorted(self._name_set ^ values.keys())
            raise TypeError(f"{type(self).__name__}: missing or unknown fields {wrong}")
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: use replace()")

    def replace(self, **changes: Any):
        """A copy with ``changes``."""
        return type(self)(**{**self.__dict__, **changes})

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._names)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names)
        return f"{self.__class__.__name__}({fields})"

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self._kind, "v": self._version} if self._kind else {}
        for name, meta, _, hi in _fields(type(self)):
            value = getattr(self, name)
            out[name] = value if hi >= 0 else _to_plain(meta, value)
        return out

    @classmethod
    def from_dict(cls, data: object, where: str | None = None):
        """The record ``data`` describes; :class:`StateError` naming the field for anything missing,
        unknown, of the wrong type or out of range (and nothing else)."""
        where = where or (cls._kind or cls.__name__)
        fields = _fields(cls)
        names = cls._keys
        if not isinstance(data, dict) or data.keys() != names:   # say which key is missing or unknown
            data = check_keys(data, [name for name, _, _, _ in fields] + (["kind", "v"] if cls._kind else []),
                               where)
        if cls._kind:
            if data["kind"] != cls._kind:
                raise StateError(f"{where}: this is {show_untrusted(data['kind'])} state, not {cls._kind!r} state")
            v = check_int(data["v"], 0, 1 << 31, f"{where}.v")
            if v != cls._version:
                raise StateError(f"{where}: state format version {v} is not supported "
                                 f"(this hypyr reads version {cls._version})")
        values = {}
        for name, meta, _, hi in fields:
            value = data[name]
            if type(value) is int and 0 <= value <= hi:   # the usual field: a good unsigned integer
                values[name] = value
            else:
                values[name] = _from_plain(meta, value, f"{where}.{name}")
        return cls(**values)


def _to_plain(meta, value) -> Any:
    kind = meta["kind"]
    if value is None:
        return None
    if kind in ("uint", "sint"):
        return value
    if kind == "uints":
        return list(value)
    if kind == "bytes":
        return bytes(value)
    if kind == "record":
        return value.to_dict()
    if kind == "records":
        return [r.to_dict() for r in value]
    if kind == "msrs":
        return [[index, data] for index, data in value.items()]
    raise AssertionError(kind)


def _from_plain(meta, value, where: str) -> Any:
    kind = meta["kind"]
    if value is None and meta.get("optional"):
        return None
    if kind == "uint":
        return check_int(value, 0, (1 << meta["bits"]) - 1, where)
    if kind == "sint":
        half = 1 << (meta["bits"] - 1)
        return check_int(value, -half, half - 1, where)
    if kind == "uints":
        items = check_list(value, meta["n"], meta["n"], where)
        return tuple(check_int(v, 0, (1 << meta["bits"]) - 1, f"{where}[{i}]") for i, v in enumerate(items))
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray)):
            raise StateError(f"{where}: must be bytes, not {show_untrusted(value)}")
        if not meta["min"] <= len(value) <= meta["max"] or len(value) % meta["multiple"]:
            size = (f"{meta['min']}" if meta["min"] == meta["max"]
                    else f"{meta['min']}..{meta['max']}, a multiple of {meta['multiple']}")
            raise StateError(f"{where}: has {len(value)} bytes, not {size}")
        return bytes(value)
    if kind == "record":
        return meta["cls"].from_dict(value, where)
    if kind == "records":
        items = check_list(value, meta["min"], meta["max"], where)
        return tuple(meta["cls"].from_dict(v, f"{where}[{i}]") for i, v in enumerate(items))
    if kind == "msrs":
        msrs: dict[int, int] = {}
        for i, pair in enumerate(check_list(value, 0, MAX_MSRS, where)):
            index, data = pair if type(pair) is list and len(pair) == 2 else check_list(pair, 2, 2, f"{where}[{i}]")
            if not (type(index) is int and 0 <= index <= 0xFFFF_FFFF):
                index = check_int(index, 0, 0xFFFF_FFFF, f"{where}[{i}][0]")
            if index in msrs:
                raise StateError(f"{where}[{i}]: MSR {index:#x} appears twice")
            if not (type(data) is int and 0 <= data < 1 << 64):
                data = check_int(data, 0, (1 << 64) - 1, f"{where}[{i}][1]")
            msrs[index] = data
        return msrs
    raise AssertionError(kind)


class KvmRecord(Record):
    """A record mirroring the KVM struct ``_kvm``: :meth:`from_kvm` / :meth:`to_kvm`.  Padding and
    reserved fields are not kept (KVM wants them zero)."""

    _kvm: ClassVar[type]

    @classmethod
    def from_kvm(cls, s):
        values: dict[str, Any] = {}
        for name, meta, path, hi in _fields(cls):
            raw = getattr(s, path[0]) if len(path) == 1 else _get_path(s, path)
            if hi >= 0:
                values[name] = int(raw)
            elif meta["kind"] == "record":
                values[name] = meta["cls"].from_kvm(raw)
            elif meta["kind"] == "records":
                values[name] = tuple(meta["cls"].from_kvm(x) for x in raw)
            elif meta["kind"] == "uints":
                values[name] = tuple(raw)
            else:
                values[name] = int(raw)
        return cls(**values)

    def to_kvm(self, s=None):
        """The KVM struct (or fill ``s``, e.g. a struct nested in another, in place)."""
        s = self._kvm() if s is None else s
        for field_name, meta, (*parents, name), hi in _fields(type(self)):
            value = getattr(self, field_name)
            owner = _get_path(s, parents) if parents else s
            if hi >= 0:
                setattr(owner, name, value)
            elif meta["kind"] == "record":
                value.to_kvm(getattr(owner, name))
            elif meta["kind"] == "records":
                array = getattr(owner, name)
                for i, r in enumerate(value):
                    r.to_kvm(array[i])
            elif meta["kind"] == "uints":
                getattr(owner, name)[:] = list(value)
            else:
                setattr(owner, name, value)
        return s


def _get_path(s, path: Sequence[str]):
    for name in path:
        s = getattr(s, name)
    return s
