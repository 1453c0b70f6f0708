"""xl.cfg(5) syntax: a tokenizer and parser, text → :class:`RawConfig` (key → value, line).

Nothing is evaluated.  What the settings mean is :mod:`hypyr.toolstack.xlcfg`; their validation,
:mod:`hypyr.toolstack.domconfig`.

Syntax (as xl.cfg(5)):

* ``KEY = VALUE`` settings, separated by new lines or ``;``.  Keys are identifiers
  (letters, digits, ``_``; not starting with a digit).  ``#`` starts a comment (outside strings).
* Values: strings in ``'single'`` or ``"double"`` quotes with C escapes (``\\n \\t \\\\ \\' \\"
  \\a \\b \\f \\r \\v \\xHH \\OOO``; a string may not span lines or contain NUL); numbers in
  decimal, octal (``0`` prefix) or hex (``0x`` prefix); lists ``[ v, v, ... ]`` that may span
  lines, nest, and end with a trailing comma.  BOOLEANs are numbers (0 false, other true) as in
  xl; bare words such as ``true`` or ``restart`` are an error with a hint to quote them.
* As in libxlu, a number given as a quoted string (``memory = "512"``) is accepted where a number
  is expected.
* A key set twice: the later value wins (as in xl), with a warning naming both lines.

Errors: :class:`XlCfgError` (an ``InvalidConfig``) whose str() is ``"FILE:LINE: sentence"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from hypyr.toolstack.errors import InvalidConfig

Value = str | int | list         # what a RawConfig holds: a str, an int or a (nested) list of them

MAX_NESTING = 32                 # list nesting depth


# --------------------------------------------------------------------------- errors


class XlCfgError(InvalidConfig):
    """A syntax or value error in an xl.cfg file; str() is ``"FILE:LINE: sentence"``."""

    def __init__(self, filename: str, line: int | None, message: str):
        self.filename, self.line, self.message = filename, line, message
        where = f"{filename}:{line}" if line is not None else filename
        super().__init__(f"{where}: {message}")


def show_value(value: Any, limit: int = 60) -> str:
    """A value as it would be written in the cfg, shortened, for messages."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        s = value if len(value) <= limit else value[:limit] + "..."
        return "'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"
    return str(value)


