"""Runs the job for one held slice, again and again, until the slice goes: one thread per slice.

A worker that holds three slices has three runners. Each runs the Python job, or starts the
command (in its own process group, with the slice's environment and 0600 slice file), and runs it
again when it ends: after success once ``interval`` (plus up to ``jitter``) has passed since the
run started (at once by default), with exponential backoff and jitter after a failure; after
``max_failures`` failures in a row it gives up (the worker then hands the slice to someone else for a
while). With ``once`` it ends after the first success.

How a run ends:

* **handoff or warm stop** (``stop()``): ``ownership.stopping`` is set and a command gets SIGTERM;
  one still running ``stop_grace`` seconds later is killed with its whole process group. The slice
  is released only after the run has ended.
* **lost lease**: ``ownership.lost`` is set and a command gets SIGTERM, then SIGKILL after ``grace``
  (well inside the time before anyone else can be granted the slice).
* **cold stop** (``stop(cold=True)``): a command is killed at once; a Python job gets
  :class:`~shardpreempt.errors.Shutdown` raised into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .claims import Ownership
from .config import shard_table
from .errors import Shutdown
from .process import GUARD_VARIABLE

log = logging.getLogger("shardpreempt.runner")

Job = Callable[[Ownership], None]


@dataclass(frozen=True)
class RunSettings:
    """How runners run jobs; one per worker."""

    index: int
    job: Job | None = None
    command: Sequence[str] | None = None
    once: bool = False
    max_failures: int = 5
    backoff: float = 0.5  # first delay after a failed run; doubles up to backoff_max
    backoff_max: float = 30.0
    grace: float = 0.5  # lost lease: SIGTERM -> SIGKILL
    stop_grace: float = 30.0  # handoff / warm stop: SIGTERM -> SIGKILL
    interval: float = 0.0  # least time between the starts of two successful runs (continuous mode)
    jitter: float = 0.0  # a random extra delay up to this, so many slices do not start in step
    files_dir: str | None = None  # private (0700) directory for slice files; None: a temporary one
    guard: int | None = None  # pid of the worker's guard, marked in every command's environment
    on_run: Callable[[float, bool], None] | None = None  # after each run: (seconds, failed on its own)


class SliceRunner(threading.Thread):
    """The job loop for one held slice; ``result`` tells how it ended."""

    def __init__(self, ownership: Ownership, settings: RunSettings, *, report: Callable[[str], None],
                 on_exit: Callable[[SliceRunner], None], inherit_fds: Sequence[int] = ()) -> None:
        super().__init__(name=f"slice-{ownership.slice.id}", daemon=True)
        self.ownership = ownership
        self.settings = settings
        self.report = report
        self.on_exit = on_exit
        self.cold = threading.Event()
        self.result = "stopped"  # ok | failed | lost | stopped
        self.finished = threading.Event()  # set when the run is over and result is final
        self.in_job = False
        self.inherit_fds = tuple(inherit_fds)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.log = logging.LoggerAdapter(log, {"slice": ownership.slice.id})  # the slice in JSON log lines

    @property
    def slice_id(self) -> str:
        """The slice this runner works."""
        return self.ownership.slice.id

    def wake(self) -> None:
        """Make the runner look at its flags now (thread- and signal-safe)."""
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending; closed: done
            os.write(self._wake_w, b"!")

    def stop(self, cold: bool = False) -> None:
        """End the current run (warm: SIGTERM and ``stopping``; cold: kill) and do not start another."""
        self.ownership.stopping.set()
        if cold:
            self.cold.set()
            if self.settings.job is not None and self.in_job and self.ident is not None:
                # A Python job cannot be killed alone: raise Shutdown in its thread.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), ctypes.py_object(Shutdown))
        self.wake()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the job until the slice goes, a stop, success in once mode, or too many failures."""
        s, own = self.settings, self.ownership
        failures = 0
        try:
            while not own.stopping.is_set() and not own.lost.is_set():
                started = time.monotonic()
                ok = self._run_once()
                if s.on_run is not None:  # a run cut short by a stop or a loss did not fail on its own
                    s.on_run(time.monotonic() - started, not ok and not own.stopping.is_set() and not own.lost.is_set())
                if own.lost.is_set():
                    break
                if ok:
                    failures = 0
                    if s.once:
                        self.result = "ok"
                        break
                    # the cadence: the next run starts at least `interval` (+ jitter) after this one did
                    wait = started + s.interval + random.uniform(0, s.jitter) - time.monotonic()
                    if wait > 0 and self._pause(wait):
                        break
                    continue
                if own.stopping.is_set():
                    break
                failures += 1
                if failures >= s.max_failures:
                    self.log.error("worker %d: job failed %d times in a row on slice %s; giving it up", s.index,
                              failures, self.slice_id)
                    self.result = "failed"
                    break
                delay = min(s.backoff_max, s.backoff * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
                if self._pause(delay):
                    break
            if own.lost.is_set():
                self.result = "lost"
        except Shutdown:
            pass
        except Exception:
            self.log.exception("worker %d: runner for slice %s crashed", s.index, self.slice_id)
            self.result = "failed"
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.finished.set()  # before on_exit: whoever it wakes must see the run as over
            self.on_exit(self)

    def _pause(self, seconds: float) -> bool:
        """Sleep unless stopped or lost; True if interrupted."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.ownership.stopping.is_set() or self.ownership.lost.is_set():
                return True
            self._poll([self._wake_r], left)
            self._drain()
        return self.ownership.stopping.is_set() or self.ownership.lost.is_set()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)

    @staticmethod
    def _poll(fds: Sequence[int], timeout: float) -> None:
        poller = select.poll()  # not select(): descriptors above 1024 are fine
        for fd in fds:
            poller.register(fd, select.POLLIN)
        with contextlib.suppress(InterruptedError):
            poller.poll(max(0, int(timeout * 1000) + 1))

    def _run_once(self) -> bool:
        if self.settings.command is not None:
            return self._run_command(self.settings.command)
        assert self.settings.job is not None
        try:
            self.in_job = True
            self.settings.job(self.ownership)
            return True
        except Shutdown:
            raise
        except Exception:
            self.log.exception("worker %d: job failed on slice %s", self.settings.index, self.slice_id)
            return False
        finally:
            self.in_job = False

    # -- commands ---------------------------------------------------------------------------------
    def _run_command(self, command: Sequence[str]) -> bool:
        own, index = self.ownership, self.settings.index
        with tempfile.TemporaryDirectory(prefix=f"slice-{own.slice.id}-", dir=self.settings.files_dir) as private:
            slice_file = Path(private) / "slice.json"
            fd = os.open(slice_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"slice_id": own.slice.id, "worker": index, "owner": own.owner, "tokens": own.tokens,
                           "shards": shard_table(own.shards)}, f)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPREEMPT_")}
            env.update({
                "SHARDPREEMPT_SLICE_ID": own.slice.id,
                "SHARDPREEMPT_SHARDS": json.dumps(own.slice.digest),
                "SHARDPREEMPT_TOKENS": json.dumps(own.tokens),
                "SHARDPREEMPT_WORKER": str(index),
                "SHARDPREEMPT_OWNER": own.owner,
                "SHARDPREEMPT_SLICE_FILE": str(slice_file),
            })
            if self.settings.guard is not None:
                env[GUARD_VARIABLE] = str(self.settings.guard)
            try:
                # No preexec_fn: running Python between fork and exec in a threaded worker can deadlock
                # the child. The worker's guard process ends the command's group if the worker dies.
                proc = subprocess.Popen(list(command), env=env, start_new_session=True, pass_fds=self.inherit_fds)
            except OSError as exc:
                self.log.error("worker %d: cannot start %s: %s", index, command[0], exc.strerror)
                return False
            self.report(f"c {proc.pid}")
            try:
                code = self._supervise(proc)
            finally:
                self._signal(proc, signal.SIGKILL)  # whatever the command left behind in its group
                self.report(f"x {proc.pid}")
        if code != 0 and not own.stopping.is_set() and not own.lost.is_set():
            self.log.warning("worker %d: command exited with %s on slice %s", index, code, own.slice.id)
        return code == 0

    def _supervise(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the command, woken only by its exit, a stop, or a lost lease."""
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: fall back to a short poll
            pidfd = None
        own = self.ownership
        termed_at: float | None = None
        try:
            while True:
                fds = [self._wake_r] if pidfd is None else [self._wake_r, pidfd]
                timeout = 0.05 if pidfd is None else 1.0
                if termed_at is not None:  # wake in time to escalate after the stop grace
                    timeout = min(timeout, max(0.0, termed_at + self.settings.stop_grace - time.monotonic()))
                self._poll(fds, timeout)
                self._drain()
                code = proc.poll()
                if code is not None:
                    return code
                if own.lost.is_set():
                    self._kill(proc, self.settings.grace)
                    return proc.wait()
                if self.cold.is_set():
                    self._kill(proc, 0.0)
                    return proc.wait()
                if own.stopping.is_set():
                    now = time.monotonic()
                    if termed_at is None:
                        termed_at = now
                        self._signal(proc, signal.SIGTERM)
                    elif now - termed_at >= self.settings.stop_grace:
                        self.log.warning("worker %d: command on slice %s ignored SIGTERM for %.0f s: killing it",
                                    self.settings.index, own.slice.id, self.settings.stop_grace)
                        self._kill(proc, 0.0)
                        return proc.wait()
        finally:
            if pidfd is not None:
                os.close(pidfd)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _kill(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        if grace > 0:
            self._signal(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        self._signal(proc, signal.SIGKILL)
