"""Bench mode of ``bench/bench.py scale --claimers``: one process that hosts N pool members in threads.

A supervisor forks one process per worker (about 20 MiB of the machine each at 100,000 shards), so
1,000 workers do not fit on a small box beside the server. Here each member is the product's own
:class:`shardpreempt.worker.Worker` — the same join, look, policy, acquire, renewal and release,
with its own two backend connections — run in a thread; N of them share one process. The job does
nothing (it returns at once and the next run is due in an hour), so what is measured is the pool.
SIGTERM is a warm stop of every member; SIGKILL of the process is a machine lost.

    python bench/claimers.py CONFIG URL SLICES N NAME EVENTS
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from shardpreempt import logs
from shardpreempt.backends import open_backend
from shardpreempt.config import load_settings
from shardpreempt.events import EventLog
from shardpreempt.pool import default_identity, resolve_layout
from shardpreempt.runner import RunSettings
from shardpreempt.slicing import make_slices, pack
from shardpreempt.worker import Worker, WorkerOptions


def idle(ownership: object) -> None:
    """The job: nothing to do (the next run is an hour away; a stop or a loss ends the wait)."""


def main() -> int:
    cfg, url, k, n, name, events_path = sys.argv[1:7]
    logs.setup(0)  # warnings and errors, as a supervisor without -v
    settings = load_settings(cfg)
    probe = open_backend(url)
    try:
        layout = resolve_layout(probe, settings.shards, settings.strategy, int(k), int(k))
    finally:
        probe.close()
    slices = pack(make_slices(settings.shards, layout.slices, layout.strategy))
    events = EventLog(events_path)
    identities = tuple(default_identity(name, i) for i in range(int(n)))
    workers = []
    for i, identity in enumerate(identities):
        # A member whose run does not end within the grace after a loss exits the process (os._exit, as
        # a worker does), which here takes its 99 neighbours along: a grace of half the ttl keeps a
        # starved process's idle runs from tripping it (the bench then records an ``exited`` event).
        run = RunSettings(index=i, job=idle, interval=3600.0, grace=settings.ttl / 2)
        workers.append(Worker(WorkerOptions(url, settings.ttl, slices, layout, identity, run, index=i,
                                            siblings=identities, events=events)))
    stop = threading.Event()

    def on_term(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    threads = [threading.Thread(target=w.run, name=f"member-{i}", daemon=True) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    stop.wait()
    for w in workers:
        w.on_signal(signal.SIGTERM, None)
    for t in threads:
        t.join(60)
    # The members still running end with the process: say so, as a supervisor does for a worker that
    # exits (the history would otherwise keep their holds open and count a later holder as an overlap).
    events.emit("exited", pid=os.getpid(), worker_pid=os.getpid(), reason="bench claimers: process ends")
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
