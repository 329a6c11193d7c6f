"""The claimer on the memory backend with a fake clock: renewal, self-fencing, loss, preference."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from shardpreempt import BackendUnavailable, LeaseLost, Shard, claim, make_slices
from shardpreempt.backends.memory import MemoryBackend
from shardpreempt.claims import SELF_FENCED, Claim, Claimer
from shardpreempt.errors import LossReason
from shardpreempt.model import Lease
from shardpreempt.testing import FakeClock

SHARDS = [Shard(f"s{i}") for i in range(6)]


class Flaky(MemoryBackend):
    """A memory backend whose renewals can be made to fail as if the server were unreachable."""

    down = False
    renewals = 0

    def renew(self, lease: Lease) -> Lease:
        self.renewals += 1
        if self.down:
            raise BackendUnavailable("unreachable")
        return super().renew(lease)


def backend(clock: FakeClock, cls: type[MemoryBackend] = MemoryBackend) -> MemoryBackend:
    return cls(f"memory://{uuid.uuid4().hex}", clock=clock)


def acquire(b: MemoryBackend, clock: FakeClock, slices: Sequence, start: int = 0) -> Claim:
    got = Claimer(b, ttl=10, clock=clock).try_slices(slices, start)
    assert got is not None
    return got


def test_worker_tries_its_own_slice_first_then_the_others() -> None:
    """A claimer starts at its preferred slice and moves on when that one is held."""
    clock = FakeClock()
    b = backend(clock)
    slices = make_slices(SHARDS, 3)
    first = Claimer(b, 10, clock=clock).try_slices(slices, 1)
    assert first is not None and first.slice.index == 1
    second = Claimer(b, 10, clock=clock).try_slices(slices, 1)
    assert second is not None and second.slice.index == 2


def test_tick_renews_every_third_of_the_ttl_and_keeps_the_lease() -> None:
    """Renewing on schedule keeps the claim alive far past its ttl, one renewal per tick due."""
    clock = FakeClock()
    b = backend(clock, Flaky)
    c = acquire(b, clock, make_slices(SHARDS, 1))
    for _ in range(30):
        clock.advance(c.tick())
        assert not c.lost.is_set()
    assert 25 <= b.renewals <= 31  # type: ignore[attr-defined]


def test_unreachable_backend_self_fences_before_the_server_expiry() -> None:
    """When renewals keep failing the claim is lost at deadline - margin, before the server frees it."""
    clock = FakeClock()
    b = backend(clock, Flaky)
    c = acquire(b, clock, make_slices(SHARDS, 1))
    seen: list[tuple[LossReason | None, str | None]] = []
    c.on_lost(lambda cl: seen.append((cl.reason, cl.detail)))
    b.down = True  # type: ignore[attr-defined]
    while not c.lost.is_set():
        step = c.tick()
        if step == float("inf"):
            break
        clock.advance(max(step, 0.001))
    assert c.lost.is_set() and seen == [(LossReason.SELF_FENCED, SELF_FENCED)]
    assert clock.monotonic() <= c.lease.deadline - c.margin + 0.01
    other = MemoryBackend(b.url, clock=clock)
    assert other.try_acquire(["s0"], "other", 10) is None  # the server has not expired it yet
    with pytest.raises(LeaseLost):
        c.raise_if_lost()


def test_backend_reported_loss_is_reported_once_with_callbacks() -> None:
    """If the server says the session is gone, the claim is lost and each callback runs once."""
    clock = FakeClock()
    b = backend(clock)
    c = acquire(b, clock, make_slices(SHARDS, 1))
    calls: list[int] = []
    c.on_lost(lambda cl: calls.append(1))
    b.expire(c.lease.owner)
    clock.advance(c.tick())
    c.tick()
    assert c.lost.is_set() and calls == [1]
    c.on_lost(lambda cl: calls.append(2))  # registered after the loss: runs at once
    assert calls == [1, 2]


def test_release_frees_the_slice_for_the_next_claimer_with_higher_tokens() -> None:
    """After release another owner acquires the same slice with higher tokens."""
    clock = FakeClock()
    b = backend(clock)
    slices = make_slices(SHARDS, 1)
    c = acquire(b, clock, slices)
    assert Claimer(b, 10, clock=clock).try_slices(slices) is None
    c.release()
    d = acquire(b, clock, slices)
    assert all(d.lease.tokens[k] > c.lease.tokens[k] for k in d.lease.keys)


def test_claim_context_manager_holds_and_releases() -> None:
    """``claim()`` yields an ownership with tokens and frees the slice at exit."""
    url = f"memory://{uuid.uuid4().hex}"
    b = MemoryBackend(url)
    with claim(SHARDS, backend=b, slices=2, index=1) as own:
        assert own.slice.index == 1 and set(own.tokens) == set(own.slice.digest)
        assert all(h is not None for h in b.inspect(own.slice.digest).values())
        assert own.time_left() > 0 and not own.lost.is_set()
    assert all(h is None for h in b.inspect(own.slice.digest).values())


def test_a_late_grant_is_renewed_before_its_fence_time() -> None:
    """A lease that arrived with only half its ttl left gets its first renewal before the fence time."""
    clock = FakeClock()
    b = backend(clock)
    lease = b.try_acquire(["late"], "late-owner", 10)
    assert lease is not None
    late = lease.with_deadline(clock.monotonic() + 5)  # the acquire took half the ttl
    c = Claim(b, make_slices([Shard("late")], 1)[0], late, clock=clock)
    due = c.tick()
    assert clock.monotonic() + due < c.fence_at
    clock.advance(due)
    c.tick()
    assert not c.lost.is_set() and c.fence_at > clock.monotonic() + 5


def test_claim_timeout_is_our_error_and_a_timeout_error() -> None:
    """claim(timeout=...) with every slice held raises ClaimTimeout, which is also a TimeoutError."""
    from shardpreempt import ClaimTimeout, ShardPreemptError

    b = MemoryBackend(f"memory://{uuid.uuid4().hex}")  # the real clock, as claim() uses
    with claim(SHARDS, backend=b, slices=1), pytest.raises(ClaimTimeout) as caught, \
            claim(SHARDS, backend=b, slices=1, timeout=0.0):
        pass
    assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, ShardPreemptError)
