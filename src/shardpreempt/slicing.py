"""Slicing strategies: pure functions ``(shards, count) -> slices``, no I/O.

* ``round-robin`` — shard *i* goes to slice *i mod n* (the seed's split);
* ``contiguous`` — consecutive runs of shards, sizes differing by at most one;
* ``rendezvous`` — highest-random-weight hashing of (shard identity, slice number): when the count
  changes, only about 1/n of the shards move.

Each result is the same on every machine and every run for the same shards and count, so slice ids
are stable. Empty slices are dropped (more slices than shards gives one shard per slice).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from .errors import ConfigError
from .model import Shard, Slice, clones
from .shardsets import collector_paused

Strategy = Callable[[Sequence[Shard], int], list[list[Shard]]]


def _round_robin(shards: Sequence[Shard], count: int) -> list[list[Shard]]:
    return [list(shards[i::count]) for i in range(count)]


def _contiguous(shards: Sequence[Shard], count: int) -> list[list[Shard]]:
    size, extra = divmod(len(shards), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(list(shards[start:end]))
        start = end
    return out


def _weight(identity: str, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{index}\0{identity}".encode(), digest_size=8).digest(), "big")


def _rendezvous(shards: Sequence[Shard], count: int) -> list[list[Shard]]:
    out: list[list[Shard]] = [[] for _ in range(count)]
    for shard in shards:
        out[max(range(count), key=lambda i: _weight(shard.identity, i))].append(shard)
    return out


STRATEGIES: dict[str, Strategy] = {
    "round-robin": _round_robin,
    "contiguous": _contiguous,
    "rendezvous": _rendezvous,
}


def make_slices(shards: Sequence[Shard], count: int, strategy: str = "round-robin") -> list[Slice]:
    """Split ``shards`` into at most ``count`` non-empty slices with the named strategy."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown slicing strategy {strategy!r} (choose from {', '.join(STRATEGIES)})",
                          key="slicing.strategy")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"slice count must be a positive integer, got {count!r}", key="slicing.slices")
    if not shards:
        raise ConfigError("no shards to slice", key="shards")
    groups = [g for g in STRATEGIES[strategy](list(shards), min(count, len(shards))) if g]
    return [Slice(i, tuple(g)) for i, g in enumerate(groups)]


def pack(slices: Sequence[Slice]) -> list[Slice]:
    """The same slices, with each slice's shards copied next to each other in memory.

    For a process that forks workers (``shardpreempt run``). A forked worker shares its supervisor's
    memory page by page until it writes to one, and merely using an object writes its reference count.
    Round-robin slices take every K-th shard of the list, so one slice's shards sit on as many pages as
    it has shards: at 100,000 shards a worker that acquired a few slices had copied most of the shard
    list. Packed, each slice's shards and keys fill a few consecutive pages, and what every worker
    reads on every look at the pool (each slice's id and first key, the slice objects) is allocated
    first, together. Ids and keys are computed here, once, before the fork.
    """
    with collector_paused():
        return _pack(slices)


def _pack(slices: Sequence[Slice]) -> list[Slice]:
    firsts = _copies([s.first_key for s in slices])  # the pool's look reads these: allocated together
    ids = _copies([s.id for s in slices])
    packed = []
    for sl, first in zip(slices, firsts, strict=True):
        keys = (first, *_copies(sl.keys[1:]))
        names = [k if sh.name == sh.identity else sh.name for k, sh in zip(keys, sl.shards, strict=True)]
        packed.append((keys, tuple(clones(keys, names, [sh.settings for sh in sl.shards]))))
    out = []
    for sl, sid, (keys, shards) in zip(slices, ids, packed, strict=True):
        new = Slice(sl.index, shards)
        new.__dict__.update(keys=keys, id=sid, first_key=keys[0])  # what the cached properties would compute
        out.append(new)
    return out


def _copies(texts: Sequence[str]) -> list[str]:
    """New string objects equal to ``texts``, allocated one after another."""
    if not texts:
        return []
    joined = "\0".join(texts)
    parts = joined.split("\0")
    if len(parts) == len(texts):
        return parts
    return [t.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass") for t in texts]  # a key holds NUL
