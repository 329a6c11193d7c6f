"""The worker's reconcile loop, one step at a time, on the memory backend (no processes, no sleeps)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence

import pytest

from shardpreempt import BackendUnavailable, Shard
from shardpreempt import worker as worker_module
from shardpreempt.backends.memory import MemoryBackend
from shardpreempt.balance import Members, Params
from shardpreempt.claims import Ownership
from shardpreempt.errors import LossReason
from shardpreempt.model import Holder, Lease, Slice
from shardpreempt.pool import Layout, join_margin, member_key, member_owner, ring, slots_to_watch
from shardpreempt.pool import bell as read_bell
from shardpreempt.runner import RunSettings
from shardpreempt.slicing import make_slices
from shardpreempt.status import members
from shardpreempt.worker import Worker, WorkerOptions, pool_params

SHARDS = [Shard(f"s{i}") for i in range(6)]


class Faulty(MemoryBackend):
    """Acquires whose reply is lost after the grant, and releases that fail, on demand."""

    lose_replies = 0
    fail_releases = 0
    delay_grants = 0
    delayed: list[tuple[Sequence[str], str, float]] = []

    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        if self.delay_grants and not keys[0].startswith("shardpreempt:"):
            self.delay_grants -= 1
            self.delayed = [*self.delayed, (keys, owner, ttl)]
            raise BackendUnavailable("no answer (the request waits in the paused server's buffer)")
        lease = super().try_acquire(keys, owner, ttl)
        if lease is not None and self.lose_replies and not keys[0].startswith("shardpreempt:"):
            self.lose_replies -= 1
            raise BackendUnavailable("reply lost")
        return lease

    def release(self, lease: Lease) -> None:
        if self.fail_releases:
            self.fail_releases -= 1
            raise BackendUnavailable("unreachable")
        super().release(lease)


def wait_job(ownership: Ownership) -> None:
    """A job that runs until its slice is handed over or lost."""
    while not (ownership.stopping.is_set() or ownership.lost.is_set()):
        ownership.lost.wait(0.01)


@pytest.fixture
def setup() -> Iterator[tuple[Worker, Faulty]]:
    backend = Faulty(f"memory://{uuid.uuid4().hex}")
    slices = make_slices(SHARDS, 2)
    opts = WorkerOptions(backend.url, 10.0, slices, Layout.of(SHARDS, "round-robin", 2), "host/t.0",
                         RunSettings(index=0, job=wait_job))
    worker = Worker(opts)
    worker.params, worker.period = pool_params(True, 10.0)
    worker.members = Members(worker.params)
    yield worker, backend
    stop(worker)


def pool_member(url: str, slices: Sequence[Slice], shards: Sequence[Shard], identity: str, params: Params) -> Worker:
    """A worker of a test pool on ``url`` (memory), stepped by hand."""
    w = Worker(WorkerOptions(url, 10.0, slices, Layout.of(shards, "round-robin", len(slices)), identity,
                             RunSettings(index=0, job=wait_job)))
    w.params, w.period = params, 0.5
    w.members = Members(w.params)
    return w


def quiet(w: Worker, backend: MemoryBackend) -> None:
    """As after a look that left nothing pending."""
    w.woken, w.next_look, w.last_bell = False, time.monotonic() + 100, read_bell(backend, w.member_slot)


def stop(worker: Worker) -> None:
    """End a test worker's runs and give up its member key."""
    for hold in list(worker.holds.values()):
        assert hold.runner is not None
        hold.runner.stop()
        hold.runner.join(5)
    if worker.member is not None:
        worker.member.release()


def held_by(backend: MemoryBackend, owner: str) -> set[str]:
    return {k for k, h in backend.inspect([s.identity for s in SHARDS]).items() if h is not None and h.owner == owner}


def test_an_acquire_whose_reply_was_lost_never_pins_the_slice(setup: tuple[Worker, Faulty]) -> None:
    """Keys granted to the worker's session by an acquire whose reply was lost are released and taken properly."""
    worker, backend = setup
    backend.lose_replies = 1
    worker._step(backend)
    assert len(worker.holds) == 1  # the other slice's grant was lost on the way back
    assert held_by(backend, worker.owner) == {s.identity for s in SHARDS}  # ...but the server holds it for us
    worker._step(backend)
    worker._step(backend)
    assert len(worker.holds) == 2 and not worker.orphans
    assert held_by(backend, worker.owner) == {s.identity for s in SHARDS}


