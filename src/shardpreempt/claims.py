"""The claimer: acquire a slice, keep its lease alive, report loss; the only place with a timer.

A :class:`Claim` renews its lease every ``ttl/3`` in a background thread (only for backends whose
leases expire on the server). Its *fence time* is the lease's local deadline minus a safety margin:
once past it without a successful renewal the claim is lost — even if the server is unreachable and
might still think we hold it — so the holder stops before the server can give the shards away. A
second thread does nothing but wait for the fence time, so a renewal stuck in a blocked network call
(a paused or partitioned server) cannot delay the fence.
Loss is reported as a value (``claim.lost``; ``claim.reason``, a :class:`~shardpreempt.errors.LossReason`,
and ``claim.detail``, the words) and through callbacks.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from .backends import open_backend
from .errors import BackendError, ClaimTimeout, LeaseLost, LossReason
from .model import Lease, Shard, Slice
from .slicing import make_slices
from .typing import SYSTEM_CLOCK, Backend, Clock

log_renew = logging.getLogger("shardpreempt.claims.renew")
log_acquire = logging.getLogger("shardpreempt.claims.acquire")

#: The detail of a self-fenced loss, as the events show it.
SELF_FENCED = "no renewal before the local deadline (self-fenced)"


def new_owner_id() -> str:
    """A unique owner id: host, pid and a random part (one per worker incarnation)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def safety_margin(ttl: float) -> float:
    """How long before the lease's deadline a holder stops: 20 % of the ttl."""
    return ttl * 0.2


