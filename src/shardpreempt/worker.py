"""One worker process: pick a slice (its own first, then the others), hold it, run the job, release.

Continuous mode (the default) keeps the slice while the worker lives and runs the job again when it
returns: at once after success, with exponential backoff after a failure, giving the slice up after
``max_failures`` failures in a row so another worker can try. ``once`` mode processes each slice once
per run: a marker file per finished slice in the run's private directory tells every worker what is
left. A lost lease stops the job (a command gets SIGTERM, then SIGKILL after a grace) before the
worker reports the loss; a job that ignores the loss is ended with the whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
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
from dataclasses import dataclass, field
from pathlib import Path

from .backends import open_backend
from .claims import Claim, Claimer, Ownership
from .config import shard_table
from .errors import BackendError, ConfigError, Shutdown
from .events import EventLog
from .model import Slice

log = logging.getLogger("shardpreempt.worker")

Job = Callable[[Ownership], None]
EXIT_OK, EXIT_CONFIG, EXIT_INTERNAL, EXIT_FENCED = 0, 2, 70, 75
PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; no-op elsewhere).

    If ``parent`` is given and is already gone (it died before the request took effect: the
    kernel would never signal us), die now.
    """
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


@dataclass
class WorkerOptions:
    """How one worker behaves; the supervisor builds one per worker index."""

    backend_url: str
    ttl: float
    slices: Sequence[Slice]
    index: int = 0
    job: Job | None = None
    command: Sequence[str] | None = None
    once: bool = False
    events: EventLog = field(default_factory=lambda: EventLog(None))
    done_dir: Path | None = None  # once mode: one marker file per finished slice
    max_failures: int = 5
    backoff: float = 0.5  # first delay after a failed run; doubles up to backoff_max
    backoff_max: float = 30.0
    heartbeat_fd: int | None = None
    heartbeat_every: float = 1.0
    grace: float | None = None  # SIGTERM -> SIGKILL for a command after a loss (default: margin / 2)
    stop_grace: float = 30.0  # warm stop: how long the command may take to exit after SIGTERM


