"""``Poller``: the seed's API made Pythonic — local workers that join the pool and work its slices."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from .backends import open_backend
from .config import Settings
from .errors import BackendUnavailable, ConfigError
from .events import EventLog
from .model import Shard, Slice
from .pool import Layout, begin_pass, default_identity, end_pass, pass_results, resolve_layout
from .process import EXIT_INTERRUPTED, EXIT_JOB_FAILED, make_run_dir
from .runner import Job, RunSettings
from .slicing import make_slices, pack
from .supervisor import Supervisor
from .typing import Backend
from .worker import WorkerOptions, run_worker

log = logging.getLogger("shardpreempt.poller")


class _StoppedAtStart(Exception):
    """SIGTERM or SIGINT before the supervisor runs (it installs its own handlers)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_at_start(signum: int, frame: object) -> None:
    raise _StoppedAtStart(signum)


def check_command(command: Sequence[str]) -> None:
    """ConfigError, before any worker starts, for a command that cannot be run at all."""
    if not command:
        raise ConfigError("no command given (put it after --)", key="COMMAND")
    program = command[0]
    found = program if os.sep in program else shutil.which(program)
    if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise ConfigError(f"cannot run {program!r}: no such executable file", key="COMMAND")


def check_fd_limit(largest_slice: int, all_shards: int) -> None:
    """ConfigError when the hard limit on open files cannot fit one slice's locks (file://); a warning
    when one worker holding every slice (coverage comes first) would not fit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return
    if hard < largest_slice + 256:
        raise ConfigError(f"the hard limit on open files ({hard}) is too low for a slice of {largest_slice} shards "
                          f"on file:// (one descriptor per shard): raise it (ulimit -Hn, LimitNOFILE=) to at least "
                          f"{largest_slice + 256}, or use more slices", key="slicing.slices")
    if hard < all_shards + 256:
        log.warning("the hard limit on open files (%d) is below the %d shards: a worker left alone in the pool "
                    "could not hold every slice", hard, all_shards)


def default_hang_timeout(ttl: float, server_expiry: bool) -> float:
    """A hung worker must be killed before its lease can be re-granted: well inside the ttl."""
    return max(0.2, ttl * 0.35) if server_expiry else 10.0


class Poller:
    """Supervise local workers over ``shards``: ``job(ownership)`` or a ``command`` per held slice.

    The workers are members of the pool on ``backend``: together with the workers of every other
    supervisor on the same backend they share the pool's slices fairly (see ``docs/pool.md``).
    """

    def __init__(self, shards: Sequence[Shard] | Settings, job: Job | None = None, *, backend: str | None = None,
                 command: Sequence[str] | None = None, ttl: float | None = None, strategy: str | None = None,
                 slices: int | None = None, once: bool = False, events: str | os.PathLike[str] | None = None,
                 hang_timeout: float | None = None, max_failures: int = 5, backoff: float = 0.5,
                 crash_limit: int = 5, stop_grace: float = 30.0, name: str | None = None,
                 start_timeout: float = 30.0, interval: float = 0.0, jitter: float = 0.0,
                 on_tick: Callable[[Supervisor], None] | None = None) -> None:
        if (job is None) == (command is None):
            raise TypeError("give exactly one of job or command")
        base = shards if isinstance(shards, Settings) else Settings(shards=tuple(shards))
        self.settings = base
        self.backend_url = backend or base.backend_url
        self.ttl = ttl or base.ttl
        self.strategy = strategy or base.strategy
        self.slice_count = slices or base.slices  # None: adopt the pool's, else the worker count
        self.job = job
        self.command = command
        self.once = once
        self.events = EventLog(events)
        self.hang_timeout = hang_timeout
        self.max_failures = max_failures
        self.backoff = backoff
        self.crash_limit = crash_limit
        self.stop_grace = stop_grace
        self.name = name
        self.start_timeout = start_timeout
        self.interval, self.jitter = interval, jitter
        self.on_tick = on_tick
        self.worker_count = base.workers or 1
        self.supervisor: Supervisor | None = None
        self.layout: Layout | None = None

    def set_worker_count(self, count: int) -> None:
        """How many local worker processes to run."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"worker count must be a positive integer, got {count!r}")
        self.worker_count = count

    def poll(self) -> int:
        """Run the workers until stopped (or, with ``once``, until the pool has done every slice)."""
        if self.command is not None:
            check_command(self.command)
        self.events.check()
        if self.hang_timeout is not None and self.hang_timeout <= 0:
            raise ConfigError(f"must be positive, got {self.hang_timeout!r}", key="--hang-timeout")
        shards = self.settings.shards
        # Until the supervisor runs, SIGTERM and SIGINT end the start at once (exit 128 + the signal):
        # as PID 1 of a container a process has no default action for them, and the start may wait
        # start_timeout seconds for an unreachable backend.
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.signal(s, _stop_at_start) for s in stops}
        try:
            probe = open_backend(self.backend_url)  # config errors and layout conflicts surface here, before any fork
            try:
                layout, once_pass = self._start(probe)
                server_expiry = probe.capabilities.server_expiry
                fd_per_key = hasattr(probe, "lease_fds")  # file://: one open descriptor per held shard
            finally:
                probe.close()
        except _StoppedAtStart as stop:
            log.warning("stopped by signal %d before the workers started", stop.signum)
            return 128 + stop.signum
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.layout = layout
        slices = pack(make_slices(shards, layout.slices, layout.strategy))  # before the fork: see pack
        if fd_per_key:
            check_fd_limit(max(len(s.shards) for s in slices), len(shards))
        if server_expiry and self.hang_timeout is not None and self.hang_timeout >= self.ttl:
            raise ConfigError(f"{self.hang_timeout:g} s is not below the ttl ({self.ttl:g} s): a hung worker would "
                              "be killed only after its lease could be granted to another", key="--hang-timeout")
        hang = self.hang_timeout or default_hang_timeout(self.ttl, server_expiry)
        identities = tuple(default_identity(self.name, i) for i in range(self.worker_count))
        # after a loss: SIGTERM, then SIGKILL this much later, well inside the 20 % safety margin
        grace = max(0.05, self.ttl * 0.05) if server_expiry else 0.5
        run_dir = make_run_dir() if self.command is not None else None
        run = RunSettings(index=0, job=self.job, command=self.command, once=self.once,
                          max_failures=self.max_failures, backoff=self.backoff, grace=grace,
                          stop_grace=self.stop_grace, interval=self.interval, jitter=self.jitter)

        def worker_dir(index: int) -> str | None:
            if run_dir is None:
                return None
            path = run_dir / str(index)
            path.mkdir(mode=0o700, exist_ok=True)
            return str(path)

        def main(index: int, heartbeat_fd: int, parent: int) -> int:
            settings = replace(run, index=index, files_dir=worker_dir(index))
            opts = WorkerOptions(self.backend_url, self.ttl, slices, layout, identities[index], settings, index=index,
                                 siblings=identities, once_pass=once_pass, events=self.events,
                                 heartbeat_fd=heartbeat_fd, heartbeat_every=hang / 5)
            return run_worker(opts, parent)

        def cleanup(index: int) -> None:  # a dead worker's slice files hold secrets
            if run_dir is not None:
                shutil.rmtree(run_dir / str(index), ignore_errors=True)

        self.supervisor = Supervisor(self.worker_count, main, once=self.once, hang_timeout=hang,
                                     crash_limit=self.crash_limit, events=self.events, on_tick=self.on_tick,
                                     on_worker_exit=cleanup,
                                     hang_from_ttl=(lambda granted: default_hang_timeout(granted, True))
                                     if server_expiry and self.hang_timeout is None else None)
        try:
            code = self.supervisor.run()
            sup = self.supervisor
            if code == 0 and once_pass is not None:
                code = self._finish_pass(once_pass, slices)
                if code != 0 and sup.stop_requests:  # interrupted before every slice was done
                    code = 128 + (sup.stop_signal or signal.SIGTERM)
            if code == 0 and sup.stop_requests >= 2:  # a cold stop never reads as success
                code = 128 + (sup.stop_signal or signal.SIGTERM)
            return code
        finally:
            self.events.close()
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _start(self, probe: Backend) -> tuple[Layout, str | None]:
        """Adopt or record the layout (and open the once pass), retrying an unreachable backend with a
        growing delay for ``start_timeout`` seconds; a wrong password or database fails at once."""
        end = time.monotonic() + self.start_timeout
        delay = 0.2
        while True:
            try:
                layout = resolve_layout(probe, self.settings.shards, self.strategy, self.slice_count,
                                        self.worker_count)
                return layout, begin_pass(probe, layout) if self.once else None
            except BackendUnavailable as exc:
                left = end - time.monotonic()
                if left <= 0:
                    raise
                log.info("backend unreachable (%s); trying again in %.1f s", exc, min(delay, left))
                time.sleep(min(delay, left))
                delay = min(5.0, delay * 2)

    def _finish_pass(self, once_pass: str, slices: Sequence[Slice]) -> int:
        backend = open_backend(self.backend_url)
        try:
            results = pass_results(backend, once_pass, slices)
            if any(r is None for r in results.values()):
                return EXIT_INTERRUPTED  # some slice has no result yet: the pass stays open
            end_pass(backend, once_pass)
            return EXIT_JOB_FAILED if any(r != "ok" for r in results.values()) else 0
        finally:
            backend.close()
