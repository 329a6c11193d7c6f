"""The pool as the backend records it: its layout, its members, and what a member observes.

* **Layout** — strategy, slice count and a fingerprint of the shard set, stored as the record
  ``shardpreempt:layout`` by the first supervisor; later ones adopt it, and one that asks for a
  different layout is refused (:class:`LayoutConflict`, exit status 2). ``shardpreempt layout
  --apply`` replaces it; running members then hand back every slice and take up the new ones.
* **Members** — every live worker holds one *member key* ``shardpreempt:member:N`` (the lowest free
  N) under the same liveness session as its slices, so membership costs no extra renewal and a
  member disappears exactly when its session (file: its process) does. The member's identity (its
  supervisor slot, stable across a restart of the worker) is the part of its owner id before
  ``:pid:random``.
* **Observation** — one ``inspect`` of the member keys and the first key of every slice (slices are
  acquired all or nothing, so the first key tells the holder), in chunks of 64 keys.

Lock keys and record names starting with ``shardpreempt:`` belong to the pool; a shard identity may
not start with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .model import Holder, Shard, Slice
from .typing import Backend

RESERVED = "shardpreempt:"
MEMBERS = f"{RESERVED}member:"  # every member key starts with it
LAYOUT_RECORD = "shardpreempt:layout"
ONCE_RECORD = "shardpreempt:once"
BELL_RECORD = "shardpreempt:bell"  # server backends: changed by every ring, read by members every period
CHUNK = 64  # records per read_records call in once mode


class LayoutConflict(ConfigError):
    """The pool on this backend has a different layout than the one asked for."""


def member_key(slot: int) -> str:
    """The lock key a member holds while it lives."""
    return f"{MEMBERS}{slot}"


def identity_of(owner: str) -> str:
    """A member's identity from an owner id ``IDENTITY:pid:random``."""
    return owner.rsplit(":", 2)[0]


def member_owner(identity: str) -> str:
    """A fresh owner id for one incarnation of the member ``identity``."""
    return f"{identity}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def default_identity(name: str | None, index: int) -> str:
    """``host/NAME.INDEX``: NAME is the supervisor's name (default: its pid), INDEX the worker slot."""
    return f"{socket.gethostname()}/{name or os.getpid()}.{index}"


