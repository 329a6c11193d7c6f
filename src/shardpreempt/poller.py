"""``Poller``: the seed's API made Pythonic — N local workers, each owning one slice at a time."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .backends import open_backend
from .config import Settings
from .events import EventLog
from .model import Shard
from .slicing import make_slices
from .supervisor import Supervisor
from .worker import Job, WorkerOptions, run_worker

EXIT_JOB_FAILED = 1


def default_hang_timeout(ttl: float, server_expiry: bool) -> float:
    """A hung worker must be killed before its lease can be re-granted: well inside the ttl."""
    return max(0.2, ttl * 0.35) if server_expiry else 10.0


class Poller:
    """Supervise local workers over ``shards``: ``job(ownership)`` or a ``command`` per slice."""

    def __init__(self, shards: Sequence[Shard] | Settings, job: Job | None = None, *, backend: str | None = None,
                 command: Sequence[str] | None = None, ttl: float | None = None, strategy: str | None = None,
                 slices: int | None = None, once: bool = False, events: str | os.PathLike[str] | None = None,
                 hang_timeout: float | None = None, max_failures: int = 5, backoff: float = 0.5,
                 crash_limit: int = 5, on_tick: Callable[[Supervisor], None] | None = None) -> None:
        if (job is None) == (command is None):
            raise TypeError("give exactly one of job or command")
        base = shards if isinstance(shards, Settings) else Settings(shards=tuple(shards))
        self.settings = base
        self.backend_url = backend or base.backend_url
        self.ttl = ttl or base.ttl
        self.strategy = strategy or base.strategy
        self.slice_count = slices or base.slices
        self.job = job
        self.command = command
        self.once = once
        self.events = EventLog(events)
        self.hang_timeout = hang_timeout
        self.max_failures = max_failures
        self.backoff = backoff
        self.crash_limit = crash_limit
        self.on_tick = on_tick
        self.worker_count = base.workers or 1
        self.supervisor: Supervisor | None = None

    def set_worker_count(self, count: int) -> None:
        """How many local worker processes to run."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"worker count must be a positive integer, got {count!r}")
        self.worker_count = count

    def poll(self) -> int:
        """Run the workers until stopped (or, with ``once``, until every slice is done); return the exit status."""
        slices = make_slices(self.settings.shards, self.slice_count or self.worker_count, self.strategy)
        probe = open_backend(self.backend_url)  # config errors surface here, before any fork
        server_expiry = probe.capabilities.server_expiry
        probe.close()
        hang = self.hang_timeout or default_hang_timeout(self.ttl, server_expiry)
        run_dir = Path(tempfile.mkdtemp(prefix="shardpreempt-run-"))
        done_dir = run_dir if self.once else None

        def main(index: int, heartbeat_fd: int, parent: int) -> int:
            opts = WorkerOptions(self.backend_url, self.ttl, slices, index=index, job=self.job,
                                 command=self.command, once=self.once, events=self.events, done_dir=done_dir,
                                 max_failures=self.max_failures, backoff=self.backoff,
                                 heartbeat_fd=heartbeat_fd, heartbeat_every=hang / 5)
            return run_worker(opts, parent)

        self.supervisor = Supervisor(self.worker_count, main, once=self.once, hang_timeout=hang,
                                     crash_limit=self.crash_limit, events=self.events, on_tick=self.on_tick)
        try:
            code = self.supervisor.run()
            if code == 0 and self.once:
                statuses = [(run_dir / s.id).read_text() if (run_dir / s.id).exists() else "missing" for s in slices]
                if any(st != "ok" for st in statuses) and not self.supervisor.stop_requests:
                    code = EXIT_JOB_FAILED
            return code
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            self.events.close()
