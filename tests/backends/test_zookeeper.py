"""zookeeper:// specifics beyond the contract suite: errors, reconnects, round trips, sessions, watch, records,
clients of lost owners."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendUnavailable, ConfigError, LeaseLost, LossReason
from shardpreempt.model import Lease
from shardpreempt.testing import wait_until
from shardpreempt.testing.netns import Relay
from shardpreempt.testing.servers import free_port, unique

pytest.importorskip("kazoo")
from kazoo import exceptions as kz
from kazoo.client import KazooClient
from kazoo.handlers.utils import AsyncResult

from shardpreempt.backends.zookeeper import ZooKeeperBackend
from shardpreempt.testing.servers.zookeeper import ZooKeeperServer

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def backend_name() -> str:
    """This module's backend: ``server``, ``url`` and ``open_`` come from the plugin (tests/backends/conftest.py)."""
    return "zookeeper"


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts requests handed to kazoo's connection (pings bypass this; a multi is one request)."""
    count = [0]
    original = KazooClient._call

    def counted(self: KazooClient, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KazooClient, "_call", counted)
    return count


def test_unreachable_server_is_backend_unavailable_within_the_connect_timeout() -> None:
    """A closed port gives BackendUnavailable after connect_timeout, without the password in it."""
    backend = open_backend(f"zookeeper://u:{PASSWORD}@127.0.0.1:{free_port()}/x?connect_timeout=0.5")
    before = threading.active_count()
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        backend.try_acquire(["a"], "o", 5)
    assert time.monotonic() - start < 3
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    backend.close()
    wait_until(lambda: threading.active_count() <= before, 5, message="kazoo threads stopped")


def test_bad_option_is_config_error() -> None:
    """An unknown option is a ConfigError naming the redacted URL."""
    with pytest.raises(ConfigError) as info:
        open_backend(f"zookeeper://u:{PASSWORD}@127.0.0.1:1/x?bogus=1")
    assert "bogus" in str(info.value) and PASSWORD not in str(info.value)


def test_wrong_password_is_config_error(server: ZooKeeperServer,
                                        open_: Callable[..., ZooKeeperBackend]) -> None:
    """Nodes get a digest ACL for the URL's user; another password is refused with a ConfigError."""
    chroot = unique()
    good = open_(f"zookeeper://alice:{PASSWORD}@127.0.0.1:{server.port}/{chroot}")
    lease = good.try_acquire(["a"], "o", 5)
    assert lease is not None
    bad = open_(f"zookeeper://alice:wrong-password@127.0.0.1:{server.port}/{chroot}")
    with pytest.raises(ConfigError) as info:
        bad.try_acquire(["b"], "p", 5)
    assert "wrong-password" not in str(info.value) and f"127.0.0.1:{server.port}" in str(info.value)
    with pytest.raises(ConfigError):
        bad.inspect(["a"])


def test_server_restart_keeps_sessions_and_reconnects(server: ZooKeeperServer,
                                                      open_: Callable[..., ZooKeeperBackend]) -> None:
    """After a server restart the next call fails cleanly or works, then the same session renews."""
    backend = open_()
    lease = backend.try_acquire(["a"], "o", 30)
    assert lease is not None
    server.restart()
    with contextlib.suppress(BackendUnavailable):
        backend.renew(lease)
    renewed = wait_until(lambda: _quiet(lambda: backend.renew(lease)), 20, interval=0.05,
                         message="renew after restart")
    assert renewed.deadline > lease.deadline
    holder = open_().inspect(["a"])["a"]
    assert holder is not None and holder.token == lease.tokens["a"]