class Worker:
    """The worker loop; :func:`run_worker` is its entry point in a forked child."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.stop_requests = 0
        self.stopping = threading.Event()
        self.cold = threading.Event()
        self.command_pgid: int | None = None
        self._cooldown: dict[str, float] = {}
        # written on a stop signal or a lost lease, so a worker waiting on its command wakes at once
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _wake(self, *_: object) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
            os.write(self._wake_w, b"!")

    # -- signals and heartbeats -------------------------------------------------------------------
    def on_signal(self, signum: int, frame: object) -> None:
        """First SIGTERM: warm stop; second: cold stop (a Python job gets Shutdown raised)."""
        self.stop_requests += 1
        self.stopping.set()
        self._wake()
        if self.stop_requests >= 2:
            self.cold.set()
            if self.opts.job is not None and self._in_job:
                raise Shutdown()

    _in_job = False

    def _report(self, line: str) -> None:
        if self.opts.heartbeat_fd is not None:
            try:
                os.write(self.opts.heartbeat_fd, line.encode() + b"\n")
            except OSError:  # supervisor gone: the kernel's parent-death signal is on its way
                os._exit(EXIT_INTERNAL)

    def _heartbeat(self, parent: int) -> None:
        while True:
            if os.getppid() != parent:
                os._exit(EXIT_INTERNAL)  # orphaned: never work a shard unsupervised
            self._report("h")
            time.sleep(self.opts.heartbeat_every)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Acquire and work slices until stopped (or, in once mode, until every slice is done)."""
        opts = self.opts
        try:
            backend = open_backend(opts.backend_url)
        except ConfigError as exc:
            log.error("worker %d: %s", opts.index, exc)
            return EXIT_CONFIG
        claimer = Claimer(backend, opts.ttl)
        poll = 0.25 if backend.capabilities.server_expiry else 0.5
        try:
            while not self.stopping.is_set():
                candidates = self._candidates()
                if not candidates:
                    return EXIT_OK  # once mode: nothing left
                start = next((i for i, s in enumerate(candidates) if s.index >= opts.index), 0)
                held = claimer.try_slices(candidates, start)
                if held is None:
                    claimer.wait(candidates, poll)
                    continue
                self._work(held, claimer)
            return EXIT_OK
        finally:
            backend.close()

    def _candidates(self) -> list[Slice]:
        now = time.monotonic()
        out = []
        for s in self.opts.slices:
            if self._cooldown.get(s.id, 0.0) > now:
                continue
            if self.opts.done_dir is not None and (self.opts.done_dir / s.id).exists():
                continue
            out.append(s)
        return out

    def _events(self, kind: str, claim: Claim, **extra: object) -> None:
        lease = claim.lease
        rows = [{"shard": k, "token": lease.tokens[k]} for k in lease.keys]
        self.opts.events.emit_many(kind, rows, owner=lease.owner, worker=self.opts.index,
                                   slice=claim.slice.id, **extra)

    def _work(self, claim: Claim, claimer: Claimer) -> None:
        opts = self.opts
        self._events("acquired", claim)
        log.info("worker %d owns slice %s (%d shards)", opts.index, claim.slice.id, len(claim.slice.shards))
        ownership = Ownership(claim, worker=opts.index, stopping=self.stopping)
        failures = 0
        outcome = "released"
        try:
            while not self.stopping.is_set() and not claim.lost.is_set():
                ok = self._run_job(ownership, claim)
                if claim.lost.is_set():
                    break
                if ok:
                    failures = 0
                    if opts.once:
                        self._mark_done(claim.slice, "ok")
                        break
                    continue
                if self.stopping.is_set():
                    break
                failures += 1
                if failures >= opts.max_failures:
                    log.error("worker %d: job failed %d times in a row on slice %s; giving it up",
                              opts.index, failures, claim.slice.id)
                    if opts.once:
                        self._mark_done(claim.slice, "failed")
                    else:
                        self._cooldown[claim.slice.id] = time.monotonic() + opts.backoff_max
                    break
                delay = min(opts.backoff_max, opts.backoff * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
                if self._pause(delay, claim):
                    break
        finally:
            if claim.lost.is_set():
                outcome = "lost"
                claimer.renew_owner()
            self._events(outcome, claim, **({"reason": claim.reason} if claim.reason else {}))
            claim.release()

    def _pause(self, seconds: float, claim: Claim) -> bool:
        """Sleep unless stopped or lost; True if interrupted."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.stopping.is_set() or claim.lost.wait(min(0.05, end - time.monotonic())):
                return True
        return self.stopping.is_set()

    def _mark_done(self, slice_: Slice, status: str) -> None:
        assert self.opts.done_dir is not None
        tmp = self.opts.done_dir / f".{slice_.id}.{os.getpid()}"
        tmp.write_text(status)
        os.replace(tmp, self.opts.done_dir / slice_.id)

    # -- running the job --------------------------------------------------------------------------
    def _grace(self, claim: Claim) -> float:
        return self.opts.grace if self.opts.grace is not None else max(0.05, claim.margin / 2)

    def _run_job(self, ownership: Ownership, claim: Claim) -> bool:
        if self.opts.command is not None:
            return self._run_command(ownership, claim)
        assert self.opts.job is not None
        if claim.backend.capabilities.server_expiry:
            claim.on_lost(lambda c: self._fence_python_job(c))
        try:
            self._in_job = True
            self.opts.job(ownership)
            return True
        except Shutdown:
            return True
        except Exception:
            log.exception("worker %d: job failed on slice %s", self.opts.index, claim.slice.id)
            return False
        finally:
            self._in_job = False

    def _fence_python_job(self, claim: Claim) -> None:
        """A Python job cannot be killed alone: give it the grace to return, then end the process."""
        def enforce() -> None:
            end = time.monotonic() + self._grace(claim)
            while time.monotonic() < end:
                if not self._in_job:
                    return
                time.sleep(0.01)
            log.error("worker %d: job did not stop after losing its lease; exiting", self.opts.index)
            self._events("lost", claim, reason=claim.reason or "lost")
            os._exit(EXIT_FENCED)

        threading.Thread(target=enforce, daemon=True).start()

    def _run_command(self, ownership: Ownership, claim: Claim) -> bool:
        opts = self.opts
        assert opts.command is not None
        with tempfile.TemporaryDirectory(prefix="shardpreempt-slice-") as private:
            slice_file = Path(private) / "slice.json"
            fd = os.open(slice_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"slice_id": claim.slice.id, "worker": opts.index, "owner": ownership.owner,
                           "tokens": ownership.tokens, "shards": shard_table(ownership.shards)}, f)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPREEMPT_")}
            env.update({
                "SHARDPREEMPT_SLICE_ID": claim.slice.id,
                "SHARDPREEMPT_SHARDS": json.dumps(claim.slice.digest),
                "SHARDPREEMPT_TOKENS": json.dumps(ownership.tokens),
                "SHARDPREEMPT_WORKER": str(opts.index),
                "SHARDPREEMPT_OWNER": ownership.owner,
                "SHARDPREEMPT_SLICE_FILE": str(slice_file),
            })
            worker_pid = os.getpid()
            try:
                proc = subprocess.Popen(list(opts.command), env=env, start_new_session=True,
                                        preexec_fn=lambda: die_with_parent(worker_pid))
            except OSError as exc:
                log.error("worker %d: cannot start %s: %s", opts.index, opts.command[0], exc.strerror)
                return False
            self.command_pgid = proc.pid
            self._report(f"c {proc.pid}")
            try:
                code = self._supervise(proc, claim)
            finally:
                self._report(f"x {proc.pid}")
                self.command_pgid = None
        if code != 0 and not self.stopping.is_set() and not claim.lost.is_set():
            log.warning("worker %d: command exited with %s on slice %s", opts.index, code, claim.slice.id)
        return code == 0

    def _supervise(self, proc: subprocess.Popen[bytes], claim: Claim) -> int:
        """Wait for the command, woken only by its exit, a stop signal or a lost lease."""
        claim.on_lost(self._wake)
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: fall back to a short poll
            pidfd = None
        try:
            return self._supervise_loop(proc, claim, pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _supervise_loop(self, proc: subprocess.Popen[bytes], claim: Claim, pidfd: int | None) -> int:
        termed_for_stop = False
        while True:
            fds = [self._wake_r] if pidfd is None else [self._wake_r, pidfd]
            select.select(fds, [], [], 0.05 if pidfd is None else 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
            code = proc.poll()
            if code is not None:
                return code
            if claim.lost.is_set():
                self._kill(proc, self._grace(claim))
                return proc.wait()
            if self.cold.is_set():
                self._kill(proc, 0.0)
                return proc.wait()
            if self.stopping.is_set() and not termed_for_stop:
                termed_for_stop = True
                self._signal(proc, signal.SIGTERM)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _kill(self, proc: subprocess.Popen[bytes], grace: float) -> None:
        if grace > 0:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
                self._signal(proc, signal.SIGKILL)  # the rest of its process group
                return
            except subprocess.TimeoutExpired:
                pass
        self._signal(proc, signal.SIGKILL)


def run_worker(opts: WorkerOptions, parent: int) -> int:
    """Entry point in a freshly forked worker process."""
    die_with_parent(parent)
    worker = Worker(opts)
    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if opts.heartbeat_fd is not None:
        threading.Thread(target=worker._heartbeat, args=(parent,), daemon=True, name="heartbeat").start()
    try:
        return worker.run()
    except Shutdown:
        return EXIT_OK
    except BackendError as exc:
        log.error("worker %d: %s", opts.index, exc)
        return EXIT_INTERNAL
    except Exception:
        log.exception("worker %d crashed", opts.index)
        return EXIT_INTERNAL
