"""postgresql:// specifics beyond the contract suite: errors, reconnects, timeouts, round trips, scale."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendUnavailable, ConfigError, LeaseLost
from shardpreempt.model import Lease
from shardpreempt.testing import wait_until
from shardpreempt.testing.servers import ServerUnavailable, free_port, server_for, unique
from shardpreempt.testing.skips import missing

psycopg = pytest.importorskip("psycopg")
from psycopg import sql  # noqa: E402

from shardpreempt.backends.postgres import (  # noqa: E402
    INSTALLED,
    SCHEMA_DDL,
    SCHEMA_VERSION,
    PostgresBackend,
    _Connection,
)
from shardpreempt.testing.servers.postgres import PostgresServer  # noqa: E402

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def backend_name() -> str:
    """This module's backend: ``server``, ``url`` and ``open_`` come from the plugin (tests/backends/conftest.py)."""
    return "postgresql"


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
    good = open_backend(f"postgresql://pwuser:{PASSWORD}@127.0.0.1:{server.port}/postgres?schema={unique()}&restart_grace=0")
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


def test_renew_checks_the_first_key_in_the_same_statement(open_: Callable[..., PostgresBackend],
                                                          round_trips: list[int]) -> None:
    """A live session whose lease's first key points at another session (a server that lost our grant and
    granted it again) or at none (released) is LeaseLost "superseded", in one round trip, and is not extended;
    an expired session is LeaseLost "session expired"; a lease without keys renews on the session alone."""
    a, b = open_(), open_()
    anchor = a.try_acquire(["anchor"], "owner-a", 30)
    lease = a.try_acquire(["k1", "k2"], "owner-a", 30)
    other = b.try_acquire(["elsewhere"], "owner-b", 30)
    assert anchor is not None and lease is not None and other is not None
    conn, schema = a._open(), sql.Identifier(a.schema)

    def run(query: str, *args: Any) -> Any:
        return conn.execute(sql.SQL(query).format(s=schema), args).fetchall()

    def expires() -> Any:
        return run("SELECT expires_at FROM {s}.sessions WHERE id = %s", lease.session)[0][0]

    run("UPDATE {s}.sessions SET expires_at = clock_timestamp() + interval '10 seconds' WHERE id = %s RETURNING 1",
        lease.session)
    before = expires()
    run("UPDATE {s}.shards SET session = %s, token = token + 1 WHERE key = 'k1' RETURNING 1", other.session)
    round_trips[0] = 0
    with pytest.raises(LeaseLost, match="superseded") as lost:
        a.renew(lease)
    assert round_trips[0] == 1 and lost.value.keys == ("k1", "k2")
    assert expires() == before  # not extended
    run("UPDATE {s}.shards SET session = NULL WHERE key = 'k1' RETURNING 1")  # released
    with pytest.raises(LeaseLost, match="superseded"):
        a.renew(lease)
    run("UPDATE {s}.shards SET session = %s, token = %s WHERE key = 'k1' RETURNING 1", lease.session,
        lease.tokens["k1"])
    a.renew(lease)
    assert expires() > before
    round_trips[0] = 0
    a.renew(Lease((), "owner-a", {}, 30, session=lease.session))
    assert round_trips[0] == 1
    run("UPDATE {s}.sessions SET expires_at = clock_timestamp() - interval '1 second' WHERE id = %s RETURNING 1",
        lease.session)
    round_trips[0] = 0
    with pytest.raises(LeaseLost, match="session expired"):
        a.renew(lease)
    assert round_trips[0] == 1


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


@pytest.fixture(scope="module")
def role(server: PostgresServer) -> str:
    """A login role with a password (PASSWORD) and CREATE on database postgres; returns its name."""
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS calluser; CREATE ROLE calluser LOGIN PASSWORD '{PASSWORD}'")
        admin.execute("GRANT CREATE ON DATABASE postgres TO calluser")
    return "calluser"


def _lease(owner: str = "o") -> Lease:
    """A lease object for calls that need one (the server decides whether it is still held)."""
    return Lease(("a",), owner, {"a": 1}, 5.0, time.monotonic() + 5, f"{owner}/0")


