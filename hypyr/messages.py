"""Reading the JSON messages hypyr's processes exchange (control requests and answers, start-up
reports, supervisor requests), whose sender may be hostile: a jailed VMM runs guest-facing code."""

from __future__ import annotations

import json


def json_object(data: bytes | str) -> dict | None:
    """``data`` as a JSON object, or None if it is anything else: not JSON, not UTF-8, nested
    deeper than the parser goes (``b"[" * 5000`` raises RecursionError), or not an object."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
