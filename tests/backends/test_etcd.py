"""etcd:// specifics beyond the contract suite: errors, failover, reconnects, round trips, watch, scale,
slices above the server's txn limit, records."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendUnavailable, ConfigError, LeaseLost
from shardpreempt.model import Lease
from shardpreempt.testing import wait_until
from shardpreempt.testing.fixtures import Opener, running_server, start_server
from shardpreempt.testing.servers import free_port, unique

pytest.importorskip("etcd3gw")
from etcd3gw.client import Etcd3Client

from shardpreempt.backends.etcd import SMALL, EtcdBackend
from shardpreempt.testing.servers.etcd import EtcdServer

PASSWORD = "s3cret-Pa55word"


def _started(kind: type[EtcdServer] = EtcdServer) -> EtcdServer:
    """A started etcd of the caller's own (the plugin skips when the binary is missing, fails under CI)."""
    return start_server("etcd", kind)


@pytest.fixture(scope="module")
def backend_name() -> str:
    """This module's backend: ``server``, ``url`` and ``open_`` come from the plugin (tests/backends/conftest.py)."""
    return "etcd"


class DefaultEtcdServer(EtcdServer):
    """etcd with its default limits (--max-txn-ops 128, --max-request-bytes 1.5 MiB), as clusters run."""

    max_txn_ops = 128

    def command(self) -> list[str]:
        """The test server's command without the raised limits."""
        command = list(super().command())
        for flag in ("--max-txn-ops", "--max-request-bytes"):
            at = command.index(flag)
            del command[at:at + 2]
        return command


@pytest.fixture(scope="module")
def default_server() -> Iterator[EtcdServer]:
    """One default-configured etcd for the module."""
    with running_server("etcd", DefaultEtcdServer) as srv:
        yield srv


@pytest.fixture
def default_open(default_server: EtcdServer) -> Iterator[Opener]:
    """Open backends on a fresh prefix of the default-configured server; closed after the test."""
    with Opener(default_server.url(unique())) as opener:
        yield opener


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every HTTP request the etcd client sends (each is one round trip)."""
    count = [0]
    original = Etcd3Client.post

    def counted(self: Etcd3Client, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Etcd3Client, "post", counted)
    return count


def test_unreachable_server_is_backend_unavailable_without_the_password() -> None:
    """A closed port gives BackendUnavailable at once, and the message shows no password."""
    backend = open_backend(f"etcd://root:{PASSWORD}@127.0.0.1:{free_port()}/x?connect_timeout=0.5")
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        backend.try_acquire(["a"], "o", 5)
    assert time.monotonic() - start < 2
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_silent_server_times_out_as_backend_unavailable() -> None:
    """A server that accepts but never answers is BackendUnavailable within the request timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        backend = open_backend(f"etcd://127.0.0.1:{port}/x?connect_timeout=0.5&timeout=0.5")
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            backend.inspect(["a"])
        assert time.monotonic() - start < 3


def test_bad_option_is_config_error() -> None:
    """An unknown or malformed option is a ConfigError naming the redacted URL."""
    with pytest.raises(ConfigError, match="bogus"):
        open_backend(f"etcd://u:{PASSWORD}@127.0.0.1:1/x?bogus=1")
    with pytest.raises(ConfigError) as info:
        open_backend(f"etcd://u:{PASSWORD}@127.0.0.1:1/x?timeout=soon")
    assert PASSWORD not in str(info.value)


def test_bad_password_is_config_error_naming_the_redacted_url() -> None:
    """With auth enabled, a wrong password is a ConfigError; the right one works."""
    srv = _started()
    try:
        base = f"http://127.0.0.1:{srv.port}/v3"
        for path, body in (("/auth/user/add", {"name": "root", "password": PASSWORD}),
                           ("/auth/user/grant", {"user": "root", "role": "root"}),
                           ("/auth/enable", {})):
            requests.post(base + path, json=body, timeout=5).raise_for_status()
        bad = open_backend(f"etcd://root:wrong-password@127.0.0.1:{srv.port}/x")
        with pytest.raises(ConfigError) as info:
            bad.try_acquire(["a"], "o", 5)
        assert "wrong-password" not in str(info.value) and f"127.0.0.1:{srv.port}" in str(info.value)
        good = open_backend(f"etcd://root:{PASSWORD}@127.0.0.1:{srv.port}/x")
        lease = good.try_acquire(["a"], "o", 5)
        assert lease is not None and good.inspect(["a"])["a"] is not None
        good.release(lease)
        good.close()
    finally:
        srv.close()


