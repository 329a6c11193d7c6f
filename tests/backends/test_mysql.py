"""mysql:// specifics beyond the contract suite: errors, reconnects, timeouts, round trips, scale."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendUnavailable, ConfigError, LeaseLost
from shardpreempt.model import Lease
from shardpreempt.testing import wait_until
from shardpreempt.testing.servers import ServerUnavailable, free_port, server_for, unique
from shardpreempt.testing.skips import missing

pymysql = pytest.importorskip("pymysql")

from shardpreempt.backends.mysql import SCHEMA_VERSION, MySQLBackend, procedure_ddl  # noqa: E402
from shardpreempt.testing.servers.mariadb import MariaDBServer  # noqa: E402

PASSWORD = "s3cret-Pa55word"


def database_of(url: str) -> str:
    """The database a test server's URL names (its path, without the query)."""
    return urlsplit(url).path.lstrip("/")


@pytest.fixture(scope="module")
def backend_name() -> str:
    """This module's backend: ``server``, ``url`` and ``open_`` come from the plugin (tests/backends/conftest.py)."""
    return "mysql"


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every command sent to the server (PyMySQL sends each query with ``_execute_command``)."""
    count = [0]
    original = pymysql.connections.Connection._execute_command

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", counting)
    return count


def _admin(server: MariaDBServer, *statements: str) -> None:
    conn: Any = server.connect()
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def test_unreachable_server_is_backend_unavailable_within_the_timeouts() -> None:
    """A server that accepts TCP but never answers gives BackendUnavailable within the timeouts, no password."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        backend = open_backend(f"mysql://u:{PASSWORD}@127.0.0.1:{port}/db?connect_timeout=1&timeout=1")
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            backend.try_acquire(["k"], "o", 5)
        assert time.monotonic() - start < 4
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    closed = open_backend(f"mysql://u:{PASSWORD}@127.0.0.1:{free_port()}/db")
    with pytest.raises(BackendUnavailable) as info:
        closed.inspect(["k"])
    assert PASSWORD not in str(info.value)


def test_bad_password_is_a_config_error_naming_the_redacted_url(server: MariaDBServer, url: str) -> None:
    """A wrong password is a ConfigError that shows the URL with the password replaced by ***."""
    database = database_of(url)
    _admin(server, "DROP USER IF EXISTS 'pwuser'@'%'", f"CREATE USER 'pwuser'@'%' IDENTIFIED BY '{PASSWORD}'",
           f"GRANT ALL ON `{database}`.* TO 'pwuser'@'%'")
    good = open_backend(f"mysql://pwuser:{PASSWORD}@127.0.0.1:{server.port}/{database}?restart_grace=0")
    assert good.try_acquire(["k"], "o", 5) is not None
    good.close()
    bad = open_backend(f"mysql://pwuser:wrong-{PASSWORD}@127.0.0.1:{server.port}/{database}")
    with pytest.raises(ConfigError) as info:
        bad.try_acquire(["k"], "o", 5)
    assert f"pwuser:***@127.0.0.1:{server.port}" in str(info.value) and PASSWORD not in str(info.value)


def test_missing_database_is_a_config_error(server: MariaDBServer) -> None:
    """Naming a database that does not exist is a ConfigError, not a transient failure."""
    backend = open_backend(f"mysql://root@127.0.0.1:{server.port}/no_such_db")
    with pytest.raises(ConfigError, match="no_such_db"):
        backend.inspect(["k"])


def test_bad_options_are_config_errors(server: MariaDBServer) -> None:
    """Unknown or malformed URL options and table prefixes are refused when the backend is opened."""
    base = f"mysql://root@127.0.0.1:{server.port}/db"
    with pytest.raises(ConfigError, match="bogus"):
        open_backend(f"{base}?bogus=1")
    with pytest.raises(ConfigError, match="poll"):
        open_backend(f"{base}?poll=often")
    with pytest.raises(ConfigError, match="table_prefix"):
        open_backend(f"{base}?table_prefix=x`;drop")
    with pytest.raises(ConfigError, match="database"):
        open_backend(f"mysql://root@127.0.0.1:{server.port}/")


