"""Fixtures shared by every test directory: one real server per backend kind per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardpreempt.testing.servers import EphemeralServer, ServerUnavailable, server_for
from shardpreempt.testing.skips import missing


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, EphemeralServer]]:
    """Servers started on first use, stopped by pid at the end of the session."""
    started: dict[str, EphemeralServer] = {}
    yield started
    for server in started.values():
        server.close()


def get_server(servers: dict[str, EphemeralServer], name: str) -> EphemeralServer:
    """The session's server for backend ``name``, started (or restarted) if needed."""
    if name not in servers:
        try:
            server = server_for(name)
        except (ServerUnavailable, ImportError) as exc:
            missing(f"{name}: {exc}")
        server.start()
        servers[name] = server
    server = servers[name]
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    return server


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
