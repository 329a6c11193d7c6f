"""Slicing strategies are pure, stable and balanced."""

from __future__ import annotations

import pytest

from shardpreempt import ConfigError, Shard, make_slices
from shardpreempt.slicing import STRATEGIES, pack

SHARDS = [Shard(f"s{i}") for i in range(10)]


def test_round_robin_matches_the_seed() -> None:
    """Shard i goes to slice i mod n, as the seed split them."""
    slices = make_slices(SHARDS, 3, "round-robin")
    assert [s.digest for s in slices] == [["s0", "s3", "s6", "s9"], ["s1", "s4", "s7"], ["s2", "s5", "s8"]]


def test_contiguous_sizes_differ_by_at_most_one() -> None:
    """Contiguous slices are runs of shards with balanced sizes."""
    slices = make_slices(SHARDS, 4, "contiguous")
    assert slices[0].digest == ["s0", "s1", "s2"]
    assert sorted(len(s.shards) for s in slices) == [2, 2, 3, 3]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_shard_in_exactly_one_slice_and_ids_stable(strategy: str) -> None:
    """Each strategy covers every shard once, and the same input gives the same slice ids."""
    a = make_slices(SHARDS, 4, strategy)
    b = make_slices([Shard(s.identity) for s in SHARDS], 4, strategy)
    assert sorted(k for s in a for k in s.digest) == sorted(s.identity for s in SHARDS)
    assert [s.id for s in a] == [s.id for s in b]
    assert len({s.id for s in a}) == len(a)


def test_rendezvous_moves_few_shards_when_the_count_grows() -> None:
    """Going from 10 to 11 slices moves about 1/11 of the shards under rendezvous hashing."""
    shards = [Shard(f"tenant-{i}") for i in range(2000)]

    def owner(slices: list) -> dict[str, int]:
        return {k: s.index for s in slices for k in s.digest}

    before, after = owner(make_slices(shards, 10, "rendezvous")), owner(make_slices(shards, 11, "rendezvous"))
    moved = sum(before[k] != after[k] for k in before)
    assert moved < 2000 * 0.15
    rr_before, rr_after = owner(make_slices(shards, 10)), owner(make_slices(shards, 11))
    assert sum(rr_before[k] != rr_after[k] for k in rr_before) > 1000


def test_more_slices_than_shards_gives_one_shard_each() -> None:
    """Asking for more slices than shards yields no empty slice."""
    assert [len(s.shards) for s in make_slices(SHARDS[:3], 8)] == [1, 1, 1]


@pytest.mark.parametrize(("count", "strategy"), [(0, "round-robin"), (-1, "round-robin"), (2, "nope")])
def test_bad_slicing_input_is_a_config_error(count: int, strategy: str) -> None:
    """A non-positive count or unknown strategy is rejected clearly."""
    with pytest.raises(ConfigError):
        make_slices(SHARDS, count, strategy)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_packed_slices_are_the_same_slices_made_of_fresh_objects(strategy: str) -> None:
    """pack() changes where the shards live in memory, nothing a caller can compare."""
    shards = [Shard(f"db{i}", settings={"password": "x"}) for i in range(50)]
    shards += [Shard("named", "a name", {"host": "h"}), Shard("nul\0inside")]
    plain = make_slices(shards, 7, strategy)
    packed = pack(plain)
    assert [(s.index, s.id, s.keys, s.first_key, s.shards) for s in packed] == \
        [(s.index, s.id, s.keys, s.first_key, s.shards) for s in plain]
    for p, s in zip(packed, plain, strict=True):
        assert {"id", "keys", "first_key"} <= vars(p).keys()  # computed before the fork, not in each worker
        assert all(a is not b and a.identity is not b.identity for a, b in zip(p.shards, s.shards, strict=True))
        assert all(a.settings is b.settings and a.name == b.name for a, b in zip(p.shards, s.shards, strict=True))
        assert p.keys[0] is p.first_key and all(k is sh.identity for k, sh in zip(p.keys, p.shards, strict=True))
    assert "'x'" not in repr(packed[0].shards[0])
