"""The local process pool: fork N workers, restart the dead, kill the hung, stop on signals.

* Restart: at once when the worker had been running for ``stable_after`` seconds (a kill, an OOM);
  a worker that dies sooner than that is crash-looping: it is restarted with exponential backoff and
  jitter, and ``crash_limit`` such quick deaths in a row stop the pool (:class:`CrashLoop`). The rule
  is :class:`RestartPolicy`, a pure part (times in, decisions out).
* Hang detection: every worker writes a heartbeat line to its pipe; one silent for ``hang_timeout``
  (stopped, deadlocked) is SIGKILLed, and so is the process group of the command it was running, so
  its locks free and no command runs on unsupervised.
* Stop: the first SIGTERM/SIGINT is a warm stop (workers finish, release at once, exit); the second
  is cold (commands are killed; after ``kill_after`` seconds workers are SIGKILLed).
* Workers die with the supervisor (parent-death signal), and commands with their worker.
* Metrics (``--metrics``): the metrics process is forked before the first worker; workers' ``m``
  lines are forwarded to it, with each start and exit (see :mod:`shardpreempt.metrics`).

Signal handlers only write the signal number to a self-pipe; reaping uses ``waitpid``.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics as metrics_
from .errors import CrashLoop
from .events import EventLog
from .process import EXIT_CONFIG, EXIT_INTERNAL, EXIT_OK

log = logging.getLogger("shardpreempt.supervisor")

#: run_worker(index, heartbeat_fd, supervisor_pid) -> exit code, called in the forked child
WorkerMain = Callable[[int, int, int], int]


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is started again (docs/decisions.md, 3): pure, so it is tested without a clock."""

    stable_after: float = 2.0  # a death later than this after the start is not a crash
    crash_limit: int = 5  # quick deaths in a row that stop restarting
    backoff: float = 0.1  # the delay before the third start in a row, doubled for each after it
    backoff_max: float = 10.0
    jitter: Callable[[], float] = field(default=lambda: random.uniform(0.8, 1.2), compare=False)

    def after_death(self, quick_deaths: int, started_at: float, now: float) -> tuple[int, float | None]:
        """A worker started at ``started_at`` died at ``now`` after ``quick_deaths`` quick deaths in a row:
        the new count, and the delay before its restart (``None``: a crash loop, restart no more)."""
        n = quick_deaths + 1 if now - started_at < self.stable_after else 0
        if n >= self.crash_limit:
            return n, None
        return n, 0.0 if n <= 1 else min(self.backoff_max, self.backoff * 2 ** (n - 2)) * self.jitter()


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    pipe: int | None = None
    buffer: bytes = b""
    last_beat: float = 0.0
    command_pgids: set[int] = field(default_factory=set)  # one per slice the worker runs
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each within stable_after of its start
    restart_at: float | None = None
    finished: bool = False  # once mode: exited 0, not to be restarted
    hang_timeout: float | None = None  # from the ttl the backend granted this worker, when it differs