def test_restart_while_open_recovers_on_a_later_call(server: MariaDBServer,
                                                     open_: Callable[..., MySQLBackend]) -> None:
    """After the server restarts under an open backend, a call fails at most once, then works again."""
    b = open_()
    lease = b.try_acquire(["r1", "r2"], "owner-a", 30)
    assert lease is not None
    server.restart()
    with contextlib.suppress(BackendUnavailable):  # the first call may fail: the old link is dead
        b.inspect(["r1"])
    seen = wait_until(lambda: _or_none(lambda: b.inspect(["r1", "r2"])), 20, interval=0.05,
                      message="inspect after restart")
    assert seen["r1"] is not None and seen["r1"].token == lease.tokens["r1"]
    assert b.renew(lease).session == lease.session
    b.release(lease)
    assert b.inspect(["r1"])["r1"] is None


def test_paused_server_gives_backend_unavailable_then_recovers(
    server: MariaDBServer, open_: Callable[..., MySQLBackend]
) -> None:
    """A SIGSTOPped server makes a call raise BackendUnavailable after the read timeout; later calls work."""
    b = open_(timeout=1)
    assert b.try_acquire(["p"], "owner-p", 30) is not None
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            b.inspect(["p"])
        assert time.monotonic() - start < 4
    finally:
        server.resume()
    holder = wait_until(lambda: _or_none(lambda: b.inspect(["p"])["p"]), 20, message="inspect after resume")
    assert holder.owner == "owner-p"


def test_lock_conflict_reports_busy_not_an_error(server: MariaDBServer, url: str,
                                                 open_: Callable[..., MySQLBackend]) -> None:
    """When another transaction holds a key's row lock past the lock wait timeout, try_acquire returns None."""
    b = open_(timeout=2)  # innodb_lock_wait_timeout = 1 s
    lease = b.try_acquire(["locked"], "owner-a", 30)
    assert lease is not None
    b.release(lease)
    blocker: Any = server.connect(database_of(url))
    try:
        with blocker.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT token FROM shardpreempt_shards WHERE `key` = %s FOR UPDATE", (b"locked",))
        start = time.monotonic()
        assert b.try_acquire(["free-one", "locked"], "owner-b", 30) is None
        assert time.monotonic() - start < 3
    finally:
        blocker.rollback()
        blocker.close()
    assert b.inspect(["free-one", "locked"]) == {"free-one": None, "locked": None}
    assert b.try_acquire(["free-one", "locked"], "owner-b", 30) is not None


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_one_round_trip_per_acquire_and_release(size: int, open_: Callable[..., MySQLBackend],
                                                round_trips: list[int]) -> None:
    """try_acquire, renew and release send one command each, whatever the slice size."""
    b = open_()
    b.init()  # connecting and creating the tables happen once, on first use
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
    assert open_().try_acquire(keys, "owner-x", 30) is not None
    round_trips[0] = 0
    assert b.try_acquire(keys, "owner-busy", 30) is None
    assert round_trips[0] == 1


def test_inspect_100000_keys_in_batches(open_: Callable[..., MySQLBackend], round_trips: list[int]) -> None:
    """inspect answers for 100,000 keys (20,000 held) correctly with one query per 10,000 keys."""
    b = open_(timeout=30)  # granting 20,000 keys at once takes a while
    keys = [f"big-{i}" for i in range(100_000)]
    lease = b.try_acquire(keys[:20_000], "owner-big", 60)
    assert lease is not None
    round_trips[0] = 0
    seen = b.inspect(keys)  # timing is for bench/, not tests: about 0.3 s (postgres), 0.6 s (mariadb) idle
    assert round_trips[0] == 10
    held = [k for k, h in seen.items() if h is not None]
    assert len(seen) == 100_000 and len(held) == 20_000
    assert all(seen[k].token == lease.tokens[k] for k in keys[:20_000])  # type: ignore[union-attr]


def test_keys_are_exact_bytes(open_: Callable[..., MySQLBackend]) -> None:
    """Keys differing only in case, accents or trailing spaces are different keys."""
    b = open_()
    keys = ["Shard", "shard", "shärd", "shard ", "шард"]
    lease = b.try_acquire(keys, "owner-k", 30)
    assert lease is not None and set(lease.tokens) == set(keys)
    assert all(h is not None and h.owner == "owner-k" for h in b.inspect(keys).values())
    b.release(lease)
    assert all(h is None for h in b.inspect(keys).values())


