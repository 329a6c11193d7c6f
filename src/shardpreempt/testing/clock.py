"""A fake clock for tests: time moves only when the test says so."""

from __future__ import annotations

import threading


class FakeClock:
    """Implements :class:`shardpreempt.typing.Clock`; ``sleep`` advances time instead of waiting."""

    def __init__(self, start: float = 1000.0, unix: float = 1_700_000_000.0) -> None:
        self._now = start
        self._offset = unix - start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        """Current fake monotonic time."""
        with self._lock:
            return self._now

    def time(self) -> float:
        """Current fake unix time."""
        with self._lock:
            return self._now + self._offset

    def sleep(self, seconds: float) -> None:
        """Advance time by ``seconds`` at once."""
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self._now += max(0.0, seconds)
