"""The restart grace of the server backends: a server restored from an older snapshot grants nothing
until every lease it may have forgotten has passed its holder's deadline (docs/faults.md, restore-backend)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.errors import BackendUnavailable, LeaseLost
from shardpreempt.model import Lease
from shardpreempt.testing import wait_until
from shardpreempt.testing.servers import EphemeralServer, ServerUnavailable, server_for, unique
from shardpreempt.testing.servers.redis import RedisServer
from shardpreempt.testing.skips import missing
from shardpreempt.typing import Backend

TTL = 30.0
GRACE = 1.5  # the short grace of the test's second client


@pytest.fixture(params=["redis", "postgresql", "mysql"])
def own_server(request: pytest.FixtureRequest) -> Iterator[EphemeralServer]:
    """A server of the test's own, which it may stop, snapshot and restore."""
    try:
        srv = server_for(request.param)
    except ServerUnavailable as exc:
        missing(f"{request.param}: {exc}")
    if isinstance(srv, RedisServer):
        srv.persist = True  # an RDB file at every clean stop, as the snapshots need
    srv.start()
    yield srv
    srv.close()


def _with_grace(url: str, seconds: float | None) -> str:
    """The test server's URL (``restart_grace=0``) with another grace, or the default (the ttl asked)."""
    if seconds is None:
        return url.replace("&restart_grace=0", "").replace("?restart_grace=0&", "?").replace("?restart_grace=0", "")
    return url.replace("restart_grace=0", f"restart_grace={seconds}")


def _renewal_refused(backend: Backend, lease: Lease) -> bool:
    """Whether renewing ``lease`` is refused (a broken connection is retried, not a refusal)."""
    try:
        backend.renew(lease)
    except LeaseLost:
        return True
    except BackendUnavailable:
        return False
    raise AssertionError("the restored server renewed a lease it never granted")


def test_a_restored_server_grants_nothing_until_forgotten_leases_have_expired(own_server: EphemeralServer) -> None:
    """A holds a shard; the server comes back, fast, from a snapshot taken before A's grant: nobody else
    gets the shard while A may still be working (the grace defaults to the ttl asked), A's renewal fails,
    and once the grace is over the shard is granted again with a token above A's."""
    url = own_server.url(unique())
    first = open_backend(_with_grace(url, GRACE))  # the namespace, older than the grace, is in the snapshot
    lease = wait_until(lambda: first.try_acquire(["other"], "setup", TTL), 15, interval=0.05,
                       message="the namespace's first grant")
    first.release(lease)
    first.close()
    own_server.stop()
    snapshot = own_server.snapshot("before-a")
    own_server.start()

    holder = open_backend(url)
    a = holder.try_acquire(["s"], "a", TTL)
    assert a is not None
    own_server.stop()
    own_server.restore(snapshot)  # A's grant is lost; A does not know and works on until its deadline
    own_server.start()

    default, short = open_backend(_with_grace(url, None)), open_backend(_with_grace(url, GRACE))
    try:
        assert default.try_acquire(["s"], "b", TTL) is None, "granted while A is inside its deadline"
        assert short.try_acquire(["s"], "c", TTL) is None, "granted at once after the restore"
        wait_until(lambda: _renewal_refused(holder, a), 10, interval=0.05, message="A's renewal refused")
        c = wait_until(lambda: short.try_acquire(["s"], "c", TTL), 15, interval=0.05,
                       message="granted once the grace is over")
        assert c.tokens["s"] > a.tokens["s"]
        assert default.try_acquire(["s"], "b", TTL) is None  # C holds it now
    finally:
        for backend in (holder, default, short):
            backend.close()


def test_a_client_refused_by_a_restored_zookeeper_gets_a_new_session() -> None:
    """ZooKeeper restored from an older snapshot refuses every client that has seen a later zxid, and
    nobody can write to move it on: the owner's client must forget that zxid once its session timeout
    has passed, get "session expired", and be replaced (before the fix it stayed refused for ever)."""
    try:
        srv = server_for("zookeeper")
    except ServerUnavailable as exc:
        missing(f"zookeeper: {exc}")
    srv.start()
    try:
        url = srv.url(unique())
        setup = open_backend(url)
        setup.release(wait_until(lambda: setup.try_acquire(["other"], "setup", 2.0), 15, interval=0.05,
                                 message="the namespace's first grant"))
        setup.close()
        srv.stop()
        snapshot = srv.snapshot("before-a")
        srv.start()
        backend = open_backend(url)
        try:
            for _ in range(20):  # the client sees zxids the snapshot never had
                backend.release(wait_until(lambda: backend.try_acquire(["s"], "a", 2.0), 15, interval=0.05,
                                           message="a grant before the restore"))
            srv.stop()
            srv.restore(snapshot)
            srv.start()

            def granted() -> Lease | None:
                try:
                    return backend.try_acquire(["t"], "a", 2.0)
                except BackendUnavailable:
                    return None

            wait_until(granted, 30, interval=0.2, message="the refused client replaced")
        finally:
            backend.close()
    finally:
        srv.close()
