"""Shared by every test directory: the public plugin (one real server per backend kind per test session)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by pytest_plugins, which must come first (assertion rewriting)
    from shardpreempt.testing.fixtures import Servers
    from shardpreempt.testing.servers import EphemeralServer

pytest_plugins = ["shardpreempt.testing.fixtures"]


@pytest.fixture(scope="session")
def servers(shardpreempt_servers: Servers) -> Servers:
    """The plugin's session servers, under the name tests/pool uses."""
    return shardpreempt_servers


def get_server(servers: Servers, name: str) -> EphemeralServer:
    """The session's server for backend ``name``, started (or restarted) if needed."""
    return servers.started(name)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can print a server's log on failure."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked slow unless asked for with ``-m slow`` (the suite CI runs stays short)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
