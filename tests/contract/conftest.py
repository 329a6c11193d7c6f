"""The contract suite runs on every built-in backend: the plugin's fixtures, parametrised by kind."""

from __future__ import annotations

import pytest

from shardpreempt.testing.fixtures import BACKENDS

__all__ = ["BACKENDS"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)