def test_dead_session_is_never_revived(open_: Callable[..., MySQLBackend]) -> None:
    """After its session expired, an owner's next acquire gets a new session; the old lease stays lost."""
    b = open_()
    old = b.try_acquire(["d1"], "owner-d", 0.2)
    assert old is not None
    wait_until(lambda: b.inspect(["d1"])["d1"] is None, 10, interval=0.02, message="expiry")
    new = b.try_acquire(["d2"], "owner-d", 30)
    assert new is not None and new.session != old.session
    with pytest.raises(LeaseLost):
        b.renew(old)
    assert b.inspect(["d1"])["d1"] is None


def test_short_acquire_does_not_shorten_the_owners_longer_lease(open_: Callable[..., MySQLBackend]) -> None:
    """The owner's session expiry only grows, so a short-ttl acquire cannot cut a long lease short."""
    b = open_()
    long = b.try_acquire(["long"], "owner-s", 60)
    short = b.try_acquire(["short"], "owner-s", 0.1)
    assert long is not None and short is not None and long.session == short.session
    holder = b.inspect(["long"])["long"]
    assert holder is not None and holder.expires_in is not None and holder.expires_in > 50
    assert b.renew(short).session == short.session  # an unchanged expiry still counts as renewed


def test_renew_checks_the_first_key_in_the_same_statement(open_: Callable[..., MySQLBackend],
                                                          round_trips: list[int]) -> None:
    """A live session whose lease's first key points at another session (a server that lost our grant and
    granted it again) or at none (released) is LeaseLost "superseded", in one command, and is not extended;
    an expired session is LeaseLost "session expired"; a lease without keys renews on the session alone."""
    a, b = open_(), open_()
    anchor = a.try_acquire(["anchor"], "owner-a", 30)
    lease = a.try_acquire(["k1", "k2"], "owner-a", 30)
    other = b.try_acquire(["elsewhere"], "owner-b", 30)
    assert anchor is not None and lease is not None and other is not None

    def run(query: str, *args: Any) -> Any:
        return a._run("test", query.replace("{p}", a.prefix), args)[1][0]

    def expires() -> Any:
        return run("SELECT expires_at FROM `{p}sessions` WHERE id = %s", lease.session)[0][0]

    run("UPDATE `{p}sessions` SET expires_at = SYSDATE(6) + INTERVAL 10 SECOND WHERE id = %s", lease.session)
    before = expires()
    run("UPDATE `{p}shards` SET session = %s, token = token + 1 WHERE `key` = %s", other.session, b"k1")
    round_trips[0] = 0
    with pytest.raises(LeaseLost, match="superseded") as lost:
        a.renew(lease)
    assert round_trips[0] == 1 and lost.value.keys == ("k1", "k2")
    assert expires() == before  # not extended
    run("UPDATE `{p}shards` SET session = NULL WHERE `key` = %s", b"k1")  # released
    with pytest.raises(LeaseLost, match="superseded"):
        a.renew(lease)
    run("UPDATE `{p}shards` SET session = %s, token = %s WHERE `key` = %s", lease.session, lease.tokens["k1"], b"k1")
    a.renew(lease)
    assert expires() > before
    round_trips[0] = 0
    a.renew(Lease((), "owner-a", {}, 30, session=lease.session))
    assert round_trips[0] == 1
    run("UPDATE `{p}sessions` SET expires_at = SYSDATE(6) - INTERVAL 1 SECOND WHERE id = %s", lease.session)
    round_trips[0] = 0
    with pytest.raises(LeaseLost, match="session expired"):
        a.renew(lease)
    assert round_trips[0] == 1


def test_wait_polls_for_at_most_poll_seconds(open_: Callable[..., MySQLBackend]) -> None:
    """wait sleeps one poll interval (or less, when the timeout is shorter)."""
    b = open_(poll=0.2)
    start = time.monotonic()
    b.wait(["x"], 5)
    assert 0.19 <= time.monotonic() - start < 1
    start = time.monotonic()
    b.wait(["x"], 0.01)
    assert time.monotonic() - start < 0.15