def test_a_reconnect_that_gets_no_answer_is_given_up_after_the_connect_timeout(server: ZooKeeperServer) -> None:
    """A restarting server accepts connections before it serves, and ZooKeeper 3.8 may leave one
    unanswered: the client gives that attempt up after connect_timeout and tries again, so the session
    renews within seconds. Before, kazoo waited up to the whole session timeout (30 s here), and the
    session expired meanwhile (a flake of the restart test above)."""
    relay = Relay("127.0.0.1", ("127.0.0.1", server.port))
    backend = open_backend(f"zookeeper://127.0.0.1:{relay.address[1]}/{unique()}?connect_timeout=1")
    try:
        lease = backend.try_acquire(["a"], "o", 30)
        assert lease is not None
        relay.delay = 120  # what is sent now is answered only after the test: a connection left unanswered
        relay.drop()
        with contextlib.suppress(BackendUnavailable):
            backend.renew(lease)  # notices the drop; kazoo reconnects through the unanswering relay
        wait_until(relay.connections, 10, interval=0.01, message="a reconnect through the unanswering relay")
        relay.delay = 0
        renewed = wait_until(lambda: _quiet(lambda: backend.renew(lease)), 10, interval=0.05,
                             message="renew after an unanswered reconnect")
        assert renewed.deadline > lease.deadline
    finally:
        backend.close()
        relay.close()


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_round_trips_do_not_grow_with_the_slice(open_: Callable[..., ZooKeeperBackend],
                                                round_trips: list[int], size: int) -> None:
    """try_acquire, renew and release are one request each, whatever the number of keys."""
    backend = open_()
    keys = [f"k{i}" for i in range(size)]
    first = backend.try_acquire(["warm"], "o", 30)
    assert first is not None
    round_trips[0] = 0
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None and round_trips[0] == 1
    round_trips[0] = 0
    lease = backend.renew(lease)
    assert round_trips[0] == 1
    other = open_()
    assert other.try_acquire(["warm2"], "p", 30) is not None
    round_trips[0] = 0
    assert other.try_acquire(keys, "p", 30) is None
    assert round_trips[0] == 1
    round_trips[0] = 0
    backend.release(lease)
    assert round_trips[0] == 1
    round_trips[0] = 0
    backend.release(lease)
    assert round_trips[0] == 0  # idempotent: nothing left to delete, nothing sent
    assert all(h is None for h in backend.inspect(keys).values())


def test_renew_checks_the_first_keys_node(open_: Callable[..., ZooKeeperBackend], round_trips: list[int]) -> None:
    """renew is one ``exists`` of the lease's first key's node: gone, another session's, or a newer grant's
    node is LeaseLost "superseded", and the session (proven alive by the answer) stays with its other leases;
    a lease without keys renews on the session's marker."""
    a, b = open_(), open_()
    anchor = a.try_acquire(["anchor"], "a", 30)
    lease = a.try_acquire(["x", "y"], "a", 30)
    assert anchor is not None and lease is not None
    b._reader_client().delete(a._path("x"))  # simulate an operator deleting one key's node
    round_trips[0] = 0
    with pytest.raises(LeaseLost, match="superseded") as lost:
        a.renew(lease)
    assert round_trips[0] == 1 and lost.value.keys == ("x", "y") and lost.value.reason is LossReason.SUPERSEDED
    assert "released" in lost.value.detail
    other = b.try_acquire(["x"], "b", 30)
    assert other is not None
    with pytest.raises(LeaseLost, match=f"held by ZooKeeper session {other.session}"):
        a.renew(lease)
    round_trips[0] = 0
    a.renew(anchor)  # the owner's session and client are untouched
    a.renew(Lease((), "a", {}, anchor.ttl, session=anchor.session))  # no keys: the marker
    assert round_trips[0] == 2 and "a" in a._owners
    b.release(other)
    again = a.try_acquire(["x"], "a", 30)  # the same owner and session, a new grant
    assert again is not None and again.session == lease.session
    with pytest.raises(LeaseLost, match="granted again"):
        a.renew(lease)
    a.renew(again)


def test_session_timeout_is_the_negotiated_one(open_: Callable[..., ZooKeeperBackend]) -> None:
    """The server clamps the session timeout; Lease.ttl and the deadline use what it granted."""
    backend = open_()
    start = time.monotonic()
    short = backend.try_acquire(["a"], "short", 0.05)
    assert short is not None and short.ttl == pytest.approx(2 * ZooKeeperServer.tick_ms / 1000)
    assert start + short.ttl <= short.deadline <= time.monotonic() + short.ttl
    long = backend.try_acquire(["b"], "long", 600)
    assert long is not None and long.ttl == pytest.approx(60.0)


