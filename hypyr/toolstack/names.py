"""The one rule for domain names, used by xl.cfg parsing and by the registry alike."""

from __future__ import annotations

import re

DOMAIN0_NAME = "Domain-0"   # the host, as in Xen: never a hypyr domain's name
MAX_NAME = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a domain's name (one sentence), or None if it can be.

    A name is 1-64 ASCII letters, digits, ``_``, ``.`` or ``-``, starting with a letter or digit
    (so it is a safe file name, ``logs/<name>.console.log``); not all digits (those are domain
    ids); not ``Domain-0`` (the host)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name if not isinstance(name, str) or len(name) <= 70 else name[:70] + "...")
        return (f"name must be 1-{MAX_NAME} letters, digits, '_', '.' or '-' starting with a letter or digit, "
                f"not {shown}")
    if name.isdigit():
        return f"name must not be all digits ({name} would look like a domain id)"
    if name == DOMAIN0_NAME:
        return f"name must not be {DOMAIN0_NAME}: that name is reserved for the host"
    return None
