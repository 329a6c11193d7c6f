"""The pool across machines: separate supervisors over one backend share every slice fairly."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from shardpreempt.events import HOST, EventLog
from shardpreempt.history import read_events
from shardpreempt.testing.wait import wait_until

from .conftest import Pool


def moved(before: dict[str, str | None], after: dict[str, str | None]) -> int:
    """How many slices changed holder."""
    return sum(1 for s, h in before.items() if after.get(s) != h)


def test_death_join_leave_and_mixed_worker_counts(make_pool: Any) -> None:
    """Supervisors with different -w share the slices fairly; a join takes its share by handoff, a
    warm stop releases at once, a SIGKILLed supervisor's slices are taken without standbys, and the
    history shows no overlap and no token that fails to rise."""
    pool: Pool = make_pool(shards=24, slices=6)
    slow = pool.ttl * 3 + 10
    a = pool.start(2)
    b = pool.start(1)
    pool.wait_balanced(3, slow, "3 members, 2 slices each")

    before = pool.observe().holders
    c = pool.start(1)
    pool.wait_balanced(4, slow, "a joining member gets its share")
    after = pool.observe().holders
    assert 1 <= moved(before, after) <= math.ceil(6 / 4)  # only what the newcomer is owed moves

    os.killpg(b.pid, signal.SIGTERM)  # graceful leave
    assert b.wait(30) == 0
    pool.wait_balanced(3, slow, "the leaver's slices taken")
    evs = read_events([pool.events])
    b_owners = {e["owner"] for e in evs if e["event"] == "released" and e.get("reason") == "stopped"}
    assert b_owners, "a warm stop releases its slices (no ttl wait)"

    pool.kill(a)  # a whole machine dies; nobody is idle
    pool.wait_balanced(1, slow, "the survivor holds every slice")
    assert Counter(pool.observe().holders.values()).most_common(1)[0][1] == 6
    assert c.poll() is None

    report = pool.report()
    assert report.count("overlap") == 0 and report.count("token") == 0, report.violations


def test_more_workers_than_member_slots_looked_at_first_all_join(make_pool: Any) -> None:
    """Two supervisors of 12 workers each (a joining worker looks at 16 member slots first) all become
    members, and the slices stay covered; workers joining at once do not all race for one slot."""
    pool: Pool = make_pool(shards=24, slices=6)
    pool.start(12)
    pool.start(12)
    wait_until(lambda: len(pool.observe().members) == 24, pool.ttl * 3 + 30, interval=0.05,
               message="all 24 workers members")
    pool.wait_covered(30, "every slice owned")
    assert "cannot join" not in pool.logs()


def test_a_conflicting_layout_is_refused_with_both_named(make_pool: Any) -> None:
    """A supervisor asking for another slice count on the same backend exits 2 naming both layouts."""
    pool: Pool = make_pool(shards=12, slices=4)
    first = pool.start(1)
    pool.wait_balanced(1, pool.ttl * 3 + 10, "first supervisor owns everything")
    other = subprocess.run([sys.executable, "-m", "shardpreempt", "run", str(pool.config), "--slices", "3",
                            "--", "true"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "4 slices" in lines[0] and "3 slices" in lines[0] and "layout" in lines[0]
    assert "hunter2" not in other.stderr
    adopt = pool.start(1)  # no explicit count: adopts the pool's 4 whatever its -w
    pool.wait_balanced(2, pool.ttl * 3 + 10, "a supervisor without a slice count adopts the pool's")
    assert first.poll() is None and adopt.poll() is None


def test_a_restarted_worker_keeps_its_identity_and_its_share(make_pool: Any) -> None:
    """A worker killed and restarted by its supervisor comes back under the same identity and the
    pool settles to fair shares again; on servers (restart within the ttl) it gets its own slices back."""
    pool: Pool = make_pool(shards=24, slices=6)
    sup = pool.start(2, name="m1")
    pool.wait_balanced(2, pool.ttl * 3 + 10, "two members")
    obs = pool.observe()
    ident = f"{HOST}/m1.0"
    mine = sorted(s for s, h in obs.holders.items() if h == ident)
    started = {e["worker"]: e["worker_pid"] for e in read_events([pool.events]) if e["event"] == "started"}
    log = EventLog(pool.events)
    log.emit("killed", pid=started[0], host=HOST, reason="test: kill worker")
    log.close()
    os.kill(started[0], signal.SIGKILL)
    wait_until(lambda: len([e for e in read_events([pool.events]) if e["event"] == "started"]) == 3, 30,
               message="the worker restarted")
    pool.wait_balanced(2, pool.ttl * 3 + 10, "fair shares again")
    obs = pool.observe()
    assert set(obs.members) == {f"{HOST}/m1.0", f"{HOST}/m1.1"}
    if not pool.url.startswith("file:"):
        def back() -> bool:
            return sorted(s for s, h in pool.observe().holders.items() if h == ident) == mine

        wait_until(back, pool.ttl * 3 + 10, message="the restarted worker holds its own slices again")
    assert sup.poll() is None
    report = pool.report()
    assert report.count("overlap") == 0 and report.count("token") == 0, report.violations


def test_once_is_once_per_slice_for_the_whole_pool(make_pool: Any, tmp_path: Path) -> None:
    """Two supervisors with --once process each slice exactly once between them, and both end with 0;
    a later --once run makes a new pass over every slice."""
    pool: Pool = make_pool(shards=12, slices=6)
    out, go = tmp_path / "done.txt", tmp_path / "go"
    # every run waits for "go", so the pass cannot finish before both supervisors have joined it
    script = f'while [ ! -e {go} ]; do sleep 0.02; done; echo "$SHARDPREEMPT_SLICE_ID" >> {out}'
    argv = [sys.executable, "-m", "shardpreempt", "run", str(pool.config), "--once", "--events", str(pool.events)]
    first = subprocess.Popen([*argv, "-w", "1", "--", "sh", "-c", script], stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(e["event"] == "acquired" for e in read_events([pool.events])), 60, message="pass begun")
    second = subprocess.Popen([*argv, "-w", "2", "--", "sh", "-c", script], stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(e["event"] == "started" and e["pid"] == second.pid for e in read_events([pool.events])),
               60, message="the second supervisor joined the pass")
    go.touch()
    errs = [p.communicate(timeout=120)[1] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], errs
    done = out.read_text().split()
    assert sorted(done) == sorted(s.id for s in pool.slices)
    again = subprocess.run([*argv, "-w", "1", "--", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert Counter(out.read_text().split()) == Counter({s.id: 2 for s in pool.slices})
