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
from .model import Shard, Slice

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
