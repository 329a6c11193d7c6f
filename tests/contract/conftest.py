"""Fixtures: one real server per backend per session, a fresh namespace per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardpreempt.testing.servers import EphemeralServer, ServerUnavailable, server_for, unique
from shardpreempt.testing.skips import missing

BACKENDS = ["memory", "file", "redis", "postgresql", "mysql", "etcd", "zookeeper"]


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, EphemeralServer]]:
    """Servers started on first use, stopped by pid at the end of the session."""
    started: dict[str, EphemeralServer] = {}
    yield started
    for server in started.values():
        server.close()


def get_server(servers: dict[str, EphemeralServer], name: str) -> EphemeralServer:
    """The session's server for backend ``name``, started if needed."""
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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
