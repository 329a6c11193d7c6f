"""Public test helpers: ephemeral servers, the backend contract suite, the history checker, a fake clock.

The contract suite (:mod:`shardpreempt.testing.contract`) needs pytest; import it from test code only.
"""

from __future__ import annotations

from ..history import Report, Violation, check, read_events
from .clock import FakeClock
from .wait import wait_until

__all__ = ["FakeClock", "Report", "Violation", "check", "read_events", "wait_until"]
