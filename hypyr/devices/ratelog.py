"""Rate-limited logging for lines a guest can trigger: a hostile guest must not fill the host's logs.

Each key (a kind of event) may log ``burst`` lines per ``interval`` seconds; lines beyond that are
counted, and the next line that gets through says how many were suppressed.  Keys must be fixed
strings chosen by the caller, never guest data; should a caller use more than ``MAX_KEYS`` keys
anyway, the extra ones share one window, so the table cannot grow without bound.
"""

from __future__ import annotations

import logging
import threading
import time

_OTHER = "(other keys)"


class RateLimitedLog:
    MAX_KEYS = 64

    def __init__(self, log: logging.Logger, interval: float = 5.0, burst: int = 5):
        self.log, self.interval, self.burst = log, interval, burst
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, lines, suppressed)

    def __call__(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log ``msg % args`` at ``level`` unless ``key`` has used up its lines for now."""
        self._emit(level, key, msg, args, exc_info)

    def _emit(self, level: int, key: str, msg: str, args: tuple, exc_info: bool) -> None:
        if not self.log.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            if key not in self._windows and len(self._windows) >= self.MAX_KEYS:
                key = _OTHER
            start, lines, suppressed = self._windows.get(key, (now, 0, 0))
            if now - start >= self.interval:
                start, lines = now, 0
            if lines >= self.burst:
                self._windows[key] = (start, lines, suppressed + 1)
                return
            self._windows[key] = (start, lines + 1, 0)
        if suppressed:
            msg += f" ({suppressed} similar lines suppressed)"
        # stacklevel 3: the record names the line that called us, not this module
        self.log.log(level, msg, *args, exc_info=exc_info, stacklevel=3)

    def debug(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.DEBUG, key, msg, args, False)

    def info(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.INFO, key, msg, args, False)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, key, msg, args, False)

    def error(self, key: str, msg: str, *args: object) -> None:
        self._emit(logging.ERROR, key, msg, args, False)

    def exception(self, key: str, msg: str, *args: object) -> None:
        """As :meth:`error`, with the exception being handled (call it from an ``except`` block)."""
        self._emit(logging.ERROR, key, msg, args, True)
