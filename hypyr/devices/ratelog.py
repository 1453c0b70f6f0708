"""Rate-limited logging for lines a guest can trigger: a hostile guest must not fill the host's logs.

Each key (a kind of event) may log ``burst`` lines per ``interval`` seconds; lines beyond that are
counted, and the next line that gets through says how many were suppressed.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    def __init__(self, log: logging.Logger, interval: float = 5.0, burst: int = 5):
        self.log, self.interval, self.burst = log, interval, burst
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, lines, suppressed)

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` at ``level`` unless ``key`` has used up its lines for now."""
        if not self.log.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            start, lines, suppressed = self._windows.get(key, (now, 0, 0))
            if now - start >= self.interval:
                start, lines = now, 0
            if lines >= self.burst:
                self._windows[key] = (start, lines, suppressed + 1)
                return
            self._windows[key] = (start, lines + 1, 0)
        if suppressed:
            msg += f" ({suppressed} similar lines suppressed)"
        self.log.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self(logging.WARNING, key, msg, *args)

    def debug(self, key: str, msg: str, *args: object) -> None:
        self(logging.DEBUG, key, msg, *args)
