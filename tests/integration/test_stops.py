"""Stops and exits a script can rely on, and no secret left on disk after any of them."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardpreempt.process import runtime_base
from shardpreempt.testing import wait_until

from .conftest import cli, events, write_config


def secret_files(supervisor_pid: int) -> list[Path]:
    """Every file of one supervisor's runtime directory that holds one of the test config's passwords."""
    found = []
    for root, _, files in os.walk(runtime_base() / str(supervisor_pid)):
        for name in files:
            path = Path(root) / name
            try:
                if "hunter2" in path.read_text(errors="replace"):
                    found.append(path)
            except OSError:
                continue
    return found


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_once_run_exits_non_zero(tmp_path: Path, lockdir: str, sig: int, code: int) -> None:
    """--once stopped by a signal before every slice is done exits 128 + the signal, so `&& next` stops."""
    cfg = write_config(tmp_path / "c.toml", 4, lockdir)
    ev = tmp_path / "ev.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "run", str(cfg), "-w", "2", "--once",
                             "--events", str(ev), "--", "sleep", "1000"], stderr=subprocess.DEVNULL)
    wait_until(lambda: sum(e["event"] == "acquired" for e in events(ev)) >= 4, 20, message="slices held")
    proc.send_signal(sig)
    assert proc.wait(30) == code


def test_a_cold_stop_exits_non_zero(tmp_path: Path, lockdir: str) -> None:
    """A second SIGTERM (cold stop) ends the run with 143, never with success."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    ev = tmp_path / "ev.jsonl"
    err = tmp_path / "err.log"
    with err.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "run", str(cfg), "-w", "1", "--events",
                                 str(ev), "--", "sh", "-c", f"trap '' TERM; touch {tmp_path / 'up'}; sleep 1000"],
                                stderr=log)
    # the command must be running: a warm stop before it starts ends the run at once, before the second signal
    wait_until((tmp_path / "up").exists, 20, message="command running")
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "warm stop requested" in err.read_text(), 20, message="warm stop under way")
    proc.send_signal(signal.SIGTERM)  # two signals sent at once would arrive as one
    assert proc.wait(30) == 143


def test_continuous_mode_waits_while_every_slice_cools_down(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """A command that always fails makes workers give slices up for a while, never end the run as a crash loop."""
    cfg = write_config(tmp_path / "c.toml", 3, lockdir)
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "-w", "4", "--slices", "3", "--max-failures", "2", "--backoff", "0.01",
                    "--events", str(ev), "--", "sh", "-c", "exit 7")
    wait_until(lambda: sum(e.get("reason") == "failed" for e in events(ev) if e["event"] == "released") >= 6, 30,
               message="every slice given up after failures")
    assert run.proc.poll() is None
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0


def test_a_command_that_does_not_exist_is_one_error(tmp_path: Path, lockdir: str) -> None:
    """A command that cannot be run is refused at once with exit status 2, before any worker starts."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    result = cli("run", str(cfg), "-w", "2", "--", "no-such-command-here", "x")
    assert result.returncode == 2 and "no-such-command-here" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_hang_timeout_at_the_ttl_is_refused_on_servers(tmp_path: Path) -> None:
    """--hang-timeout at or above the ttl is refused where leases expire on a server (here memory://)."""
    cfg = write_config(tmp_path / "c.toml", 2, "memory://x", ttl=2.0)
    result = cli("run", str(cfg), "--hang-timeout", "2", "--", "true")
    assert result.returncode == 2 and "--hang-timeout" in result.stderr


def test_no_slice_file_with_a_password_survives_kills_and_stops(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """Slice files live in a private runtime directory; a killed worker's are removed, and none remain after
    the run stops, nor after a killed supervisor once the next run starts."""
    cfg = write_config(tmp_path / "c.toml", 4, lockdir)
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "-w", "2", "--events", str(ev), "--", "sleep", "1000")
    sup = run.proc.pid
    wait_until(lambda: len(secret_files(sup)) >= 2, 20, message="slice files written")
    assert all(p.stat().st_mode & 0o077 == 0 for p in secret_files(sup))
    assert (runtime_base() / str(sup)).stat().st_mode & 0o077 == 0
    started = wait_until(lambda: {e["worker"]: e["worker_pid"] for e in events(ev) if e["event"] == "started"}, 20)
    before = {p for p in secret_files(sup) if p.parts[-3] == "0"}
    assert before
    os.kill(started[0], signal.SIGKILL)
    wait_until(lambda: not any(p.exists() for p in before), 20, message="the killed worker's slice files removed")
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    assert not (runtime_base() / str(sup)).exists()
    killed = start_run(str(cfg), "-w", "1", "--", "sleep", "1000")
    wait_until(lambda: secret_files(killed.proc.pid), 20, message="slice file written")
    killed.signal(signal.SIGKILL)
    killed.wait(10)
    assert secret_files(killed.proc.pid)  # left behind by the killed supervisor...
    again = start_run(str(cfg), "-w", "1", "--", "sleep", "1000")
    wait_until(lambda: not (runtime_base() / str(killed.proc.pid)).exists(), 20,
               message="...and removed by the next run")
    again.signal(signal.SIGTERM)
    again.wait(30)


def test_interval_spaces_the_runs_of_a_job_that_exits_at_once(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """With --interval, a command that succeeds at once starts again only after the interval, not in a tight loop."""
    cfg = write_config(tmp_path / "c.toml", 1, lockdir)
    out = tmp_path / "starts"
    run = start_run(str(cfg), "-w", "1", "--interval", "0.3", "--", "sh", "-c", f"date +%s.%N >> {out}")
    wait_until(lambda: out.exists() and len(out.read_text().split()) >= 4, 20, message="four runs")
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    starts = [float(x) for x in out.read_text().split()]
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(starts))  # not a tight loop (ms apart)


def test_a_warm_stop_kills_a_command_that_ignores_sigterm_after_the_stop_grace(tmp_path: Path, lockdir: str,
                                                                                  start_run: Any) -> None:
    """One SIGTERM: a command that ignores it is killed after --stop-grace, and the run ends with 0."""
    cfg = write_config(tmp_path / "c.toml", 1, lockdir)
    pidfile = tmp_path / "cmd.pid"
    run = start_run(str(cfg), "-w", "1", "--stop-grace", "0.5", "--", "sh", "-c",
                    f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done")
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, message="command running")
    pid = int(pidfile.read_text())
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
