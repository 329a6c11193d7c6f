"""postgresql:// specifics beyond the contract suite: errors, reconnects, timeouts, round trips, scale."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendUnavailable, ConfigError, LeaseLost
from shardpreempt.testing import wait_until
from shardpreempt.testing.servers import ServerUnavailable, free_port, server_for, unique
from shardpreempt.testing.skips import missing

psycopg = pytest.importorskip("psycopg")

from shardpreempt.backends.postgres import PostgresBackend, _Connection  # noqa: E402
from shardpreempt.testing.servers.postgres import PostgresServer  # noqa: E402

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the module (skipped without the binary, failing under CI)."""
    try:
        srv = server_for("postgresql")
    except ServerUnavailable as exc:
        missing(f"postgresql: {exc}")
    assert isinstance(srv, PostgresServer)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def url(server: PostgresServer) -> str:
    """A URL naming a fresh schema on the module's (running) server."""
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    return server.url(unique())


@pytest.fixture
def open_(url: str) -> Iterator[Callable[..., PostgresBackend]]:
    """Open backends on the test's schema; closed after the test."""
    opened: list[PostgresBackend] = []

    def make(**options: Any) -> PostgresBackend:
        backend = open_backend(url, **options)
        assert isinstance(backend, PostgresBackend)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every exchange with the server (each ``Connection.wait`` sends a request, reads its answer)."""
    count = [0]
    original = _Connection.wait

    def counting(self: _Connection, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_Connection, "wait", counting)
    return count


def test_unreachable_server_is_backend_unavailable_within_the_connect_timeout() -> None:
    """A server that accepts TCP but never answers: BackendUnavailable after connect_timeout, no password."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        backend = open_backend(f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/db?connect_timeout=2")
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            backend.try_acquire(["k"], "o", 5)
        assert 1.5 < time.monotonic() - start < 6
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    closed = open_backend(f"postgresql://u:{PASSWORD}@127.0.0.1:{free_port()}/db")
    with pytest.raises(BackendUnavailable) as info:
        closed.inspect(["k"])
    assert PASSWORD not in str(info.value)


def test_bad_password_is_a_config_error_naming_the_redacted_url(server: PostgresServer) -> None:
    """A wrong password is a ConfigError that shows the URL with the password replaced by ***."""
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS pwuser; CREATE ROLE pwuser LOGIN PASSWORD '{PASSWORD}'")
        admin.execute("GRANT CREATE ON DATABASE postgres TO pwuser")
    good = open_backend(f"postgresql://pwuser:{PASSWORD}@127.0.0.1:{server.port}/postgres?schema={unique()}")
    assert good.try_acquire(["k"], "o", 5) is not None
    good.close()
    bad = open_backend(f"postgresql://pwuser:wrong-{PASSWORD}@127.0.0.1:{server.port}/postgres")
    with pytest.raises(ConfigError) as info:
        bad.try_acquire(["k"], "o", 5)
    assert f"pwuser:***@127.0.0.1:{server.port}" in str(info.value) and PASSWORD not in str(info.value)


def test_missing_database_is_a_config_error(server: PostgresServer) -> None:
    """Naming a database that does not exist is a ConfigError, not a transient failure."""
    backend = open_backend(f"postgresql://postgres@127.0.0.1:{server.port}/no_such_db")
    with pytest.raises(ConfigError, match="no_such_db"):
        backend.inspect(["k"])


def test_bad_options_are_config_errors(server: PostgresServer) -> None:
    """Unknown or malformed URL options are refused when the backend is opened."""
    with pytest.raises(ConfigError, match="bogus"):
        open_backend(f"{server.dsn()}?bogus=1")
    with pytest.raises(ConfigError, match="timeout"):
        open_backend(f"{server.dsn()}?timeout=soon")
    with pytest.raises(ConfigError, match="database"):
        open_backend(f"postgresql://postgres@127.0.0.1:{server.port}/")


def test_restart_while_open_recovers_on_a_later_call(server: PostgresServer,
                                                     open_: Callable[..., PostgresBackend]) -> None:
    """After the server restarts under an open backend, a call fails at most once, then works again."""
    b = open_()
    lease = b.try_acquire(["r1", "r2"], "owner-a", 30)
    assert lease is not None
    b.wait(["r1"], 0)  # start the LISTEN connection too, so both connections see the restart
    server.restart()
    with contextlib.suppress(BackendUnavailable):  # the first call may fail: the old link is dead
        b.inspect(["r1"])
    seen = wait_until(lambda: _or_none(lambda: b.inspect(["r1", "r2"])), 20, interval=0.05,
                      message="inspect after restart")
    assert seen["r1"] is not None and seen["r1"].token == lease.tokens["r1"]
    assert b.renew(lease).session == lease.session
    b.release(lease)
    with pytest.raises(BackendUnavailable):
        b.wait(["r1"], 0.1)  # the listener's link died with the old server
    b.wait(["r1"], 0.1)  # and is rebuilt by the next call


