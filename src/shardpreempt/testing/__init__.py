"""Public test helpers: ephemeral servers, the backend contract suite, the history checker, a fake clock.

:mod:`shardpreempt.testing.fixtures` is a pytest plugin (servers per kind per session, a fresh namespace and
an opener per test); :mod:`shardpreempt.testing.contract` is the backend contract suite, which imports
without pytest but runs only under it (``pip install 'shardpreempt[test]'``). See docs/testing.md.
"""

from __future__ import annotations

from ..history import Report, Violation, check, read_events
from .clock import FakeClock
from .wait import wait_until

__all__ = ["FakeClock", "Report", "Violation", "check", "read_events", "wait_until"]
