"""The pool's balancing policy (shardpreempt.balance): shares, decisions, damping, and whole pools simulated.

Pure tests: no I/O, no sleeps. Properties are checked over many cases drawn from ``random.Random`` with fixed
seeds; the simulation (:class:`Pool`) plays rounds of members deciding on consistent or stale views, with
time advancing in steps so that ``grace``, ``min_hold`` and ``settle`` matter.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import pytest

from shardpreempt import balance
from shardpreempt.balance import Decision, Members, Params, View, decide, meant_for, targets, weight

P = Params()  # grace 0.5, settle 0.5, max_settle 30, flap_window 60, min_hold 0.5
STEP = 0.1  # seconds per simulated round: grace, settle and min_hold span several rounds, more than any lag


def names(n: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def slice_ids(k: int) -> list[str]:
    return [f"slice-{i:04d}" for i in range(k)]


# -- targets ---------------------------------------------------------------------------------------------------


def _random_case(rng: random.Random) -> tuple[int, list[str]]:
    m = rng.randint(1, 40)
    members = [f"{rng.choice(['w', 'host-', 'x'])}{rng.randrange(10**6)}" for _ in range(m)]
    members = list(dict.fromkeys(members))
    return rng.randint(0, 300), members


def test_targets_differ_by_at_most_one_and_sum_to_k() -> None:
    """Over many random pools every share is K // M or K // M + 1 and the shares add up to K."""
    rng = random.Random(1)
    for _ in range(2000):
        k, members = _random_case(rng)
        share = targets(k, members)
        assert set(share) == set(members)
        assert sum(share.values()) == k
        assert max(share.values()) - min(share.values()) <= 1
        assert set(share.values()) <= {k // len(members), k // len(members) + 1}
        assert sum(1 for v in share.values() if v > k // len(members)) == k % len(members)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 10, 64, 100])
def test_targets_k_equals_m_gives_one_each(m: int) -> None:
    """With as many slices as members, every member's share is exactly one."""
    assert targets(m, names(m)) == dict.fromkeys(names(m), 1)


def test_targets_deterministic_and_independent_of_member_order() -> None:
    """The same set of members gives the same shares whatever their order, call after call."""
    rng = random.Random(2)
    for _ in range(500):
        k, members = _random_case(rng)
        expected = targets(k, members)
        for _ in range(3):
            shuffled = members[:]
            rng.shuffle(shuffled)
            assert targets(k, shuffled) == expected
            assert targets(k, tuple(shuffled)) == expected


def test_targets_ignore_duplicate_members() -> None:
    """A member listed twice counts once: the shares still sum to K."""
    share = targets(10, ["a", "a", "b"])
    assert set(share) == {"a", "b"} and sum(share.values()) == 10
    assert targets(10, ["a", "a"]) == {"a": 10}


@pytest.mark.parametrize(("k", "members", "expected"), [(0, [], {}), (5, [], {}), (0, ["a", "b"], {"a": 0, "b": 0})])
def test_targets_edge_cases(k: int, members: list[str], expected: dict[str, int]) -> None:
    """No members gives no shares; no slices gives zero shares."""
    assert targets(k, members) == expected


def test_targets_are_monotone_in_membership() -> None:
    """A join never raises anyone's share and a death never lowers one (so nothing oscillates)."""
    rng = random.Random(3)
    for _ in range(1000):
        k, members = _random_case(rng)
        newcomer = f"new{rng.randrange(10**6)}"
        before, after = targets(k, members), targets(k, [*members, newcomer])
        assert all(after[m] <= before[m] for m in members)
        if len(members) > 1:
            gone = rng.choice(members)
            fewer = targets(k, [m for m in members if m != gone])
            assert all(fewer[m] >= before[m] for m in fewer)


# -- decide on hand-made views ---------------------------------------------------------------------------------


def view(me: str, holders: Mapping[str, str | None], members: Iterable[str], *, now: float = 100.0,
         settled: Iterable[str] | None = None, free_since: Mapping[str, float] | None = None,
         held_since: Mapping[str, float] | None = None) -> View:
    members = frozenset(members)
    return View(me, now, members, frozenset(members if settled is None else settled), dict(holders),
                dict(free_since or {}), dict(held_since or {}))


def assignment(holders: Mapping[str, str | None], members: Iterable[str]) -> dict[str, str]:
    """Who each free slice is meant for, found the slow way: ask every member what it takes at once."""
    meant: dict[str, str] = {}
    for m in members:
        for s in decide(view(m, holders, members, free_since={})).acquire:
            assert s not in meant, f"{s} meant for both {meant[s]} and {m}"
            meant[s] = m
    return meant


def test_free_slices_meant_for_exactly_one_member_each() -> None:
    """With consistent views each free slice is taken at once by exactly one member, and nobody exceeds its share."""
    rng = random.Random(4)
    for _ in range(150):
        members = names(rng.randint(1, 8))
        k = rng.randint(0, 30)
        share = targets(k, members)
        holders: dict[str, str | None] = dict.fromkeys(slice_ids(k))
        room = {m: rng.randint(0, share[m]) for m in members}  # a consistent pool: nobody above its share
        for s in holders:
            m = rng.choice(members)
            if room[m] > 0:
                holders[s], room[m] = m, room[m] - 1
        meant = assignment(holders, members)
        assert set(meant) == {s for s, h in holders.items() if h is None}
        after = Counter(h for h in holders.values() if h is not None) + Counter(meant.values())
        assert after == Counter({m: v for m, v in share.items() if v})


def test_free_slice_goes_to_the_member_that_prefers_it_most() -> None:
    """A single free slice in a pool where everyone is short goes to the highest rendezvous weight."""
    rng = random.Random(5)
    for _ in range(200):
        members = names(rng.randint(2, 9))
        holders: dict[str, str | None] = {f"lone-{rng.randrange(10**9)}": None}
        holders.update({f"pad-{i}": None for i in range(len(members) * 2 - 1)})
        first = next(iter(holders))
        meant = assignment(holders, members)
        assert meant[first] == max(members, key=lambda m: (weight(m, first), m))


def test_coverage_first_a_free_slice_is_taken_after_grace_even_above_target() -> None:
    """A free slice meant for someone else is left alone until it has been free for grace, then anyone takes it."""
    holders = {"a": "me", "b": "me", "c": None, "d": "other"}
    members = {"me", "other"}  # shares 2 and 2: "c" is meant for "other", "me" is at its share
    assert targets(4, sorted(members)) == {"me": 2, "other": 2}
    for age, taken in [(0.0, False), (P.grace / 2, False), (P.grace - 1e-6, False), (P.grace, True), (60.0, True)]:
        d = decide(view("me", holders, members, free_since={"c": 100.0 - age}), P)
        assert d.acquire == (("c",) if taken else ()), age
        assert d.release == ()
        assert d.target == 2
        assert d.recheck == (None if taken else pytest.approx(100.0 - age + P.grace)), age


def test_a_member_never_takes_a_slice_meant_for_someone_else_before_grace() -> None:
    """Within grace a member takes only the free slices meant for it, whatever the mix of free and held slices."""
    rng = random.Random(6)
    for _ in range(300):
        members = names(rng.randint(2, 6))
        k = rng.randint(1, 20)
        holders = {s: rng.choice([None, *members]) for s in slice_ids(k)}
        meant = assignment(holders, members)
        for m in members:
            early = decide(view(m, holders, members, free_since=dict.fromkeys(holders, 100.0 - P.grace / 2)), P)
            assert set(early.acquire) == {s for s, who in meant.items() if who == m}
            late = decide(view(m, holders, members, free_since=dict.fromkeys(holders, 100.0 - P.grace)), P)
            assert set(late.acquire) == {s for s, h in holders.items() if h is None}


def test_release_least_preferred_down_to_the_settled_share() -> None:
    """A member above its share among settled members hands over, down to that share, the slices the short
    members prefer most over it."""
    slices = slice_ids(6)
    holders: dict[str, str | None] = {s: "me" for s in slices}
    d = decide(view("me", holders, {"me", "b"}, held_since=dict.fromkeys(slices, 0.0)), P)
    assert d.acquire == () and d.target == 3
    assert set(d.release) == set(sorted(slices, key=lambda s: weight("me", s) - weight("b", s))[:3])
    # The newcomer is present (it lowers my share for taking) but not settled yet: nothing is handed over.
    d = decide(view("me", holders, {"me", "b"}, settled={"me"}, held_since=dict.fromkeys(slices, 0.0)), P)
    assert d == Decision((), (), 3, None)
    # Counted among the settled members only: "c" (unsettled) lowers my share for taking, not for handing over.
    holders = {**dict.fromkeys(slices[:3], "me"), **dict.fromkeys(slices[3:], "b")}
    d = decide(view("me", holders, {"me", "b", "c"}, settled={"me", "b"}), P)
    assert d.release == () and d.target == 2


def test_min_hold_protects_a_just_acquired_slice() -> None:
    """A slice acquired less than min_hold ago is not handed over; the decision says when to look again."""
    slices = slice_ids(4)
    holders: dict[str, str | None] = {s: "me" for s in slices}
    order = sorted(slices, key=lambda s: weight("me", s) - weight("b", s))  # handed over first
    recent = {order[0]: 100.0 - P.min_hold / 2, order[1]: 100.0 - P.min_hold / 2}
    held = {s: recent.get(s, 0.0) for s in slices}
    d = decide(view("me", holders, {"me", "b"}, held_since=held), P)
    assert d.release == tuple(order[2:4])  # share 2: the two older ones go instead
    everything_recent = dict.fromkeys(slices, 100.0 - P.min_hold / 4)
    d = decide(view("me", holders, {"me", "b"}, held_since=everything_recent), P)
    assert d.release == () and d.recheck == pytest.approx(100.0 - P.min_hold / 4 + P.min_hold)
    d = decide(view("me", holders, {"me", "b"}, held_since=dict.fromkeys(slices, 100.0 - P.min_hold)), P)
    assert d.release == tuple(order[:2])


def test_no_release_while_acquiring() -> None:
    """A member that takes a slice this round hands nothing over in the same decision."""
    holders: dict[str, str | None] = {"a": "me", "b": "me", "c": "me", "d": None}
    d = decide(view("me", holders, {"me", "b2"}, free_since={"d": 0.0}), P)
    assert d.acquire == ("d",) and d.release == ()


# -- damping: Members ------------------------------------------------------------------------------------------


def test_members_settle_after_settle_time() -> None:
    """A member seen for the first time counts once it has been seen for the settle time."""
    tracker = Members(P)
    assert tracker.update(["a", "b"], 10.0) == (frozenset(), 10.0 + P.settle)
    assert tracker.update(["a", "b"], 10.0 + P.settle / 2) == (frozenset(), 10.0 + P.settle)
    assert tracker.update(["a", "b"], 10.0 + P.settle) == (frozenset({"a", "b"}), None)


def test_members_joining_a_running_pool_counts_established_members_at_once() -> None:
    """A tracker told how long members have been in the pool settles established members at once, newcomers later."""
    tracker = Members(P)
    settled, next_at = tracker.update(["old1", "old2", "me"], 500.0, established={"old1": 90.0, "old2": 3.0, "me": 0})
    assert settled == {"old1", "old2"} and next_at == 500.0 + P.settle
    young = Members(P)
    settled, next_at = young.update(["a"], 0.0, established={"a": P.settle / 5})
    assert settled == frozenset() and next_at == pytest.approx(P.settle * 4 / 5)


def test_members_disappearing_stop_counting_at_once() -> None:
    """A member absent from one observation is no longer settled."""
    tracker = Members(P)
    tracker.update(["a", "b"], 0.0)
    assert tracker.update(["a", "b"], 1.0)[0] == {"a", "b"}
    assert tracker.update(["a"], 1.1)[0] == {"a"}


def test_members_flapping_doubles_settle_up_to_the_cap() -> None:
    """Each reappearance within flap_window doubles the settle time up to max_settle, whatever the established age."""
    tracker = Members(P)
    settles = []
    for i in range(12):
        now = 1.0 * i
        _, next_at = tracker.update(["stable", "flapper"], now, established={"stable": 1000.0, "flapper": 1000.0})
        settles.append(0.0 if next_at is None else next_at - now)
        tracker.update(["stable"], now + 0.5)  # gone for a moment
    assert settles[0] == 0.0  # first appearance: in the pool for long, counts at once
    assert settles[1:] == pytest.approx([min(P.max_settle, P.settle * 2**i) for i in range(1, 12)])
    assert settles[-1] == P.max_settle


def test_members_reappearance_after_flap_window_starts_over() -> None:
    """A member that comes back after flap_window has passed settles in the base settle time again."""
    tracker = Members(P)
    for t in (0.0, 1.0, 2.0):  # three appearances in a row: settle would be 4 * settle
        tracker.update(["f"], t)
        tracker.update([], t + 0.5)
    settled, next_at = tracker.update(["f"], 2.0 + P.flap_window + 1)
    assert settled == frozenset() and next_at == pytest.approx(2.0 + P.flap_window + 1 + P.settle)


def test_members_settle_time_for_many_flaps_stays_capped() -> None:
    """Even after thousands of reappearances within flap_window the settle time is max_settle (no overflow)."""
    tracker = Members(P)
    now = 0.0
    for _ in range(2100):
        tracker.update(["f"], now)
        tracker.update([], now + 0.001)
        now += 0.002
    _, next_at = tracker.update(["f"], now)
    assert next_at == pytest.approx(now + P.max_settle)


# -- simulation ------------------------------------------------------------------------------------------------


class Node:
    """One simulated member: its own damping tracker and what it remembers of free and held slices."""

    def __init__(self, identity: str, params: Params) -> None:
        self.identity = identity
        self.tracker = Members(params)
        self.free_since: dict[str, float] = {}
        self.held_since: dict[str, float] = {}


class Pool:
    """A pool of simulated members around a dict slice -> holder.

    Each round every live member, in a random order, observes the pool (live, or as it was at the start of this or
    the previous round: ``lag`` 0, 1 or 2), decides, and has its decision applied at once: a release frees the
    slice, an acquire takes it only if it is free at that moment. Its own holdings it always knows exactly, as the
    worker does. Then time advances by ``step``.
    """

    def __init__(self, k: int, *, params: Params = P, seed: int = 0, step: float = STEP,
                 lag: Callable[[random.Random, str], int] | None = None) -> None:
        self.slices = slice_ids(k)
        self.holders: dict[str, str | None] = dict.fromkeys(self.slices)
        self.params, self.step = params, step
        self.rng = random.Random(seed)
        self.lag = lag or (lambda rng, member: 0)
        self.now = 100.0
        self.nodes: dict[str, Node] = {}
        self.joined: dict[str, float] = {}  # identity -> when its latest incarnation joined
        self.snapshots: list[tuple[frozenset[str], dict[str, str | None]]] = []
        self.rounds = 0
        self.reset_counters()

    # bookkeeping
    def reset_counters(self) -> None:
        self.moves: Counter[str] = Counter()  # slice -> times it went from one member to another
        self.acquired: list[tuple[str, str]] = []  # (slice, member)
        self.released: list[tuple[str, str]] = []
        self.last_holder: dict[str, str | None] = dict(self.holders)

    def held(self, member: str) -> list[str]:
        return [s for s, h in self.holders.items() if h == member]

    def counts(self) -> dict[str, int]:
        return {m: len(self.held(m)) for m in self.nodes}

    # membership
    def join(self, *identities: str) -> None:
        for identity in identities:
            assert identity not in self.nodes
            self.nodes[identity] = Node(identity, self.params)
            self.joined[identity] = self.now

    def kill(self, identity: str) -> list[str]:
        """The member dies: it is gone and its slices are free at once (file://: the kernel drops its locks)."""
        del self.nodes[identity]
        lost = self.held(identity)
        for s in lost:
            self.holders[s] = None
        return lost

    # one round
    def observe(self, lag: int) -> tuple[frozenset[str], dict[str, str | None]]:
        if lag == 0 or not self.snapshots:
            return frozenset(self.nodes), dict(self.holders)
        return self.snapshots[-min(lag, len(self.snapshots))]

    def view_of(self, member: str, lag: int = 0) -> View:
        node, now = self.nodes[member], self.now
        present, seen = self.observe(lag)
        present = present | {member}
        holders: dict[str, str | None] = {}
        for s in self.slices:
            if self.holders[s] == member:
                holders[s] = member
            else:
                holders[s] = None if seen[s] == member else seen[s]
            if holders[s] is None:
                node.free_since.setdefault(s, now)
            else:
                node.free_since.pop(s, None)
        established = {m: now - self.joined[m] for m in present}
        settled, _ = node.tracker.update(present, now, established)
        return View(member, now, present, settled, holders, dict(node.free_since),
                    {s: node.held_since[s] for s in self.held(member)})

    def play(self, member: str, lag: int = 0) -> Decision:
        node = self.nodes[member]
        d = decide(self.view_of(member, lag), self.params)
        for s in d.release:
            assert self.holders[s] == member, (s, member)
            self.holders[s] = None
            node.held_since.pop(s)
            self.released.append((s, member))
        for s in d.acquire:
            if self.holders[s] is not None:
                continue  # raced: someone else has it
            self.holders[s] = member
            node.held_since[s] = self.now
            node.free_since.pop(s, None)
            self.acquired.append((s, member))
            if self.last_holder[s] not in (None, member):
                self.moves[s] += 1
            self.last_holder[s] = member
        return d

    def round(self) -> None:
        self.snapshots = [*self.snapshots[-1:], (frozenset(self.nodes), dict(self.holders))]
        order = list(self.nodes)
        self.rng.shuffle(order)
        for m in order:
            self.play(m, self.lag(self.rng, m))
        self.now += self.step
        self.rounds += 1

    def balanced(self) -> bool:
        """Every slice owned and every member holding exactly its share of the live pool."""
        return all(h is not None for h in self.holders.values()) and \
            self.counts() == targets(len(self.slices), sorted(self.nodes))

    def run_until_balanced(self, limit: int = 400) -> int:
        """Play rounds until balanced; the number of rounds it took."""
        start = self.rounds
        while not self.balanced():
            assert self.rounds - start < limit, f"not balanced after {limit} rounds: {self.counts()}"
            self.round()
        return self.rounds - start

    def quiet(self) -> bool:
        """Every member, looking at the live pool, decides to do nothing."""
        for m in self.nodes:
            d = decide(self.view_of(m), self.params)
            if d.acquire or d.release:
                return False
        return True


def any_lag(rng: random.Random, member: str) -> int:
    return rng.choice([0, 1, 2])


def lag_one_round(rng: random.Random, member: str) -> int:
    return 1


LAGS = {"consistent": None, "stale": lag_one_round, "mixed": any_lag}


def balanced_pool(k: int, m: int, *, seed: int, lag: str = "consistent") -> Pool:
    """A pool of m members that started together, balanced and quiet, with every member settled everywhere."""
    pool = Pool(k, seed=seed, lag=LAGS[lag])
    pool.join(*names(m))
    pool.run_until_balanced()
    for _ in range(int(P.settle / STEP) + 2):  # let everybody settle at everybody
        pool.round()
    assert pool.balanced() and pool.quiet()
    pool.reset_counters()
    return pool


@pytest.mark.parametrize("lag", list(LAGS))
def test_sim_from_empty_pool_everyone_converges(lag: str) -> None:
    """Members starting together, in random orders, on consistent or stale views, end with every slice owned, each
    member at its share (max - min <= 1), and then nothing changes."""
    rng = random.Random(7)
    for case in range(40):
        k, m = rng.randint(1, 60), rng.randint(1, 12)
        pool = Pool(k, seed=case, lag=LAGS[lag])
        pool.join(*names(m))
        pool.run_until_balanced()
        counts = pool.counts()
        assert max(counts.values()) - min(counts.values()) <= 1
        assert not pool.released  # the members all saw one another: nothing was handed over
        for _ in range(10):
            pool.round()
        assert pool.balanced() and pool.quiet() and not pool.released


@pytest.mark.parametrize("lag", list(LAGS))
def test_sim_staggered_start_converges(lag: str) -> None:
    """Members joining one by one (each taking what it can before the next arrives) still converge to the shares."""
    rng = random.Random(8)
    for case in range(25):
        k, m = rng.randint(1, 50), rng.randint(2, 8)
        pool = Pool(k, seed=case, lag=LAGS[lag])
        for member in names(m):
            pool.join(member)
            for _ in range(rng.randint(0, 15)):
                pool.round()
        pool.run_until_balanced()
        for _ in range(10):
            pool.round()
        assert pool.balanced() and pool.quiet()
        assert max(pool.moves.values(), default=0) <= m - 1  # at most once per join


def test_sim_k_equals_m_from_scratch_one_each_no_handoffs() -> None:
    """K = M members that see each other from the first round take one slice each in that round, with no handoff
    (the seed's behaviour), in any order and on consistent or stale views."""
    for lag in LAGS:
        for m in (1, 2, 3, 5, 10, 16, 30):
            for seed in range(3):
                pool = Pool(m, seed=seed, lag=LAGS[lag])
                pool.join(*names(m))
                pool.round()
                assert pool.counts() == dict.fromkeys(names(m), 1), (lag, m, seed)
                for _ in range(10):
                    pool.round()
                assert pool.counts() == dict.fromkeys(names(m), 1)
                assert not pool.released and not pool.moves and len(pool.acquired) == m


JOIN_CASES = [(100, 10), (100, 3), (10, 10), (7, 3), (64, 7), (250, 9), (5, 8), (37, 1)]


@pytest.mark.parametrize(("k", "m"), JOIN_CASES)
@pytest.mark.parametrize("lag", list(LAGS))
def test_sim_join_moves_at_most_the_newcomers_share_once_each(k: int, m: int, lag: str) -> None:
    """A member joining a balanced pool of M gets exactly its share, which is <= ceil(K / (M + 1)); only that many
    slices move, each once, all to the newcomer."""
    for seed in range(3):
        pool = balanced_pool(k, m, seed=seed, lag=lag)
        newcomer = f"new{seed}"
        pool.join(newcomer)
        rounds = pool.run_until_balanced()
        for _ in range(10):
            pool.round()
        assert pool.balanced() and pool.quiet()
        share = targets(k, sorted(pool.nodes))[newcomer]
        assert share <= math.ceil(k / (m + 1))
        assert sum(pool.moves.values()) == share == len(pool.released)
        assert all(n == 1 for n in pool.moves.values())
        assert {who for _, who in pool.acquired} <= {newcomer}
        # the move waits for the newcomer to settle, then takes a round or two
        assert rounds * STEP <= P.settle + P.min_hold + 5 * STEP


def test_sim_join_k100_m10_figures() -> None:
    """K=100, M=10: a join moves 9 or 10 slices (the newcomer's share; ceil(100/11) = 10), over many newcomers."""
    seen = Counter()
    for seed in range(12):
        pool = balanced_pool(100, 10, seed=seed)
        pool.join(f"joiner-{seed}")
        pool.run_until_balanced()
        seen[sum(pool.moves.values())] += 1
        assert max(pool.moves.values()) == 1
    assert set(seen) <= {9, 10} and sum(seen.values()) == 12


@pytest.mark.parametrize(("k", "m"), [(100, 10), (10, 10), (30, 4), (7, 3), (3, 5), (200, 2)])
@pytest.mark.parametrize("lag", list(LAGS))
def test_sim_death_survivors_take_exactly_the_dead_members_slices(k: int, m: int, lag: str) -> None:
    """When a member dies the survivors take exactly its slices, at once (before grace), and nothing else moves."""
    for seed in range(3):
        pool = balanced_pool(k, m, seed=seed, lag=lag)
        victim = names(m)[seed % m]
        lost = pool.kill(victim)
        rounds = pool.run_until_balanced()
        for _ in range(10):
            pool.round()
        assert pool.balanced() and pool.quiet()
        assert sorted(s for s, _ in pool.acquired) == sorted(lost)
        assert not pool.released and set(pool.moves) == set(lost)
        assert rounds * STEP < P.grace  # taken by share, not by the coverage timeout


def test_sim_churn_converges_and_moves_each_slice_at_most_once_per_change() -> None:
    """Under random joins, deaths and restarts (some overlapping, on consistent or stale views) the pool settles at
    the shares, stays quiet, and no slice moved more often than the membership changed."""
    for case in range(40):
        rng = random.Random(1000 + case)
        k, m = rng.randint(1, 60), rng.randint(2, 8)
        pool = balanced_pool(k, m, seed=case, lag=rng.choice(list(LAGS)))
        changes, dead = 0, []
        for _ in range(rng.randint(1, 6)):
            if len(pool.nodes) > 1 and rng.random() < 0.5:
                victim = rng.choice(sorted(pool.nodes))
                pool.kill(victim)
                dead.append(victim)
            elif dead and rng.random() < 0.5:
                pool.join(dead.pop(rng.randrange(len(dead))))  # back under the same identity: damped
            else:
                pool.join(f"j{changes}")
            changes += 1
            for _ in range(rng.randint(0, 8)):  # sometimes the next change comes before the pool has settled
                pool.round()
        pool.run_until_balanced()
        for _ in range(10):
            pool.round()
        assert pool.balanced() and pool.quiet()
        assert max(pool.moves.values(), default=0) <= changes, case


def test_sim_steady_state_plans_change_nothing() -> None:
    """At steady state every member decides, round after round and on any view, to acquire and release nothing."""
    for seed, (k, m) in enumerate([(100, 10), (10, 10), (7, 3), (3, 7), (1, 1), (0, 3)]):
        pool = balanced_pool(k, m, seed=seed)
        before = dict(pool.holders)
        for _ in range(40):
            for member in pool.nodes:
                for lag in (0, 1, 2):
                    d = pool.play(member, lag)
                    assert d.acquire == () and d.release == () and d.recheck is None
            pool.now += STEP
        assert pool.holders == before


def test_sim_quick_restart_same_identity_gets_every_slice_back() -> None:
    """A member that dies and is back under the same identity before anyone acted gets all its slices back."""
    for seed in range(10):
        pool = balanced_pool(100, 10, seed=seed, lag="mixed")
        victim = names(10)[seed]
        lost = pool.kill(victim)
        pool.join(victim)
        pool.run_until_balanced()
        assert sorted(pool.held(victim)) == sorted(lost)
        assert not pool.released and not pool.moves and len(pool.acquired) == len(lost)


def restart_after_takeover(k: int, m: int, seed: int) -> tuple[int, int, Pool]:
    """Kill one member of a balanced pool, let the survivors take its slices, then restart it under the same
    identity: (how many of its slices it got back, how many it had, the pool)."""
    pool = balanced_pool(k, m, seed=seed)
    victim = names(m)[seed % m]
    lost = pool.kill(victim)
    pool.run_until_balanced()  # the survivors take its slices
    pool.join(victim)
    pool.run_until_balanced()
    for _ in range(10):
        pool.round()
    assert pool.balanced() and pool.quiet()
    return len(set(lost) & set(pool.held(victim))), len(lost), pool


def test_sim_restart_after_takeover_moves_only_its_share_back() -> None:
    """A member restarting under the same identity after the survivors took its slices gets its share back: each
    slice moves at most once each way and nothing else moves."""
    for seed in range(6):
        _, lost, pool = restart_after_takeover(100, 10, seed)
        assert sum(pool.moves.values()) == 2 * lost  # each slice out to a survivor, then its share back
        assert max(pool.moves.values()) <= 2


RESTART_CASES = [(100, 10), (30, 4), (200, 5)]


def test_sim_restart_after_takeover_gets_most_slices_back() -> None:
    """A member restarting under the same identity after the survivors took its slices gets most of them back."""
    back = total = 0
    for seed in range(6):
        for k, m in RESTART_CASES:
            got, lost, _ = restart_after_takeover(k, m, seed)
            back, total = back + got, total + lost
    assert back / total > 0.5, f"{back} of {total} came back"


def test_decide_weighs_free_slices_as_weight_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """decide remembers the weights it computed (each pair hashed once per process, within a bound);
    they are the ones weight() gives, and a full cache starts again."""
    members = ["host/a.0", "host/b.1", "ünï/c.2"]
    for sid in ("s1", "0f3a9c", "slice-ü"):
        row = balance._weights_of(sid, members)
        assert all(row[m] == weight(m, sid) for m in members)
    hashed: list[str] = []
    monkeypatch.setattr(balance, "weight", lambda m, s: hashed.append(m) or weight(m, s))
    balance._weights_of("s1", [*members, "host/d.3"])  # one more member: only it is hashed
    assert hashed == ["host/d.3"] and balance._weights["s1"]["host/d.3"] == weight("host/d.3", "s1")
    monkeypatch.undo()
    cap = balance.CACHED_WEIGHTS
    try:
        balance.CACHED_WEIGHTS = balance._cached + 2
        row = balance._weights_of("new", members)  # 3 more than the bound allows: the cache starts again
        assert balance._cached == 3 and list(balance._weights) == ["new"]
        assert all(row[m] == weight(m, "new") for m in members)
    finally:
        balance.CACHED_WEIGHTS = cap


def test_meant_for_breaks_equal_weights_by_the_highest_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two members with the same weight for a slice: the one with the highest name gets it, as a
    (weight, name) comparison gives (every member must compute the same)."""
    monkeypatch.setattr(balance, "weight", lambda member, slice_id: 7)
    monkeypatch.setattr(balance, "_weights", {})
    monkeypatch.setattr(balance, "_cached", 0)
    view = View("a", 0.0, frozenset({"a", "b", "c"}), frozenset({"a", "b", "c"}), {"s1": None, "s2": None, "s3": None})
    assert meant_for(view) == {"s1": "c", "s2": "b", "s3": "a"}  # one slice each, by name from the highest
