"""Twenty random joins, leaves and kills in a row: the pool stays safe and ends fully owned and fair."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import pytest

from .conftest import Pool


@pytest.mark.slow_on_servers
def test_twenty_random_joins_leaves_and_kills(make_pool: Any) -> None:
    """After 20 random membership changes (start, warm stop, SIGKILL of a supervisor) the history shows
    no overlap and no token that fails to rise, every slice is owned and the shares differ by at most one."""
    pool: Pool = make_pool(shards=40, slices=10)
    rng = random.Random(7)
    sizes: dict[int, int] = {}

    def start() -> Any:
        workers = rng.randint(1, 2)
        proc = pool.start(workers)
        sizes[proc.pid] = workers
        return proc

    live = [start() for _ in range(2)]
    for _ in range(20):
        action = rng.choice(["join", "leave", "kill"]) if len(live) > 1 else "join"
        if len(live) >= 5:
            action = rng.choice(["leave", "kill"])
        if action == "join":
            live.append(start())
        else:
            victim = live.pop(rng.randrange(len(live)))
            if action == "kill":
                pool.kill(victim)
            else:
                os.killpg(victim.pid, signal.SIGTERM)
                assert victim.wait(60) in (0, -signal.SIGTERM)  # -15: stopped before it had started
        # a short pause of random length, or none: changes overlap with moves in flight
        pool.wait_covered(pool.ttl * 3 + 20, "covered between changes") if rng.random() < 0.5 else None
    members = sum(sizes[p.pid] for p in live)  # every worker of the live supervisors
    pool.wait_balanced(members, pool.ttl * 3 + 30, "fair and covered at the end")
    report = pool.report()
    assert report.count("overlap") == 0 and report.count("token") == 0, report.violations