def test_an_acquire_carried_out_after_its_timeout_never_pins_the_slice(setup: tuple[Worker, Faulty]) -> None:
    """An acquire that got no answer may be carried out later (a paused server runs the requests in its
    buffers when it resumes), after the first release of its keys: they are released again every round
    for a ttl. Regression: the slice stayed held by the renewed session, unworked, until a full look
    (on Redis, 9-10 s after a pause in the 500-fault stress run)."""
    worker, backend = setup
    backend.delay_grants = 1
    worker._step(backend)
    assert len(worker.holds) == 1 and worker.unsure
    worker._release_orphans(backend)  # the first release comes before the delayed grant: frees nothing
    for keys, owner, ttl in backend.delayed:  # the server resumes and carries the acquire out
        assert Faulty.try_acquire(backend, keys, owner, ttl) is not None
    stuck = set(backend.delayed[0][0])
    assert stuck <= held_by(backend, worker.owner) and not any(set(h.lease.keys) & stuck for h in worker.holds.values())
    worker._release_orphans(backend)
    assert not stuck & held_by(backend, worker.owner)
    worker.wake()
    worker._sleep(0)
    worker._step(backend)
    assert len(worker.holds) == 2 and not worker.unsure  # taken properly; no longer released behind its back
    worker._release_orphans(backend)
    assert held_by(backend, worker.owner) == {s.identity for s in SHARDS}


def test_a_failed_release_is_retried_until_the_keys_are_free(setup: tuple[Worker, Faulty]) -> None:
    """A release that fails is retried on the next rounds, so the renewed session does not keep the slice."""
    worker, backend = setup
    worker._step(backend)
    hold = next(iter(worker.holds.values()))
    assert hold.runner is not None
    hold.runner.stop()
    hold.runner.join(5)
    backend.fail_releases = 2
    worker._release(backend, hold, "test")
    assert set(hold.lease.keys) <= held_by(backend, worker.owner) and worker.orphans
    worker._release_orphans(backend)  # fails again
    assert worker.orphans
    worker._release_orphans(backend)
    assert not worker.orphans and not set(hold.lease.keys) & held_by(backend, worker.owner)


def test_a_lost_session_loses_every_slice_and_the_worker_joins_again(setup: tuple[Worker, Faulty]) -> None:
    """When the session expires, every held slice is lost together, and the next round joins under a new owner."""
    worker, backend = setup
    worker._step(backend)
    first_owner = worker.owner
    holds = list(worker.holds.values())
    assert len(holds) == 2
    backend.expire(first_owner)
    assert worker.member is not None
    worker.member.lose(LossReason.EXPIRED, "session expired")  # as the renewal thread does when the session is gone
    assert all(h.lost.is_set() for h in holds)
    worker._step(backend)
    assert worker.owner != first_owner and len(worker.holds) == 2
    assert all(h.runner is not None and not h.runner.is_alive() for h in holds)


def test_a_slice_granted_to_someone_else_is_lost_at_once(setup: tuple[Worker, Faulty]) -> None:
    """When the backend shows another owner on a held slice (it lost our grant), the run stops and the
    slice is dropped as lost, never released."""
    worker, backend = setup
    worker._step(backend)
    sid, hold = next(iter(worker.holds.items()))
    other = backend.try_acquire(["unrelated"], "someone-else", 30)  # a live session of another owner
    assert other is not None
    with backend._store.lock:  # what a server that lost our grant would show
        for key in hold.lease.keys:
            backend._store.holds[key] = other.session
    worker._step(backend)
    assert hold.lost.is_set() and hold.reason is LossReason.SUPERSEDED
    assert hold.detail == "superseded by someone-else"
    assert hold.runner is not None
    hold.runner.join(5)
    worker._step(backend)
    assert sid not in worker.holds
    assert all(h is not None and h.owner == "someone-else" for h in backend.inspect(list(hold.lease.keys)).values())