def test_failover_to_the_next_endpoint(server: EtcdServer) -> None:
    """When the first endpoint refuses connections, the next one in the list serves the call."""
    backend = open_backend(f"etcd://127.0.0.1:{free_port()},127.0.0.1:{server.port}/{unique()}")
    lease = backend.try_acquire(["a"], "o", 5)
    assert lease is not None
    backend.release(lease)
    backend.close()


def test_server_restart_then_reconnect(server: EtcdServer, open_: Callable[..., EtcdBackend]) -> None:
    """After a server restart the next call fails cleanly or works, and a later call works; data stays."""
    backend = open_()
    lease = backend.try_acquire(["a"], "o", 30)
    assert lease is not None
    server.restart()
    with contextlib.suppress(BackendUnavailable):
        backend.inspect(["a"])
    holder = wait_until(lambda: _quiet(lambda: backend.inspect(["a"])["a"]), 20, interval=0.05,
                        message="inspect after restart")
    assert holder.token == lease.tokens["a"]
    assert backend.renew(lease).deadline > lease.deadline


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_round_trips_do_not_grow_with_the_slice(open_: Callable[..., EtcdBackend], round_trips: list[int],
                                                size: int) -> None:
    """try_acquire and release are one HTTP request each, renew two (the keepalive, and a txn checking the
    first key: a txn cannot refresh a lease), whatever the number of keys."""
    backend = open_()
    keys = [f"k{i}" for i in range(size)]
    round_trips[0] = 0
    first = backend.try_acquire(["warm"], "o", 30)
    assert first is not None and round_trips[0] == 2  # the owner's first acquire also grants its lease
    round_trips[0] = 0
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None and round_trips[0] == 1
    round_trips[0] = 0
    lease = backend.renew(lease)
    assert round_trips[0] == 2
    round_trips[0] = 0
    backend.renew(Lease((), "o", {}, lease.ttl, session=lease.session))  # no keys: the keepalive alone
    assert round_trips[0] == 1
    round_trips[0] = 0
    assert backend.try_acquire(keys, "p", 30) is None
    round_trips[0] = 0
    assert open_().try_acquire(keys[-1:], "q", 30) is None
    round_trips[0] = 0
    backend.release(lease)
    assert round_trips[0] == 1
    assert all(h is None for h in backend.inspect(keys).values())


def test_ttl_is_rounded_up_and_the_deadline_never_outlives_the_server(
    open_: Callable[..., EtcdBackend],
) -> None:
    """A fractional ttl becomes whole etcd seconds; the local deadline is within the granted TTL."""
    backend = open_()
    start = time.monotonic()
    lease = backend.try_acquire(["a"], "o", 2.5)
    assert lease is not None
    assert lease.ttl == 3.0 and lease.ttl == math.ceil(lease.ttl)
    assert start + lease.ttl <= lease.deadline <= time.monotonic() + lease.ttl
    holder = backend.inspect(["a"])["a"]
    assert holder is not None and holder.expires_in is not None and 0 <= holder.expires_in <= lease.ttl


def test_awkward_keys_round_trip(open_: Callable[..., EtcdBackend]) -> None:
    """Keys with slashes, NUL, non-ASCII characters or 10,000 characters are held and reported."""
    backend = open_()
    keys = ["a/b/../c", "nul\0byte", "ünïcødé-☃", "x" * 10_000]
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None
    seen = open_().inspect([*keys, "a/b"])
    assert seen["a/b"] is None and all(seen[k] is not None for k in keys)
    backend.release(lease)
    assert all(h is None for h in backend.inspect(keys).values())


def test_release_after_a_partial_loss_frees_only_what_is_ours(open_: Callable[..., EtcdBackend]) -> None:
    """If another holder took one key, release still frees our other keys and leaves theirs."""
    a, b = open_(), open_()
    lease = a.try_acquire(["x", "y"], "a", 30)
    assert lease is not None
    a._post("/kv/deleterange", {"key": a._key("x")})  # simulate an operator deleting one key
    other = b.try_acquire(["x"], "b", 30)
    assert other is not None
    a.release(lease)
    seen = b.inspect(["x", "y"])
    assert seen["y"] is None and seen["x"] is not None and seen["x"].owner == "b"