class Claim:
    """A held lease on one slice, kept alive until released or lost."""

    def __init__(self, backend: Backend, slice_: Slice, lease: Lease, *, clock: Clock = SYSTEM_CLOCK,
                 margin: float | None = None) -> None:
        self.backend = backend
        self.slice = slice_
        self.lease = lease
        self.clock = clock
        self.margin = safety_margin(lease.ttl) if margin is None else margin
        self.lost = threading.Event()
        self.reason: LossReason | None = None
        self.detail: str | None = None
        self._released = threading.Event()
        self._callbacks: list[Callable[[Claim], None]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        now = clock.monotonic()
        # The first renewal comes a third of the ttl in, or halfway to the fence time if the grant
        # arrived late (a slow acquire leaves less than the ttl): never after the fence.
        self._next_renew = now + max(0.0, min(lease.ttl / 3, (self.fence_at - now) / 2))

    @property
    def fence_at(self) -> float:
        """Monotonic time after which the claim counts as lost unless renewed."""
        return self.lease.deadline - self.margin

    def time_left(self) -> float:
        """Seconds until the fence time (``inf`` for backends whose holds end with the process)."""
        return self.fence_at - self.clock.monotonic()

    def on_lost(self, callback: Callable[[Claim], None]) -> None:
        """Call ``callback(claim)`` once when the claim is lost (at once if it already is)."""
        with self._lock:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the claim is lost."""
        if self.lost.is_set():
            raise lease_lost(self)

    def covers(self, lease: Lease) -> bool:
        """Whether ``lease`` lives in this claim's liveness session, so renewing this claim keeps it.

        Then the claim's deadline moves to the later of the two (the acquire extended the session
        too). ``False`` means the session was replaced (it had expired): ``lease`` cannot be kept
        alive by this claim. Backends without server expiry cover everything.
        """
        if not self.backend.capabilities.server_expiry:
            return True
        if lease.session != self.lease.session:
            return False
        with self._lock:
            if lease.deadline > self.lease.deadline:
                self.lease = self.lease.with_deadline(lease.deadline)
        return True

    def lose(self, reason: LossReason, detail: str) -> None:
        """Declare the claim lost now (its holder found out some other way)."""
        self._lose(reason, detail)

    def _lose(self, reason: LossReason, detail: str) -> None:
        with self._lock:
            if self.lost.is_set() or self._released.is_set():
                return
            self.reason, self.detail = reason, detail
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
        log_renew.warning("lease on slice %s lost: %s", self.slice.id, detail)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log_renew.exception("lost-lease callback failed")

    def tick(self) -> float:
        """Renew if due, fence if past the deadline; return seconds until the next tick is due."""
        if self.lost.is_set() or self._released.is_set():
            return float("inf")
        now = self.clock.monotonic()
        if now >= self.fence_at:
            self._lose(LossReason.SELF_FENCED, SELF_FENCED)
            return float("inf")
        if now >= self._next_renew:
            try:
                renewed = self.backend.renew(self.lease)
                with self._lock:
                    if renewed.deadline > self.lease.deadline:
                        self.lease = renewed
                self._next_renew = self.clock.monotonic() + self.lease.ttl / 3
            except LeaseLost as exc:
                self._lose(exc.reason, f"backend says lost: {exc.detail}")
                return float("inf")
            except BackendError as exc:
                retry = max(0.02, min(self.lease.ttl / 10, (self.fence_at - now) / 3))
                log_renew.warning("renewal of slice %s failed (%s); retrying in %.2f s", self.slice.id, exc, retry)
                self._next_renew = now + retry
        return max(0.0, min(self._next_renew, self.fence_at) - self.clock.monotonic())

    def start(self) -> None:
        """Start the renewal and fence threads (not needed for backends without server expiry)."""
        if not self.backend.capabilities.server_expiry or self._threads:
            return
        self._threads = [threading.Thread(target=self._renew_loop, name=f"renew-{self.slice.id}", daemon=True),
                         threading.Thread(target=self._fence_loop, name=f"fence-{self.slice.id}", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _renew_loop(self) -> None:
        while not self._released.is_set() and not self.lost.is_set():
            self._released.wait(min(self.tick(), 3600.0))  # tick() is inf once lost

    def _fence_loop(self) -> None:
        while not self._released.is_set() and not self.lost.is_set():
            left = self.time_left()  # re-read: a renewal moves the fence time on
            if left <= 0:
                self._lose(LossReason.SELF_FENCED, SELF_FENCED)
                return
            self._released.wait(left)

    def release(self) -> None:
        """Stop renewing and free the slice at once (idempotent; harmless after loss)."""
        self._released.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(self.lease.ttl)  # a renewal blocked on a dead server must not hold us up
        try:
            self.backend.release(self.lease)
        except BackendError as exc:  # the server's expiry frees it anyway
            log_renew.warning("release of slice %s failed: %s", self.slice.id, exc)


class Claimer:
    """Acquires slices for one owner: its preferred slice first, then the others in order."""

    def __init__(self, backend: Backend, ttl: float, *, owner: str | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.backend = backend
        self.ttl = ttl
        self.owner = owner or new_owner_id()
        self.clock = clock

    def try_slices(self, slices: Sequence[Slice], start: int = 0) -> Claim | None:
        """Try every slice once, starting at position ``start``; the first fully acquired wins."""
        n = len(slices)
        for i in range(n):
            slice_ = slices[(start + i) % n]
            try:
                lease = self.backend.try_acquire(slice_.keys, self.owner, self.ttl)
            except BackendError as exc:
                log_acquire.warning("acquire of slice %s failed: %s", slice_.id, exc)
                return None
            if lease is not None:
                claim = Claim(self.backend, slice_, lease, clock=self.clock)
                if claim.time_left() <= 0:  # granted after a stall longer than the ttl: born dead
                    log_acquire.warning("lease on slice %s arrived past its deadline; giving it back", slice_.id)
                    claim.release()
                    continue
                claim.start()
                return claim
        return None

    def wait(self, slices: Sequence[Slice], timeout: float) -> None:
        """Block until a slice may have been freed (the backend's notification) or ``timeout``."""
        keys = [k for s in slices for k in s.keys[:1]]
        try:
            self.backend.wait(keys, timeout)
        except BackendError as exc:
            log_acquire.warning("waiting for a release failed: %s", exc)
            self.clock.sleep(min(timeout, 0.5) * random.uniform(0.5, 1.0))

    def renew_owner(self) -> None:
        """Take a fresh owner id (after a loss, so nothing of the old session can revive)."""
        self.owner = new_owner_id()


class Held(Protocol):
    """What an :class:`Ownership` reads: a held slice, its lease, and the lease's state."""

    slice: Slice
    lease: Lease
    lost: threading.Event
    reason: LossReason | None
    detail: str | None

    def time_left(self) -> float:
        """Seconds before the holder must stop unless the lease is renewed."""
        ...


class Ownership:
    """What a job gets: the slice, its shards with settings, tokens, and the lease's state."""

    def __init__(self, held: Held, *, worker: int = 0, stopping: threading.Event | None = None) -> None:
        self._held = held
        self.worker = worker
        self.stopping = stopping or threading.Event()

    @property
    def slice(self) -> Slice:
        """The slice held."""
        return self._held.slice

    @property
    def shards(self) -> tuple[Shard, ...]:
        """The slice's shards, settings included."""
        return self._held.slice.shards

    @property
    def tokens(self) -> dict[str, int]:
        """Identity -> fencing token."""
        return dict(self._held.lease.tokens)

    @property
    def owner(self) -> str:
        """This holder's owner id."""
        return self._held.lease.owner

    @property
    def lost(self) -> threading.Event:
        """Set when the lease is lost."""
        return self._held.lost

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLost` if the lease is lost."""
        if self._held.lost.is_set():
            raise lease_lost(self._held)

    def time_left(self) -> float:
        """Seconds before the holder must stop unless the lease is renewed."""
        return self._held.time_left()


def lease_lost(held: Held) -> LeaseLost:
    """The error that says why ``held`` was lost (an expiry when nobody said)."""
    return LeaseLost(held.reason or LossReason.EXPIRED, held.lease.keys, held.detail or "lease lost")


@contextmanager
def claim(shards: Sequence[Shard], *, backend: str | Backend = "file://", slices: int = 1, index: int = 0,
          strategy: str = "round-robin", ttl: float = 10.0, timeout: float | None = None,
          **options: Any) -> Iterator[Ownership]:
    """Hold one slice of ``shards`` in this process for the ``with`` block.

    The shards are cut into ``slices`` slices with ``strategy``; slice ``index`` is tried first, then
    the others in order, so several processes with different ``index`` values usually get different
    slices. This is a single holder outside any pool: nothing rebalances it. Without ``timeout`` it
    waits until a slice is free; with one it raises :class:`~shardpreempt.errors.ClaimTimeout` (also a
    ``TimeoutError``) when none could be acquired in time.
    """
    opened = isinstance(backend, str)
    store: Backend = open_backend(backend, **options) if isinstance(backend, str) else backend
    try:
        cut = make_slices(shards, slices, strategy)
        claimer = Claimer(store, ttl)
        end = None if timeout is None else claimer.clock.monotonic() + timeout
        while (held := claimer.try_slices(cut, index)) is None:
            left = 0.25 if end is None else end - claimer.clock.monotonic()
            if left <= 0:
                raise ClaimTimeout(f"no slice of {len(cut)} could be acquired within {timeout} s")
            claimer.wait(cut, min(left, 0.25))
        try:
            yield Ownership(held)
        finally:
            held.release()
    finally:
        if opened:
            store.close()
