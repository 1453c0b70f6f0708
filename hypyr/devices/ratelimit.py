"""A token bucket: at most ``rate`` bytes per second on average, bursts up to ``capacity``."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Xen's vif ``rate=RATE@INTERVAL`` as a bucket refilled continuously at ``rate`` bytes/s.

    ``capacity`` defaults to one interval's credit, but never less than ``min_capacity`` (a whole
    packet must fit, or a big packet could never be sent)."""

    def __init__(self, rate: float, interval: float, min_capacity: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or interval <= 0:
            raise ValueError("rate and interval must be positive")
        self.rate = float(rate)
        self.capacity = max(rate * interval, float(min_capacity))
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, amount: int) -> bool:
        """Spend ``amount`` tokens if there are that many; False (nothing spent) otherwise."""
        self._refill()
        if amount <= self._tokens:
            self._tokens -= amount
            return True
        return False

    def wait_time(self, amount: int) -> float:
        """Seconds until ``amount`` tokens will be there."""
        self._refill()
        return max(0.0, (min(amount, self.capacity) - self._tokens) / self.rate)
