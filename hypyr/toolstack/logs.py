"""Logging setup, done once per process by its entry point (`hypyr`, `hypyr serve`, a domain
process): one line per record, ``TIME level=LEVEL logger=NAME msg=MESSAGE``, at the level
``$HYPYR_LOG`` names (DEBUG, INFO, WARNING, ERROR) or else the entry point's default."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def level(default: int) -> int:
    """``$HYPYR_LOG`` as a logging level, or ``default`` when it is unset or not a level name."""
    name = os.environ.get("HYPYR_LOG", "").strip().upper()
    value = logging.getLevelName(name) if name else None
    return value if isinstance(value, int) else default


def setup(default: int = logging.WARNING, handler: logging.Handler | None = None) -> None:
    """Send log records to ``handler`` (default: stderr).  A process that already has handlers
    (an embedding program's, pytest's) keeps them."""
    logging.basicConfig(level=level(default), format=FORMAT,
                        handlers=[handler or logging.StreamHandler(sys.stderr)])