def test_renew_checks_that_the_first_key_is_still_on_our_lease(open_: Callable[..., EtcdBackend],
                                                               round_trips: list[int]) -> None:
    """A live etcd lease whose lease's first key was deleted and put again under another lease (a server that
    lost our grant and granted it again), or just deleted, is LeaseLost "superseded": two round trips."""
    a, b = open_(), open_()
    anchor = a.try_acquire(["anchor"], "a", 30)
    lease = a.try_acquire(["x", "y"], "a", 30)
    assert anchor is not None and lease is not None
    a._post("/kv/deleterange", {"key": a._key("x")})  # simulate an operator deleting one key
    round_trips[0] = 0
    with pytest.raises(LeaseLost, match=r"superseded.*deleted") as lost:
        a.renew(lease)
    assert round_trips[0] == 2 and lost.value.keys == ("x", "y")
    other = b.try_acquire(["x"], "b", 30)
    assert other is not None
    with pytest.raises(LeaseLost, match=f"superseded.*under etcd lease {int(other.session):x}"):
        a.renew(lease)
    a.renew(anchor)  # the owner's etcd lease itself is alive
    b.release(other)
    again = a.try_acquire(["x"], "a", 30)  # the same owner, the same etcd lease, a new grant
    assert again is not None and again.session == lease.session
    with pytest.raises(LeaseLost, match="granted again"):
        a.renew(lease)
    a.renew(again)


def test_renew_of_a_revoked_lease_is_lease_lost_and_a_new_lease_follows(
    open_: Callable[..., EtcdBackend],
) -> None:
    """When the owner's etcd lease is gone, renew raises LeaseLost and the next acquire uses a new lease."""
    backend = open_()
    lease = backend.try_acquire(["a"], "o", 30)
    assert lease is not None
    backend._post("/kv/lease/revoke", {"ID": int(lease.session)})
    with pytest.raises(LeaseLost):
        backend.renew(lease)
    again = backend.try_acquire(["a"], "o", 30)
    assert again is not None and again.session != lease.session and again.tokens["a"] > lease.tokens["a"]


def seconds_to_wake(waiter: EtcdBackend, keys: list[str], releaser: EtcdBackend, lease: Lease) -> float:
    """How long ``waiter.wait(keys, 10)`` took while ``releaser`` released ``lease`` 0.3 s into it."""
    timer = threading.Timer(0.3, releaser.release, [lease])
    timer.start()
    start = time.monotonic()
    waiter.wait(keys, 10)
    timer.join()
    return time.monotonic() - start


def test_wait_is_woken_by_the_watch_not_by_polling(open_: Callable[..., EtcdBackend]) -> None:
    """With polling effectively off, a release wakes the waiter through the etcd watch."""
    a, b = open_(), open_(poll=30)
    lease = a.try_acquire(["w"], "a", 30)
    assert lease is not None
    assert b.try_acquire(["w"], "b", 30) is None
    assert seconds_to_wake(b, ["w"], a, lease) < 5
    assert b._watch is not None


def test_a_release_before_the_wait_is_not_missed(open_: Callable[..., EtcdBackend]) -> None:
    """A release between the failed acquire and the wait call makes the wait return at once."""
    a, b = open_(), open_(poll=30)
    lease = a.try_acquire(["w"], "a", 30)
    assert lease is not None
    assert b.try_acquire(["w"], "b", 30) is None
    a.release(lease)
    start = time.monotonic()
    b.wait(["w"], 10)
    assert time.monotonic() - start < 5


def test_wait_over_several_slices_misses_no_release(open_: Callable[..., EtcdBackend]) -> None:
    """A slice freed after its own failed acquire but before a later slice's failure still wakes the wait."""
    a, b = open_(), open_(poll=30)
    first, second = a.try_acquire(["s1"], "a", 30), a.try_acquire(["s2"], "a", 30)
    assert first is not None and second is not None
    assert b.try_acquire(["s1"], "b", 30) is None
    b.wait(["s2"], 0.01)  # a stream is open and has read past nothing yet
    a.release(first)
    assert b.try_acquire(["s2"], "b", 30) is None
    start = time.monotonic()
    b.wait(["s1", "s2"], 10)
    assert time.monotonic() - start < 5