def test_paused_server_gives_backend_unavailable_then_recovers(
    server: PostgresServer, open_: Callable[..., PostgresBackend]
) -> None:
    """A SIGSTOPped server cannot cancel anything; the client-side bound still raises BackendUnavailable."""
    b = open_(timeout=1)
    assert b.try_acquire(["p"], "owner-p", 30) is not None
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            b.inspect(["p"])
        assert time.monotonic() - start < 5
    finally:
        server.resume()
    holder = wait_until(lambda: _or_none(lambda: b.inspect(["p"])["p"]), 20, message="inspect after resume")
    assert holder.owner == "owner-p"


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_one_round_trip_per_acquire_and_release(size: int, open_: Callable[..., PostgresBackend],
                                                round_trips: list[int]) -> None:
    """try_acquire, renew and release cost one round trip each, whatever the slice size."""
    b = open_()
    b.init()  # connecting and creating the schema happen once, on first use
    keys = [f"rt-{size}-{i}" for i in range(size)]
    for _ in range(2):  # the second pass runs on existing rows
        round_trips[0] = 0
        lease = b.try_acquire(keys, "owner-rt", 30)
        assert lease is not None and len(lease.tokens) == size
        assert round_trips[0] == 1
        round_trips[0] = 0
        lease = b.renew(lease)
        assert round_trips[0] == 1
        round_trips[0] = 0
        b.release(lease)
        assert round_trips[0] == 1
    other = open_()
    other.init()
    round_trips[0] = 0
    assert other.try_acquire(keys, "owner-x", 30) is not None
    assert open_().try_acquire(keys[-1:], "owner-y", 30) is None
    round_trips[0] = 0
    assert b.try_acquire(keys, "owner-busy", 30) is None
    assert round_trips[0] == 1


def test_inspect_100000_keys_in_one_query(open_: Callable[..., PostgresBackend],
                                          round_trips: list[int]) -> None:
    """inspect answers for 100,000 keys (20,000 held) correctly in one round trip."""
    b = open_()
    keys = [f"big-{i}" for i in range(100_000)]
    lease = b.try_acquire(keys[:20_000], "owner-big", 60)
    assert lease is not None
    round_trips[0] = 0
    seen = b.inspect(keys)  # timing is for bench/, not tests: about 0.3 s (postgres), 0.6 s (mariadb) idle
    assert round_trips[0] == 1
    held = [k for k, h in seen.items() if h is not None]
    assert len(seen) == 100_000 and len(held) == 20_000
    assert all(seen[k].token == lease.tokens[k] for k in keys[:20_000])  # type: ignore[union-attr]


def test_dead_session_is_never_revived(open_: Callable[..., PostgresBackend]) -> None:
    """After its session expired, an owner's next acquire gets a new session; the old lease stays lost."""
    b = open_()
    old = b.try_acquire(["d1"], "owner-d", 0.2)
    assert old is not None
    wait_until(lambda: b.inspect(["d1"])["d1"] is None, 10, interval=0.02, message="expiry")
    new = b.try_acquire(["d2"], "owner-d", 30)
    assert new is not None and new.session != old.session
    with pytest.raises(LeaseLost):
        b.renew(old)
    assert b.inspect(["d1"])["d1"] is None  # the old key did not come back with the owner


def test_short_acquire_does_not_shorten_the_owners_longer_lease(
    open_: Callable[..., PostgresBackend]
) -> None:
    """The owner's session expiry only grows, so a short-ttl acquire cannot cut a long lease short."""
    b = open_()
    long = b.try_acquire(["long"], "owner-s", 60)
    short = b.try_acquire(["short"], "owner-s", 0.1)
    assert long is not None and short is not None and long.session == short.session
    holder = b.inspect(["long"])["long"]
    assert holder is not None and holder.expires_in is not None and holder.expires_in > 50


def test_wait_sees_a_release_made_before_it_was_called(open_: Callable[..., PostgresBackend]) -> None:
    """Once listening, a release that happens between two waits wakes the next wait at once."""
    a, b = open_(), open_()
    lease = a.try_acquire(["w"], "owner-a", 30)
    assert lease is not None
    b.wait(["w"], 5)  # first call: starts listening and returns
    assert b.try_acquire(["w"], "owner-b", 30) is None
    a.release(lease)
    start = time.monotonic()
    b.wait(["w"], 5)
    assert time.monotonic() - start < 1
    assert b.try_acquire(["w"], "owner-b", 30) is not None


def test_wait_ignores_releases_of_other_keys(open_: Callable[..., PostgresBackend]) -> None:
    """A release of unrelated keys does not wake a waiter before its timeout."""
    a, b = open_(), open_()
    b.wait(["mine"], 0)
    lease = a.try_acquire(["theirs"], "owner-a", 30)
    assert lease is not None
    a.release(lease)
    start = time.monotonic()
    b.wait(["mine"], 0.3)
    assert time.monotonic() - start >= 0.29


def test_init_is_idempotent_and_safe_concurrently(open_: Callable[..., PostgresBackend]) -> None:
    """Many workers creating the schema at once all succeed, and the tables work afterwards."""
    backends = [open_() for _ in range(6)]
    errors: list[BaseException] = []

    def run(backend: PostgresBackend) -> None:
        try:
            backend.init()
            backend.init()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert backends[0].try_acquire(["i"], "owner-i", 30) is not None


def _or_none(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BackendUnavailable:
        return None
