"""``shardpreempt stress``: run a backend under injected faults, then check the history and the shards.

Two (or more) supervisors — stand-ins for two machines — run the demo's fenced SQLite job in
continuous mode over a set of shards; half of the workers are standbys. Work keeps arriving. A fault
is injected, the harness waits until every shard is owned again, and so on for ``count`` faults or
``duration`` seconds. Then new work stops, the workers drain it, and the run is judged: the history
checker (overlaps, token order, unowned time after each fault heals) and the shard databases (items
lost, duplicated, written without a lease, stale writes accepted).

Fault kinds: ``kill-worker`` (SIGKILL a holder), ``stop-worker`` (SIGSTOP a holder past the ttl, then
SIGCONT; the supervisor's watchdog kills it first), ``kill-supervisor`` (SIGKILL a whole supervisor,
then start it again), ``restart-backend`` (SIGKILL the server and start it again; Redis loses its
data), ``pause-backend`` (SIGSTOP the server past the ttl), ``restore-backend`` (stop the server, put
back the data of a snapshot taken one restore earlier, start it: recent writes are lost). With
``fork_children`` (or ``SHARDPREEMPT_STRESS_FORK``) each command forks the processes that do the work
(:mod:`shardpreempt.testing.workload`), and a watcher (:mod:`shardpreempt.testing.watch`) reports every
process of the run found alive after its lease ended (``outlived``). With ``network`` (``--network``),
every supervisor runs in its own network namespace and two more kinds apply: ``partition-worker`` (cut
a holder's supervisor off the backend past the ttl) and ``slow-backend`` (add latency to every link for
a few seconds); see :mod:`shardpreempt.testing.netfaults`. More kinds can be added to :data:`FAULTS`.
:meth:`Stress.run` returns a :class:`StressResult`; ``shardpreempt stress --json`` prints its
:meth:`~StressResult.as_dict`.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..backends import open_backend
from ..config import Settings, to_toml
from ..errors import BackendError, ConfigError
from ..events import HOST, EventLog
from ..history import Report, check, read_events
from ..status import members
from ..typing import Backend
from .netfaults import NETWORK_FAULTS, NetFaults, NetworkFigures
from .servers import EphemeralServer, server_for, unique
from .servers.base import wait_stopped
from .servers.redis import RedisServer
from .watch import RUN_MARK, EventTail, Watcher, alive, children
from .workload import FORK_MODES, ItemTotals, SqliteWorkload, Workload

SERVER_BACKENDS = ("redis", "postgresql", "mysql", "etcd", "zookeeper")


SERVER_FAULTS = {"restart-backend", "pause-backend", "restore-backend"}

#: Chooses the forking workload when ``StressOptions.fork_children`` is not given (the CLI has no flag).
FORK_VARIABLE = "SHARDPREEMPT_STRESS_FORK"


@runtime_checkable
class Snapshots(Protocol):
    """A server whose stored data can be copied while it is stopped, and put back."""

    def snapshot(self, name: str) -> Path:
        """Copy the stopped server's data."""
        ...

    def restore(self, snapshot: Path) -> None:
        """Put back a copy taken by :meth:`snapshot`."""
        ...


@dataclass
class StressOptions:
    """What to run and which faults to inject."""

    backend: str = "file"  # file, a server name (an ephemeral server is started), or a URL
    kinds: Sequence[str] = ("kill-worker", "stop-worker", "kill-supervisor", "restart-backend", "pause-backend",
                            "restore-backend")
    count: int = 20
    duration: float | None = None
    shards: int = 6
    supervisors: int = 2
    workers: int = 3  # per supervisor; as many slices as one supervisor's workers
    ttl: float = 2.0
    items: int = 5  # new items per shard per fault
    item_seconds: float = 0.002
    seed: int = 0
    unowned_bound: float | None = None  # default: 0.1 s on file, ttl + 1 s on servers
    network: bool = False  # each supervisor in a network namespace (root, Linux); adds the network faults
    workload: Workload | None = None  # default: SqliteWorkload(shards, item_seconds, fork_children)
    restore_down: float = 0.0  # least time the server stays down in restore-backend (0: as fast as it goes)
    fork_children: str | None = None  # group | session | mixed (testing.workload), "" none; None: $FORK_VARIABLE
    directory: Path | None = None
    log: Callable[[str], None] = field(default=lambda line: None)


