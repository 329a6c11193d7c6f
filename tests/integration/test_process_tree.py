"""Nothing a command started outlives the lease it ran under."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from shardpreempt.testing import wait_until

from .conftest import alive, events, write_config


def test_a_killed_supervisor_takes_the_commands_children_with_it(tmp_path: Path, lockdir: str,
                                                                   start_run: Any) -> None:
    """SIGKILL of the supervisor ends the command's background children too, not only the command."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    pidfile = tmp_path / "child.pid"
    run = start_run(str(cfg), "-w", "1", "--", "bash", "-c", f"sleep 1000 & echo $! > {pidfile}; wait")
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, message="the child started")
    child = int(pidfile.read_text())
    assert alive(child)
    run.signal(signal.SIGKILL)
    run.wait(10)
    wait_until(lambda: not alive(child), 10, message="the command's child is gone")


def test_on_file_a_process_that_left_the_group_keeps_the_slice_locked(tmp_path: Path, lockdir: str,
                                                                        start_run: Any) -> None:
    """On file://, a process that escaped the command's group and the guard's mark still holds the
    slice's locks, so no other worker starts on the slice until it has ended."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir, extra="[slicing]\nslices = 1\n")
    ev = tmp_path / "ev.jsonl"
    started, ended = tmp_path / "started", tmp_path / "ended"
    script = f"env -u SHARDPREEMPT_GUARD setsid sh -c 'echo $$ > {started}; sleep 1.5; date +%s.%N > {ended}' & wait"
    first = start_run(str(cfg), "-w", "1", "--events", str(ev), "--", "bash", "-c", script)
    wait_until(lambda: started.exists() and started.read_text().strip(), 20, message="the escaped process started")
    first.signal(signal.SIGKILL)
    first.wait(10)
    start_run(str(cfg), "-w", "1", "--events", str(ev), "--", "sleep", "1000")
    wait_until(lambda: ended.exists() and ended.read_text().strip(), 20, message="the escaped process ended")
    wait_until(lambda: sum(e["event"] == "acquired" for e in events(ev)) == 4, 20, message="second holder")
    second = max(e["t"] for e in events(ev) if e["event"] == "acquired")
    assert second >= float(ended.read_text()) - 0.05  # not before the escaped process let go
    assert os.path.exists(lockdir.removeprefix("file://"))


def test_a_process_that_left_the_group_is_ended_with_its_worker(tmp_path: Path, lockdir: str,
                                                                start_run: Any) -> None:
    """A command's child that moved to its own session is still found (by the guard's mark in its
    environment) and killed when the worker dies."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    pidfile = tmp_path / "escaped.pid"
    run = start_run(str(cfg), "-w", "1", "--", "bash", "-c", f"setsid sh -c 'echo $$ > {pidfile}; sleep 1000' & wait")
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, message="the escaped process started")
    escaped = int(pidfile.read_text())
    run.signal(signal.SIGKILL)
    run.wait(10)
    wait_until(lambda: not alive(escaped), 10, message="the escaped process is gone")


def test_the_guard_finds_a_command_that_execs_after_its_worker_died(tmp_path: Path) -> None:
    """A command forked just before its worker died carries the guard's mark only once it has exec'd;
    the guard keeps looking, so it is killed too (it would otherwise hold its slice's locks for ever)."""
    pidfile = tmp_path / "late.pid"
    script = f"""
import os, subprocess, sys
from shardpreempt.process import GUARD_VARIABLE, start_guard
guard, _pipe = start_guard()
late = f"sleep 0.2; exec env {{GUARD_VARIABLE}}={{guard}} sleep 1000"
proc = subprocess.Popen(["sh", "-c", late], start_new_session=True)
open({str(pidfile)!r}, "w").write(str(proc.pid))
os._exit(0)  # the worker dies; the command has not exec'd yet
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    late = int(pidfile.read_text())
    wait_until(lambda: not alive(late), 10, message="the late command is gone")
