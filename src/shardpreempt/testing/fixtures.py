"""A pytest plugin for backend tests: real servers, one per kind per test session, a fresh namespace per test.

Enable it in a ``conftest.py`` at the top of your tests (``pytest_plugins = ["shardpreempt.testing.fixtures"]``)
or on the command line (``pytest -p shardpreempt.testing.fixtures``). It is not loaded automatically. Fixtures:

``shardpreempt_servers`` (session)
    A :class:`Servers`: ``started(kind)`` starts that kind's server on first use, restarts it when an earlier
    test killed it, and every server is stopped at the end of the session.
``backend_name``
    The backend kind under test (``"redis"``, ``"postgresql"``, ``"mysql"``, ``"etcd"``, ``"zookeeper"``,
    ``"memory"``, ``"file"``): override this fixture or parametrise it (:data:`BACKENDS`).
``backend_server``
    The session's server for ``backend_name``, started and checked alive before each test (``None`` for
    ``memory`` and ``file``). Override it to run a server of your own (``shardpreempt_servers.started(kind,
    factory)``).
``backend_url``
    A URL of a fresh, empty namespace on that server; when the test fails, the server's log tail is printed.
``open_``
    An :class:`~shardpreempt.testing.contract.Opener` on ``backend_url``: ``open_(**options)`` opens a new
    backend instance, ``open_(other_url)`` another URL; all are closed after the test.

A server whose binary is missing skips the test, or fails it when the ``CI`` variable is set
(:func:`shardpreempt.testing.skips.missing`). :class:`~shardpreempt.testing.contract.BackendContract` runs on
these fixtures as it is; docs/testing.md has an example.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar, overload

try:
    import pytest
except ModuleNotFoundError as exc:  # only pytest's own absence; a broken install still raises
    if exc.name not in ("pytest", "_pytest"):
        raise
    raise ImportError(
        "shardpreempt.testing.fixtures is a pytest plugin and needs pytest: pip install 'shardpreempt[test]'"
    ) from exc

from .contract import Opener
from .servers import SERVERS, EphemeralServer, ServerUnavailable, server_for, unique
from .skips import missing

S = TypeVar("S", bound=EphemeralServer)

#: Every built-in backend kind: the in-process ones, then one per test server.
BACKENDS = ["memory", "file", *SERVERS]
#: Kinds that need no server.
SERVERLESS = ("memory", "file")


@overload
def start_server(kind: str) -> EphemeralServer: ...
@overload
def start_server(kind: str, factory: Callable[[], S]) -> S: ...
def start_server(kind: str, factory: Callable[[], EphemeralServer] | None = None) -> EphemeralServer:
    """A started server: ``factory()``, or the built-in test server for ``kind``.

    Skips the test (fails it under ``CI``) when the server's binary or its client library is missing.
    """
    if factory is None and kind not in SERVERS:
        known = ", ".join(SERVERS)
        raise ValueError(f"no built-in test server for {kind!r} (built in: {known}); pass a factory")
    try:
        server = server_for(kind) if factory is None else factory()
    except (ServerUnavailable, ImportError) as exc:
        missing(f"{kind}: {exc}")
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@overload
def running_server(kind: str) -> AbstractContextManager[EphemeralServer]: ...
@overload
def running_server(kind: str, factory: Callable[[], S]) -> AbstractContextManager[S]: ...
def running_server(kind: str, factory: Callable[[], EphemeralServer] | None = None
                   ) -> AbstractContextManager[EphemeralServer]:
    """A server of the caller's own (a special configuration) for a ``with`` block: :func:`start_server` on
    entry, closed on exit. The usual server of a kind is ``shardpreempt_servers.started(kind)``, shared by the
    session."""
    return _running(kind, factory)


@contextmanager
def _running(kind: str, factory: Callable[[], EphemeralServer] | None) -> Iterator[EphemeralServer]:
    server = start_server(kind) if factory is None else start_server(kind, factory)
    try:
        yield server
    finally:
        server.close()


def ensure_running(server: EphemeralServer) -> EphemeralServer:
    """The dead-server check: start ``server`` again if a test killed or stopped it, resume it if one paused it."""
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    else:
        server.resume()
    return server


class Servers(dict[str, EphemeralServer]):
    """The session's servers by kind, started on first use."""

    @overload
    def started(self, kind: str) -> EphemeralServer: ...
    @overload
    def started(self, kind: str, factory: Callable[[], S]) -> S: ...
    def started(self, kind: str, factory: Callable[[], EphemeralServer] | None = None) -> EphemeralServer:
        """The running server for ``kind``: started on the first call (``factory()``, or the built-in test
        server), started again when a test killed it. Skips (fails under ``CI``) when it cannot be had."""
        if kind not in self:
            self[kind] = start_server(kind) if factory is None else start_server(kind, factory)
        return ensure_running(self[kind])

    def close(self) -> None:
        """Stop every server (by pid) and delete its files."""
        while self:
            _, server = self.popitem()
            server.close()


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                               ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so ``backend_url`` can print the server's log when a test failed."""
    report: pytest.TestReport = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def failed(node: pytest.Item | pytest.Collector) -> bool:
    """Whether the test ``node`` failed in its call phase (read during teardown)."""
    if not isinstance(node, pytest.Item):
        return False
    report = node.stash.get(_REPORTS, {}).get("call")
    return report is not None and report.failed


@pytest.fixture(scope="session")
def shardpreempt_servers() -> Iterator[Servers]:
    """The session's servers, one per kind, started on first use and stopped (by pid) at the end."""
    servers = Servers()
    yield servers
    servers.close()


@pytest.fixture
def backend_name() -> str:
    """The backend kind under test: override this fixture, or parametrise it."""
    pytest.fail("shardpreempt.testing.fixtures: say which backend to test: define a fixture backend_name that "
                f"returns one of {BACKENDS} (or parametrise it)", pytrace=False)


@pytest.fixture
def backend_server(backend_name: str, shardpreempt_servers: Servers) -> EphemeralServer | None:
    """The session's running server for ``backend_name`` (None for memory and file), checked alive before the
    test: a test may kill it."""
    if backend_name in SERVERLESS:
        return None
    return shardpreempt_servers.started(backend_name)


@pytest.fixture
def backend_url(backend_name: str, backend_server: EphemeralServer | None,
                tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> str:
    """A URL of a fresh, empty namespace (key prefix, schema, database, chroot, directory) of the backend."""
    if backend_name == "memory":
        return f"memory://{unique()}"
    if backend_name == "file":
        return f"file://{tmp_path_factory.mktemp('locks')}/{unique()}"
    if backend_server is None:
        raise ValueError(f"backend {backend_name!r} has no server: override backend_url")
    url = backend_server.url(unique())
    server = backend_server

    def print_log() -> None:
        if failed(request.node):
            print(f"--- {server.name} log ---\n{server.log_tail()}")

    request.addfinalizer(print_log)
    return url


@pytest.fixture
def open_(backend_url: str) -> Iterator[Opener]:
    """Open backends on the test's namespace (``open_(**options)``, or ``open_(url)``); closed after the test."""
    with Opener(backend_url) as opener:
        yield opener


__all__ = ["BACKENDS", "SERVERLESS", "Opener", "Servers", "ensure_running", "failed", "running_server",
           "start_server"]
