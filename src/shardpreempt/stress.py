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
data), ``pause-backend`` (SIGSTOP the server past the ttl). With ``network`` (``--network``), every
supervisor runs in its own network namespace and two more kinds apply: ``partition-worker`` (cut a
holder's supervisor off the backend past the ttl) and ``slow-backend`` (add latency to every link for
a few seconds); see :mod:`shardpreempt.netfaults`. More kinds can be added to :data:`FAULTS`.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings, to_toml
from .events import HOST, EventLog
from .netfaults import NETWORK_FAULTS, NetFaults
from .testing.history import check, holds_of, read_events
from .testing.servers import EphemeralServer, server_for, unique
from .workload import SqliteWorkload, Workload

SERVER_BACKENDS = ("redis", "postgresql", "mysql", "etcd", "zookeeper")


SERVER_FAULTS = {"restart-backend", "pause-backend"}


@dataclass
class StressOptions:
    """What to run and which faults to inject."""

    backend: str = "file"  # file, a server name (an ephemeral server is started), or a URL
    kinds: Sequence[str] = ("kill-worker", "stop-worker", "kill-supervisor", "restart-backend", "pause-backend")
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
    workload: Workload | None = None  # default: SqliteWorkload(item_seconds)
    directory: Path | None = None
    log: Callable[[str], None] = field(default=lambda line: None)


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
        self.workload: Workload = opts.workload or SqliteWorkload(opts.shards, opts.item_seconds)

    # -- set-up -----------------------------------------------------------------------------------
    def _backend_url(self) -> str:
        b = self.opts.backend
        if b == "file":
            return f"file://{self.dir / 'locks'}"
        if b in SERVER_BACKENDS:
            self.server = server_for(b)
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
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if index < len(self.supervisors):
            self.supervisors[index] = proc
        else:
            self.supervisors.append(proc)

    # -- observing --------------------------------------------------------------------------------
    def _open_holds(self) -> dict[str, dict[str, Any]]:
        """shard -> the acquired event of its current holder."""
        evs = read_events([self.events_path])
        open_ = {(h.shard, h.owner) for h in holds_of(evs) if h.end == float("inf")}
        out: dict[str, dict[str, Any]] = {}
        for e in evs:
            if e["event"] == "acquired" and (e["shard"], e["owner"]) in open_:
                out[e["shard"]] = e
        return out

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
            evs = read_events([self.events_path])
            started = {e["worker_pid"] for e in evs if e["event"] == "started"}
            ended = {e["pid"] for e in evs if e["event"] in ("exited", "killed")}
            if sum(1 for pid in started - ended if _alive(pid)) >= want:
                return True
            time.sleep(0.02)
        return False

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

    def fault_kill_worker(self) -> None:
        """SIGKILL the worker holding a random shard."""
        v = self._victim()
        if v:
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
        """SIGKILL one supervisor (its workers die with it), then start it again."""
        index = self.rng.randrange(len(self.supervisors))
        proc = self.supervisors[index]
        workers = {e["worker_pid"] for e in read_events([self.events_path])
                   if e["event"] == "started" and e["pid"] == proc.pid}
        t = time.time()
        for pid in workers:
            self.events.emit("killed", pid=pid, host=HOST, reason="stress: kill-supervisor", t_kill=t)
        proc.kill()
        proc.wait()
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

    def fault_partition_worker(self) -> None:
        """Cut a holder's supervisor off the backend for 1.5 x ttl, then heal the link."""
        assert self.net is not None
        self.net.partition(self)

    def fault_slow_backend(self) -> None:
        """Add 100-200 ms of latency each way on every link for a few seconds."""
        assert self.net is not None
        self.net.slow(self)

    # -- the run ----------------------------------------------------------------------------------
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

    def run(self) -> dict[str, Any]:
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
            start = time.time()
            end_by = None if self.opts.duration is None else time.monotonic() + self.opts.duration
            n = 0
            while n < self.opts.count and (end_by is None or time.monotonic() < end_by):
                kind = kinds[n % len(kinds)] if kinds else None
                if kind is not None:
                    FAULTS[kind](self)
                    self.injected[kind] += 1
                self._add_work()
                n += 1
                if not (self._wait_covered(settle) and self._wait_workers_up(settle)):
                    self.coverage_timeouts += 1
                if n % 25 == 0:
                    self.opts.log(f"{n} faults injected: {dict(self.injected)}")
            stop = time.time()
            drain_by = time.monotonic() + 120
            while self._pending() and time.monotonic() < drain_by:
                time.sleep(0.1)
        finally:
            for proc in self.supervisors:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.supervisors:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self.net is not None:
                self.net.close()
            if self.server is not None:
                self.server.close()
        assert self.settings is not None
        history = read_events([self.events_path])
        report = check(history, max_unowned=bound, shards=[s.identity for s in self.settings.shards],
                       start=start, end=stop, excused=self.excused)
        items = self.workload.audit(self.settings.shards, history)
        return {
            "backend": self.opts.backend,
            "faults": dict(self.injected),
            "faults_total": sum(self.injected.values()),
            "acquisitions": sum(1 for e in history if e["event"] == "acquired"),
            "overlaps": report.count("overlap"),
            "token_violations": report.count("token"),
            "max_unowned_s": round(report.max_unowned, 3),
            "unowned_bound_s": bound,
            "unowned_violations": report.count("unowned"),
            "coverage_timeouts": self.coverage_timeouts,
            "items": items,
            "directory": str(self.dir),
            "violations": [f"{v.kind} {v.shard}: {v.detail}" for v in report.violations[:10]],
            **({"network": self.net.figures(history)} if self.net is not None else {}),
        }


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


FAULTS: dict[str, Callable[[Stress], None]] = {
    "kill-worker": Stress.fault_kill_worker,
    "stop-worker": Stress.fault_stop_worker,
    "kill-supervisor": Stress.fault_kill_supervisor,
    "restart-backend": Stress.fault_restart_backend,
    "pause-backend": Stress.fault_pause_backend,
    "partition-worker": Stress.fault_partition_worker,
    "slow-backend": Stress.fault_slow_backend,
}


def passed(figures: dict[str, Any]) -> bool:
    """True when the run shows no violation of any kind."""
    items = figures["items"]
    return bool(figures["overlaps"] == figures["token_violations"] == figures["unowned_violations"] == 0
            and figures["coverage_timeouts"] == 0 and items["lost"] == items["duplicated"] == 0
            and items["unauthorised"] == items["stale_accepted"] == 0)
