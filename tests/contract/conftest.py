"""Fixtures: one real server per backend per session, a fresh namespace per test."""

from __future__ import annotations

import pytest

from shardpreempt.testing.servers import EphemeralServer, unique

from ..conftest import get_server

BACKENDS = ["memory", "file", "redis", "postgresql", "mysql", "etcd", "zookeeper"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
def backend_server(backend_name: str, servers: dict[str, EphemeralServer]) -> EphemeralServer | None:
    """The real server behind the backend (None for memory and file)."""
    if backend_name in ("memory", "file"):
        return None
    return get_server(servers, backend_name)


@pytest.fixture
def backend_url(backend_name: str, backend_server: EphemeralServer | None, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> str:
    """A URL of a fresh, empty namespace."""
    if backend_name == "memory":
        return f"memory://{unique()}"
    if backend_name == "file":
        return f"file://{tmp_path_factory.mktemp('locks')}/{unique()}"
    assert backend_server is not None
    url = backend_server.url(unique())
    request.addfinalizer(lambda: _print_log_on_failure(request, backend_server))
    return url


def _print_log_on_failure(request: pytest.FixtureRequest, server: EphemeralServer) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- {server.name} log ---\n{server.log_tail()}")
