"""What every `hypyr` command shares: exit statuses, sizes, the one-line message."""

from __future__ import annotations

import re
import sys

from hypyr.errors import HypyrError

EXIT_ERROR = 1
EXIT_NOT_NATIVE = 3  # `hypyr doctor --native`: KVM works but guests would be emulated


def parse_size(text: str, default_unit: str = "M") -> int:
    """'256M', '1G', '512' (MiB, as in xl.cfg), '65536K' → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:([KMGT])(?:i?B)?|(B))?\s*", text, re.IGNORECASE)
    if not m:
        raise HypyrError(f"'{text}' is not a size (use e.g. 256M or 1G)")
    if m.group(3):
        return int(m.group(1))
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def say(msg: str) -> None:
    """One line on stderr; on a terminal, from its first column (the guest may have left it mid-line)."""
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + f"hypyr: {msg}\n")
    sys.stderr.flush()