def test_a_quiet_pool_is_read_only_on_news(setup: tuple[Worker, Faulty], monkeypatch: pytest.MonkeyPatch) -> None:
    """While nothing happens a member reads only the bell and its watched neighbours' member keys (O(1) a
    period); a ring, a wake-up, a due look or a watched member gone makes it read the whole pool."""
    worker, backend = setup
    looks: list[int] = []
    real = worker_module.observe
    monkeypatch.setattr(worker_module, "observe", lambda *a: (looks.append(1), real(*a))[1])
    worker._step(backend)
    assert looks == [1] and len(worker.holds) == 2

    quiet(worker, backend)
    worker._step(backend)
    worker._step(backend)
    assert looks == [1]  # nothing happened: no look
    ring(MemoryBackend(backend.url))  # another member joined, released or saw a death
    worker._step(backend)
    assert looks == [1, 1]
    quiet(worker, backend)
    worker.wake()
    worker._sleep(0)
    worker._step(backend)
    assert looks == [1, 1, 1]
    quiet(worker, backend)
    bell = read_bell(backend)
    gone = next(j for j in range(16) if j != worker.member_slot)  # (its own slot is picked at random)
    worker.watch_keys = [member_key(gone)]  # a watched member whose key is gone: it died
    worker._step(backend)
    assert looks == [1, 1, 1, 1] and read_bell(backend) == bell  # it looked; the pool's bell stays (see below)


