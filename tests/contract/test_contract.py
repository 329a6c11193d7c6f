"""The backend contract suite, run against every backend on a real server."""

from __future__ import annotations

from shardpreempt.testing.contract import BackendContract


class TestContract(BackendContract):
    """Every rule of the backend contract (docs/testing.md), for each backend in conftest.BACKENDS."""