# --------------------------------------------------------------------------- tokenizer

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_TOKEN = re.compile(r"-?[0-9][0-9A-Za-z_.]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "\\": "\\", "'": "'", '"': '"'}


@dataclass(frozen=True)
class _Tok:
    kind: str          # "ident", "string", "number", "nl", "eof", or one of = [ ] , ;
    value: Any
    line: int

    def describe(self) -> str:
        return {"ident": f"'{self.value}'", "string": "a string", "number": "a number",
                "nl": "the end of the line", "eof": "the end of the file"}.get(self.kind, f"'{self.kind}'")


def parse_int(text: str) -> int:
    """An xl NUMBER: decimal, octal (0 prefix) or hex (0x prefix), optionally negative.

    Raises ValueError for anything else (the caller words the error).
    """
    s = text.strip()
    neg = s.startswith("-")
    body = s[1:] if neg else s
    if len(body) > 40:
        raise ValueError(text)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
        n = int(body[2:], 16)
    elif re.fullmatch(r"0[0-7]*", body):
        n = int(body, 8)
    elif re.fullmatch(r"[1-9][0-9]*", body):
        n = int(body, 10)
    else:
        raise ValueError(text)
    return -n if neg else n


def _tokenize(text: str, filename: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n, line = 0, len(text), 1

    def fail(ln: int, msg: str) -> NoReturn:
        raise XlCfgError(filename, ln, msg)

    while i < n:
        c = text[i]
        if c == "\n":
            toks.append(_Tok("nl", None, line))
            line += 1
            i += 1
        elif c in " \t\r\f\v":
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c in "'\"":
            s, i = _scan_string(text, i, line, fail)
            toks.append(_Tok("string", s, line))
        elif c in "=[],;":
            toks.append(_Tok(c, c, line))
            i += 1
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _IDENT.match(text, i)
            assert m is not None           # c starts one
            toks.append(_Tok("ident", m.group(), line))
            i = m.end()
        elif (c.isascii() and c.isdigit()) or (c == "-" and i + 1 < n and text[i + 1].isascii()
                                                and text[i + 1].isdigit()):
            m = _NUMBER_TOKEN.match(text, i)
            assert m is not None           # c starts one
            try:
                num = parse_int(m.group())
            except ValueError:
                fail(line, f"{show_value(m.group(), 20)} is not a number (use decimal, 0x hex or 0 octal)")
            toks.append(_Tok("number", num, line))
            i = m.end()
        else:
            fail(line, f"unexpected character {c!r}")
    toks.append(_Tok("eof", None, line))
    return toks


def _scan_string(text: str, start: int, line: int, fail: Callable[[int, str], NoReturn]) -> tuple[str, int]:
    """Scan the quoted string at text[start]; return (value, index after the closing quote)."""
    quote = text[start]
    out: list[str] = []
    i, n = start + 1, len(text)
    unterminated = f"unterminated string: the {quote} has no closing {quote} on the same line"
    while True:
        if i >= n or text[i] == "\n":
            fail(line, unterminated)
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\0":
            fail(line, "strings cannot contain NUL characters")
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n or text[i + 1] == "\n":
            fail(line, unterminated)
        e = text[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e == "x":
            digits = text[i + 2:i + 4]
            if not re.fullmatch(r"[0-9a-fA-F]{2}", digits):
                fail(line, "\\x in a string must be followed by two hex digits")
            out.append(chr(int(digits, 16)))
            i += 4
        elif e in "01234567":
            m = re.match(r"[0-7]{1,3}", text[i + 1:i + 4])
            assert m is not None           # e is an octal digit
            v = int(m.group(), 8)
            if v == 0:
                fail(line, "strings cannot contain NUL characters")
            if v > 0o377:
                fail(line, f"octal escape \\{m.group()} is out of range")
            out.append(chr(v))
            i += 1 + len(m.group())
        else:
            fail(line, f"unknown escape sequence \\{e} in a string (write \\\\ for a backslash)")


# --------------------------------------------------------------------------- parser


class RawConfig(dict):
    """Parsed settings in file order: key → (value, line of the key).

    ``value`` is a str, an int or a (possibly nested) list of those.  ``item_lines[key]`` gives the
    line of each top-level item of a list value; ``warnings`` holds parse-level warnings
    (duplicate keys).
    """

    def __init__(self, filename: str = "<cfg>"):
        super().__init__()
        self.filename = filename
        self.warnings: list[str] = []
        self.item_lines: dict[str, list[int]] = {}

    def line(self, key: str) -> int | None:
        return self[key][1] if key in self else None

    def value(self, key: str, default: Any = None) -> Any:
        return self[key][0] if key in self else default


def parse(text: str, filename: str = "<cfg>") -> RawConfig:
    """Parse xl.cfg text into a RawConfig; raises XlCfgError (and nothing else) on bad syntax."""
    toks = _tokenize(text, filename)
    raw = RawConfig(filename)
    p = 0
    while True:
        t = toks[p]
        if t.kind == "eof":
            return raw
        if t.kind in ("nl", ";"):
            p += 1
            continue
        if t.kind != "ident":
            raise XlCfgError(filename, t.line, f"expected a setting such as memory = 512, found {t.describe()}")
        key = t.value
        if toks[p + 1].kind != "=":
            raise XlCfgError(filename, t.line, f"expected '=' after {key}, found {toks[p + 1].describe()}")
        p += 2
        if toks[p].kind in ("nl", ";", "eof"):
            raise XlCfgError(filename, t.line, f"{key} has no value")
        value, item_lines, p = _parse_value(toks, p, filename, key, 0)
        end = toks[p]
        if end.kind not in ("nl", ";", "eof"):
            raise XlCfgError(filename, end.line, f"expected a new line or ';' after the value of {key}, "
                                                 f"found {end.describe()}")
        if key in raw:
            raw.warnings.append(f"{filename}:{t.line}: {key} is set again (first on line {raw.line(key)}); "
                                "the later value is used")
            del raw[key]
        raw[key] = (value, t.line)
        raw.item_lines.pop(key, None)
        if item_lines is not None:
            raw.item_lines[key] = item_lines


def _parse_value(toks: list[_Tok], p: int, filename: str, key: str, depth: int):
    """Parse one value at toks[p]; return (value, item lines if a list else None, next index)."""
    t = toks[p]
    if t.kind in ("string", "number"):
        return t.value, None, p + 1
    if t.kind == "ident":
        hint = "write 1 or 0" if t.value.lower() in ("true", "false", "yes", "no", "on", "off") \
            else f"quote it: {key} = '{t.value}'"
        raise XlCfgError(filename, t.line, f"the value of {key} must be a quoted string, a number or a list, "
                                           f"not the bare word {t.value} ({hint})")
    if t.kind != "[":
        raise XlCfgError(filename, t.line, f"expected a value for {key}, found {t.describe()}")
    if depth >= MAX_NESTING:
        raise XlCfgError(filename, t.line, f"lists are nested too deeply in {key}")
    open_line = t.line
    items: list = []
    lines: list[int] = []
    p += 1

    def unclosed(tok: _Tok):
        where = "the end of the file" if tok.kind == "eof" else f"{tok.describe()} on line {tok.line}"
        raise XlCfgError(filename, open_line, f"the list for {key} is not closed with ']' (found {where})")

    while True:
        while toks[p].kind == "nl":
            p += 1
        t = toks[p]
        if t.kind == "]":
            return items, lines, p + 1
        if t.kind == ",":
            raise XlCfgError(filename, t.line, f"unexpected ',' in the list for {key} (an item is missing)")
        if t.kind not in ("string", "number", "["):
            unclosed(t)
        v, _, p = _parse_value(toks, p, filename, key, depth + 1)
        items.append(v)
        lines.append(t.line)
        while toks[p].kind == "nl":
            p += 1
        t = toks[p]
        if t.kind == ",":
            p += 1
        elif t.kind == "]":
            return items, lines, p + 1
        elif t.kind in ("string", "number", "["):
            raise XlCfgError(filename, t.line, f"missing ',' between items of the list for {key}")
        else:
            unclosed(t)
