"""The pool's balancing policy: pure functions from a view of the pool to a decision, no I/O.

Every member of a pool runs the same policy on what it observes (who is a member, who holds which
slice) and decides for itself only: which free slices to take now and which of its slices to hand
over. Members never talk to each other; they converge because they compute the same thing.

* **Shares.** With K slices and M counted members, every member's target is ``K // M``; the
  ``K % M`` members ranked first by a hash of their identity get one more. Ranking by identity (not
  by current holdings) keeps targets fixed while slices move, so nothing oscillates: a death only
  raises survivors' targets, a join only lowers them. K = M gives exactly one slice each.
* **Coverage first.** A free slice is always taken: members under target take the ones assigned to
  them at once; anyone takes a slice that has stayed free for ``grace`` seconds, even above target.
* **Preference.** Free slices are assigned, in slice order, to the under-target member with the
  highest rendezvous weight of (member identity, slice id), so a member that restarts under the same
  identity gets its slices back, and a change moves only what it must.
* **Moves.** A member above target releases its least-preferred slices (planned handoff); one that
  acquired a slice less than ``min_hold`` seconds ago keeps it for now, so a slice moves at most
  once per membership change even while views disagree for a moment.
* **Damping.** A member counts towards the shares only after it has been seen for its settle time,
  which doubles with each reappearance within ``flap_window`` (up to ``max_settle``), so a member
  that flaps does not shake the pool. Members that disappear stop counting at once: their slices
  are free anyway.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


def weight(member: str, slice_id: str) -> int:
    """Rendezvous weight of (member identity, slice id): the highest weight is the preferred holder."""
    digest = hashlib.blake2b(f"{member}\0{slice_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


#: (member, slice) weights a process remembers at most: a pool of 100 members and 100 slices is 10,000.
#: Beyond it the cache starts again (a bigger pool's looks find few slices free: few weights each).
CACHED_WEIGHTS = 1 << 14
_weights: dict[str, dict[str, int]] = {}  # slice id -> member -> weight(member, slice id)
_cached = 0


def _weights_of(slice_id: str, members: Iterable[str]) -> dict[str, int]:
    """The weights of ``members`` for ``slice_id`` (a dict that holds at least them), each hashed once
    per process: every look of a forming pool weighs the same members for the same free slices, and
    hashing them again was most of a look's time (5 of 7 ms with 100 members and 100 free slices)."""
    global _cached
    row = _weights.get(slice_id)
    if row is None:
        row = _weights[slice_id] = {}
    missing = set(members).difference(row)
    if missing:
        if _cached + len(missing) > CACHED_WEIGHTS:
            _weights.clear()
            _cached = 0
            row = _weights[slice_id] = {}
            missing = set(members)
        for m in missing:
            row[m] = weight(m, slice_id)
        _cached += len(missing)
    return row


@functools.lru_cache(maxsize=4096)
def _rank(member: str) -> bytes:
    return hashlib.blake2b(member.encode(), digest_size=8).digest()


def targets(slices: int, members: Sequence[str]) -> dict[str, int]:
    """Each member's fair share of ``slices``: ``slices // M`` or one more, by a fixed ranking."""
    if not members:
        return {}
    ranked = sorted(set(members), key=lambda m: (_rank(m), m))
    base, extra = divmod(slices, len(ranked))  # a member listed twice counts once
    return {m: base + (1 if i < extra else 0) for i, m in enumerate(ranked)}


@dataclass(frozen=True)
class Params:
    """The policy's timing knobs (seconds)."""

    grace: float = 0.5  # a slice free this long is taken by anyone, even above target
    settle: float = 0.5  # a new member counts after it has been seen this long
    max_settle: float = 30.0  # damping cap for a flapping member
    flap_window: float = 60.0  # reappearances within this window double the settle time
    min_hold: float = 0.5  # a slice acquired less than this long ago is not handed over