def test_an_acquire_whose_reply_was_lost_is_undone_by_the_next_one(open_: Callable[..., EtcdBackend],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """If an acquire took effect but its reply was lost, the owner's next acquire frees those keys first."""
    backend = open_()
    real = backend.txns.txn

    def applied_then_lost(*args: Any) -> Any:
        real(*args)
        raise BackendUnavailable("reply lost")

    monkeypatch.setattr(backend.txns, "txn", applied_then_lost)
    with pytest.raises(BackendUnavailable):
        backend.try_acquire(["l1", "l2"], "o", 30)
    monkeypatch.setattr(backend.txns, "txn", real)
    assert all(h is not None for h in backend.inspect(["l1", "l2"]).values())
    assert backend.try_acquire(["other"], "o", 30) is not None
    assert backend.inspect(["l1", "l2"]) == {"l1": None, "l2": None}


def test_a_key_too_large_for_any_txn_is_config_error(default_open: Callable[..., EtcdBackend]) -> None:
    """A single key above the server's --max-request-bytes is a ConfigError naming that limit."""
    with pytest.raises(ConfigError, match="max-request-bytes"):
        default_open().try_acquire(["x" * 2_000_000], "o", 30)


def test_a_1000_key_slice_on_a_default_server_is_held_and_released_whole(
    default_open: Callable[..., EtcdBackend],
) -> None:
    """On a server with etcd's default --max-txn-ops (128) a 1,000-key slice is acquired and released whole."""
    a, b = default_open(), default_open()
    keys = [f"shard-{i:04d}" for i in range(1000)]
    lease = a.try_acquire(keys, "a", 30)
    assert lease is not None and set(lease.tokens) == set(keys) and all(t > 0 for t in lease.tokens.values())
    seen = b.inspect(keys)
    assert all(h is not None and h.owner == "a" and h.token == lease.tokens[k] for k, h in seen.items())
    assert b.try_acquire(keys[::-1], "b", 30) is None
    assert b.try_acquire(keys[-1:], "b", 30) is None
    a.release(lease)
    assert all(h is None for h in b.inspect(keys).values())
    again = b.try_acquire(keys, "b", 30)
    assert again is not None and all(again.tokens[k] > lease.tokens[k] for k in keys)


def test_contention_in_a_middle_chunk_rolls_back_every_chunk_taken(
    default_open: Callable[..., EtcdBackend],
) -> None:
    """A key held elsewhere in the fourth chunk makes the acquire fail holding nothing, and its tokens rise."""
    a, b, c = default_open(), default_open(), default_open()
    keys = [f"shard-{i:04d}" for i in range(1000)]
    first = a.try_acquire(keys, "a", 30)
    assert first is not None
    a.release(first)
    middle = b.try_acquire([keys[500]], "b", 30)
    assert middle is not None
    assert a.try_acquire(keys, "a", 30) is None
    seen = c.inspect(keys)
    holder = seen[keys[500]]
    assert {k for k, h in seen.items() if h is not None} == {keys[500]} and holder is not None and holder.owner == "b"
    start = time.monotonic()
    a.wait(keys[:1], 0.3)  # the roll-back's own deletes must not wake the loser's wait
    assert time.monotonic() - start >= 0.3
    b.release(middle)
    lease = a.try_acquire(keys, "a", 30)
    assert lease is not None and all(lease.tokens[k] > first.tokens[k] for k in keys)
    assert lease.tokens[keys[500]] > middle.tokens[keys[500]]


def test_a_lost_reply_in_a_middle_chunk_is_undone_by_the_next_acquire(
    default_open: Callable[..., EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the third chunk's reply is lost, the owner's next acquire first deletes every chunk it may hold."""
    backend = default_open(max_txn_ops=128)
    keys = [f"shard-{i:04d}" for i in range(1000)]
    real, calls = backend.txns.txn, [0]

    def third_reply_lost(*args: Any) -> Any:
        reply = real(*args)
        calls[0] += 1
        if calls[0] == 3:
            raise BackendUnavailable("reply lost")
        return reply

    assert backend.try_acquire(["warm"], "o", 30) is not None
    monkeypatch.setattr(backend.txns, "txn", third_reply_lost)
    with pytest.raises(BackendUnavailable):
        backend.try_acquire(keys, "o", 30)
    monkeypatch.setattr(backend.txns, "txn", real)
    seen = default_open().inspect(keys)
    assert {k for k, h in seen.items() if h is not None} == set(keys[:3 * 128])
    assert backend.try_acquire(["other"], "o", 30) is not None
    assert all(h is None for h in default_open().inspect(keys).values())


def test_a_lease_that_vanishes_between_chunks_gives_a_whole_acquire_on_a_new_lease(
    default_open: Callable[..., EtcdBackend], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the owner's lease is revoked after the first chunk, the acquire starts over on a new lease."""
    backend = default_open(max_txn_ops=128)
    keys = [f"shard-{i:04d}" for i in range(300)]
    first = backend.try_acquire(["warm"], "o", 30)
    assert first is not None
    real, calls = backend.txns.txn, [0]

    def revoke_after_the_first_chunk(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            backend._post("/kv/lease/revoke", {"ID": int(first.session)})
        return real(*args)

    monkeypatch.setattr(backend.txns, "txn", revoke_after_the_first_chunk)
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None and lease.session != first.session
    seen = default_open().inspect(keys)
    assert all(h is not None and h.token == lease.tokens[k] for k, h in seen.items())


def test_round_trips_on_a_default_server(default_open: Callable[..., EtcdBackend], round_trips: list[int]) -> None:
    """A slice that fits one txn costs one; a larger one one per chunk, after one refused txn per backend."""
    backend = default_open()
    assert backend.try_acquire(["warm"], "o", 30) is not None
    round_trips[0] = 0
    fits = backend.try_acquire([f"f{i}" for i in range(128)], "o", 30)
    assert fits is not None and round_trips[0] == 1
    round_trips[0] = 0
    keys = [f"k{i}" for i in range(1000)]
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None and round_trips[0] == 1 + math.ceil(1000 / 128)
    round_trips[0] = 0
    backend.release(lease)
    assert round_trips[0] == math.ceil(1000 / 128)
    told = default_open(max_txn_ops=100)
    assert told.try_acquire(["warm2"], "p", 30) is not None
    round_trips[0] = 0
    assert told.try_acquire(keys[:250], "p", 30) is not None and round_trips[0] == 3


def test_read_records_above_the_txn_limit(default_open: Callable[..., EtcdBackend],
                                          round_trips: list[int]) -> None:
    """read_records answers for more names than one txn may read; a few names cost one round trip."""
    backend = default_open()
    names = [f"r{i}" for i in range(300)]
    for name in names[::7]:
        assert backend.swap_record(name, None, f"v-{name}")
    values = default_open().read_records(names)
    assert values == {n: f"v-{n}" if i % 7 == 0 else None for i, n in enumerate(names)}
    round_trips[0] = 0
    assert backend.read_records(names[:5]) == {n: f"v-{n}" if n == "r0" else None for n in names[:5]}
    assert round_trips[0] == 1


def test_records_stay_out_of_lock_scans_and_watches(open_: Callable[..., EtcdBackend]) -> None:
    """Records sit under the prefix but outside the lock keys' range: a scan never reports them as locks."""
    backend = open_()
    keys = [f"s{i}" for i in range(SMALL + 36)]
    assert backend.swap_record(keys[0], None, "not a lock")
    assert all(h is None for h in backend.inspect(keys).values())
    lease = backend.try_acquire(keys, "o", 30)
    assert lease is not None and backend.read_records([keys[0]]) == {keys[0]: "not a lock"}
    backend.release(lease)
    assert backend.read_records([keys[0]]) == {keys[0]: "not a lock"}


def test_inspect_of_100000_keys(open_: Callable[..., EtcdBackend]) -> None:
    """inspect answers for 100,000 keys (half held by two owners) in a few round trips."""
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


def test_a_big_inspect_scans_side_by_side_and_falls_back_to_paging(open_: Callable[..., EtcdBackend],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Above 64 keys inspect scans the prefix in sub-ranges asked together, keys only, and reads one value
    per grant; when asking together fails it pages through the prefix instead, with the same answer. Keys
    taken in one txn share one Holder."""
    backend = open_(page=7)  # several pages per sub-range
    keys = [f"k{i:03d}" for i in range(300)]
    first = backend.try_acquire(keys[:100], "o1", 60)
    second = backend.try_acquire(keys[150:200], "o2", 60)
    assert first is not None and second is not None
    viewer = open_(page=7)
    together = viewer.gateway.post_together
    rounds: list[int] = []
    monkeypatch.setattr(viewer.gateway, "post_together", lambda path, bodies: (rounds.append(len(bodies)),
                                                                               together(path, bodies))[1])
    seen = viewer.inspect(keys)
    assert rounds and max(rounds) > 1  # sub-ranges asked side by side, page after page
    assert [k for k in keys if seen[k] is not None] == keys[:100] + keys[150:200]
    assert len({id(seen[k]) for k in keys[:100]}) == 1 and seen[keys[0]].token == first.tokens[keys[0]]  # type: ignore[union-attr]

    def refused(path: str, bodies: list[Any]) -> Any:
        raise BackendUnavailable("no second connection")

    monkeypatch.setattr(viewer.gateway, "post_together", refused)
    paged = viewer.inspect(keys)  # expires_in may have ticked: compare who and which grant
    grants = [{k: (h.owner, h.token) for k, h in answer.items() if h} for answer in (paged, seen)]
    assert grants[0] == grants[1]


def _quiet(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BackendUnavailable:
        return None


def test_a_look_reads_holders_in_one_round_trip_without_time_left(open_: Callable[..., EtcdBackend],
                                                                   round_trips: list[int]) -> None:
    """``peek`` (the pool's look) says who holds each key as ``inspect`` does, in one txn, and asks no
    holder's time left (a LeaseTimeToLive per holder made a look of N members N round trips more)."""
    a, b, c = open_(), open_(), open_()
    held = {"p1": a.try_acquire(["p1", "p2"], "a", 30), "p3": b.try_acquire(["p3"], "b", 30)}
    assert all(lease is not None for lease in held.values())
    keys = ["p1", "p2", "p3", "free"]
    full = c.inspect(keys)
    round_trips[0] = 0
    seen = c.peek(keys)
    assert round_trips[0] == 1
    assert {k: (h.owner, h.token) if h else None for k, h in seen.items()} == {
        k: (h.owner, h.token) if h else None for k, h in full.items()}
    assert seen["free"] is None and all(h.expires_in is None for h in seen.values() if h is not None)


def test_any_release_wakes_a_waiter_and_a_roll_back_does_not(open_: Callable[..., EtcdBackend]) -> None:
    """Waiters watch one news key that every release puts, so a release is one event for each waiter
    whatever its size (a watch of the lock keys sent one per deleted key); as on Redis, any release
    wakes them, and an acquire's roll-back does not."""
    a, b = open_(), open_(poll=30)
    big = a.try_acquire([f"big-{i}" for i in range(500)], "a", 30)
    mine = a.try_acquire(["x"], "a", 30)
    assert big is not None and mine is not None
    assert b.try_acquire(["x"], "b", 30) is None
    b.wait(["x"], 0.01)  # the watch is open from the failed acquire on
    chunked = open_(max_txn_ops=1)  # one key per txn
    assert chunked.try_acquire(["y", "big-0"], "c", 30) is None  # took "y", then rolled it back
    assert chunked.inspect(["y"]) == {"y": None}
    start = time.monotonic()
    b.wait(["x"], 0.5)
    assert time.monotonic() - start >= 0.45  # nothing was released yet
    assert seconds_to_wake(b, ["x"], a, big) < 5
    assert b._watch is not None
    assert b._watch.read(0.3) == []  # the 500 deleted keys were one event


def test_a_look_reads_the_member_keys_with_one_range(open_: Callable[..., EtcdBackend],
                                                      round_trips: list[int]) -> None:
    """``peek_under`` answers the keys under a prefix (the pool's member slots) from one range read and
    the others by one txn at that range's revision: two round trips however many slots are asked."""
    a, b = open_(), open_()
    for slot in (0, 1, 5):
        assert a.try_acquire([f"m:{slot}"], f"member-{slot}", 30) is not None
    assert a.try_acquire(["m-other"], "x", 30) is not None  # outside the prefix: never in the range
    assert a.try_acquire(["s1"], "member-1", 30) is not None
    keys = [f"m:{slot}" for slot in range(200)] + ["s1", "s2", "m-other"]
    round_trips[0] = 0
    seen = b.peek_under(keys, "m:")
    assert round_trips[0] == 2
    assert seen == b.peek(keys)
    assert {k for k, h in seen.items() if h is not None} == {"m:0", "m:1", "m:5", "s1", "m-other"}