def test_a_restarted_workers_dead_incarnation_is_watched(setup: tuple[Worker, Faulty],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker restarted under the same identity joins while its dead incarnation's member key lingers
    (until the server expires it, in another slot): that key is watched, and its expiry makes the
    pool look at once (Redis does not notify expiry). Regression: members were keyed by identity, so
    the dead key in the higher slot was hidden and its slices waited for the quiet-pool safety net."""
    worker, backend = setup
    looks: list[int] = []
    real = worker_module.observe
    monkeypatch.setattr(worker_module, "observe", lambda *a: (looks.append(1), real(*a))[1])
    worker._step(backend)
    dead_slot = worker.member_slot + 1  # free: the worker is the only member
    dead = member_owner(worker.opts.identity)  # the same identity, an earlier incarnation
    assert backend.try_acquire([member_key(dead_slot)], dead, 30) is not None
    worker.wake()
    worker._sleep(0)
    worker._step(backend)
    assert worker.watch_keys == [member_key(dead_slot)]
    worker.woken, worker.next_look, worker.last_bell = (False, time.monotonic() + 100,
                                                               read_bell(backend, worker.member_slot))
    looks.clear()
    worker._step(backend)
    assert looks == []  # quiet while the dead incarnation's session lasts
    backend.expire(dead)
    worker._step(backend)
    assert looks == [1]


class Rivals(MemoryBackend):
    """Every slice is taken by another member between the worker's look and its acquire (a lost race)."""

    tried: list[str] = []

    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        if not keys[0].startswith("shardpreempt:"):
            self.tried = [*self.tried, keys[0]]
            super().try_acquire(keys, "rival:1:a", ttl)
        return super().try_acquire(keys, owner, ttl)


def test_a_round_stops_trying_leftovers_taken_since_its_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free slices left over after the grace are tried by every member that sees them, in the same order:
    once one was taken since the look, the round tries only the slices of its own share, then looks
    again. Regression: with 1,000 slices and 100 workers each round tried hundreds of leftovers, one busy
    round trip each, for longer than the heartbeat's STALL, and the supervisor killed the worker as hung."""
    shards = [Shard(f"s{i}") for i in range(20)]
    backend = Rivals(f"memory://{uuid.uuid4().hex}")
    slices = make_slices(shards, 20)
    worker = Worker(WorkerOptions(backend.url, 10.0, slices, Layout.of(shards, "round-robin", 20), "host/t.0",
                                  RunSettings(index=0, job=wait_job)))
    worker.params, worker.period = pool_params(True, 10.0)
    worker.members = Members(worker.params)
    assert backend.try_acquire([member_key(15)], member_owner("host/t.1"), 30) is not None  # another member
    worker.free_since = dict.fromkeys((s.id for s in slices), time.monotonic() - 1000)  # free for long
    decisions = []
    real = worker_module.decide
    monkeypatch.setattr(worker_module, "decide", lambda *a: decisions.append(real(*a)) or decisions[-1])
    try:
        worker._step(backend)
    finally:
        if worker.member is not None:
            worker.member.release()
    (decision,) = decisions
    mine = set(decision.assigned)
    leftovers = [s for s in decision.acquire if s not in mine]
    assert mine and len(leftovers) > 1 and mine <= set(decision.acquire)
    sid_of = {s.keys[0]: s.id for s in slices}
    tried = [sid_of[k] for k in backend.tried]
    assert tried == [s for s in decision.acquire if s in mine or s == leftovers[0]]  # one leftover, all of its share
    assert not worker.holds and worker.next_look <= time.monotonic() + worker.period  # and it looks again soon


def test_each_slice_taken_counts_as_progress_for_the_heartbeat(setup: tuple[Worker, Faulty],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat stops when the loop has not gone round for STALL seconds; a round that takes many
    slices (each a round trip and a run started) makes progress with each one, so it is not a stall."""
    worker, backend = setup
    ticks: list[float] = []
    real = Faulty.try_acquire

    def spy(self: Faulty, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        if not keys[0].startswith("shardpreempt:"):
            ticks.append(worker.ticked)
        return real(self, keys, owner, ttl)

    monkeypatch.setattr(Faulty, "try_acquire", spy)
    worker._step(backend)
    assert len(worker.holds) == 2 and len(ticks) == 2
    assert ticks[1] > ticks[0]  # the first slice taken moved the heartbeat's clock


def test_only_members_above_their_share_look_again_when_a_newcomer_settles(
        setup: tuple[Worker, Faulty], monkeypatch: pytest.MonkeyPatch) -> None:
    """A member settling changes only what members above their share hand over: one at its share
    does not look again when it does. Regression: in a pool that a thousand workers joined, every
    member looked again as each newcomer settled."""
    worker, backend = setup
    worker._step(backend)
    assert len(worker.holds) == 2  # alone: its share is both slices
    worker.started -= 100  # past its own start-up window
    soon = time.monotonic() + 5  # when a newcomer settles
    me = frozenset({worker.opts.identity})
    monkeypatch.setattr(worker.members, "update", lambda present, now, established=None: (me, soon))
    worker.woken = True
    worker._step(backend)
    assert worker.next_look > soon + 10  # at its share: the quiet pool's safety net only
    backend.try_acquire([member_key(15 if worker.member_slot != 15 else 14)], "host/x.0:1:ab", 10.0)
    worker.woken = True
    worker._step(backend)  # a member not settled yet: its share falls to one, so it looks at the settling
    assert len(worker.holds) == 2 and worker.next_look <= soon


def test_a_join_reads_each_member_slot_once_and_climbs_past_taken_ones(
        setup: tuple[Worker, Faulty], monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker joining a pool reads the member slots once, each slot once, and takes a free slot at
    most 16 past the highest in use (members read that far); a slot it finds taken sends the next try
    above it, with no second read of the pool. Regression: each lost race read every member slot
    again, and the window grew 16, 32, 64 ... each read from slot 0 (1,000 workers joining at once
    kept Redis busy with nothing else)."""
    worker, backend = setup
    for j in range(40):  # a pool of 40 members in slots 0..39
        backend.try_acquire([member_key(j)], f"host/m.{j}:1:ab", 10.0)
    read: list[str] = []
    real_inspect, real_acquire = Faulty.inspect, Faulty.try_acquire

    def inspect(self: Faulty, keys: Sequence[str]) -> dict[str, Holder | None]:
        read.extend(keys)
        return real_inspect(self, keys)

    def racing(self: Faulty, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        if keys[0].startswith("shardpreempt:member:") and int(keys[0].rsplit(":", 1)[1]) < 44:
            real_acquire(self, keys, "host/rival.0:1:ab", ttl)  # another joiner got there first
            return None
        return real_acquire(self, keys, owner, ttl)

    monkeypatch.setattr(Faulty, "inspect", inspect)
    monkeypatch.setattr(Faulty, "try_acquire", racing)
    assert worker._join(backend)
    assert len(read) == len(set(read)) and len(read) <= 64 + 64
    assert worker.member_slot is not None and 44 <= worker.member_slot <= 43 + 16


def test_a_death_rings_only_the_members_its_slices_are_meant_for() -> None:
    """Servers: a member that sees a watched member's session end looks, takes what the policy gives
    it, and rings the bells of the members the other free slices are meant for, not the pool's bell.
    Regression: every death rang the pool's bell, so every member read the whole pool at once (1,000
    members on one Redis: the looks starved the server, renewals missed their deadlines, members
    self-fenced, and each of their deaths rang everyone again)."""
    url = f"memory://{uuid.uuid4().hex}"
    backend = MemoryBackend(url)
    k = 6
    slices = make_slices([Shard(f"s{i}") for i in range(k)], k)
    shards = [s for sl in slices for s in sl.shards]

    # a long grace: a member takes only the free slices meant for it, so news must reach the others
    params = Params(grace=100.0, settle=0.0, min_hold=0.0)
    a, b, c = (pool_member(url, slices, shards, f"host/{x}.0", params) for x in "abc")
    try:
        for w in (a, b, c):
            assert w._join(backend)
        for w in (a, b, c):
            w._step(backend)
        assert [len(w.holds) for w in (a, b, c)] == [2, 2, 2]
        for w in (a, b):
            w._step(backend)  # a look that sees every member: each watches the two others
            quiet(w, backend)
        assert c.member is not None and member_key(c.member_slot) in a.watch_keys
        pool_bell, b_bell = read_bell(backend), read_bell(backend, b.member_slot)
        backend._store.sessions[c.member.lease.session] = 0.0  # c's session expires: its slices are free
        a._step(backend)  # sees its neighbour gone: looks, takes its one, rings b
        assert len(a.holds) == 3 and read_bell(backend) == pool_bell
        assert read_bell(backend, b.member_slot) != b_bell
        b._step(backend)  # its own bell rang: it looks and takes the other
        assert len(b.holds) == 3
    finally:
        for w in (a, b, c):
            stop(w)


def test_a_join_and_its_handoffs_ring_only_the_members_they_concern() -> None:
    """Servers: a newcomer short of its share rings the bells of the members above theirs (and of the
    member before it, which watches it from now on), never the pool's bell; the handoff's release
    rings the newcomer's bell alone. Regression: every join and every handoff rang the pool's bell, so
    every member read the whole pool (300 workers over 1,000 slices on 2 cores: reading the pool took
    most of the CPU and hundreds of workers were killed as hung)."""
    url = f"memory://{uuid.uuid4().hex}"
    backend = MemoryBackend(url)
    k = 4
    slices = make_slices(SHARDS, k)

    params = Params(grace=0.0, settle=0.0, min_hold=0.0)
    a, b = (pool_member(url, slices, SHARDS, f"host/{x}.0", params) for x in "ab")
    try:
        a._step(backend)
        assert len(a.holds) == k and not a.hungry  # alone: its share is every slice
        quiet(a, backend)
        pool_bell = read_bell(backend)
        b._step(backend)  # joins, looks: short of its share (2), nothing free
        assert not b.holds and b.hungry
        assert read_bell(backend) == pool_bell  # nobody else was told
        a._step(backend)  # its own bell rang: it looks and hands two slices over
        handing = [h for h in a.holds.values() if h.handing_over]
        assert len(handing) == 2 and all(h.handoff_slot == b.member_slot for h in handing)
        for hold in handing:
            assert hold.runner is not None
            hold.runner.join(5)
        quiet(b, backend)
        a._step(backend)  # the runs have ended: released, and b's bell rung
        assert len(a.holds) == 2 and read_bell(backend) == pool_bell
        b._step(backend)
        assert len(b.holds) == 2 and not b.hungry
    finally:
        stop(a)
        stop(b)


def test_the_member_window_doubles_as_the_pool_grows() -> None:
    """A member catching up with a growing pool looks again a few times, not once per 16 joins: the
    window doubles when the highest member slot in use comes within 16 of its end, and otherwise stays
    at most twice what is in use (a pool that shrank reads fewer empty slots)."""
    assert slots_to_watch(-1) == 16 and slots_to_watch(0) == 17
    window, looks = 16, 0
    while window <= 1000:  # a pool of 1,000 members, seen by a member that started alone
        grown = slots_to_watch(min(999, window - 1), window)
        looks += 1
        if grown <= window:
            break
        window = grown
    assert looks <= 8 and window >= 1000
    assert slots_to_watch(100, 234) == 234  # far from the end: no growth, no look again
    assert slots_to_watch(3, 1024) == 40  # a pool that shrank: twice what it needs


def test_looks_on_a_shared_server_wait_their_turn(setup: tuple[Worker, Faulty],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers: the next full look waits the last one's duration x members / 2, even when something woke
    the member (the news is kept for then), unless its own bell rang; a look that failed counts too; the
    wait is capped at a quarter ttl or members / 25 seconds. Regression: 1,000 members on one Redis looked
    whenever woken; looks took longer than the client's timeout, were sent again, and the server, busy with them,
    answered renewals too late: members self-fenced by the hundred."""
    worker, backend = setup
    looks: list[int] = []
    real = worker_module.observe
    monkeypatch.setattr(worker_module, "observe", lambda *a: (looks.append(1), real(*a))[1])
    worker._step(backend)  # joins and looks
    assert looks == [1]
    worker._space_looks(backend, time.monotonic() - 0.04, 1000)  # as if it took 40 ms in a pool of 1,000
    assert worker.look_gap == pytest.approx(20.0, rel=0.01)
    worker.wake()
    worker._sleep(0)
    assert 0 < worker._step(backend) <= worker.period and looks == [1] and worker.woken
    worker.looked_at -= worker.look_gap  # its turn has come
    worker._step(backend)
    assert looks == [1, 1]
    worker._space_looks(backend, time.monotonic() - 2.0, 1000)  # a look that took 2 s
    assert worker.look_gap == 40.0  # capped: 1,000 / 25
    worker._space_looks(backend, time.monotonic() - 2.0, 4)
    assert worker.look_gap == 2.5  # a small pool: a quarter ttl at most

    # while it waits its turn, only its own bell (news for it alone, say a slice handed to it) makes it look
    worker._space_looks(backend, time.monotonic() - 0.04, 1000)
    worker.woken = False
    ring(MemoryBackend(backend.url))  # the pool's bell: waits for its turn
    worker._step(backend)
    assert looks == [1, 1] and worker.woken
    assert worker.member_slot is not None
    ring(MemoryBackend(backend.url), [worker.member_slot])
    worker._step(backend)
    assert looks == [1, 1, 1]

    def unreachable(*_: object) -> None:
        raise BackendUnavailable("timed out")

    monkeypatch.setattr(worker_module, "observe", unreachable)
    worker.looked_at, worker.look_gap, worker.woken = -1e9, 0.0, True
    worker._step(backend)
    assert worker.looked_at > 0  # a failed look spaces the next one too


def test_retries_back_off_within_bounds(setup: tuple[Worker, Faulty]) -> None:
    """Failed looks and joins lost to others back off: doubling from the first wait, drawn from the upper
    half, never above max(2 periods, ttl / 4) (at most 4 s), so at a short ttl recovery after an outage
    stays within the ttl (docs/decisions.md, 17)."""
    worker, _ = setup
    for tries in range(1, 12):
        wait = worker._backoff(tries, worker.period)
        bound = min(2.5, worker.period * 2 ** (tries - 1))  # ttl 10: a quarter ttl
        assert bound / 2 <= wait <= bound
    worker.opts.ttl, worker.period = 1.0, pool_params(True, 1.0)[1]
    assert max(worker._backoff(t, worker.period) for t in range(1, 20)) <= 2 * worker.period


def test_joins_spread_out_after_lost_rounds_but_stay_in_sight(setup: tuple[Worker, Faulty],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker joining takes one of the four lowest slots free above the highest in use; after rounds
    lost to other joiners it picks among more (up to 16), so hundreds joining at once do not all try the
    same four slots each round; never more than 16 past the highest slot in use, where members look.
    Acquires refused while nobody holds the slots (a server's restart grace) do not send it further out.
    Regressions: 1,000 joining workers let in about four per round; after a restart grace a joiner had
    climbed to slot 53 above members in slots 0..3, and nobody saw it."""
    worker, backend = setup
    for j in range(40):  # a pool of 40 members in slots 0..39
        backend.try_acquire([member_key(j)], f"host/m.{j}:1:ab", 10.0)

    def slots_taken(races: int) -> set[int]:
        taken = set()
        for _ in range(20):
            worker.member_slot, worker.join_view, worker.join_races = None, None, races
            assert worker._join(backend) and worker.member is not None
            taken.add(worker.member_slot)
            worker.member.release()
            worker.member = None
        return taken

    assert slots_taken(0) <= {40, 41, 42, 43}
    wider = slots_taken(2)
    assert max(wider) > 43 and max(wider) <= 39 + 16

    refused = 0
    real_acquire = Faulty.try_acquire

    def grace(self: Faulty, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        nonlocal refused
        if keys[0].startswith("shardpreempt:member:") and refused < 200:
            refused += 1
            return None  # nothing is granted yet
        return real_acquire(self, keys, owner, ttl)

    monkeypatch.setattr(Faulty, "try_acquire", grace)
    worker.member_slot, worker.join_view, worker.join_races = None, None, 0
    rounds = 0
    while not worker._join(backend):
        rounds += 1
    assert rounds >= 10 and worker.member_slot is not None and 40 <= worker.member_slot <= 39 + 16


def test_a_big_pool_leaves_joiners_more_room_and_every_reader_sees_them() -> None:
    """Workers may join up to 16 slots past the highest in use, or an eighth of the slots in use in a pool
    of more than 128; every look (slots_to_watch) and ``status`` (members) reads that far, so a member
    that joined at the edge is seen. Regression: with 16 for any pool, 1,000 workers joining at once got
    in about 16 per round of tries."""
    assert join_margin(-1) == join_margin(15) == join_margin(127) == 16 and join_margin(999) == 125
    for top in (0, 15, 100, 500, 999, 4000):
        for window in (16, top + 17, top + 100, 2 * top + 40):
            assert slots_to_watch(top, window) > top + join_margin(top)
    backend = MemoryBackend(f"memory://{uuid.uuid4().hex}")
    for j in [*range(1000), 1000 + 120]:
        backend.try_acquire([member_key(j)], f"host/m.{j}:1:ab", 10.0)
    assert len(members(backend)) == 1001


def test_lost_join_rounds_keep_one_owner_id(setup: tuple[Worker, Faulty], monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose join rounds are lost to other joiners tries again under the same owner id; a join
    that succeeds, and a later one, get fresh ones. Regression: every round took a new owner id, which
    on etcd is a new lease granted (and revoked at its expiry) through the cluster's log: a pool of 300
    joining at once kept etcd granting about 40 leases a second for nobody."""
    worker, backend = setup
    owners: list[str] = []
    real_acquire = Faulty.try_acquire

    def busy(self: Faulty, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        if keys[0].startswith("shardpreempt:member:"):
            owners.append(owner)
            if len(owners) <= 40:
                return None  # others joining got there first
        return real_acquire(self, keys, owner, ttl)

    monkeypatch.setattr(Faulty, "try_acquire", busy)
    rounds = 0
    while not worker._join(backend):
        rounds += 1
    assert rounds >= 2 and len(set(owners)) == 1 and worker.owner == owners[0]
    assert worker.member is not None
    worker.member.release()
    worker.member = None
    assert worker._join(backend) and worker.owner != owners[0]


def test_the_workers_of_one_supervisor_join_at_their_index_without_racing() -> None:
    """A worker's first try is the member slot of its index among its supervisor's workers, so workers
    started together do not race for the same few slots; one whose slot is beyond the join margin waits
    (a lost round, no acquire) until the workers below it have joined, then takes its own. Regression:
    every joiner picked among the lowest four free slots at random, so a supervisor of 100 workers
    joining an empty pool let about four in per round, and each round on a busy server took seconds."""
    url = f"memory://{uuid.uuid4().hex}"
    backend = MemoryBackend(url)
    slices = make_slices(SHARDS, 2)
    tried: list[str] = []
    real_acquire = MemoryBackend.try_acquire

    def acquire(self: MemoryBackend, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        tried.extend(k for k in keys if k.startswith("shardpreempt:member:"))
        return real_acquire(self, keys, owner, ttl)

    workers = {i: Worker(WorkerOptions(url, 10.0, slices, Layout.of(SHARDS, "round-robin", 2), f"host/s.{i}",
                                       RunSettings(index=i, job=wait_job), index=i)) for i in (0, 1, 5, 15, 30)}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MemoryBackend, "try_acquire", acquire)
            assert workers[30]._join(backend) is None and tried == []  # slot 30 is out of sight: it waits
            for i in (15, 5, 1, 0):
                assert workers[i]._join(backend) and workers[i].member_slot == i
            assert tried == [member_key(i) for i in (15, 5, 1, 0)]  # one acquire each, no race
            assert workers[30]._join(backend) and workers[30].member_slot == 30  # 15 + 16 is in sight now
    finally:
        for w in workers.values():
            stop(w)
