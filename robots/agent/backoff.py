"""Exponential backoff with full jitter, shared by the websocket reconnect loop and the uploader."""

from __future__ import annotations

import random
from typing import Optional


class Backoff:
    """Delays of ``uniform(0, min(maximum, initial * 2**n))`` for the n-th consecutive failure.

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads a fleet that lost the server at the
    same moment, so the robots do not all come back in the same second. Not thread-safe: one owner each.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: Optional[random.Random] = None):
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Record a failure and return how long to wait before the next attempt."""
        cap = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return self._rng.uniform(0, cap)

    def reset(self) -> None:
        """Call after a success: the next failure starts from ``initial`` again."""
        self.failures = 0
