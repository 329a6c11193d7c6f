"""redis:// specifics beyond the contract suite: errors, reconnects, round trips, scale, session rules."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendProtocolError, BackendUnavailable, ConfigError, LeaseLost
from shardpreempt.model import Lease
from shardpreempt.testing import wait_until
from shardpreempt.testing.fixtures import running_server
from shardpreempt.testing.servers import free_port, unique

redis = pytest.importorskip("redis")
from redis.connection import AbstractConnection  # noqa: E402 - only once redis-py is known to be there

from shardpreempt.backends.redis import RedisBackend  # noqa: E402
from shardpreempt.testing.servers.redis import RedisServer  # noqa: E402

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def backend_name() -> str:
    """This module's backend: ``server``, ``url`` and ``open_`` come from the plugin (tests/backends/conftest.py)."""
    return "redis"


@pytest.fixture(scope="module")
def secured() -> Iterator[RedisServer]:
    """A redis-server that requires a password."""
    with running_server("redis", lambda: RedisServer(password=PASSWORD)) as srv:
        yield srv


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every request written to a Redis socket (a pipeline is one write, one round trip)."""
    count = [0]
    original = AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return count


def test_refused_port_is_unavailable_quickly_without_the_password() -> None:
    """A closed port gives BackendUnavailable at once, and the message hides the password."""
    backend = open_backend(f"redis://user:{PASSWORD}@127.0.0.1:{free_port()}/0?connect_timeout=0.5")
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        backend.try_acquire(["a"], "o", 5)
    assert time.monotonic() - start < 5
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    backend.close()


def test_connect_timeout_is_honoured() -> None:
    """A host that never completes the TCP handshake fails after about connect_timeout."""
    # A listener whose accept queue is full drops further SYNs: a black hole on loopback.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        backend = open_backend(f"redis://:{PASSWORD}@127.0.0.1:{port}/0?connect_timeout=0.3&timeout=0.3")
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            backend.try_acquire(["a"], "o", 5)
        elapsed = time.monotonic() - start
        assert 0.2 < elapsed < 5, elapsed
        assert PASSWORD not in str(info.value)
        backend.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_wrong_password_is_a_config_error_naming_the_redacted_url(secured: RedisServer) -> None:
    """A bad password (or none) is a ConfigError that names the URL with the password hidden."""
    for auth in (":not-the-password@", ""):
        backend = open_backend(f"redis://{auth}127.0.0.1:{secured.port}/0")
        with pytest.raises(ConfigError) as info:
            backend.inspect(["a"])
        message = str(info.value)
        assert f"127.0.0.1:{secured.port}" in message
        assert "not-the-password" not in message and PASSWORD not in message
        backend.close()
    good = open_backend(secured.url(unique()))
    assert good.try_acquire(["a"], "o", 5) is not None
    assert PASSWORD not in good.url
    good.close()


def test_missing_database_is_a_config_error(server: RedisServer) -> None:
    """A database number the server does not have is a ConfigError naming the URL."""
    backend = open_backend(f"redis://127.0.0.1:{server.port}/999")
    with pytest.raises(ConfigError, match=f"127.0.0.1:{server.port}/999"):
        backend.inspect(["a"])
    backend.close()


def test_bad_options_are_config_errors(server: RedisServer) -> None:
    """Unknown options, TLS options without rediss:// and malformed values are refused up front."""
    base = f"redis://127.0.0.1:{server.port}/0"
    for url in (f"{base}?bogus=1", f"{base}?ssl_ca_certs=/x", f"{base}?timeout=soon",
                f"redis://127.0.0.1:{server.port}/zero"):
        with pytest.raises(ConfigError):
            open_backend(url)
    tls = open_backend(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs=/etc/ssl/ca.pem&ssl_check_hostname=no")
    kwargs = tls._client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem" and kwargs["ssl_check_hostname"] is False
    tls.close()


def test_restart_then_reconnect(server: RedisServer, open_: Callable[..., RedisBackend]) -> None:
    """After a server restart an open backend fails at most once with BackendUnavailable, then works."""
    b = open_()
    lease = b.try_acquire(["r1"], "owner", 30)
    assert lease is not None
    b.wait(["r1"], 0.5)  # start the pub/sub subscription, so it too must survive the restart
    server.restart(lose_data=True)
    for call in (lambda: b.renew(lease), lambda: b.wait(["r1"], 0.1)):
        with contextlib.suppress(BackendUnavailable, LeaseLost):
            call()
    again = wait_until(lambda: _attempt(lambda: b.try_acquire(["r1"], "owner", 30)), 10, interval=0.05,
                       message="acquire after restart")
    assert again.tokens["r1"] > lease.tokens["r1"]
    b.wait(["r1"], 0.0)
    with pytest.raises(LeaseLost):
        b.renew(lease)  # the old session died with the data


def _attempt(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BackendUnavailable:
        return None


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_one_round_trip_per_operation(open_: Callable[..., RedisBackend], round_trips: list[int],
                                      size: int) -> None:
    """try_acquire, renew and release are one round trip each, whatever the slice size."""
    b = open_()
    warm = b.try_acquire(["warm"], "o", 30)  # loads the scripts and opens the connection
    assert warm is not None
    b.renew(warm)
    b.release(warm)
    keys = [f"k{i}" for i in range(size)]
    before = round_trips[0]
    lease = b.try_acquire(keys, "o", 30)
    assert lease is not None and len(lease.tokens) == size
    assert round_trips[0] - before == 1
    before = round_trips[0]
    lease = b.renew(lease)
    assert round_trips[0] - before == 1
    before = round_trips[0]
    b.release(lease)
    assert round_trips[0] - before == 1
    before = round_trips[0]
    assert b.try_acquire(keys, "o2", 30) is not None
    assert round_trips[0] - before == 1


def test_inspect_100k_keys_in_one_round_trip(open_: Callable[..., RedisBackend],
                                             round_trips: list[int]) -> None:
    """inspect answers 100,000 keys, held by two owners or free, in one round trip (their sessions
    with them: a look at a big pool names a session per member)."""
    a, b = open_(), open_()
    keys = [f"shard-{i}" for i in range(100_000)]
    first = a.try_acquire(keys[:30_000], "alpha", 60)
    second = b.try_acquire(keys[30_000:50_000], "beta", 60)
    assert first is not None and second is not None
    viewer = open_()
    viewer.inspect(["warm-up"])
    before = round_trips[0]
    seen = viewer.inspect(keys)
    assert round_trips[0] - before == 1
    assert len(seen) == 100_000
    assert sum(h is None for h in seen.values()) == 50_000
    assert all(seen[k] is not None and seen[k].owner == "alpha" for k in keys[:30_000])  # type: ignore[union-attr]
    holder = seen[keys[40_000]]
    assert holder is not None and holder.owner == "beta" and holder.token == second.tokens[keys[40_000]]
    assert holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert holder.expires_in is not None and 0 < holder.expires_in <= 60
    assert holder.since is not None and abs(holder.since - time.time()) < 60


def test_dead_session_never_revives(open_: Callable[..., RedisBackend]) -> None:
    """Once an owner's session expired, its next acquire starts a new session and old keys stay free."""
    a, viewer = open_(), open_()
    old = a.try_acquire(["s1"], "same-owner", 0.2)
    assert old is not None
    wait_until(lambda: viewer.inspect(["s1"])["s1"] is None, 10, interval=0.02, message="session expiry")
    new = a.try_acquire(["s2"], "same-owner", 30)
    assert new is not None and new.session != old.session
    assert viewer.inspect(["s1"])["s1"] is None
    with pytest.raises(LeaseLost):
        a.renew(old)


def test_a_short_acquire_never_shortens_the_owners_session(open_: Callable[..., RedisBackend]) -> None:
    """A second lease with a short ttl does not cut the session a longer lease of the same owner relies on."""
    a = open_()
    long = a.try_acquire(["long"], "owner", 30)
    short = a.try_acquire(["short"], "owner", 0.05)
    assert long is not None and short is not None and long.session == short.session
    a.renew(short)
    left = a._client.pttl(a._session_key(long.session))
    assert left > 20_000


def test_renew_checks_the_first_key_in_the_same_script(open_: Callable[..., RedisBackend],
                                                      round_trips: list[int]) -> None:
    """A live session whose lease's first key names another session (a server that lost our grant and granted
    it again), or no session (released), is LeaseLost saying so, in one round trip, and is not extended."""
    a, b = open_(), open_()
    anchor = a.try_acquire(["anchor"], "owner", 30)
    lease = a.try_acquire(["k1", "k2"], "owner", 30)
    other = b.try_acquire(["elsewhere"], "other", 30)
    assert anchor is not None and lease is not None and other is not None
    a.renew(lease)  # the script is loaded
    key, session = a._shard_key("k1"), a._session_key(lease.session)
    a._client.pexpire(session, 10_000)
    a._client.set(key, f"{lease.tokens['k1'] + 1} 0 {other.session}")  # granted again, to another live session
    before = round_trips[0]
    with pytest.raises(LeaseLost, match=r"superseded.*another session") as lost:
        a.renew(lease)
    assert round_trips[0] - before == 1 and lost.value.keys == ("k1", "k2")
    assert a._client.pttl(session) <= 10_000  # not extended
    a._client.set(key, str(lease.tokens["k1"]))  # released: the last token only
    with pytest.raises(LeaseLost, match=r"superseded.*released"):
        a.renew(lease)
    a._client.set(key, f"{lease.tokens['k1']} 0 {lease.session}")  # ours again: renews
    a.renew(lease)
    assert a._client.pttl(session) > 20_000
    before = round_trips[0]
    a.renew(Lease((), "owner", {}, 30, session=lease.session))  # no keys: the session alone
    assert round_trips[0] - before == 1
    a._client.delete(session)
    with pytest.raises(LeaseLost, match="session expired"):
        a.renew(lease)


def test_unknown_script_code_and_corrupt_record_are_protocol_errors(
    open_: Callable[..., RedisBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard record we cannot read, or a script code we do not know, is a BackendProtocolError."""
    b = open_()
    b._client.set(b._shard_key("bad"), "not a record")
    with pytest.raises(BackendProtocolError, match="unreadable"):
        b.try_acquire(["bad"], "o", 5)
    monkeypatch.setattr(b, "_acquire", lambda **_: [7])
    with pytest.raises(BackendProtocolError, match="unexpected reply"):
        b.try_acquire(["fine"], "o", 5)


def test_release_between_failed_acquire_and_wait_is_not_missed(open_: Callable[..., RedisBackend]) -> None:
    """Once a worker has waited, a release before its next wait still wakes it at once."""
    a, b = open_(), open_()
    lease = a.try_acquire(["w"], "a", 30)
    assert lease is not None
    b.wait(["w"], 1.0)  # subscribes; returns once the subscription is confirmed
    assert b.try_acquire(["w"], "b", 30) is None
    a.release(lease)  # happens before b waits again
    start = time.monotonic()
    b.wait(["w"], 5.0)
    assert time.monotonic() - start < 4.0
    assert b.try_acquire(["w"], "b", 30) is not None


def test_tokens_come_from_the_server_clock(open_: Callable[..., RedisBackend]) -> None:
    """A first grant's token is the server's time in microseconds, so it outruns any lost history."""
    b = open_()
    server_us = int(b._client.time()[0]) * 1_000_000
    lease = b.try_acquire(["fresh"], "o", 5)
    assert lease is not None
    assert server_us <= lease.tokens["fresh"] < server_us + 60_000_000


def _lease(owner: str = "o") -> Lease:
    """A lease object for calls that need one (the server decides whether it is still held)."""
    return Lease(("a",), owner, {"a": 1}, 5.0, time.monotonic() + 5, f"{owner}/0")


#: Every public call, each run once against a backend (the lazy connection is opened by whichever comes first).
CALLS: dict[str, Callable[[RedisBackend], Any]] = {
    "try_acquire": lambda b: b.try_acquire(["a"], "o", 5),
    "renew": lambda b: b.renew(_lease()),
    "release": lambda b: b.release(_lease()),
    "inspect": lambda b: b.inspect(["a"]),
    "read_records": lambda b: b.read_records(["r"]),
    "swap_record": lambda b: b.swap_record("r", None, "v"),
    "wait": lambda b: b.wait(["a"], 0.1),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_wrong_password_is_a_config_error_on_every_call(secured: RedisServer, call: str) -> None:
    """Whichever call first opens the lazy connection, a wrong password is a ConfigError without the password."""
    backend = open_backend(f"redis://:wrong-{PASSWORD}@127.0.0.1:{secured.port}/0")
    assert isinstance(backend, RedisBackend)
    with pytest.raises(ConfigError) as info:
        CALLS[call](backend)
    assert "authentication failed" in str(info.value) and PASSWORD not in str(info.value)
    backend.close()


def test_busy_server_is_unavailable_then_recovers(server: RedisServer, open_: Callable[..., RedisBackend]) -> None:
    """While a script hogs the server (BUSY), every call is BackendUnavailable; after SCRIPT KILL all work again."""
    b = open_()
    lease = b.try_acquire(["a"], "o", 30)
    assert lease is not None
    admin = redis.Redis(port=server.port)
    admin.config_set("lua-time-limit", 50)  # answer BUSY after 50 ms instead of 5 s
    hog = threading.Thread(target=_run_endless_script, args=(server.port,))
    hog.start()
    try:
        wait_until(lambda: _raises(lambda: b.inspect(["a"]), BackendUnavailable), 10, message="BUSY replies")
        for name, call in CALLS.items():
            if name != "wait":  # a subscription already open just keeps waiting
                with pytest.raises(BackendUnavailable, match="busy"):
                    call(b)
        with pytest.raises(BackendUnavailable, match="busy"):
            b.renew(lease)
    finally:
        killer = redis.Redis(port=server.port)  # a fresh connection: the pooled one may be mid-reply
        wait_until(lambda: _killed(killer), 10, message="SCRIPT KILL")
        hog.join(10)
        wait_until(lambda: _attempt(lambda: admin.config_set("lua-time-limit", 5000)), 10, message="config reset")
        admin.close()
        killer.close()
    assert wait_until(lambda: _attempt(lambda: b.renew(lease)), 10, message="renew after BUSY").session == lease.session
    assert b.swap_record("after", None, "busy") is True


def _run_endless_script(port: int) -> None:
    """Run a script that never ends by itself (it writes nothing, so SCRIPT KILL may stop it)."""
    client = redis.Redis(port=port)
    with contextlib.suppress(redis.exceptions.ResponseError):
        client.eval("local i = 0 while true do i = i + 1 end", 0)
    client.close()


def _killed(client: Any) -> bool:
    """SCRIPT KILL until it reports a script stopped (it fails when none is running yet or any more)."""
    try:
        return bool(client.script_kill())
    except redis.exceptions.ResponseError as exc:
        return "NOTBUSY" in str(exc)


def _raises(call: Callable[[], Any], kind: type[BaseException]) -> bool:
    try:
        call()
    except kind:
        return True
    return False


def test_full_memory_and_read_only_replica_refuse_writes_as_unavailable(
    server: RedisServer, open_: Callable[..., RedisBackend]
) -> None:
    """OOM (maxmemory reached) and READONLY (the server became a replica) make writes BackendUnavailable."""
    b = open_()
    admin = redis.Redis(port=server.port)
    try:
        for refuse, allow in ((("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0")),
                              (("REPLICAOF", "127.0.0.1", str(free_port())), ("REPLICAOF", "NO", "ONE"))):
            admin.execute_command(*refuse)
            try:
                for write in (lambda: b.try_acquire(["a"], "o", 30), lambda: b.swap_record("r", None, "v")):
                    with pytest.raises(BackendUnavailable, match="busy"):
                        write()
                assert b.read_records(["r"]) == {"r": None}  # reads are still served
            finally:
                admin.execute_command(*allow)
            assert b.swap_record("r", None, "v") is True and b.swap_record("r", "v", None) is True
    finally:
        admin.close()


def test_max_clients_reached_is_unavailable(server: RedisServer, open_: Callable[..., RedisBackend]) -> None:
    """A server at maxclients refuses a new connection: BackendUnavailable, and the backend works once it has room."""
    b = open_()
    admin = redis.Redis(port=server.port)
    admin.ping()  # the admin's own connection is opened before the limit
    admin.config_set("maxclients", 1)
    try:
        with pytest.raises(BackendUnavailable, match="max number of clients"):
            b.read_records(["r"])
    finally:
        admin.config_set("maxclients", 10000)
        admin.close()
    assert b.read_records(["r"]) == {"r": None}


def test_records_are_one_round_trip_each_and_stay_under_the_prefix(
    server: RedisServer, open_: Callable[..., RedisBackend], round_trips: list[int]
) -> None:
    """read_records (any number of names) and swap_record are one round trip; records live at {prefix}record:."""
    b = open_()
    assert b.swap_record("warm", None, "x") is True  # loads the script
    before = round_trips[0]
    assert b.swap_record("layout", None, "v1") is True
    assert round_trips[0] - before == 1
    before = round_trips[0]
    names = [f"n{i}" for i in range(500)]
    assert b.read_records(["layout", *names]) == {"layout": "v1", **dict.fromkeys(names)}
    assert round_trips[0] - before == 1
    assert b._client.get(f"{b.prefix}record:layout") == "v1"
    other = open_backend(server.url(unique()))
    assert other.read_records(["layout"]) == {"layout": None}  # another prefix, another namespace
    other.close()


def test_bad_record_input_is_a_config_error_before_any_round_trip(
    open_: Callable[..., RedisBackend], round_trips: list[int]
) -> None:
    """Names and values no backend stores (empty, NUL, too long, lone surrogate) are refused locally."""
    b = open_()
    before = round_trips[0]
    for call in (lambda: b.read_records([""]), lambda: b.swap_record("a\0b", None, "v"),
                 lambda: b.swap_record("n" * 201, None, "v"), lambda: b.swap_record("n", None, "v" * 8193),
                 lambda: b.swap_record("n", None, "bad \udc80"), lambda: b.read_records(["bad \udc80"])):
        with pytest.raises(ConfigError):
            call()
    assert round_trips[0] == before


def test_init_marks_a_new_namespace_so_its_first_acquire_skips_the_restart_grace(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Without init, a new namespace's first acquire waits the restart grace (the ttl) and says so once, as
    after a restart that lost data; after init it is granted at once; init leaves a namespace it finds as it is."""
    def fresh() -> str:
        return server.url(unique()).replace("&restart_grace=0", "")

    waiting = open_backend(fresh())
    prepared_url = fresh()
    init = open_backend(prepared_url)
    try:
        with caplog.at_level("WARNING", logger="shardpreempt.backends.grace"):
            assert waiting.try_acquire(["k"], "a", 30) is None
            assert waiting.try_acquire(["k"], "a", 30) is None
        assert len([r for r in caplog.records if "nothing is granted" in r.getMessage()]) == 1
        init.init()  # type: ignore[attr-defined]
        assert init.try_acquire(["k"], "a", 30) is not None
        init.init()  # type: ignore[attr-defined]  # again: harmless
        waiting.init()  # type: ignore[attr-defined]  # a namespace already in its grace keeps it
        assert waiting.try_acquire(["k"], "a", 30) is None
    finally:
        waiting.close()
        init.close()