@dataclass(frozen=True)
class View:
    """What one member knows when it decides.

    ``members``: every member that counts for taking free slices (the live ones, plus, while this
    member is starting, the siblings its supervisor is starting with it); ``settled``: the live
    members that count for handing slices over (seen for their settle time, see :class:`Members`);
    ``holders``: each slice id, in slice order, to its holder's identity or ``None``; ``free_since``:
    for free slices, when this member first saw them free; ``held_since``: when it acquired each of
    its own slices.
    """

    me: str
    now: float
    members: frozenset[str]
    settled: frozenset[str]
    holders: Mapping[str, str | None]
    free_since: Mapping[str, float] = field(default_factory=dict)
    held_since: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What to do now: acquire these slices (in order), release those; look again at ``recheck``.

    ``assigned``: the slices of ``acquire`` assigned to this member (towards its share); the others are
    free slices nobody took within ``grace``, which every member that sees them tries to take, in the
    same order. ``handoff``: for each slice of ``release``, the short member it is meant for (the one
    that prefers it most), so the releaser can tell that member alone.
    """

    acquire: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    target: int = 0
    recheck: float | None = None  # the earliest time the decision may change without news from the pool
    assigned: tuple[str, ...] = ()
    handoff: Mapping[str, str] = field(default_factory=dict)


def _held(view: View, members: frozenset[str]) -> dict[str, list[str]]:
    held_by: dict[str, list[str]] = {m: [] for m in members}
    for slice_id, holder in view.holders.items():
        if holder is not None and holder in held_by:
            held_by[holder].append(slice_id)
    return held_by


def decide(view: View, params: Params = Params()) -> Decision:
    """The decision of member ``view.me`` for the pool it sees."""
    now = view.now
    k = len(view.holders)
    wake: list[float] = []

    # Taking: shares over every member that may take; free slices go, in slice order, to the
    # member with a deficit that prefers each one most. Others wait ``grace`` (coverage first).
    takers = view.members | {view.me}
    share = targets(k, sorted(takers))
    meant = _assign(view, takers, share, until=view.me)
    acquire: list[str] = []
    assigned: list[str] = []  # the free slices meant for view.me
    for slice_id, holder in view.holders.items():
        if holder is not None:
            continue
        seen = view.free_since.get(slice_id, now)
        if meant.get(slice_id) == view.me:
            assigned.append(slice_id)
        if meant.get(slice_id) == view.me or now - seen >= params.grace:
            acquire.append(slice_id)
        else:
            wake.append(seen + params.grace)

    # Handing over: shares over settled members only (a newcomer counts once it has settled);
    # release the least-preferred slices held long enough, if a settled member lacks slices.
    release: list[str] = []
    handoff: dict[str, str] = {}
    settled = view.settled | {view.me}
    share_settled = targets(k, sorted(settled))
    held_settled = _held(view, settled)
    mine = held_settled[view.me]
    excess = len(mine) - share_settled[view.me]
    someone_short = any(share_settled[m] > len(held_settled[m]) for m in settled if m != view.me)
    if excess > 0 and not acquire and someone_short:
        # Hand over first what the short members prefer most over us: a member that restarts under the
        # same identity gets back the slices it had, since it prefers them.
        short = [m for m in settled if m != view.me and share_settled[m] > len(held_settled[m])]

        def keep(slice_id: str) -> tuple[int, str]:
            return weight(view.me, slice_id) - max(weight(m, slice_id) for m in short), slice_id

        for slice_id in sorted(mine, key=keep):
            if len(release) == excess:
                break
            since = view.held_since.get(slice_id, now - params.min_hold)
            if now - since >= params.min_hold:
                release.append(slice_id)
                handoff[slice_id] = max(short, key=lambda m: (weight(m, slice_id), m))
            else:
                wake.append(since + params.min_hold)
    future = [t for t in wake if t > now]
    return Decision(tuple(acquire), tuple(release), share[view.me], min(future) if future else None,
                    tuple(assigned), handoff)


def _assign(view: View, takers: frozenset[str], share: Mapping[str, int], until: str | None = None) -> dict[str, str]:
    """Free slice id -> the member it is meant for: in slice order, the member short of its share
    that prefers it most. With ``until``, only as far as it concerns that member: once it wants no
    more, who gets the rest does not matter to it."""
    held_by = _held(view, takers)
    deficit = {m: share[m] - len(held_by[m]) for m in takers}
    # highest name first: of members with equal weights, max() keeps the first, as (weight, name) would
    wanting = sorted((m for m in takers if deficit[m] > 0), reverse=True)
    out: dict[str, str] = {}
    for slice_id, holder in view.holders.items():
        if holder is not None or not wanting or (until is not None and deficit.get(until, 0) <= 0):
            continue
        chosen = max(wanting, key=_weights_of(slice_id, wanting).__getitem__)
        out[slice_id] = chosen
        deficit[chosen] -= 1
        if not deficit[chosen]:
            wanting.remove(chosen)
    return out


def meant_for(view: View) -> dict[str, str]:
    """Free slice id -> the member short of its share that the policy gives it to (every member
    computes the same from the same view): who must hear of a slice that became free."""
    takers = view.members | {view.me}
    return _assign(view, takers, targets(len(view.holders), sorted(takers)))


class Members:
    """Tracks when each live member was first seen; a member settles after its settle time, which
    doubles each time it reappears within ``flap_window`` (damping for members that flap)."""

    def __init__(self, params: Params = Params()) -> None:
        self.params = params
        self._settles_at: dict[str, float] = {}
        self._history: dict[str, list[float]] = {}  # identity -> times it (re)appeared

    def update(self, present: Sequence[str] | frozenset[str], now: float,
               established: Mapping[str, float] | None = None) -> tuple[frozenset[str], float | None]:
        """Record the members seen now; return the settled ones and when the next one settles.

        ``established`` optionally gives, per member, how long ago (seconds) it joined as the
        backend reports it, so a member joining a running pool does not wait out everyone's settle
        time.
        """
        p = self.params
        present_set = set(present)
        for gone in [m for m in self._settles_at if m not in present_set]:
            del self._settles_at[gone]
        for member in present_set - set(self._settles_at):
            history = [t for t in self._history.get(member, []) if now - t <= p.flap_window]
            # exponent bounded: 2 ** 1024 does not convert to a float (OverflowError) after that many flaps
            settle = min(p.max_settle, p.settle * 2.0 ** min(len(history), 1000))
            age = (established or {}).get(member, 0.0)
            self._settles_at[member] = now + settle - (age if not history else 0.0)
            self._history[member] = [*history, now]
        settled = frozenset(m for m, t in self._settles_at.items() if t <= now)
        pending = [t for t in self._settles_at.values() if t > now]
        return settled, (min(pending) if pending else None)
