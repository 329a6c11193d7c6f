"""The backend contract suite (the rules of ``shardpreempt.typing.Backend``; docs/testing.md), public so
third-party backends can run it too.

Use it from pytest: subclass :class:`BackendContract` in a test module and provide a fixture
``backend_url`` that returns a URL of a fresh, empty namespace on a running server, and optionally
``backend_server`` (an :class:`~shardpreempt.testing.servers.EphemeralServer`, or ``None``) for the
restart test. The plugin :mod:`shardpreempt.testing.fixtures` provides both for every built-in kind
(docs/testing.md). ``ttl`` (class attribute) is the short lease time the expiry tests use; ``opener``
names the function that opens a backend from its URL (``"module:function"``, imported in child
processes too), for a backend that ``open_backend`` does not know.

This module imports without pytest (:func:`new_owner`, :func:`hammer` and :class:`Opener` work anywhere);
running the suite needs it: ``pip install 'shardpreempt[test]'``.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from ..errors import LeaseLost, LossReason
from ..model import Lease
from ..typing import Backend
from .history import check
from .wait import wait_until

NEEDS_PYTEST = "running the backend contract suite needs pytest: pip install 'shardpreempt[test]'"


class _WithoutPytest:
    """Stands in for pytest when it is not installed: the class body below still runs (``fixture`` leaves the
    function as it is); anything a test would call raises an ImportError naming the extra."""

    @staticmethod
    def fixture(function: Callable[..., Any]) -> Callable[..., Any]:
        return function

    def __getattr__(self, name: str) -> Any:
        raise ImportError(f"pytest.{name}: {NEEDS_PYTEST}")


try:
    import pytest
except ModuleNotFoundError as exc:  # only pytest's own absence; a broken install still raises
    if exc.name not in ("pytest", "_pytest"):
        raise
    pytest = _WithoutPytest()  # type: ignore[assignment]

#: The default ``opener``: the registry of built-in schemes.
OPEN_BACKEND = "shardpreempt.backends:open_backend"


def load_opener(path: str) -> Callable[..., Backend]:
    """The function ``"module:function"`` names; it is called as ``function(url, **options)``."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"an opener is named 'module:function', got {path!r}")
    function: Callable[..., Backend] = getattr(importlib.import_module(module), name)
    return function