def test_a_holder_that_stops_renewing_loses_its_session(open_: Callable[..., ZooKeeperBackend]) -> None:
    """Kazoo's own pings are off for holders: without renew the session expires and the keys are free."""
    a, b = open_(), open_()
    lease = a.try_acquire(["x"], "a", 1.0)
    assert lease is not None
    taken = wait_until(lambda: b.try_acquire(["x"], "b", 30), 10, interval=0.05, message="takeover")
    assert taken.tokens["x"] > lease.tokens["x"]
    with pytest.raises(LeaseLost):
        a.renew(lease)
    again = a.try_acquire(["y"], "a", 1.0)
    assert again is not None and again.session != lease.session


def test_awkward_keys_round_trip(open_: Callable[..., ZooKeeperBackend]) -> None:
    """Keys with slashes, NUL, non-ASCII characters or 100,000 characters are held and reported."""
    backend = open_()
    keys = ["a/b/../c", "nul\0byte", "ünïcødé-☃", "x" * 100_000, ""]
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None
    seen = open_().inspect([*keys, "a/b"])
    assert seen["a/b"] is None and all(seen[k] is not None for k in keys)
    backend.release(lease)
    assert all(h is None for h in backend.inspect(keys).values())


def test_wait_is_woken_by_a_watch(open_: Callable[..., ZooKeeperBackend]) -> None:
    """A release during the wait wakes it through the exists watch, long before the timeout."""
    a, b = open_(), open_()
    lease = a.try_acquire(["w"], "a", 30)
    assert lease is not None
    assert b.try_acquire(["w"], "b", 30) is None
    timer = threading.Timer(0.3, a.release, [lease])
    timer.start()
    start = time.monotonic()
    b.wait(["w"], 10)
    timer.join()
    assert time.monotonic() - start < 5


def test_a_release_before_the_wait_is_not_missed(open_: Callable[..., ZooKeeperBackend]) -> None:
    """A release between the failed acquire and the wait makes the wait return at once."""
    a, b = open_(), open_()
    lease = a.try_acquire(["w"], "a", 30)
    assert lease is not None
    assert b.try_acquire(["w"], "b", 30) is None
    a.release(lease)
    start = time.monotonic()
    b.wait(["w"], 10)
    assert time.monotonic() - start < 1


def test_close_frees_the_keys_at_once(open_: Callable[..., ZooKeeperBackend]) -> None:
    """Closing a backend closes its sessions, so their ephemeral nodes go without waiting for a timeout."""
    a, b = open_(), open_()
    assert a.try_acquire(["c"], "a", 30) is not None
    a.close()
    assert b.try_acquire(["c"], "b", 30) is not None


def test_inspect_of_100000_keys(open_: Callable[..., ZooKeeperBackend]) -> None:
    """inspect answers for 100,000 keys (half held by two owners) within seconds."""
    backend = open_()
    keys = [f"shard-{i:06d}" for i in range(100_000)]
    leases = [backend.try_acquire(keys[i:i + 5000], "o1" if i < 25_000 else "o2", 60)
              for i in range(0, 50_000, 5000)]
    assert all(leases)
    start = time.monotonic()
    seen = open_().inspect(keys)
    elapsed = time.monotonic() - start
    assert sum(h is not None for h in seen.values()) == 50_000
    assert {h.owner for h in seen.values() if h is not None} == {"o1", "o2"}
    assert elapsed < 30


