"""JSON in and out: request bodies decoded and checked against the document's schemas, replies
encoded.

``check(value, schema, what)`` validates against the JSON Schema subset the document uses (type,
properties, required, additionalProperties, min/maxProperties, items, minItems, minimum, maximum,
minLength, pattern, enum, oneOf, nullable, $ref) and raises ``BadRequest`` with a sentence that
names the field: what the document says is what the server takes, no more and no less.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from hypyr.errors import InvalidInput


class BadRequest(InvalidInput):
    """A request body or parameter that is not what the operation takes."""


# -- in ---------------------------------------------------------------------------------------------
def decode(raw: bytes) -> Any:
    """The JSON value of a request body (BadRequest if it is not JSON)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None
    except ValueError as e:     # e.g. an integer of more digits than Python converts
        raise BadRequest(f"the request body is not JSON this server can read ({e})") from None


# JSON Schema type name → (its test, how a sentence names it); keyed by object: schemas are untyped
_KINDS: dict[object, tuple[Callable[[Any], bool], str]] = {
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "array": (lambda v: isinstance(v, list), "a list"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
}


def _names(keys) -> str:
    keys = [f"'{k}'" for k in sorted(keys)]
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " or " + keys[-1]


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(schema: Mapping) -> str:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    return f" of at most {hi}" if hi is not None else ""


def _what(schema: Mapping, components: Mapping) -> str:
    """How to say what ``schema`` wants, for a sentence: its description, else its type."""
    schema = _resolve(schema, components)
    if schema.get("description"):
        return schema["description"]
    kind = _KINDS.get(schema.get("type"))
    return (kind[1] + _range(schema)) if kind else "something else"


def _resolve(schema: Mapping, components: Mapping) -> Mapping:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def check(value: Any, schema: Mapping, what: str, components: Mapping) -> None:
    """Raise BadRequest unless ``value`` matches ``schema``; ``what`` names the value in the sentence
    (e.g. "the request body", "'cpus'")."""
    schema = _resolve(schema, components)
    if value is None and schema.get("nullable"):
        return
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                check(value, option, what, components)
                matches += 1
            except BadRequest:
                pass
        if matches != 1:
            raise BadRequest(f"{what} must be {_what(schema, components)}, not {_shown(value)}")
        return
    kind = schema.get("type")
    if kind is not None:
        test, noun = _KINDS[kind]
        if not test(value):
            if kind == "object" and what == "the request body":
                raise BadRequest("the request body must be a JSON object")
            more = f" ({schema['description']})" if schema.get("description") and kind == "string" else ""
            raise BadRequest(f"{what} must be {noun}{_range(schema)}{more}, not {_shown(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise BadRequest(f"{what} must be one of {', '.join(map(str, schema['enum']))}, not {_shown(value)}")
    if (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (("minimum" in schema and value < schema["minimum"])
                 or ("maximum" in schema and value > schema["maximum"]))):
        kind = _KINDS.get(schema.get("type"))
        noun = kind[1] if kind else "a number"
        raise BadRequest(f"{what} must be {noun}{_range(schema)}, not {_shown(value)}")
    if isinstance(value, str) and (len(value) < schema.get("minLength", 0)
                                   or ("pattern" in schema and not re.search(schema["pattern"], value))):
        raise BadRequest(f"{what} must be {_what(schema, components)}, not {_shown(value)}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise BadRequest(f"{what} must be {_what(schema, components)}, not an empty list"
                             if not value else f"{what} must have at least {schema['minItems']} items")
        for i, item in enumerate(value):
            check(item, schema.get("items", {}), f"item {i} of {what}", components)
    if isinstance(value, dict):
        _check_object(value, schema, what, components)


def _check_object(value: dict, schema: Mapping, what: str, components: Mapping) -> None:
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        extra = sorted(set(value) - set(props))
        if extra:
            allowed = f"allowed: {', '.join(sorted(props))}" if props else "this request takes none"
            raise BadRequest(f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                             f"({allowed})")
    lo, hi = schema.get("minProperties", 0), schema.get("maxProperties")
    if lo == hi == 1 and len(value) != 1:
        raise BadRequest(f"give exactly one of {_names(props)}")
    if len(value) < lo:
        raise BadRequest(f"give at least {'one' if lo == 1 else lo} of {_names(props)}")
    if hi is not None and len(value) > hi:
        raise BadRequest(f"give at most {hi} of {_names(props)}")
    for key in schema.get("required", ()):
        if key not in value:
            raise BadRequest(f"give '{key}': {_what(props.get(key, {}), components)}")
    for key, item in value.items():
        if key in props:
            check(item, props[key], f"'{key}'", components)


# -- out --------------------------------------------------------------------------------------------
def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def encode(o: Any) -> bytes:
    """A reply body: indented JSON and a newline."""
    return (json.dumps(o, default=_default, indent=2) + "\n").encode()
