"""The history checker, kept importable from the testing package (it lives in :mod:`shardpreempt.history`)."""

from __future__ import annotations

from ..history import Hold, Report, Violation, check, holds_of, read_events

__all__ = ["Hold", "Report", "Violation", "check", "holds_of", "read_events"]