@dataclass
class StressResult:
    """The figures of one stress run (docs/faults.md says what each means)."""

    backend: str
    faults: dict[str, int]  # kind -> how many were injected
    faults_total: int
    acquisitions: int
    overlaps: int
    token_violations: int
    max_unowned_s: float
    unowned_bound_s: float
    unowned_violations: int
    coverage_timeouts: int  # faults after which the shards were not all owned again in time
    outlived: int  # processes found alive after their lease ended
    workload: str
    items: ItemTotals
    directory: str
    violations_by_fault: dict[str, dict[str, int]]  # violation kind -> the fault before it -> count
    violations: list[str]  # the first ten of each kind, in words
    network: NetworkFigures | None = None  # with --network

    @property
    def passed(self) -> bool:
        """True when the run shows no violation of any kind."""
        return (self.overlaps == self.token_violations == self.unowned_violations == 0
                and self.coverage_timeouts == self.outlived == 0 and self.items.clean)

    def as_dict(self) -> dict[str, Any]:
        """The figures as ``shardpreempt stress --json`` prints them (``network`` only with --network)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["items"] = self.items.as_dict()
        if self.network is None:
            del out["network"]
        else:
            out["network"] = self.network.as_dict()
        return out


class Stress:
    """One stress run; :meth:`run` returns the figures."""

    def __init__(self, opts: StressOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.dir = opts.directory or Path(tempfile.mkdtemp(prefix="shardpreempt-stress-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.events_path = self.dir / "events.jsonl"
        self.events = EventLog(self.events_path)
        self.server: EphemeralServer | None = None
        self.supervisors: list[subprocess.Popen[bytes]] = []
        self.excused: list[tuple[float, float]] = []
        self.injected: Counter[str] = Counter()
        self.coverage_timeouts = 0
        self.settings: Settings | None = None
        self.net: NetFaults | None = None
        fork = opts.fork_children if opts.fork_children is not None else os.environ.get(FORK_VARIABLE, "")
        self.fork = fork or None
        if self.fork is not None and self.fork not in FORK_MODES:
            raise ConfigError(f"unknown fork mode {self.fork!r} (known: {', '.join(FORK_MODES)})",
                              source=FORK_VARIABLE)
        if opts.workload is not None and opts.fork_children:
            raise ValueError("fork_children applies to the default workload only")
        self.workload: Workload = opts.workload or SqliteWorkload(opts.shards, opts.item_seconds, self.fork)
        self.tail = EventTail(self.events_path)
        self.mark = uuid.uuid4().hex
        self.watcher = Watcher(self.mark, self.tail)
        self.snapshot: Path | None = None  # the data the next restore-backend puts back
        self.fault_log: list[tuple[float, str]] = []  # (start, kind) of every fault injected
        self.observer: Backend | None = None  # the harness's own connection, to see who has joined the pool
        self.restores = 0

    # -- set-up -----------------------------------------------------------------------------------
    def _backend_url(self) -> str:
        b = self.opts.backend
        if b == "file":
            return f"file://{self.dir / 'locks'}"
        if b in SERVER_BACKENDS:
            self.server = server_for(b)
            if isinstance(self.server, RedisServer) and "restore-backend" in self.opts.kinds:
                self.server.persist = True  # an RDB file at every clean stop, for the snapshots
            self.server.start()
            # the production setting: restarts that lose data must not grant a lease still in use
            return self.server.url(unique("stress")).replace("restart_grace=0", f"restart_grace={self.opts.ttl}")
        return b

    def _setup(self) -> Path:
        url = self._backend_url()
        shards = self.workload.make_shards(self.dir, self.opts.items)
        self.settings = Settings(shards=tuple(shards), backend_url=url, ttl=self.opts.ttl)
        cfg = self.dir / "stress.toml"
        cfg.write_text(to_toml({"backend": {"url": url, "ttl": self.opts.ttl},
                                   "shards": {s.name: {**s.settings, "identity": s.identity} for s in shards}}))
        os.chmod(cfg, 0o600)  # shard settings may hold passwords
        return cfg

    def _start_supervisor(self, cfg: Path, index: int) -> None:
        hang = "1.0" if self.opts.backend == "file" else str(round(self.opts.ttl * 0.35, 3))
        argv = [sys.executable, "-m", "shardpreempt", "run", str(cfg), "-w", str(self.opts.workers),
                "--slices", str(self.opts.workers), "--events", str(self.events_path), "--hang-timeout", hang,
                "--backoff", "0.05", "--max-failures", "1000", "--crash-limit", "1000",
                "--", *self.workload.command()]
        log = open(self.dir / f"supervisor{index}.log", "ab")  # noqa: SIM115 - inherited by the child
        if self.net is not None:
            argv = self.net.command(index, argv)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, RUN_MARK: self.mark})
        log.close()
        if index < len(self.supervisors):
            self.supervisors[index] = proc
        else:
            self.supervisors.append(proc)

    # -- observing --------------------------------------------------------------------------------
    def _open_holds(self) -> dict[str, dict[str, Any]]:
        """shard -> the acquired event of its current holder."""
        return self.tail.holders()

    def _wait_covered(self, timeout: float) -> bool:
        assert self.settings is not None
        want = {s.identity for s in self.settings.shards}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self._open_holds()) >= want:
                return True
            time.sleep(0.02)
        return False

    def _wait_workers_up(self, timeout: float) -> bool:
        """Wait until every supervisor runs its full set of workers (standbys ready for the next fault)."""
        want = self.opts.supervisors * self.opts.workers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for pid in self.tail.workers() if alive(pid)) >= want:
                return True
            time.sleep(0.02)
        return False

    def _wait_joined(self, timeout: float) -> bool:
        """Wait until every live worker is a member of the pool in the backend (a standby that has joined,
        not one still starting up, is what takes a slice over within the bound)."""
        want = self.opts.supervisors * self.opts.workers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = {pid for pid in self.tail.workers() if alive(pid)}
            try:
                joined = {m.pid for m in members(self._observer())}
            except (BackendError, OSError):
                self._close_observer()  # reconnect after a restart
                joined = set()
            if len(live) >= want and live <= joined:
                return True
            time.sleep(0.05)
        return False

    def _observer(self) -> Backend:
        if self.observer is None:
            assert self.settings is not None
            self.observer = open_backend(self.settings.backend_url)
        return self.observer

    def _close_observer(self) -> None:
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.close()
            self.observer = None

    def _add_work(self) -> None:
        assert self.settings is not None
        self.workload.add_work(self.settings.shards, self.opts.items)

    def _pending(self) -> int:
        assert self.settings is not None
        return self.workload.pending(self.settings.shards)

    # -- faults -----------------------------------------------------------------------------------
    def _victim(self) -> dict[str, Any] | None:
        holds = self._open_holds()
        return self.rng.choice(sorted(holds.values(), key=lambda e: e["shard"])) if holds else None

    def _kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _stop_all(self, pids: Sequence[int]) -> None:
        """SIGSTOP processes and wait until they are stopped: a victim's events all come before its kill's."""
        for pid in pids:
            self._kill(pid, signal.SIGSTOP)
        wait_stopped(list(pids))

    def fault_kill_worker(self) -> None:
        """SIGKILL the worker holding a random shard (stopped first, so it acquires nothing after the event)."""
        v = self._victim()
        if v:
            self._stop_all([v["pid"]])
            self.events.emit("killed", pid=v["pid"], host=HOST, reason="stress: kill-worker")
            self._kill(v["pid"], signal.SIGKILL)

    def fault_stop_worker(self) -> None:
        """SIGSTOP a holder for 1.5 x ttl, then SIGCONT (its supervisor should have killed it)."""
        v = self._victim()
        if v:
            self._kill(v["pid"], signal.SIGSTOP)
            time.sleep(self.opts.ttl * 1.5)
            self._kill(v["pid"], signal.SIGCONT)

    def fault_kill_supervisor(self) -> None:
        """SIGKILL one supervisor (its workers die with it), then start it again.

        The supervisor and its workers are stopped first, so none of them acquires anything after the
        ``killed`` events (a worker's events after them would leave its holds open in the history).
        """
        index = self.rng.randrange(len(self.supervisors))
        proc = self.supervisors[index]
        self._stop_all([proc.pid])  # it forks no more workers
        workers = sorted(set(self.tail.workers(supervisor=proc.pid)) | set(children(proc.pid)))
        self._stop_all(workers)
        t = time.time()
        for pid in workers:
            self.events.emit("killed", pid=pid, host=HOST, reason="stress: kill-supervisor", t_kill=t)
        proc.kill()
        proc.wait()
        for pid in workers:  # the parent-death signal has killed them; one just forked may not have asked yet
            self._kill(pid, signal.SIGKILL)
        self._start_supervisor(self.dir / "stress.toml", index)

    def fault_restart_backend(self) -> None:
        """SIGKILL the server and start it again."""
        assert self.server is not None
        t0 = time.time()
        self.server.restart(lose_data=True)
        self.excused.append((t0, time.time()))

    def fault_pause_backend(self) -> None:
        """SIGSTOP the server for 1.5 x ttl."""
        assert self.server is not None
        t0 = time.time()
        self.server.pause()
        time.sleep(self.opts.ttl * 1.5)
        self.server.resume()
        self.excused.append((t0, time.time()))

    def fault_restore_backend(self) -> None:
        """Stop the server, put back the data of the previous snapshot (recent writes lost), start it."""
        assert isinstance(self.server, Snapshots) and self.snapshot is not None
        t0 = time.time()
        self.server.stop()
        self.restores += 1
        newer = self.server.snapshot(f"restore{self.restores}")
        self.server.restore(self.snapshot)
        _remove(self.snapshot)
        self.snapshot = newer
        time.sleep(max(0.0, t0 + self.opts.restore_down - time.time()))
        self.server.start()
        self.excused.append((t0, time.time()))

    def _first_snapshot(self) -> None:
        """The data the first restore-backend puts back: taken once the shards are owned, before any fault."""
        assert isinstance(self.server, EphemeralServer) and isinstance(self.server, Snapshots)
        self.server.stop()
        self.snapshot = self.server.snapshot("restore0")
        self.server.start()

    def fault_partition_worker(self) -> None:
        """Cut a holder's supervisor off the backend for 1.5 x ttl, then heal the link."""
        assert self.net is not None
        events = read_events([self.events_path])
        victim = self._victim()
        pids = [p.pid for p in self.supervisors]
        owner = next((e["pid"] for e in events if e["event"] == "started" and victim is not None
                      and e.get("worker_pid") == victim["pid"]), None)
        index = pids.index(owner) if owner in pids else self.rng.randrange(len(pids))
        workers = frozenset(e["worker_pid"] for e in events if e["event"] == "started" and e["pid"] == pids[index])
        self.excused.append(self.net.partition(index, workers, self.opts.ttl * 1.5))

    def fault_slow_backend(self) -> None:
        """Add 100-200 ms of latency each way on every link for a few seconds."""
        assert self.net is not None
        ms = min(200.0, max(100.0, self.opts.ttl * 100))
        self.excused.append(self.net.slow(ms, max(3.0, self.opts.ttl * 2)))

    # -- the run ----------------------------------------------------------------------------------
    def _by_fault(self, report: Report) -> dict[str, dict[str, int]]:
        """violation kind (and ``outlived``) -> the fault injected last before each began -> count."""
        times = [t for t, _ in self.fault_log]
        out: dict[str, Counter[str]] = {}
        began = [(v.kind, v.at, "(before any fault)") for v in report.violations]
        began += [("outlived", o.at, "(after the run)") for o in self.watcher.found.values()]
        for kind, when, otherwise in began:
            i = bisect.bisect_right(times, when) - 1 if when is not None else -1
            out.setdefault(kind, Counter())[self.fault_log[i][1] if i >= 0 else otherwise] += 1
        return {kind: dict(counts) for kind, counts in out.items()}

    def kinds(self) -> list[str]:
        """The fault kinds that apply to this backend."""
        kinds = [k for k in self.opts.kinds if k in FAULTS]
        unknown = set(self.opts.kinds) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kind(s): {', '.join(sorted(unknown))} (known: {', '.join(FAULTS)})")
        if self.opts.backend not in SERVER_BACKENDS:
            kinds = [k for k in kinds if k not in SERVER_FAULTS]
        if self.opts.network and self.opts.backend not in SERVER_BACKENDS:
            raise ValueError(f"network faults need a server the harness starts: {', '.join(SERVER_BACKENDS)}")
        if not self.opts.network:
            kinds = [k for k in kinds if k not in NETWORK_FAULTS]
        return kinds

    def run(self) -> StressResult:
        """Inject the faults, drain the work, and return the figures."""
        kinds = self.kinds()
        cfg = self._setup()
        bound = self.opts.unowned_bound
        if bound is None:
            bound = 0.1 if self.opts.backend == "file" else self.opts.ttl + 1.0
        settle = self.opts.ttl * 3 + 15
        try:
            if self.opts.network:
                assert self.settings is not None
                self.net = NetFaults(self.opts.supervisors, self.settings.backend_url)
            for i in range(self.opts.supervisors):
                self._start_supervisor(cfg, i)
            if not self._wait_covered(60):
                raise RuntimeError(f"shards never all owned; see {self.dir}")
            if "restore-backend" in kinds:
                self._first_snapshot()
                if not self._wait_covered(60):
                    raise RuntimeError(f"shards not all owned again after the first snapshot; see {self.dir}")
            self.watcher.start()
            start = time.time()
            end_by = None if self.opts.duration is None else time.monotonic() + self.opts.duration
            n = 0
            while n < self.opts.count and (end_by is None or time.monotonic() < end_by):
                kind = kinds[n % len(kinds)] if kinds else None
                if kind is not None:
                    t0 = time.time()
                    FAULTS[kind](self)
                    self.injected[kind] += 1
                    self.fault_log.append((t0, kind))
                    with open(self.dir / "faults.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps({"t": t0, "healed": time.time(), "fault": kind}) + "\n")
                self._add_work()
                n += 1
                if not (self._wait_covered(settle) and self._wait_workers_up(settle) and self._wait_joined(settle)):
                    self.coverage_timeouts += 1
                if n % 25 == 0:
                    self.opts.log(f"{n} faults injected: {dict(self.injected)}")
            stop = time.time()
            drain_by = time.monotonic() + 120
            while self._pending() and time.monotonic() < drain_by:
                time.sleep(0.1)
        finally:
            self.watcher.stop()
            self._close_observer()
            for proc in self.supervisors:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.supervisors:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.watcher.leftovers()
            if self.net is not None:
                self.net.close()
            if self.server is not None:
                self.server.close()
        assert self.settings is not None
        history = read_events([self.events_path])
        report = check(history, max_unowned=bound, shards=[s.identity for s in self.settings.shards],
                       start=start, end=stop, excused=self.excused)
        return StressResult(
            backend=self.opts.backend,
            faults=dict(self.injected),
            faults_total=sum(self.injected.values()),
            acquisitions=sum(1 for e in history if e["event"] == "acquired"),
            overlaps=report.count("overlap"),
            token_violations=report.count("token"),
            max_unowned_s=round(report.max_unowned, 3),
            unowned_bound_s=bound,
            unowned_violations=report.count("unowned"),
            coverage_timeouts=self.coverage_timeouts,
            outlived=len(self.watcher.found),
            workload=f"sqlite, fork {self.fork}" if self.fork and self.opts.workload is None else
                     "sqlite" if self.opts.workload is None else type(self.workload).__name__,
            items=self.workload.audit(self.settings.shards, history),
            directory=str(self.dir),
            violations_by_fault=self._by_fault(report),
            violations=[f"{v.kind} {v.shard}: {v.detail}" for v in report.violations[:10]]
                       + [f"outlived {o}" for o in list(self.watcher.found.values())[:10]],
            network=self.net.figures(history) if self.net is not None else None,
        )


def _remove(path: Path) -> None:
    """Delete a snapshot (a directory, or one file)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


FAULTS: dict[str, Callable[[Stress], None]] = {
    "kill-worker": Stress.fault_kill_worker,
    "stop-worker": Stress.fault_stop_worker,
    "kill-supervisor": Stress.fault_kill_supervisor,
    "restart-backend": Stress.fault_restart_backend,
    "pause-backend": Stress.fault_pause_backend,
    "restore-backend": Stress.fault_restore_backend,
    "partition-worker": Stress.fault_partition_worker,
    "slow-backend": Stress.fault_slow_backend,
}
