"""The supervisor and workers under real signals: stops, crashes, hangs, kills."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from shardpreempt.testing import check, wait_until

from .conftest import alive, events, write_config

SLEEPER = """
import os, signal, sys, time
out = sys.argv[1]
def term(*_):
    open(out, "a").write(f"term {os.getpid()}\\n")
    if sys.argv[2] == "obey":
        sys.exit(0)
signal.signal(signal.SIGTERM, term)
env = os.environ
open(out, "a").write(f"start {os.getpid()} {env['SHARDPREEMPT_WORKER']} {env['SHARDPREEMPT_SLICE_ID']}\\n")
while True:
    time.sleep(0.05)
"""


def lines(path: Path, word: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.startswith(word)]


def sleeper(tmp: Path, mode: str = "obey") -> tuple[list[str], Path]:
    out = tmp / "cmd.log"
    script = tmp / "sleeper.py"
    script.write_text(SLEEPER)
    return [sys.executable, str(script), str(out), mode], out


def test_warm_stop_terminates_commands_releases_and_exits_0(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """First SIGTERM: each command gets SIGTERM, the slices are released at once, status 0."""
    cfg = write_config(tmp_path / "c.toml", 4, lockdir)
    cmd, out = sleeper(tmp_path)
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "-w", "2", "--events", str(ev), "--", *cmd)
    wait_until(lambda: len(lines(out, "start")) == 2, 20, message="two commands running")
    run.signal(signal.SIGTERM)
    assert run.wait(20) == 0, run.stderr()
    assert len(lines(out, "term")) == 2
    kinds = [e["event"] for e in events(ev)]
    assert kinds.count("released") == 4 and "lost" not in kinds


def test_cold_stop_kills_commands_that_ignore_sigterm(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """A second SIGTERM kills commands that ignored the first, and the run ends."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    cmd, out = sleeper(tmp_path, mode="ignore")
    run = start_run(str(cfg), "-w", "1", "--", *cmd)
    wait_until(lambda: lines(out, "start"), 20, message="command running")
    pid = int(lines(out, "start")[0][1])
    run.signal(signal.SIGTERM)
    wait_until(lambda: lines(out, "term"), 20, message="command saw SIGTERM")
    assert alive(pid)
    run.signal(signal.SIGTERM)
    assert run.wait(20) == 143  # a cold stop never reads as success
    wait_until(lambda: not alive(pid), 10, message="command killed")


def test_sigkill_of_a_worker_hands_its_slice_over_with_higher_tokens(tmp_path: Path, lockdir: str,
                                                                     start_run: Any) -> None:
    """A SIGKILLed worker's command dies too and its shards are owned again with higher tokens."""
    cfg = write_config(tmp_path / "c.toml", 4, lockdir)
    cmd, out = sleeper(tmp_path)
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "-w", "2", "--events", str(ev), "--", *cmd)
    wait_until(lambda: len(lines(out, "start")) == 2, 20, message="two commands running")
    started = {e["worker"]: e["worker_pid"] for e in events(ev) if e["event"] == "started"}
    victim_cmd = next(int(x[1]) for x in lines(out, "start") if x[2] == "0")
    os.kill(started[0], signal.SIGKILL)
    wait_until(lambda: not alive(victim_cmd), 10, message="the dead worker's command is gone")
    wait_until(lambda: len(lines(out, "start")) == 3, 20, message="slice taken over")
    run.signal(signal.SIGTERM)
    run.wait(20)
    report = check(events(ev))
    assert report.ok, report.violations
    victim = next(e["shard"] for e in events(ev) if e["event"] == "acquired" and e["worker"] == 0)
    tokens = sorted(e["token"] for e in events(ev) if e["event"] == "acquired" and e["shard"] == victim)
    assert tokens == [1, 2]


def test_killed_supervisor_takes_workers_and_commands_with_it(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """SIGKILL of the supervisor ends its workers and their commands at once."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    cmd, out = sleeper(tmp_path)
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "-w", "2", "--events", str(ev), "--", *cmd)
    wait_until(lambda: len(lines(out, "start")) == 2, 20, message="commands running")
    pids = [int(x[1]) for x in lines(out, "start")] + [e["worker_pid"] for e in events(ev) if e["event"] == "started"]
    run.signal(signal.SIGKILL)
    run.wait(10)
    wait_until(lambda: not any(alive(p) for p in pids), 10, message="workers and commands gone")


def test_hung_worker_is_killed_and_its_slice_taken_over(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """A stopped (SIGSTOP) worker misses heartbeats, is killed with its command, and is replaced."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    cmd, out = sleeper(tmp_path)
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "-w", "1", "--hang-timeout", "0.5", "--events", str(ev), "--", *cmd)
    wait_until(lambda: lines(out, "start"), 20, message="command running")
    worker = next(e["worker_pid"] for e in events(ev) if e["event"] == "started")
    first_cmd = int(lines(out, "start")[0][1])
    os.kill(worker, signal.SIGSTOP)
    wait_until(lambda: any(e["event"] == "killed" for e in events(ev)), 10, message="hung worker killed")
    wait_until(lambda: not alive(first_cmd), 10, message="its command killed")
    wait_until(lambda: len(lines(out, "start")) == 2, 20, message="replacement running")
    run.signal(signal.SIGTERM)
    run.wait(20)
    assert check(events(ev)).ok


def test_crash_loop_stops_with_a_clear_message(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """A worker that keeps dying makes the supervisor stop restarting it and exit 3."""
    cfg = write_config(tmp_path / "c.toml", 1, lockdir)
    run = start_run(str(cfg), "--", "sh", "-c", "kill -9 $PPID")
    assert run.wait(60) == 3
    assert "crash loop" in run.stderr() and "Traceback" not in run.stderr()


def test_continuous_mode_reruns_the_command_after_it_exits(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """Without --once the worker keeps its slice and runs the command again, with the same tokens."""
    cfg = write_config(tmp_path / "c.toml", 1, lockdir)
    out = tmp_path / "runs.txt"
    run = start_run(str(cfg), "--", "sh", "-c", f'echo "$SHARDPREEMPT_TOKENS" >> {out}')
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 5, 20, message="five runs")
    run.signal(signal.SIGTERM)
    assert run.wait(20) == 0
    assert len(set(out.read_text().splitlines())) == 1


def test_failing_slice_is_given_up_so_another_worker_can_try(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """After repeated failures a worker releases its slice and a standby worker runs it successfully."""
    cfg = write_config(tmp_path / "c.toml", 1, lockdir)
    ok = tmp_path / "ok.txt"
    script = f'if [ "$SHARDPREEMPT_WORKER" = 0 ]; then exit 1; fi; echo "$SHARDPREEMPT_WORKER" >> {ok}; sleep 5'
    run = start_run(str(cfg), "-w", "2", "--slices", "1", "--max-failures", "2", "--backoff", "0.01",
                    "--", "sh", "-c", script)
    # worker 0 prefers slice 0 and fails; worker 1 is a standby that gets it once worker 0 gives up
    wait_until(lambda: ok.exists() and ok.read_text().strip() == "1", 30, message="worker 1 took over")
    run.signal(signal.SIGTERM)
    run.wait(20)