def test_init_is_idempotent_and_safe_concurrently(open_: Callable[..., MySQLBackend]) -> None:
    """Many workers creating the tables and procedures at once all succeed, and they work afterwards."""
    backends = [open_() for _ in range(6)]
    errors: list[BaseException] = []

    def run(backend: MySQLBackend) -> None:
        try:
            backend.init()
            backend.init()
            assert backend.try_acquire([f"i-{id(backend)}"], f"owner-{id(backend)}", 30) is not None
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def _or_none(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BackendUnavailable:
        return None


def _lease(owner: str = "o") -> Lease:
    """A lease object for calls that need one (the server decides whether it is still held)."""
    return Lease(("a",), owner, {"a": 1}, 5.0, time.monotonic() + 5, f"{owner}/0")


#: Every public call, each run once against a backend (the lazy connection is opened by whichever comes first).
CALLS: dict[str, Callable[[MySQLBackend], Any]] = {
    "try_acquire": lambda b: b.try_acquire(["a"], "o", 5),
    "renew": lambda b: b.renew(_lease()),
    "release": lambda b: b.release(_lease()),
    "inspect": lambda b: b.inspect(["a"]),
    "read_records": lambda b: b.read_records(["r"]),
    "swap_record": lambda b: b.swap_record("r", None, "v"),
    "init": lambda b: b.init(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_wrong_password_and_missing_database_are_config_errors_on_every_call(
    server: MariaDBServer, url: str, call: str
) -> None:
    """Whichever call first opens the lazy connection, a wrong password or database is a ConfigError."""
    database = database_of(url)
    _admin(server, "DROP USER IF EXISTS 'calluser'@'%'", f"CREATE USER 'calluser'@'%' IDENTIFIED BY '{PASSWORD}'",
           f"GRANT ALL ON `{database}`.* TO 'calluser'@'%'")
    for bad in (f"mysql://calluser:wrong-{PASSWORD}@127.0.0.1:{server.port}/{database}",
                f"mysql://calluser:{PASSWORD}@127.0.0.1:{server.port}/no_such_db"):
        backend = open_backend(bad)
        assert isinstance(backend, MySQLBackend)
        with pytest.raises(ConfigError) as info:
            CALLS[call](backend)
        assert "calluser:***@" in str(info.value) and PASSWORD not in str(info.value)
        backend.close()


class _LimitedServer(MariaDBServer):
    """MariaDB started with a per-user connection limit, so SET GLOBAL max_user_connections may change it."""

    def command(self) -> list[str]:
        """The usual command with ``--max-user-connections`` (MariaDB refuses to set it later if it starts at 0)."""
        return [*super().command(), "--max-user-connections=1000"]


@pytest.fixture(scope="module")
def limited() -> Iterator[MariaDBServer]:
    """A MariaDB server whose connection limits the tests may lower, with user ``lim`` (password PASSWORD)."""
    try:
        srv = _LimitedServer()
    except ServerUnavailable as exc:
        missing(f"mysql: {exc}")
    srv.start()
    _admin(srv, "CREATE DATABASE lim", f"CREATE USER 'lim'@'%' IDENTIFIED BY '{PASSWORD}'",
           "GRANT ALL ON lim.* TO 'lim'@'%'")
    yield srv
    srv.close()


#: name -> (statements that lower a limit, statements that restore it, the server's error code)
LIMITS = {
    "user MAX_USER_CONNECTIONS": (["GRANT USAGE ON *.* TO 'lim'@'%' WITH MAX_USER_CONNECTIONS 2"],
                                  ["GRANT USAGE ON *.* TO 'lim'@'%' WITH MAX_USER_CONNECTIONS 0"], 1226),
    "max_user_connections": (["SET GLOBAL max_user_connections = 2"], ["SET GLOBAL max_user_connections = 1000"],
                             1203),
    "max_connections": (["SET GLOBAL max_connections = 10"], ["SET GLOBAL max_connections = 300"], 1040),
}


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_too_many_connections_is_unavailable_not_a_config_error(limited: MariaDBServer, limit: str) -> None:
    """Connection refusals 1040, 1203 and 1226 are BackendUnavailable (no password shown); with room, calls work."""
    lower, restore, code = LIMITS[limit]
    url = f"mysql://lim:{PASSWORD}@127.0.0.1:{limited.port}/lim?restart_grace=0"
    admin: Any = limited.connect()  # opened first: it must be able to restore the limit
    fillers: list[Any] = []
    try:
        with admin.cursor() as cur:
            for statement in lower:
                cur.execute(statement)
        for _ in range(20):  # take every connection the limit allows
            try:
                fillers.append(pymysql.connect(host="127.0.0.1", port=limited.port, user="lim", password=PASSWORD))
            except pymysql.err.OperationalError as exc:
                assert exc.args[0] == code, exc.args
                break
        else:
            raise AssertionError(f"{limit}: 20 connections accepted")
        backend = open_backend(url)
        with pytest.raises(BackendUnavailable, match=str(code)) as info:
            backend.swap_record(f"r{code}", None, limit)
        assert PASSWORD not in str(info.value)
    finally:
        with admin.cursor() as cur:
            for statement in restore:
                cur.execute(statement)
        admin.close()
        for conn in fillers:
            conn.close()
    wait_until(lambda: _or_none(lambda: backend.read_records([f"r{code}"])), 10, message="room again")
    assert backend.swap_record(f"r{code}", None, limit) is True
    backend.close()


def test_one_backend_shared_by_threads_never_mixes_up_its_connection(open_: Callable[..., MySQLBackend]) -> None:
    """Threads acquiring, renewing, inspecting, swapping and releasing on one backend object all get right answers."""
    b = open_()
    held = b.try_acquire(["held"], "owner-renewer", 30)
    assert held is not None
    threads, rounds = 6, 30
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []
    done = threading.Event()

    def renewer() -> None:
        nonlocal held
        start.wait()
        try:
            while not done.is_set():  # a worker's renewal thread, racing with the others' calls
                assert held is not None
                held = b.renew(held)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    def worker(n: int) -> None:
        owner, keys = f"owner-{n}", [f"t{n}-a", f"t{n}-b"]
        start.wait()
        try:
            for i in range(rounds):
                lease = b.try_acquire(keys, owner, 30)
                assert lease is not None, (n, i)
                seen = b.inspect(keys)
                assert all(h is not None and h.owner == owner and h.token == lease.tokens[k] for k, h in seen.items())
                lease = b.renew(lease)
                assert b.swap_record(f"r{n}", None if i == 0 else str(i - 1), str(i)) is True
                assert b.read_records([f"r{n}"]) == {f"r{n}": str(i)}
                b.release(lease)
                assert b.inspect(keys) == dict.fromkeys(keys)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    pool.append(threading.Thread(target=renewer))
    for t in pool:
        t.start()
    for t in pool[:-1]:
        t.join(60)
    done.set()
    pool[-1].join(10)
    assert not errors, errors[:3]
    holder = b.inspect(["held"])["held"]
    assert holder is not None and holder.owner == "owner-renewer"
    assert b.read_records([f"r{n}" for n in range(threads)]) == {f"r{n}": str(rounds - 1) for n in range(threads)}


def test_records_are_one_round_trip_each_and_exact(open_: Callable[..., MySQLBackend],
                                                   round_trips: list[int]) -> None:
    """read_records and every kind of swap_record send one command; values compare byte for byte."""
    b = open_()
    b.init()
    names = [f"n{i}" for i in range(500)]
    for call, result in ((lambda: b.swap_record("r", None, "v"), True), (lambda: b.swap_record("r", None, "v"), False),
                         (lambda: b.swap_record("r", "v ", "w"), False), (lambda: b.swap_record("r", "V", "w"), False),
                         (lambda: b.swap_record("r", "v", "v"), True), (lambda: b.swap_record("r", "v", "v ü"), True),
                         (lambda: b.read_records(["r", *names]), {"r": "v ü", **dict.fromkeys(names)}),
                         (lambda: b.swap_record("r", "v ü", None), True),
                         (lambda: b.swap_record("r", None, None), True),
                         (lambda: b.swap_record("r", "gone", None), False)):
        round_trips[0] = 0
        assert call() == result
        assert round_trips[0] == 1


def test_bad_record_input_is_a_config_error_before_any_round_trip(
    open_: Callable[..., MySQLBackend], round_trips: list[int]
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
    server: MariaDBServer, url: str, open_: Callable[..., MySQLBackend], previous: str
) -> None:
    """An older schema (token + 1, maybe no records table) gets clock tokens; release is relabelled, not dropped."""
    database = database_of(url)
    old = open_()
    old.init()
    _admin(server, f"USE `{database}`", "DROP PROCEDURE shardpreempt_acquire",
           procedure_ddl("acquire", "shardpreempt_", version=previous, next_token="h.token + 1"),
           f"ALTER PROCEDURE shardpreempt_release COMMENT '{previous}'",
           *(["DROP TABLE shardpreempt_records"] if previous.endswith("1") else []))
    lease = old.try_acquire(["kept"], "owner-old", 60)
    assert lease is not None and lease.tokens["kept"] == 1  # granted by the old procedure
    before = _procedures(server, database)
    new = open_()
    assert new.swap_record("layout", None, "v1") is True
    assert new.read_records(["layout"]) == {"layout": "v1"}
    after = _procedures(server, database)
    assert after["shardpreempt_release"][0] == before["shardpreempt_release"][0]  # relabelled, not recreated
    assert {comment for _, comment in after.values()} == {SCHEMA_VERSION}
    assert "TIMESTAMPDIFF(MICROSECOND" in _definition(server, database, "shardpreempt_acquire")
    holder = new.inspect(["kept"])["kept"]
    assert holder is not None and holder.owner == "owner-old" and holder.token == 1
    assert old.renew(lease).session == lease.session  # a worker of the old version goes on working
    old.release(lease)
    now = _server_us(server)
    again = new.try_acquire(["kept"], "owner-new", 60)
    assert again is not None and again.tokens["kept"] >= now


def test_tokens_are_the_server_clock_in_microseconds(server: MariaDBServer, open_: Callable[..., MySQLBackend]) -> None:
    """A fresh grant's token is the server's clock in microseconds since the epoch, read during the acquire."""
    b = open_()
    b.init()
    before = _server_us(server)
    lease = b.try_acquire(["c1", "c2"], "owner-c", 30)
    after = _server_us(server)
    assert lease is not None and all(before <= t <= after for t in lease.tokens.values()), (before, lease, after)


def test_a_token_stays_above_the_last_one_when_the_clock_is_behind_it(
    server: MariaDBServer, url: str, open_: Callable[..., MySQLBackend]
) -> None:
    """When a key's last token is ahead of the server clock, the next grants are last + 1, last + 2."""
    b = open_()
    lease = b.try_acquire(["ahead"], "owner-a", 30)
    assert lease is not None
    b.release(lease)
    _admin(server, f"UPDATE `{database_of(url)}`.shardpreempt_shards SET token = {2**62} WHERE `key` = 'ahead'")
    for expected in (2**62 + 1, 2**62 + 2):
        lease = b.try_acquire(["ahead"], "owner-a", 30)
        assert lease is not None and lease.tokens["ahead"] == expected
        b.release(lease)


def _server_us(server: MariaDBServer) -> int:
    """The server's clock, in microseconds since the epoch."""
    conn: Any = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CAST(UNIX_TIMESTAMP(SYSDATE(6)) * 1000000 AS SIGNED)")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def _definition(server: MariaDBServer, database: str, name: str) -> str:
    """The body of procedure ``name`` in ``database``."""
    conn: Any = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ROUTINE_DEFINITION FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s"
                        " AND ROUTINE_NAME = %s", (database, name))
            return str(cur.fetchone()[0])
    finally:
        conn.close()


def _procedures(server: MariaDBServer, database: str) -> dict[str, tuple[Any, str]]:
    """name -> (creation time, comment) of the procedures in ``database``."""
    conn: Any = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ROUTINE_NAME, CREATED, ROUTINE_COMMENT FROM information_schema.ROUTINES "
                        "WHERE ROUTINE_SCHEMA = %s", (database,))
            return {name: (created, comment) for name, created, comment in cur.fetchall()}
    finally:
        conn.close()


def test_records_inserts_and_deletes_racing_stay_consistent(open_: Callable[..., MySQLBackend]) -> None:
    """Clients creating and deleting one record by compare-and-set never fail and never lose a change."""
    clients = [open_() for _ in range(6)]

    def toggle(client: MySQLBackend) -> int:
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
    server: MariaDBServer, url: str, open_: Callable[..., MySQLBackend]
) -> None:
    """Dropping the records table under an up-to-date backend costs one BackendUnavailable, then it is back."""
    b = open_()
    assert b.swap_record("r", None, "v") is True
    _admin(server, f"DROP TABLE `{database_of(url)}`.shardpreempt_records")
    with pytest.raises(BackendUnavailable, match="missing"):
        b.read_records(["r"])
    assert b.read_records(["r"]) == {"r": None}
    assert b.swap_record("r", None, "again") is True


@pytest.fixture
def own_server() -> Iterator[MariaDBServer]:
    """A MariaDB server of the test's own, which it may stop, snapshot and restore."""
    try:
        srv = server_for("mysql")
    except ServerUnavailable as exc:
        missing(f"mysql: {exc}")
    assert isinstance(srv, MariaDBServer)
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


def test_tokens_never_repeat_after_a_restore_from_an_older_snapshot(own_server: MariaDBServer) -> None:
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