def fingerprint(shards: Sequence[Shard]) -> str:
    """A short stable hash of the shard identities in order."""
    h = hashlib.sha256()
    for shard in shards:
        h.update(shard.identity.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def check_identities(shards: Sequence[Shard]) -> None:
    """ConfigError for a shard identity in the pool's reserved namespace."""
    for shard in shards:
        if shard.identity.startswith(RESERVED):
            raise ConfigError(f"identities starting with {RESERVED!r} are reserved for the pool",
                              key=f"shards.{shard.name}")


@dataclass(frozen=True)
class Layout:
    """How the pool cuts its shards: strategy, slice count, and which shards (by fingerprint)."""

    strategy: str
    slices: int
    shards: int
    fingerprint: str

    @classmethod
    def of(cls, shards: Sequence[Shard], strategy: str, slices: int) -> Layout:
        """The layout for ``shards`` cut into ``slices`` with ``strategy``."""
        return cls(strategy, slices, len(shards), fingerprint(shards))

    def encode(self) -> str:
        """The record's value."""
        return json.dumps({"strategy": self.strategy, "slices": self.slices, "shards": self.shards,
                           "fingerprint": self.fingerprint}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> Layout:
        """Parse a record value; ConfigError if it is not one."""
        try:
            data = json.loads(raw)
            return cls(str(data["strategy"]), int(data["slices"]), int(data["shards"]), str(data["fingerprint"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"the pool's layout record is unreadable: {raw[:80]!r}") from None

    def __str__(self) -> str:
        return f"{self.slices} slices ({self.strategy}) of {self.shards} shards [{self.fingerprint}]"

    def public(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"strategy": self.strategy, "slices": self.slices, "shards": self.shards,
                "fingerprint": self.fingerprint}


def recorded_layout(backend: Backend) -> Layout | None:
    """The pool's recorded layout, if any."""
    raw = backend.read_records([LAYOUT_RECORD])[LAYOUT_RECORD]
    return None if raw is None else Layout.decode(raw)


def resolve_layout(backend: Backend, shards: Sequence[Shard], strategy: str, slices: int | None,
                   default_slices: int) -> Layout:
    """Adopt the pool's recorded layout, or record ours if there is none.

    ``slices`` is the count asked for explicitly (flag, variable or config), ``None`` to adopt the
    pool's; ``default_slices`` is used only by the first supervisor of a pool.
    """
    check_identities(shards)
    ours = Layout.of(shards, strategy, slices if slices is not None else default_slices)
    for _ in range(5):
        current = recorded_layout(backend)
        if current is None:
            if backend.swap_record(LAYOUT_RECORD, None, ours.encode()):
                return ours
            continue  # another supervisor recorded one first: compare with it
        wanted = Layout.of(shards, strategy, slices if slices is not None else current.slices)
        if wanted != current:
            raise LayoutConflict(
                f"the pool on {backend.url} has layout {current}, but this config asks for {wanted}; "
                "use the same shards, strategy and slice count on every machine, or change the pool's "
                "layout with: shardpreempt layout CONFIG --apply")
        return current
    raise ConfigError(f"the pool's layout record on {backend.url} keeps changing; try again")


def apply_layout(backend: Backend, layout: Layout) -> Layout | None:
    """Record ``layout`` as the pool's (replacing any); return the one it replaced."""
    for _ in range(10):
        current = backend.read_records([LAYOUT_RECORD])[LAYOUT_RECORD]
        if backend.swap_record(LAYOUT_RECORD, current, layout.encode()):
            return None if current is None else Layout.decode(current)
    raise ConfigError(f"the pool's layout record on {backend.url} keeps changing; try again")


@dataclass(frozen=True)
class Member:
    """A live member as the backend shows it."""

    identity: str
    slot: int
    owner: str
    pid: int | None
    host: str | None
    since: float | None

    def public(self, slices: int) -> dict[str, Any]:
        """A JSON-ready dict, with the number of slices it holds."""
        return {"identity": self.identity, "slot": self.slot, "owner": self.owner, "pid": self.pid,
                "host": self.host, "since": self.since, "slices": slices}


@dataclass(frozen=True)
class Observation:
    """Members and slice holders, read in one pass."""

    members: dict[str, Member]  # identity -> member (its lowest slot when a restarted one's old key lingers)
    holders: dict[str, str | None]  # slice id -> holder identity, in slice order
    owners: dict[str, Holder | None]  # slice id -> the holder record of the slice's first key
    by_slot: dict[int, Member]  # every member slot in use, a dead incarnation's too, in slot order

    @property
    def top_slot(self) -> int:
        """The highest member slot in use (-1: none)."""
        return max(self.by_slot, default=-1)


def look_at(backend: Backend, keys: Sequence[str], under: str | None = None) -> dict[str, Holder | None]:
    """Who holds each key a look reads: ``inspect``, or the backend's cheaper ``peek`` where it has one
    (file://: a probe of cached descriptors; etcd: the keys without each holder's time left, which a
    look does not use). Redis, SQL and ZooKeeper answer any number of keys in a few round trips. With
    ``under`` (the member keys' prefix), a backend with ``peek_under`` (etcd) reads every key under it
    with one range instead of one read per key."""
    peek_under = getattr(backend, "peek_under", None) if under is not None else None
    if peek_under is not None:
        return dict(peek_under(keys, under))
    peek = getattr(backend, "peek", None)
    return dict(peek(keys) if peek is not None else backend.inspect(keys))


def observe(backend: Backend, slices: Sequence[Slice], slots: int) -> Observation:
    """Who is a member (member slots ``0..slots-1``) and who holds each slice."""
    member_keys = [member_key(j) for j in range(slots)]
    seen = look_at(backend, member_keys + [s.first_key for s in slices], under=MEMBERS)
    members: dict[str, Member] = {}
    by_slot: dict[int, Member] = {}
    for j, key in enumerate(member_keys):
        h = seen.get(key)
        if h is None:
            continue
        ident = identity_of(h.owner)
        by_slot[j] = Member(ident, j, h.owner, h.pid, h.host, h.since)
        members.setdefault(ident, by_slot[j])
    holders: dict[str, str | None] = {}
    owners: dict[str, Holder | None] = {}
    for s in slices:
        h = seen.get(s.first_key)
        holders[s.id] = identity_of(h.owner) if h is not None else None
        owners[s.id] = h
    return Observation(members, holders, owners, by_slot)


def member_bell(slot: int) -> str:
    """Server backends: the bell of one member (by member slot), rung for news that concerns it alone."""
    return f"{BELL_RECORD}:{slot}"


def ring(backend: Backend, slots: Sequence[int] = ()) -> None:
    """Tell members to look at the pool again. Without ``slots``, every member: a release nobody was
    told of, a leave, a member seen dead. On ``file://`` the bell file (inotify wakes members at
    once, and every ring is for everyone); on a server a new value of the bell record, which members
    read every period while the pool is quiet. With ``slots`` (servers), only those members: each
    has a bell of its own, read with the pool's in one round trip (see ``docs/pool.md``)."""
    file_ring = getattr(backend, "ring", None)
    if file_ring is not None:
        file_ring()
        return
    names = [member_bell(j) for j in slots] if slots else [BELL_RECORD]
    for name, current in backend.read_records(names).items():
        backend.swap_record(name, current, os.urandom(8).hex())  # lost the race: someone rang anyway


def bell(backend: Backend, slot: int | None = None) -> object:
    """The bell's current value (with ``slot``, on servers: the pool's and that member's bells): it
    differs from an earlier one after a ring."""
    file_bell = getattr(backend, "bell", None)
    if file_bell is not None:
        return file_bell()
    names = [BELL_RECORD] if slot is None else [BELL_RECORD, member_bell(slot)]
    seen = backend.read_records(names)
    return tuple(seen[n] for n in names)


def join_margin(top_slot: int) -> int:
    """How far past the highest member slot in use a worker may join, and so how far past it every look
    and ``status`` read: 16 slots, or an eighth of the slots in use in a pool of more than 128 (so that
    hundreds of workers joining at once have room beside each other: with 16, about 16 got in per
    round of tries)."""
    return max(16, (top_slot + 1) // 8)


def slots_to_watch(top_slot: int, window: int = 16) -> int:
    """How many member slots the next observation covers, after one over ``window`` slots saw
    ``top_slot`` as the highest in use: all in use, with room for newcomers (:func:`join_margin`). When
    the highest came within the margin of the window's end (more members may be beyond), twice as many
    as in use, so a member catching up with a growing pool looks again a few times, not once per 16
    joins; the window shrinks no lower than twice what is in use."""
    margin = join_margin(top_slot)
    if top_slot + margin >= window:
        return max(16, top_slot + margin + 1, 2 * (top_slot + 1))
    return max(16, top_slot + margin + 1, min(window, 2 * (top_slot + 17)))


# -- once mode: one pass over every slice by the whole pool -------------------------------------------
def once_record(pass_id: str, slice_id: str) -> str:
    """The record that marks ``slice_id`` done (``ok`` or ``failed``) in a once pass."""
    return f"{ONCE_RECORD}:{pass_id}:{slice_id}"


def begin_pass(backend: Backend, layout: Layout) -> str:
    """Join the pool's open once pass for ``layout``, or open a new one; return its id.

    The pass record is ``{"pass": N, "layout": FINGERPRINT/SLICES/STRATEGY, "open": bool}``. A pass
    stays open until every slice has a result, so supervisors started while it runs join it and one
    started after it finished begins the next pass.
    """
    key = f"{layout.fingerprint}/{layout.slices}/{layout.strategy}"
    for _ in range(10):
        raw = backend.read_records([ONCE_RECORD])[ONCE_RECORD]
        current = _decode_pass(raw)
        if current is not None and current["open"] and current["layout"] == key:
            return str(current["pass"])
        number = int(current["pass"]) + 1 if current is not None else 1
        value = json.dumps({"pass": number, "layout": key, "open": True}, separators=(",", ":"))
        if backend.swap_record(ONCE_RECORD, raw, value):
            return str(number)
    raise ConfigError(f"the pool's once record on {backend.url} keeps changing; try again")


def pass_results(backend: Backend, pass_id: str, slices: Sequence[Slice]) -> dict[str, str | None]:
    """slice id -> ``ok`` | ``failed`` | ``None`` (not done) in pass ``pass_id``."""
    out: dict[str, str | None] = {}
    ids = [s.id for s in slices]
    for i in range(0, len(ids), CHUNK):
        names = {once_record(pass_id, sid): sid for sid in ids[i:i + CHUNK]}
        for name, value in backend.read_records(list(names)).items():
            out[names[name]] = value
    return out


def end_pass(backend: Backend, pass_id: str) -> None:
    """Close pass ``pass_id`` (idempotent; a later pass is left alone)."""
    for _ in range(10):
        raw = backend.read_records([ONCE_RECORD])[ONCE_RECORD]
        current = _decode_pass(raw)
        if current is None or str(current["pass"]) != pass_id or not current["open"]:
            return
        if backend.swap_record(ONCE_RECORD, raw, json.dumps({**current, "open": False}, separators=(",", ":"))):
            return


def _decode_pass(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return {"pass": int(data["pass"]), "layout": str(data["layout"]), "open": bool(data["open"])}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"the pool's once record is unreadable: {raw[:80]!r}") from None
