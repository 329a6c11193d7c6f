"""Every process and server fault against every backend, judged on the recorded history and the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardpreempt.stress import FAULTS, SERVER_FAULTS, Stress, StressOptions, passed
from shardpreempt.testing.servers import ServerUnavailable
from shardpreempt.testing.skips import missing

PROCESS_FAULTS = ("kill-worker", "stop-worker", "kill-supervisor")
BACKENDS = ["file", "redis", "postgresql", "mysql", "etcd", "zookeeper"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_faults_leave_no_overlap_and_process_every_item_exactly_once(backend: str, tmp_path: Path) -> None:
    """SIGKILL, SIGSTOP past the ttl, a killed supervisor, a restarted or paused server: the history shows
    no overlap, tokens only rise, every shard is owned again within the bound, and every item is
    processed exactly once with only fenced writes."""
    kinds = PROCESS_FAULTS if backend == "file" else PROCESS_FAULTS + tuple(sorted(SERVER_FAULTS))
    assert set(kinds) <= set(FAULTS)
    opts = StressOptions(backend=backend, kinds=kinds, count=len(kinds) * (2 if backend == "file" else 1),
                         ttl=2.0 if backend == "etcd" else 1.0,  # etcd grants 2 s at least
                         shards=4, workers=2, directory=tmp_path / "stress",
                         # the stress command holds file:// to 100 ms; a loaded CI machine gets some slack
                         unowned_bound=0.5 if backend == "file" else None)
    try:
        figures = Stress(opts).run()
    except ServerUnavailable as exc:
        missing(f"{backend}: {exc}")
    assert figures["faults_total"] == opts.count
    assert passed(figures), json.dumps(figures, indent=1)