def _quiet(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BackendUnavailable:
        return None


def test_inspect_paths_agree(open_: Callable[..., ZooKeeperBackend]) -> None:
    """Few keys (node stats) and many keys (claim records) report the same owner, token and start."""
    backend = open_()
    keys = [f"s{i}" for i in range(200)]
    lease = backend.try_acquire(keys[:100], "o", 30)
    assert lease is not None
    reader = open_()
    few, many = reader.inspect(keys[:3]), reader.inspect(keys)
    for key in keys[:3]:
        assert few[key] == many[key] and few[key] is not None and few[key].token == lease.tokens[key]  # type: ignore[union-attr]
    assert sum(h is not None for h in many.values()) == 100


def test_an_acquire_whose_reply_was_lost_is_undone_by_the_next_one(open_: Callable[..., ZooKeeperBackend],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """If an acquire's multi took effect but its reply was lost, the owner's next acquire frees its nodes."""
    backend = open_()
    assert backend.try_acquire(["warm"], "o", 30) is not None
    real = KazooClient.transaction

    class Lost:
        def get(self, timeout: float) -> None:
            raise kz.ConnectionLoss()

    def transaction(self: KazooClient) -> Any:
        txn = real(self)
        commit = txn.commit_async
        txn.commit_async = lambda: (commit().get(), Lost())[1]
        return txn

    monkeypatch.setattr(KazooClient, "transaction", transaction)
    with pytest.raises(BackendUnavailable):
        backend.try_acquire(["l1", "l2"], "o", 30)
    monkeypatch.setattr(KazooClient, "transaction", real)
    assert all(h is not None for h in open_().inspect(["l1", "l2"]).values())
    assert backend.try_acquire(["other"], "o", 30) is not None
    assert open_().inspect(["l1", "l2"]) == {"l1": None, "l2": None}


def test_owners_that_lost_their_sessions_have_their_clients_closed(open_: Callable[..., ZooKeeperBackend]) -> None:
    """Losing leases again and again, a new owner each time as the worker does, leaves no kazoo client behind."""
    a, b = open_(), open_()
    assert b.try_acquire(["warm"], "b", 30) is not None
    a.inspect(["x"])  # a's reader session, which lives as long as the backend
    before = threading.active_count()
    for i in range(6):
        lease = a.try_acquire(["x"], f"a{i}", 0.4)
        assert lease is not None
        taken = wait_until(lambda: b.try_acquire(["x"], "b", 30), 10, interval=0.02, message="takeover")
        with contextlib.suppress(BackendUnavailable):
            a.release(lease)  # as the claimer does after its local deadline passed, then a fresh owner id
        b.release(taken)
    wait_until(lambda: a.inspect(["any"])["any"] is None and not a._owners, 10, interval=0.05,
               message="every lost owner's client closed")
    wait_until(lambda: threading.active_count() <= before, 10, message="kazoo threads of lost owners stopped")


def test_records_outlive_the_session_that_wrote_them(open_: Callable[..., ZooKeeperBackend]) -> None:
    """A record is a persistent node: closing the writer's backend leaves it for every other reader."""
    writer = open_()
    assert writer.swap_record("layout", None, "v1") is True
    writer.close()
    assert open_().read_records(["layout", "none"]) == {"layout": "v1", "none": None}


def test_swapping_an_absent_record_to_absent_succeeds_only_while_absent(
    open_: Callable[..., ZooKeeperBackend],
) -> None:
    """swap_record(name, None, None) is True while the record is absent, leaves nothing, and False once set."""
    backend = open_()
    assert backend.swap_record("r", None, None) is True
    assert backend.read_records(["r"]) == {"r": None}
    assert backend.swap_record("r", None, "v") is True
    assert backend.swap_record("r", None, None) is False
    assert backend.read_records(["r"]) == {"r": "v"}


def test_read_records_issues_every_request_before_awaiting_a_reply(open_: Callable[..., ZooKeeperBackend],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """read_records pipelines: a sync and one get per name all go out before the first reply is awaited."""
    backend = open_()
    names = [f"n{i}" for i in range(300)]
    for name in names[::3]:
        assert backend.swap_record(name, None, name.upper())
    order: list[str] = []
    call, get, caller = KazooClient._call, AsyncResult.get, threading.current_thread()

    def called(self: KazooClient, *args: Any, **kwargs: Any) -> Any:
        order.append("call")
        return call(self, *args, **kwargs)

    def awaited(self: AsyncResult, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is caller:  # kazoo's own completion callbacks call get too
            order.append("get")
        return get(self, *args, **kwargs)

    monkeypatch.setattr(KazooClient, "_call", called)
    monkeypatch.setattr(AsyncResult, "get", awaited)
    values = backend.read_records(names)
    assert order == ["call"] * 301 + ["get"] * 301
    assert values == {n: n.upper() if i % 3 == 0 else None for i, n in enumerate(names)}


def test_records_with_a_wrong_password_are_config_error(server: ZooKeeperServer,
                                                        open_: Callable[..., ZooKeeperBackend]) -> None:
    """Records carry the user's digest ACL: another password cannot write them."""
    chroot = unique()
    good = open_(f"zookeeper://alice:{PASSWORD}@127.0.0.1:{server.port}/{chroot}")
    assert good.swap_record("r", None, "v") is True
    bad = open_(f"zookeeper://alice:wrong-password@127.0.0.1:{server.port}/{chroot}")
    with pytest.raises(ConfigError) as info:
        bad.swap_record("s", None, "v")
    assert "wrong-password" not in str(info.value)
