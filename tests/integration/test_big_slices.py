"""Slices of any size on file://: descriptors above 1024 work, and a limit too low is one clear error."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from shardpreempt.testing import wait_until

from .conftest import events


def big_config(path: Path, shards: int, lockdir: str) -> Path:
    """One slice of ``shards`` shards from a shard set."""
    path.write_text(f'[backend]\nurl = "{lockdir}"\n[slicing]\nslices = 1\n'
                    f'[[shard_sets]]\ntemplate = "s{{n}}"\nrange = [1, {shards}]\n')
    return path


def test_a_slice_of_1100_shards_runs_on_file(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """A worker holds a 1,100-shard slice (descriptors above 1024) and runs and stops its command."""
    cfg = big_config(tmp_path / "c.toml", 1100, lockdir)
    ev = tmp_path / "ev.jsonl"
    out = tmp_path / "ran"
    run = start_run(str(cfg), "-w", "1", "--events", str(ev), "--", "sh", "-c", f"touch {out}; sleep 1000")
    wait_until(out.exists, 30, message="the command started")
    assert sum(e["event"] == "acquired" for e in events(ev)) == 1100
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    assert sum(e["event"] == "released" for e in events(ev)) == 1100


def test_a_hard_fd_limit_too_low_for_a_slice_is_refused(tmp_path: Path, lockdir: str) -> None:
    """When the hard limit on open files cannot fit one slice's locks, run exits 2 with one line saying so."""
    cfg = big_config(tmp_path / "c.toml", 2000, lockdir)
    script = f"ulimit -Sn 1024; ulimit -Hn 1024; exec {sys.executable} -m shardpreempt run {cfg} -- true"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "hard limit on open files" in result.stderr and len(result.stderr.strip().splitlines()) == 1
