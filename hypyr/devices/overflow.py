"""Console input that overflows a device's bounded buffer: warn once, then quietly until it drains.

Both lines are rate limited too: a guest that alternately drains and ignores its input buffer
decides how often the buffer overflows."""

from __future__ import annotations

import logging

from hypyr.devices.ratelog import RateLimitedLog


class OverflowLog:
    """Call :meth:`note` under the device lock after each enqueue, then :meth:`emit` outside it."""

    def __init__(self, log: logging.Logger, device: str, capacity: int):
        self.log, self.device, self.capacity = log, device, capacity
        self._rlog = RateLimitedLog(log)
        self._warned = False

    def note(self, offered: int, accepted: int, backlog: int) -> tuple[bool, int]:
        """Record one enqueue; returns (warn now?, bytes dropped)."""
        dropped = offered - accepted
        warn = dropped > 0 and not self._warned
        if dropped:
            self._warned = True
        elif backlog <= self.capacity // 2:
            self._warned = False  # drained: the next overflow is news again
        return warn, dropped

    def emit(self, warn: bool, dropped: int) -> None:
        if warn:
            self._rlog.warning("full", "%s: input buffer full (guest not reading?), dropping input"
                               " (%d bytes now; further drops not logged until it drains)", self.device, dropped)
        elif dropped:
            self._rlog.debug("dropped", "%s: input buffer full, dropped %d bytes", self.device, dropped)