class Opener:
    """Opens backends on one URL, a new instance (new connections) per call, and closes them all at :meth:`close`.

    ``opener(**options)`` opens ``url`` with those options, ``opener(other_url)`` another URL.
    """

    def __init__(self, url: str, opener: str | Callable[..., Backend] = OPEN_BACKEND) -> None:
        self.url = url
        self._open = load_opener(opener) if isinstance(opener, str) else opener
        self.opened: list[Backend] = []

    def __call__(self, url: str | None = None, **options: Any) -> Backend:
        backend = self._open(self.url if url is None else url, **options)
        self.opened.append(backend)
        return backend

    def close(self) -> None:
        """Close every backend opened so far (all of them, even when one raises; the first error is raised)."""
        error: BaseException | None = None
        while self.opened:
            try:
                self.opened.pop(0).close()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def new_owner(tag: str = "t") -> str:
    """A unique owner id."""
    return f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def hammer(url: str, keys: list[str], seconds: float, ttl: float, seed: int,
           opener: str = OPEN_BACKEND) -> list[dict[str, Any]]:
    """Acquire random overlapping subsets of ``keys`` for ``seconds``; return acquired/released events."""
    rng = random.Random(seed)
    backend = load_opener(opener)(url)
    owner = new_owner(f"h{seed}")
    events: list[dict[str, Any]] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            subset = rng.sample(keys, rng.randint(1, max(1, len(keys) // 2)))
            lease = backend.try_acquire(subset, owner, ttl)
            if lease is None:
                backend.wait(subset, 0.002)
                continue
            t = time.time()
            events += [{"t": t, "event": "acquired", "shard": k, "owner": owner, "token": lease.tokens[k]}
                       for k in lease.keys]
            time.sleep(rng.uniform(0, 0.003))  # hold a little, so a broken backend shows an overlap
            t = time.time()
            events += [{"t": t, "event": "released", "shard": k, "owner": owner} for k in lease.keys]
            backend.release(lease)
    finally:
        backend.close()
    return events


#: argv: opener ("module:function"), url, owner, ttl, keys...
HOLDER_SCRIPT = """
import importlib, sys, time
module, _, name = sys.argv[1].partition(":")
b = getattr(importlib.import_module(module), name)(sys.argv[2])
ttl = float(sys.argv[4])
lease = b.try_acquire(sys.argv[5:], sys.argv[3], ttl)
print("token", lease.tokens[sys.argv[5]] if lease else -1, flush=True)
while True:
    time.sleep(ttl / 4)
    b.renew(lease)
"""


class BackendContract:
    """The behaviour every backend must show; each test states one rule."""

    ttl = 1.0
    processes = 4
    hammer_seconds = 2.0
    #: ``"module:function"`` that opens a backend from its URL (children import it too)
    opener = OPEN_BACKEND

    @pytest.fixture
    def open_(self, backend_url: str) -> Iterator[Callable[[], Backend]]:
        """Open new backend instances (new connections) on the test's namespace."""
        with Opener(backend_url, self.opener) as opener:
            yield opener

    def test_acquire_gives_tokens_and_inspect_reports_holder(self, open_: Callable[[], Backend]) -> None:
        """An acquire holds every key with a positive token, and inspect names the owner."""
        b = open_()
        owner = new_owner()
        lease = b.try_acquire(["a", "b", "c"], owner, 30)
        assert lease is not None
        assert set(lease.tokens) == {"a", "b", "c"} and all(t > 0 for t in lease.tokens.values())
        seen = open_().inspect(["a", "b", "c", "free"])
        assert seen["free"] is None
        for key in "abc":
            holder = seen[key]
            assert holder is not None and holder.owner == owner and holder.token == lease.tokens[key]

    def test_all_or_nothing_under_contention(self, open_: Callable[[], Backend]) -> None:
        """When one key of a slice is held elsewhere, the acquire fails and holds nothing."""
        a, b = open_(), open_()
        assert a.try_acquire(["k2"], new_owner("a"), 30) is not None
        assert b.try_acquire(["k1", "k2", "k3"], new_owner("b"), 30) is None
        seen = b.inspect(["k1", "k3"])
        assert seen == {"k1": None, "k3": None}
        assert b.try_acquire(["k1", "k3"], new_owner("b"), 30) is not None

    def test_release_is_idempotent_and_never_frees_another_holder(self, open_: Callable[[], Backend]) -> None:
        """Releasing twice is harmless and a stale release leaves the new holder's key alone."""
        a, b = open_(), open_()
        lease = a.try_acquire(["x", "y"], new_owner("a"), 30)
        assert lease is not None
        a.release(lease)
        a.release(lease)
        other = b.try_acquire(["x"], new_owner("b"), 30)
        assert other is not None
        a.release(lease)
        holder = b.inspect(["x"])["x"]
        assert holder is not None and holder.owner == other.owner

    def test_release_by_keys_and_session_alone(self, open_: Callable[[], Backend]) -> None:
        """A lease rebuilt from its keys, owner and session (no tokens) releases what that session holds:
        how a holder frees keys granted by an acquire whose reply it never got."""
        a = open_()
        owner = new_owner()
        lease = a.try_acquire(["o1", "o2"], owner, 30)
        assert lease is not None
        a.release(Lease(lease.keys, owner, {}, lease.ttl, session=lease.session))
        assert open_().inspect(["o1", "o2"]) == {"o1": None, "o2": None}
        assert open_().try_acquire(["o1", "o2"], new_owner("b"), 30) is not None

    def test_records_compare_and_set(self, open_: Callable[[], Backend]) -> None:
        """A record is set only from the expected value, read back by another client, and deleted."""
        a, b = open_(), open_()
        assert a.read_records(["layout", "other"]) == {"layout": None, "other": None}
        assert a.swap_record("layout", None, "v1") is True
        assert b.swap_record("layout", None, "v2") is False  # already there
        assert b.read_records(["layout"]) == {"layout": "v1"}
        assert b.swap_record("layout", "v0", "v2") is False  # not the expected value
        assert b.swap_record("layout", "v1", "v2 ü " + "x" * 4000) is True
        assert a.read_records(["layout"]) == {"layout": "v2 ü " + "x" * 4000}
        assert a.swap_record("layout", "v2 ü " + "x" * 4000, None) is True
        assert b.read_records(["layout"]) == {"layout": None}
        assert b.swap_record("layout", None, "") is True  # an empty string is a value, not absence
        assert a.read_records(["layout"]) == {"layout": ""}

    def test_records_never_collide_with_lock_keys(self, open_: Callable[[], Backend]) -> None:
        """A record and a lock key of the same name are independent."""
        a = open_()
        assert a.swap_record("same", None, "value") is True
        lease = a.try_acquire(["same"], new_owner(), 30)
        assert lease is not None
        a.release(lease)
        assert a.read_records(["same"]) == {"same": "value"}

    def test_records_swap_is_atomic_under_contention(self, open_: Callable[[], Backend]) -> None:
        """Many clients incrementing a counter by compare-and-set never lose an increment."""
        clients = [open_() for _ in range(4)]
        clients[0].swap_record("counter", None, "0")

        def bump(client: Backend) -> int:
            done = 0
            while done < 10:
                current = client.read_records(["counter"])["counter"]
                assert current is not None
                if client.swap_record("counter", current, str(int(current) + 1)):
                    done += 1
            return done

        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            assert sum(pool.map(bump, clients)) == 40
        assert clients[0].read_records(["counter"]) == {"counter": "40"}

    def test_tokens_strictly_increase_across_holders(self, open_: Callable[[], Backend]) -> None:
        """Each new holder of a key gets a higher token than every earlier one."""
        backends = [open_(), open_()]
        last = 0
        for i in range(6):
            lease = backends[i % 2].try_acquire(["tok"], new_owner(str(i)), 30)
            assert lease is not None
            assert lease.tokens["tok"] > last
            last = lease.tokens["tok"]
            backends[i % 2].release(lease)

    def test_wait_returns_when_a_key_is_released(self, open_: Callable[[], Backend]) -> None:
        """A waiting worker wakes when the holder releases, well before its timeout."""
        a, b = open_(), open_()
        lease = a.try_acquire(["w"], new_owner("a"), 30)
        assert lease is not None
        woke: list[float] = []

        def waiter() -> None:
            start = time.monotonic()
            while b.try_acquire(["w"], new_owner("b"), 30) is None:
                b.wait(["w"], 5.0)
                if time.monotonic() - start > 20:
                    return
            woke.append(time.monotonic() - start)

        thread = threading.Thread(target=waiter)
        thread.start()
        a.release(lease)
        thread.join(30)
        assert woke and woke[0] < 5.0

    def test_inspect_many_keys(self, open_: Callable[[], Backend]) -> None:
        """inspect answers for thousands of keys, held and free, correctly."""
        b = open_()
        keys = [f"shard-{i}" for i in range(3000)]
        lease = b.try_acquire(keys[:1000], new_owner(), 60)
        assert lease is not None
        seen = open_().inspect(keys)
        assert sum(h is not None for h in seen.values()) == 1000
        assert all(seen[k] is not None and seen[k].token == lease.tokens[k] for k in keys[:1000])  # type: ignore[union-attr]

    def test_renew_keeps_the_lease_past_its_ttl(self, open_: Callable[[], Backend]) -> None:
        """A holder that renews keeps its keys beyond the ttl."""
        a, b = open_(), open_()
        lease = a.try_acquire(["r"], new_owner("a"), self.ttl)
        assert lease is not None
        end = time.monotonic() + self.ttl * 2.5
        while time.monotonic() < end:
            lease = a.renew(lease)
            assert b.try_acquire(["r"], new_owner("b"), self.ttl) is None
            time.sleep(self.ttl / 5)

    def test_expiry_hands_the_key_to_the_next_owner_with_a_higher_token(
        self, open_: Callable[[], Backend]
    ) -> None:
        """A lease that is not renewed expires; the next owner gets the key with a higher token."""
        a, b = open_(), open_()
        if not a.capabilities.server_expiry:
            pytest.skip("backend has no server-side expiry (holds end with the process)")
        lease = a.try_acquire(["e1", "e2"], new_owner("a"), self.ttl)
        assert lease is not None
        taken = wait_until(lambda: b.try_acquire(["e1", "e2"], new_owner("b"), 30), self.ttl * 5 + 5,
                           message="expired key taken over")
        assert taken is not None
        assert all(taken.tokens[k] > lease.tokens[k] for k in ("e1", "e2"))
        with pytest.raises(LeaseLost):
            a.renew(lease)
        a.release(lease)  # stale: must not free b's keys
        assert all(h is not None and h.owner == taken.owner for h in b.inspect(["e1", "e2"]).values())

    def test_renew_after_expiry_raises_lease_lost(self, open_: Callable[[], Backend]) -> None:
        """Renewing a lease whose ttl ran out raises LeaseLost, even if nobody took the keys."""
        a = open_()
        if not a.capabilities.server_expiry:
            pytest.skip("backend has no server-side expiry")
        lease = a.try_acquire(["l"], new_owner("a"), self.ttl)
        assert lease is not None
        wait_until(lambda: open_().inspect(["l"])["l"] is None, self.ttl * 5 + 5, interval=0.05,
                   message="lease expiry")
        with pytest.raises(LeaseLost):
            a.renew(lease)

    def test_renew_of_a_lease_whose_keys_another_owner_took_raises_lease_lost(
        self, open_: Callable[[], Backend]
    ) -> None:
        """A stale lease object whose keys another owner holds now cannot be renewed, although its owner's
        session is alive (it holds another key): renew checks the lease's keys, not only the session."""
        a, b = open_(), open_()
        owner = new_owner("a")
        anchor = a.try_acquire(["anchor"], owner, 30)  # keeps the owner's session alive throughout
        lease = a.try_acquire(["s1", "s2", "s3"], owner, 30)
        assert anchor is not None and lease is not None
        a.release(lease)
        taken = b.try_acquire(["s1", "s2", "s3"], new_owner("b"), 30)
        assert taken is not None
        with pytest.raises(LeaseLost) as lost:
            a.renew(lease)
        assert lost.value.reason in (LossReason.SUPERSEDED, LossReason.RELEASED), lost.value.detail
        assert lost.value.keys == lease.keys
        with pytest.raises(LeaseLost):  # and again: the failed renewal changed nothing
            a.renew(lease)
        a.renew(anchor)  # the session itself lives on, for the owner's other leases
        a.renew(Lease((), owner, {}, anchor.ttl, session=anchor.session))  # no keys: the session alone
        b.renew(taken)
        seen = open_().inspect(["s1", "s2", "s3", "anchor"])
        assert [h.owner if h else None for h in seen.values()] == [taken.owner] * 3 + [owner], seen

    def test_renew_of_a_stale_lease_raises_after_its_owner_took_the_keys_again(
        self, open_: Callable[[], Backend]
    ) -> None:
        """A released lease object stays dead when the same owner (and session) is granted its keys again:
        the new grant renews, the stale object raises LeaseLost."""
        a = open_()
        owner = new_owner("a")
        anchor = a.try_acquire(["anchor2"], owner, 30)
        old = a.try_acquire(["t1", "t2"], owner, 30)
        assert anchor is not None and old is not None
        a.release(old)
        again = a.try_acquire(["t1", "t2"], owner, 30)
        assert again is not None and again.tokens["t1"] > old.tokens["t1"]
        with pytest.raises(LeaseLost) as lost:
            a.renew(old)
        assert lost.value.reason in (LossReason.SUPERSEDED, LossReason.RELEASED), lost.value.detail
        a.renew(again)
        a.renew(anchor)

    def test_killed_holder_frees_its_keys(self, backend_url: str, open_: Callable[[], Backend]) -> None:
        """SIGKILL of a holder process frees its keys (at once, or after the ttl) for a higher token."""
        if backend_url.startswith("memory:"):
            pytest.skip("memory:// is in-process")
        ttl = self.ttl
        proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, self.opener, backend_url, new_owner("k"),
                                 str(ttl), "d1", "d2"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line and line[0] == "token" and int(line[1]) > 0, line
            b = open_()
            assert b.try_acquire(["d1"], new_owner("b"), 30) is None
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        taken = wait_until(lambda: b.try_acquire(["d1", "d2"], new_owner("b"), 30), ttl * 5 + 5,
                           message="killed holder's keys taken over")
        assert taken is not None
        assert taken.tokens["d1"] > int(line[1])

    def test_exclusivity_between_processes(self, backend_url: str) -> None:
        """Processes racing for overlapping key sets never hold one key at once; tokens only rise."""
        keys = [f"p{i}" for i in range(6)]
        if backend_url.startswith("memory:"):
            pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(self.processes)
        else:
            pool = concurrent.futures.ProcessPoolExecutor(self.processes,
                                                          mp_context=multiprocessing.get_context("spawn"))
        with pool:
            futures = [pool.submit(hammer, backend_url, keys, self.hammer_seconds, 30.0, seed, self.opener)
                       for seed in range(self.processes)]
            events = [e for f in futures for e in f.result()]
        report = check(events)
        acquired = sum(e["event"] == "acquired" for e in events)
        assert acquired >= self.processes, "the race produced too few acquisitions to mean anything"
        assert report.ok, report.violations[:5]

    def test_tokens_increase_across_a_server_restart(self, open_: Callable[[], Backend],
                                                     backend_server: Any) -> None:
        """After the server restarts (losing volatile state), tokens still only go up."""
        if backend_server is None:
            pytest.skip("no restartable server for this backend")
        a = open_()
        lease = a.try_acquire(["rs"], new_owner("a"), 30)
        assert lease is not None
        a.release(lease)
        backend_server.restart(lose_data=True)
        b = open_()
        again = wait_until(lambda: _try(b, ["rs"]), 30, interval=0.1, message="acquire after restart")
        assert again.tokens["rs"] > lease.tokens["rs"]


def _try(backend: Backend, keys: list[str]) -> Any:
    from ..errors import BackendUnavailable

    try:
        return backend.try_acquire(keys, new_owner("r"), 30)
    except BackendUnavailable:
        return None


__all__ = ["OPEN_BACKEND", "BackendContract", "Opener", "hammer", "load_opener", "new_owner"]
