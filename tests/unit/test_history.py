"""The history checker catches each kind of violation on crafted histories."""

from __future__ import annotations

from typing import Any

from shardpreempt.testing import check


def ev(t: float, event: str, shard: str = "a", owner: str = "o1", token: int = 1, **kw: Any) -> dict[str, Any]:
    return {"t": t, "event": event, "shard": shard, "owner": owner, "token": token, **kw}


def test_clean_handover_passes() -> None:
    """Release then acquire with a higher token is fine."""
    report = check([ev(0, "acquired"), ev(1, "released"), ev(1.01, "acquired", owner="o2", token=2)],
                   max_unowned=0.1, end=2)
    assert report.ok, report.violations


def test_overlap_is_caught() -> None:
    """A second owner acquiring before the first released is an overlap."""
    report = check([ev(0, "acquired"), ev(0.5, "acquired", owner="o2", token=2), ev(1, "released")])
    assert report.count("overlap") == 1


def test_killed_holder_holds_until_its_kill_time() -> None:
    """A SIGKILLed owner holds until its exit event; acquiring before that overlaps, after it does not."""
    base = [ev(0, "acquired", pid=7, host="h"), {"t": 2.0, "event": "exited", "pid": 7, "host": "h"}]
    assert check([*base, ev(2.5, "acquired", owner="o2", token=2)]).ok
    assert check([*base, ev(1.5, "acquired", owner="o2", token=2)]).count("overlap") == 1


def test_lost_owner_holds_until_its_lost_event() -> None:
    """An owner that lost its lease counts as holding until it reports the loss."""
    history = [ev(0, "acquired"), ev(1.0, "acquired", owner="o2", token=2), ev(1.5, "lost")]
    assert check(history).count("overlap") == 1


def test_token_going_backwards_is_caught() -> None:
    """A later holder with a lower or equal token is a token violation."""
    history = [ev(0, "acquired", token=5), ev(1, "released", token=5), ev(2, "acquired", owner="o2", token=5)]
    assert check(history).count("token") == 1


def test_unowned_gap_longer_than_the_bound_is_caught_unless_excused() -> None:
    """A shard free for longer than the bound fails, unless the gap falls in an excused window."""
    history = [ev(0, "acquired"), ev(1, "released"), ev(3, "acquired", owner="o2", token=2)]
    report = check(history, max_unowned=0.5, end=4)
    assert report.count("unowned") == 1 and 1.9 < report.max_unowned < 2.1
    assert check(history, max_unowned=0.5, end=4, excused=[(0.9, 3.1)]).ok
    after_heal = check(history, max_unowned=0.5, end=4, excused=[(0.9, 2.2)])
    assert after_heal.count("unowned") == 1 and 0.7 < after_heal.max_unowned < 0.9
    never = check(history, max_unowned=0.5, shards=["a", "b"], start=0, end=4)
    assert any(v.shard == "b" for v in never.violations)
