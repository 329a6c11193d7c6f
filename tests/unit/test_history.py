"""The history checker catches each kind of violation on crafted histories."""

from __future__ import annotations

from typing import Any

from shardpreempt.claims import SELF_FENCED
from shardpreempt.testing import check
from shardpreempt.testing.netfaults import Partition, cut_holds


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


def test_cut_holds_say_how_each_cut_hold_ended() -> None:
    """Of the holds a partition cut, one self-fenced, one was released by its holder (a handoff under way), one
    only heard of it from the server; holds of other processes, or ended before the cut, are not counted."""
    history = [
        ev(0, "acquired", shard="a", owner="o1", pid=7), ev(0, "acquired", shard="b", owner="o1", pid=7),
        ev(0, "acquired", shard="c", owner="o2", pid=8), ev(0, "acquired", shard="d", owner="o3", pid=9),
        ev(0.5, "released", shard="d", owner="o3", pid=9, reason="handoff"),  # before the cut
        ev(1.1, "released", shard="b", owner="o1", pid=7, reason="handoff"),
        ev(1.8, "lost", shard="a", owner="o1", pid=7, reason=SELF_FENCED),
        ev(2.5, "lost", shard="c", owner="o2", pid=8, reason="backend says lost: session expired"),
        ev(2.2, "acquired", shard="a", owner="o4", token=2, pid=10),
        ev(2.6, "acquired", shard="c", owner="o4", token=2, pid=10),
    ]
    figures = cut_holds([Partition(0, frozenset({7, 8, 9}), start=1.0, end=2.5)], history)
    assert figures["holds_cut"] == 3
    assert (figures["self_fenced"], figures["released_cut"]) == (1, 1)
    assert figures["min_fence_lead_s"] == 0.1  # c: lost at 2.5, taken at 2.6
    assert figures["max_takeover_s"] == 1.6