class Supervisor:
    """Runs ``count`` workers until stopped (or, with ``once``, until all exit successfully)."""

    def __init__(self, count: int, worker_main: WorkerMain, *, once: bool = False,
                 hang_timeout: float = 10.0, crash_limit: int = 5, stable_after: float = 2.0,
                 backoff: float = 0.1, backoff_max: float = 10.0, kill_after: float = 10.0,
                 events: EventLog | None = None, on_tick: Callable[[Supervisor], None] | None = None,
                 on_worker_exit: Callable[[int], None] | None = None,
                 hang_from_ttl: Callable[[float], float] | None = None,
                 tick_every: float = 0.25, metrics: metrics_.MetricsServer | None = None) -> None:
        self.slots = [_Slot(i) for i in range(count)]
        self.worker_main = worker_main
        self.once = once
        self.hang_timeout = hang_timeout
        self.restarts = RestartPolicy(stable_after, crash_limit, backoff, backoff_max)
        self.kill_after = kill_after
        self.events = events or EventLog(None)
        self.on_tick = on_tick
        self.on_worker_exit = on_worker_exit  # e.g. remove the dead worker's slice files
        self.hang_from_ttl = hang_from_ttl  # granted ttl -> hang timeout (None: keep hang_timeout)
        self.tick_every = tick_every
        # where workers' metrics go: the given server, else the one the command line installed
        self.metrics = metrics if metrics is not None else metrics_.installed()
        self.stop_requests = 0
        self.stop_signal: int | None = None  # the signal that asked for the (first) stop
        self.crash: CrashLoop | None = None
        self.config_failed = False
        self._cold_deadline: float | None = None
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals ----------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        os.write(self._sig_w, bytes([signum]))

    def request_stop(self) -> None:
        """Begin a warm stop (a second call makes it cold), as SIGTERM does."""
        self._on_signal(signal.SIGTERM, None)

    # -- workers ----------------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        # Block the stop signals across fork: one sent to the new worker before it has reset the
        # supervisor's handlers would otherwise be swallowed (the worker would miss a warm stop).
        stops = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        pid = os.fork()
        if pid == 0:  # child
            code: int = EXIT_INTERNAL
            try:
                os.close(read_fd)
                if self.metrics is not None:
                    self.metrics.in_worker()
                os.setpgid(0, 0)  # its own group: a terminal's Ctrl-C reaches only the supervisor
                for s in stops:
                    signal.signal(s, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # a pending SIGTERM ends it here
                code = self.worker_main(slot.index, write_fd, parent)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.pid, slot.pipe, slot.buffer = pid, read_fd, b""
        slot.last_beat = slot.started_at = time.monotonic()
        slot.restart_at = None
        if self.metrics is not None:
            self.metrics.started(slot.index)
        self.events.emit("started", worker=slot.index, worker_pid=pid)
        log.info("worker %d started (pid %d)", slot.index, pid, extra={"worker": slot.index})

    def _kill(self, pid: int | None, sig: int, group: bool = False) -> None:
        if pid is None:
            return
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _read_pipe(self, slot: _Slot) -> bool:
        """Take what the worker wrote; False at the end of the pipe or when nothing was there."""
        assert slot.pipe is not None
        try:
            data = os.read(slot.pipe, 4096)
        except BlockingIOError:
            return False
        if not data:
            return False
        slot.last_beat = time.monotonic()
        slot.buffer += data
        *lines, slot.buffer = slot.buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"m "):
                if self.metrics is not None:
                    self.metrics.forward(slot.index, line[2:])
            elif line.startswith(b"c "):
                slot.command_pgids.add(int(line[2:]))
            elif line.startswith(b"x "):
                slot.command_pgids.discard(int(line[2:]))
            elif line.startswith(b"t ") and self.hang_from_ttl is not None:
                # the backend granted another ttl than asked (ZooKeeper negotiates): follow it
                slot.hang_timeout = self.hang_from_ttl(float(line[2:]))
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._on_exit(slot, status)

    def _on_exit(self, slot: _Slot, status: int) -> None:
        pid = slot.pid
        if slot.pipe is not None:
            while self._read_pipe(slot):  # its last lines (its final metrics) before it is gone
                pass
            os.close(slot.pipe)
        for pgid in slot.command_pgids:  # nothing works a shard unsupervised
            self._kill(pgid, signal.SIGKILL, group=True)
        slot.command_pgids.clear()
        if self.on_worker_exit is not None:
            self.on_worker_exit(slot.index)
        slot.pid = slot.pipe = None
        code = os.waitstatus_to_exitcode(status)
        if self.metrics is not None:
            self.metrics.exited(slot.index)
        self.events.emit("exited", worker=slot.index, code=code, worker_pid=pid, **{"pid": pid})
        if code == EXIT_OK and (self.once or self.stop_requests):
            slot.finished = True
            return
        if self.stop_requests:
            return
        if code == EXIT_CONFIG:
            self.config_failed = True
            self.request_stop()
            return
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        log.warning("worker %d (pid %s) died with %s", slot.index, pid, how, extra={"worker": slot.index})
        now = time.monotonic()
        slot.quick_deaths, delay = self.restarts.after_death(slot.quick_deaths, slot.started_at, now)
        if delay is None:
            self.crash = CrashLoop(slot.index, slot.quick_deaths, self.restarts.stable_after, how)
            log.error("%s", self.crash, extra={"worker": slot.index})
            self.request_stop()
            return
        slot.restart_at = now + delay

    def _check_hung(self, now: float) -> None:
        for slot in self.slots:
            if slot.pid is not None and now - slot.last_beat > (slot.hang_timeout or self.hang_timeout):
                log.error("worker %d (pid %d) sent no heartbeat for %.1f s: killing it", slot.index, slot.pid,
                          now - slot.last_beat, extra={"worker": slot.index})
                self.events.emit("killed", worker=slot.index, reason="hung", **{"pid": slot.pid})
                self._kill(slot.pid, signal.SIGKILL)
                for pgid in slot.command_pgids:
                    self._kill(pgid, signal.SIGKILL, group=True)
                slot.last_beat = now  # reaped via SIGCHLD; don't kill twice

    def _handle_signals(self) -> None:
        try:
            data = os.read(self._sig_r, 1024)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                continue
            self.stop_requests += 1
            if self.stop_signal is None:
                self.stop_signal = signum
            cold = self.stop_requests >= 2
            log.warning("%s stop requested", "cold" if cold else "warm")
            if cold and self._cold_deadline is None:
                self._cold_deadline = time.monotonic() + self.kill_after
            for slot in self.slots:
                self._kill(slot.pid, signal.SIGTERM)
                slot.restart_at = None

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until every worker has exited; return the exit status for the command line.

        ``on_tick`` is called once before the first worker starts, then every ``tick_every`` seconds.
        """
        if self.metrics is not None:
            self.metrics.start()  # before the signal handlers and the workers: it inherits neither
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        # Objects made so far (shards, slices) live on in every worker: keep the collector off them,
        # so it does not touch — and copy — every copy-on-write page in each forked child.
        gc.freeze()
        try:
            if self.on_tick is not None:
                self.on_tick(self)
            for slot in self.slots:
                self._spawn(slot)
            next_tick = time.monotonic()
            while any(s.pid is not None or s.restart_at is not None for s in self.slots):
                now = time.monotonic()
                timeout = min([self.hang_timeout / 4, max(0.0, next_tick - now) if self.on_tick else 1.0]
                              + [max(0.0, s.restart_at - now) for s in self.slots if s.restart_at is not None])
                fds = [self._sig_r] + [s.pipe for s in self.slots if s.pipe is not None]
                try:
                    ready, _, _ = select.select(fds, [], [], timeout)
                except InterruptedError:
                    ready = []
                if self._sig_r in ready:
                    self._handle_signals()
                for slot in self.slots:
                    if slot.pipe is not None and slot.pipe in ready:
                        self._read_pipe(slot)
                self._reap()
                now = time.monotonic()
                self._check_hung(now)
                if self._cold_deadline is not None and now > self._cold_deadline:
                    for slot in self.slots:
                        self._kill(slot.pid, signal.SIGKILL)
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at and not self.stop_requests:
                        self._spawn(slot)
                if self.on_tick is not None and now >= next_tick:
                    self.on_tick(self)
                    next_tick = now + self.tick_every
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.metrics is not None:
                self.metrics.close()
        if self.crash is not None:
            raise self.crash
        return EXIT_CONFIG if self.config_failed else 0

    def worker_pids(self) -> dict[int, int]:
        """index -> pid of the live workers."""
        return {s.index: s.pid for s in self.slots if s.pid is not None}