#: Every public call, each run once against a backend (the lazy connection is opened by whichever comes first).
CALLS: dict[str, Callable[[PostgresBackend], Any]] = {
    "try_acquire": lambda b: b.try_acquire(["a"], "o", 5),
    "renew": lambda b: b.renew(_lease()),
    "release": lambda b: b.release(_lease()),
    "inspect": lambda b: b.inspect(["a"]),
    "read_records": lambda b: b.read_records(["r"]),
    "swap_record": lambda b: b.swap_record("r", None, "v"),
    "wait": lambda b: b.wait(["a"], 0.1),
    "init": lambda b: b.init(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_wrong_password_and_missing_database_are_config_errors_on_every_call(
    server: PostgresServer, role: str, call: str
) -> None:
    """Whichever call first opens the lazy connection, a wrong password or database is a ConfigError."""
    for url in (f"postgresql://{role}:wrong-{PASSWORD}@127.0.0.1:{server.port}/postgres",
                f"postgresql://{role}:{PASSWORD}@127.0.0.1:{server.port}/no_such_db"):
        backend = open_backend(url)
        assert isinstance(backend, PostgresBackend)
        with pytest.raises(ConfigError) as info:
            CALLS[call](backend)
        assert f"{role}:***@" in str(info.value) and PASSWORD not in str(info.value)
        backend.close()


def test_role_connection_limit_is_unavailable_not_a_config_error(server: PostgresServer, role: str) -> None:
    """A role at its CONNECTION LIMIT ("too many connections for role", 53300) is BackendUnavailable."""
    url = f"postgresql://{role}:{PASSWORD}@127.0.0.1:{server.port}/postgres?schema={unique()}&restart_grace=0"
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT 1")
        try:
            with psycopg.connect(url.split("?")[0]):  # the role's one connection
                backend = open_backend(url)
                with pytest.raises(BackendUnavailable, match="too many connections for role") as info:
                    backend.try_acquire(["k"], "o", 5)
                assert PASSWORD not in str(info.value)
            assert wait_until(lambda: _or_none(lambda: backend.try_acquire(["k"], "o", 5)), 10,
                              message="acquire once the role has a free connection")
            backend.close()
        finally:
            admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")


class _SmallServer(PostgresServer):
    """A PostgreSQL server with 6 connection slots, 2 of them reserved for superusers."""

    def command(self) -> list[str]:
        """The usual command; later ``-c`` settings override earlier ones."""
        return [*super().command(), "-c", "max_connections=6", "-c", "superuser_reserved_connections=2"]


def test_full_server_is_unavailable_not_a_config_error() -> None:
    """Reserved slots only (53300) and "too many clients" (53300) are BackendUnavailable; room again, it works."""
    try:
        small = _SmallServer()
    except ServerUnavailable as exc:
        missing(f"postgresql: {exc}")
    small.start()
    fillers: list[Any] = []
    try:
        with psycopg.connect(small.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE ROLE filler LOGIN PASSWORD '{PASSWORD}'")
            admin.execute("GRANT CREATE ON DATABASE postgres TO filler")
        user_url = f"postgresql://filler:{PASSWORD}@127.0.0.1:{small.port}/postgres"
        for dsn, backend_url, refusal in ((user_url, f"{user_url}?schema=u", "remaining connection slots"),
                                          (small.dsn(), small.url("s"), "too many clients")):
            fillers += _fill(dsn)
            backend = open_backend(backend_url)
            with pytest.raises(BackendUnavailable, match=refusal) as info:
                backend.swap_record("r", None, "v")
            assert PASSWORD not in str(info.value)
            backend.close()
        while fillers:
            fillers.pop().close()
        backend = open_backend(f"{user_url}?schema=u")
        assert wait_until(lambda: _or_none(lambda: backend.swap_record("r", None, "v")), 10, message="room again")
        backend.close()
    finally:
        for conn in fillers:
            conn.close()
        small.close()


def _fill(dsn: str) -> list[Any]:
    """Open connections to ``dsn`` until the server refuses one; return them (to be closed by the caller)."""
    opened: list[Any] = []
    for _ in range(10):
        try:
            opened.append(psycopg.connect(dsn, autocommit=True))
        except psycopg.OperationalError:
            return opened
    raise AssertionError("the server accepted 10 more connections than it has slots")


class _StandbyServer(PostgresServer):
    """A PostgreSQL server that can be restarted as a standby that takes no connections (57P03)."""

    standby = False

    def command(self) -> list[str]:
        """The usual command, with ``hot_standby=off`` once it is a standby."""
        return [*super().command(), *(["-c", "hot_standby=off"] if self.standby else [])]

    def ready(self) -> bool:
        """Up: answering queries, or, as a standby, refusing connections because it is in recovery."""
        if not self.standby:
            return super().ready()
        try:
            super().ready()
        except psycopg.OperationalError as exc:
            return "not accepting connections" in str(exc) or "starting up" in str(exc)
        return False


def test_shutting_down_and_standby_servers_are_unavailable() -> None:
    """A server shutting down and one in recovery refuse connections (57P03): BackendUnavailable each time."""
    try:
        pg = _StandbyServer()
    except ServerUnavailable as exc:
        missing(f"postgresql: {exc}")
    pg.start()
    try:
        held = psycopg.connect(pg.dsn())
        os.kill(pg.pid, signal.SIGTERM)  # a smart shutdown: new connections are refused until the last one leaves
        backend = open_backend(pg.url("s"))
        error = wait_until(lambda: _refusal(backend), 10, message="refusal while shutting down")
        assert "shutting down" in str(error)
        held.close()
        assert pg.proc is not None
        pg.proc.wait(30)
        (pg.tmp / "data" / "standby.signal").touch()
        pg.standby = True
        pg.start()
        with pytest.raises(BackendUnavailable, match=r"not accepting connections|starting up"):
            backend.inspect(["k"])
        backend.close()
    finally:
        pg.close()


def _refusal(backend: Any) -> BackendUnavailable | None:
    """The BackendUnavailable an inspect raises, or None while the server still accepts it."""
    try:
        backend.inspect(["k"])
    except BackendUnavailable as exc:
        return exc
    return None


def test_records_are_one_round_trip_each(open_: Callable[..., PostgresBackend], round_trips: list[int]) -> None:
    """read_records (any number of names) and every kind of swap_record cost one round trip."""
    b = open_()
    b.init()
    names = [f"n{i}" for i in range(500)]
    for call, result in ((lambda: b.swap_record("r", None, "v1"), True), (lambda: b.swap_record("r", "v1", "v2"), True),
                         (lambda: b.read_records(["r", *names]), {"r": "v2", **dict.fromkeys(names)}),
                         (lambda: b.swap_record("r", "v2", None), True), (lambda: b.swap_record("r", None, None), True),
                         (lambda: b.swap_record("r", "gone", None), False)):
        round_trips[0] = 0
        assert call() == result
        assert round_trips[0] == 1


def test_bad_record_input_is_a_config_error_before_any_round_trip(
    open_: Callable[..., PostgresBackend], round_trips: list[int]
) -> None:
    """Names and values no backend stores are refused locally; an expected value no record can hold is False."""
    b = open_()
    round_trips[0] = 0
    for call in (lambda: b.read_records([""]), lambda: b.swap_record("a\0b", None, "v"),
                 lambda: b.swap_record("n" * 201, None, "v"), lambda: b.swap_record("n", None, "v" * 8193),
                 lambda: b.swap_record("n", None, "bad \udc80"), lambda: b.read_records(["bad \udc80"])):
        with pytest.raises(ConfigError):
            call()
    assert b.swap_record("n", "with\0nul", "v") is False and b.swap_record("n", "bad \udc80", None) is False
    assert round_trips[0] == 0


@pytest.mark.parametrize("previous", ["shardpreempt schema 1", "shardpreempt schema 2"])
def test_an_older_installation_gets_the_records_table_and_clock_tokens(
    server: PostgresServer, open_: Callable[..., PostgresBackend], previous: str
) -> None:
    """An older schema (acquire with token + 1, maybe no records table) is brought up to date by the next backend."""
    old = open_()
    old.init()
    schema = sql.Identifier(old.schema)
    conn = old._open()
    conn.execute(sql.SQL(SCHEMA_DDL).format(s=schema, version=sql.Literal(previous), next_token=sql.SQL("h.token + 1")))
    if previous.endswith("1"):
        conn.execute(sql.SQL("DROP TABLE {}.records").format(schema))
    lease = old.try_acquire(["kept"], "owner-old", 60)
    assert lease is not None and lease.tokens["kept"] == 1  # granted by the old function
    new = open_()
    assert new.swap_record("layout", None, "v1") is True
    assert new.read_records(["layout"]) == {"layout": "v1"}
    with psycopg.connect(server.dsn()) as admin:
        marker = admin.execute(INSTALLED, (f"{old.schema}.release(text[], text, text)",)).fetchone()
        body = admin.execute("SELECT pg_get_functiondef(to_regprocedure(%s))",
                             (f"{old.schema}.acquire(text[], text, text, float8, integer, text)",)).fetchone()
    assert marker == (SCHEMA_VERSION,) and body is not None and "extract(epoch FROM v_now)" in body[0]
    holder = new.inspect(["kept"])["kept"]
    assert holder is not None and holder.owner == "owner-old" and holder.token == 1
    assert old.renew(lease).session == lease.session  # a worker of the old version goes on working
    old.release(lease)
    now = _server_us(server)
    again = new.try_acquire(["kept"], "owner-new", 60)
    assert again is not None and again.tokens["kept"] >= now


def test_tokens_are_the_server_clock_in_microseconds(server: PostgresServer,
                                                     open_: Callable[..., PostgresBackend]) -> None:
    """A fresh grant's token is the server's clock in microseconds since the epoch, read during the acquire."""
    b = open_()
    b.init()
    before = _server_us(server)
    lease = b.try_acquire(["c1", "c2"], "owner-c", 30)
    after = _server_us(server)
    assert lease is not None and all(before <= t <= after for t in lease.tokens.values()), (before, lease, after)


def test_a_token_stays_above_the_last_one_when_the_clock_is_behind_it(open_: Callable[..., PostgresBackend]) -> None:
    """When a key's last token is ahead of the server clock, the next grants are last + 1, last + 2."""
    b = open_()
    lease = b.try_acquire(["ahead"], "owner-a", 30)
    assert lease is not None
    b.release(lease)
    b._open().execute(sql.SQL("UPDATE {}.shards SET token = %s WHERE key = 'ahead'").format(sql.Identifier(b.schema)),
                      (2**62,))
    for expected in (2**62 + 1, 2**62 + 2):
        lease = b.try_acquire(["ahead"], "owner-a", 30)
        assert lease is not None and lease.tokens["ahead"] == expected
        b.release(lease)


def _server_us(server: PostgresServer) -> int:
    """The server's clock, in microseconds since the epoch."""
    with psycopg.connect(server.dsn()) as conn:
        row = conn.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def test_records_inserts_and_deletes_racing_stay_consistent(open_: Callable[..., PostgresBackend]) -> None:
    """Clients creating and deleting one record by compare-and-set never fail and never lose a change."""
    clients = [open_() for _ in range(6)]

    def toggle(client: PostgresBackend) -> int:
        balance = 0  # records created minus records deleted by this client
        for _ in range(100):
            current = client.read_records(["flag"])["flag"]
            if client.swap_record("flag", current, None if current is not None else "on"):
                balance += 1 if current is None else -1
        return balance

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        total = sum(pool.map(toggle, clients))
    assert total == (1 if clients[0].read_records(["flag"])["flag"] is not None else 0)


def test_a_table_dropped_under_a_running_backend_is_recreated_by_the_next_call(
    open_: Callable[..., PostgresBackend]
) -> None:
    """Dropping the records table under an up-to-date backend costs one BackendUnavailable, then it is back."""
    b = open_()
    assert b.swap_record("r", None, "v") is True
    b._open().execute(sql.SQL("DROP TABLE {}.records").format(sql.Identifier(b.schema)))
    with pytest.raises(BackendUnavailable, match="missing"):
        b.read_records(["r"])
    assert b.read_records(["r"]) == {"r": None}
    assert b.swap_record("r", None, "again") is True


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, which it may stop, snapshot and restore."""
    try:
        srv = server_for("postgresql")
    except ServerUnavailable as exc:
        missing(f"postgresql: {exc}")
    assert isinstance(srv, PostgresServer)
    srv.start()
    yield srv
    srv.close()


def _grant(url: str, key: str, owner: str) -> int:
    """Acquire ``key`` for ``owner`` on a new backend, release it, and return its token."""
    backend = open_backend(url)
    try:
        lease = backend.try_acquire([key], owner, 30)
        assert lease is not None
        backend.release(lease)
        return lease.tokens[key]
    finally:
        backend.close()


def test_tokens_never_repeat_after_a_restore_from_an_older_snapshot(own_server: PostgresServer) -> None:
    """A server restored from a snapshot taken after grant T1 (later grants up to T2 lost) grants above T2."""
    url = own_server.url(unique())
    t1 = _grant(url, "snap", "owner-1")
    own_server.stop()
    snapshot = own_server.snapshot("after-t1")
    own_server.start()
    later = [_grant(url, "snap", f"owner-{n}") for n in range(2, 5)]
    backend = open_backend(url)
    assert backend.swap_record("lost", None, "written after the snapshot") is True
    backend.close()
    assert t1 < later[0] < later[1] < later[2]
    t2 = later[-1]
    own_server.stop()
    own_server.restore(snapshot)
    own_server.start()
    backend = open_backend(url)
    try:
        assert backend.read_records(["lost"]) == {"lost": None}  # the writes after the snapshot are gone
        again = backend.try_acquire(["snap"], "owner-after-restore", 30)
        assert again is not None
        assert again.tokens["snap"] > t2, (t1, later, again.tokens["snap"])
    finally:
        backend.close()
