"""The Python API as a user calls it: Poller with a job function, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

SCRIPT = """
import sys
from shardpreempt import Poller, load_shards

out, locks = sys.argv[1], sys.argv[2]

def job(ownership):
    with open(out, "a") as f:
        f.write(f"{ownership.slice.id} {ownership.worker} {len(ownership.shards)}\\n")

shards = load_shards({f"db{i}": {"password": "hunter2"} for i in range(8)})
poller = Poller(shards, job, backend=f"file://{locks}", slices=4, once=True)
poller.set_worker_count(2)
sys.exit(poller.poll())
"""


def test_poller_runs_the_job_once_per_slice_across_its_workers(tmp_path: Path) -> None:
    """Poller(job, once=True) with 2 workers and 4 slices runs the job exactly once for every slice."""
    out = tmp_path / "out.txt"
    (tmp_path / "locks").mkdir(mode=0o700)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "locks")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    runs = [line.split() for line in out.read_text().splitlines()]
    assert len(runs) == 4 and len(Counter(r[0] for r in runs)) == 4
    assert sum(int(r[2]) for r in runs) == 8
