"""The ``pool`` scenario of ``bench/bench.py``: M supervisors, one per "machine", over one backend namespace.

Each supervisor is ``python -m shardpreempt run CONFIG -w W --slices K --events EV -- sleep 100000`` in
its own session. The bench never asks them anything: it polls ``shardpreempt.pool.observe(backend,
slices, 64)`` every ``--poll`` seconds from its own connection and reads the shared events file.
One run, in order:

1. **coverage** — start M supervisors; time from the first start until every slice is held by a live
   member, and until the pool is **balanced** (M x W members, max-min slices per member <= 1);
2. **steady state** — max-min over every observation for ``--steady`` seconds;
3. **join** — start one more supervisor; slices whose holder changed (observed before the join and
   after the pool is balanced again and has stayed so for ``--steady`` s) against the optimum
   ceil(K/(M+1)); time to converge; each moved slice's unowned time (its ``released`` event to the
   next ``acquired``, from the events file); then the steady state again;
4. **failover** — SIGKILL one supervisor's process group and every process under it (a machine
   lost; no standbys with W=1); a ``killed`` event for each of its workers goes to the events file
   first, so the history checker ends their holds there. Time until every slice is held by a live
   member again, and until the pool is balanced again;
5. **history** — ``shardpreempt.history.check`` over the run's whole events file: overlaps
   and token violations.

Each run has its own namespace (file: a fresh lock dir; servers: a fresh prefix) and events file.
Baselines measured in the same invocation: coverage on ``file`` against a naive flock loop (M
processes, each locks the shards of ceil(K/M) slices with non-blocking flock, rolling back a busy
slice, re-scanning every 10 ms); coverage on a server against the pool on ``file``; failover and
join convergence against the ttl; join moves against the optimum.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence, Set
from pathlib import Path
from types import ModuleType
from typing import Any

from shardpreempt import open_backend
from shardpreempt.config import load_settings
from shardpreempt.errors import BackendError
from shardpreempt.events import HOST, EventLog
from shardpreempt.history import check, read_events
from shardpreempt.pool import Observation, observe
from shardpreempt.slicing import make_slices
from shardpreempt.testing.servers import unique
from shardpreempt.testing.servers.base import wait_stopped
from shardpreempt.testing.watch import children

COMMAND = ["sleep", "100000"]
SLOTS = 64  # member slots the bench observes

# A naive flock loop, the baseline for coverage on file://: no members, no balancing, no failover.
NAIVE = r"""
import fcntl, hashlib, os, resource, signal, sys, time
from shardpreempt.config import load_settings
from shardpreempt.slicing import make_slices
cfg, directory, k, index, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
settings = load_settings(cfg)
slices = make_slices(settings.shards, k, settings.strategy)
share = -(-len(slices) // m)
first = index * share % len(slices)
order = slices[first:] + slices[:first]
held = set()

def take(s):
    fds = []
    for key in sorted(s.keys):
        path = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:40] + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for f in [fd, *fds]:
                os.close(f)
            return False
        fds.append(fd)
    return True

while len(held) < share:
    for s in order:
        if s.index not in held and take(s):
            held.add(s.index)
            if len(held) == share:
                break
    else:
        time.sleep(0.01)
signal.pause()
"""


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Pool:
    """The supervisors of one run, the bench's own backend connection, and what it observes."""

    def __init__(self, tmp: Path, url: str, cfg: Path, slices: int, workers: int, poll: float, tag: str) -> None:
        self.tmp, self.url, self.cfg, self.k, self.w, self.poll = tmp, url, cfg, slices, workers, poll
        self.events = tmp / f"events-{tag}.jsonl"
        self.logs = tmp / f"logs-{tag}"
        self.logs.mkdir()
        settings = load_settings(cfg)
        self.slices = make_slices(settings.shards, slices, settings.strategy)
        self.first_key = {s.id: s.keys[0] for s in self.slices}
        self.backend = open_backend(url)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.observe_costs: list[float] = []
        self.last: Observation | None = None
        self.slots = SLOTS  # member slots observed: more than the pool's workers
        self.claimers = False  # scale --claimers: each "supervisor" is a bench/claimers.py process
        self.ended: dict[int, int] = {}  # claimers: pid -> exit status of a process that ended by itself
        self.killing: set[int] = set()  # pids the bench itself is stopping or killing

    # -- processes ---------------------------------------------------------------------------------
    def start(self) -> subprocess.Popen[bytes]:
        """One more supervisor, in its own session, as a user would start one per machine."""
        if self.claimers:  # N members in threads of one process (bench/claimers.py), named c0, c1, ...
            argv = [str(Path(__file__).resolve().parent / "claimers.py"), str(self.cfg), self.url, str(self.k),
                    str(self.w), f"c{len(self.procs)}", str(self.events)]
        else:
            argv = ["-m", "shardpreempt", "run", str(self.cfg), "-w", str(self.w), "--slices", str(self.k),
                    "--events", str(self.events), "--", *COMMAND]
        with open(self.logs / f"supervisor{len(self.procs)}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def identities(self, proc: subprocess.Popen[bytes]) -> set[str]:
        """The member identities of a supervisor's workers (``host/PID.INDEX``; claimers: ``host/cN.INDEX``)."""
        name = f"c{self.procs.index(proc)}" if self.claimers else proc.pid
        return {f"{HOST}/{name}.{i}" for i in range(self.w)}

    def kill(self, proc: subprocess.Popen[bytes]) -> tuple[float, float]:
        """SIGKILL a supervisor's process group and everything under it; ``killed`` events first.

        Returns (monotonic, unix) time just before the kill.
        """
        # Stopped before the killed events (as stress does): a worker that acquired between the events
        # and the kill would hold for ever in the checker's eyes.
        self.killing.add(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP)
        workers = [proc.pid] if self.claimers else children(proc.pid)  # claimers: every member in one process
        wait_stopped([proc.pid, *workers])
        tree = descendants(proc.pid)
        log = EventLog(self.events)
        for pid in workers:
            log.emit("killed", pid=pid, host=HOST, worker_pid=pid, reason="bench pool: supervisor SIGKILLed")
        log.close()
        t = time.monotonic(), time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        return t

    def stop(self) -> None:
        """Warm stop of every supervisor at once, then close the bench's connection."""
        self.notice_ended()
        self.killing.update(p.pid for p in self.procs)
        for proc in self.live():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill(proc)  # with its ``killed`` events first
        with contextlib.suppress(Exception):
            self.backend.close()

    def notice_ended(self) -> None:
        """Claimers: a process that ended by itself (a member's fatal exit takes its 99 neighbours with
        it) gets an ``exited`` event now, as a supervisor writes one for a worker, so the history ends its
        members' holds there (others can take them only after the ttl); it is reported in the figures."""
        if not self.claimers:
            return
        for proc in self.procs:
            code = proc.poll()
            if code is None or proc.pid in self.killing or proc.pid in self.ended:
                continue
            self.ended[proc.pid] = code
            log = EventLog(self.events)
            log.emit("exited", pid=proc.pid, host=HOST, worker_pid=proc.pid, reason=f"bench: claimers exited {code}")
            log.close()

    # -- observing ---------------------------------------------------------------------------------
    def look(self) -> tuple[float, Observation | None]:
        """One observation; the monotonic time it ended (None while the namespace is not set up)."""
        self.notice_ended()
        t = time.monotonic()
        try:
            obs = observe(self.backend, self.slices, self.slots)
        except BackendError:
            obs = None
        end = time.monotonic()
        self.observe_costs.append(end - t)
        if obs is not None:
            self.last = obs
        return end, obs

    def counts(self, obs: Observation) -> dict[str, int]:
        """Slices per live member (members holding none count 0)."""
        out = dict.fromkeys(obs.members, 0)
        for holder in obs.holders.values():
            if holder in out:
                out[holder] += 1
        return out

    @staticmethod
    def covered(obs: Observation, gone: Set[str] = frozenset()) -> bool:
        """Every slice held by a live member (and by none of ``gone``)."""
        return all(h is not None and h in obs.members and h not in gone for h in obs.holders.values())

    def spread(self, obs: Observation) -> int:
        counts = list(self.counts(obs).values())
        return max(counts) - min(counts) if counts else self.k

    def balanced(self, obs: Observation, members: int, gone: Set[str] = frozenset()) -> bool:
        return len(obs.members) == members and self.covered(obs, gone) and self.spread(obs) <= 1

    def wait(self, pred: Callable[[Observation], bool], timeout: float, what: str) -> tuple[float, Observation]:
        """Poll until ``pred`` holds; the monotonic time of the observation that showed it."""
        deadline = time.monotonic() + timeout
        while True:
            t, obs = self.look()
            if obs is not None and pred(obs):
                return t, obs
            if t > deadline:
                raise PoolStuck(what, timeout, self)
            time.sleep(self.poll)

    def steady(self, seconds: float, members: int) -> tuple[int, int, Observation]:
        """Observe for ``seconds``: the worst max-min and the observations showing a slice unowned."""
        end = time.monotonic() + seconds
        worst, uncovered, last = 0, 0, self.last
        while True:
            t, obs = self.look()
            if obs is not None:
                worst = max(worst, self.spread(obs) if len(obs.members) == members else self.k)
                uncovered += not self.covered(obs)
                last = obs
            if t > end and last is not None:
                return worst, uncovered, last
            time.sleep(self.poll)

    def describe(self) -> str:
        obs = self.last
        if obs is None:
            return "no observation"
        free = sum(1 for h in obs.holders.values() if h is None)
        stale = sum(1 for h in obs.holders.values() if h is not None and h not in obs.members)
        return (f"members {len(obs.members)}, slices per member {sorted(self.counts(obs).values())}, "
                f"free {free}, held by a non-member {stale}")


class PoolStuck(RuntimeError):
    """The pool did not reach a state in time: the message carries what it looked like."""

    def __init__(self, what: str, timeout: float, pool: Pool) -> None:
        super().__init__(f"pool not {what} within {timeout:g} s: last seen {pool.describe()}")
        self.pool = pool


def slice_events(pool: Pool, since: float, until: float) -> list[dict[str, Any]]:
    """The events of each slice's first shard (one per slice action) in [since, until]."""
    return [e for e in read_events([pool.events])
            if e.get("slice") in pool.first_key and e["shard"] == pool.first_key[e["slice"]]
            and since <= e["t"] <= until]


def unowned_gaps(evs: Sequence[dict[str, Any]], slices: set[str]) -> list[float]:
    """For each release of one of ``slices``: seconds until the slice's next acquire."""
    gaps = []
    for i, e in enumerate(evs):
        if e["event"] == "released" and e["slice"] in slices:
            nxt = next((x for x in evs[i + 1:] if x["event"] == "acquired" and x["slice"] == e["slice"]), None)
            if nxt is not None:
                gaps.append(nxt["t"] - e["t"])
    return gaps


def pool_run(pool: Pool, m: int, args: argparse.Namespace, index: int) -> dict[str, Any]:
    """One run: coverage, steady state, join, steady state, failover, history."""
    w, timeout = args.workers, args.timeout
    fig: dict[str, Any] = {}
    # 1. coverage and balance from the first start
    t0 = time.monotonic()
    for _ in range(m):
        pool.start()
    t_cov, _ = pool.wait(pool.covered, timeout, "covered after start")
    t_bal, _ = pool.wait(lambda o: pool.balanced(o, m * w), timeout, "balanced after start")
    fig["coverage_s"], fig["balanced_s"] = t_cov - t0, t_bal - t0
    # 2. steady state
    fig["steady_spread_before_join"], fig["uncovered_looks_before_join"], before = pool.steady(args.steady, m * w)
    # 3. join
    t_join, wall_join = time.monotonic(), time.time()
    newcomer = pool.start()
    t_member, _ = pool.wait(lambda o: len(o.members) == (m + 1) * w, timeout, "joined by the new member")
    t_conv, _ = pool.wait(lambda o: pool.balanced(o, (m + 1) * w), timeout, "balanced after the join")
    spread, uncovered, after = pool.steady(args.steady, (m + 1) * w)
    wall_end = time.time()
    moved = {sid for sid, h in before.holders.items() if after.holders.get(sid) != h}
    evs = slice_events(pool, wall_join, wall_end)
    handoffs = [e for e in evs if e["event"] == "released" and e.get("reason") == "handoff"]
    fig.update(join_at_unix=wall_join, join_moved=len(moved), join_optimum=math.ceil(len(pool.slices) / (m + 1)),
               join_handoffs=len(handoffs), join_to_newcomer=sum(1 for h in after.holders.values()
                                                                   if h in pool.identities(newcomer)),
               join_converge_s=t_conv - t_join, join_converge_from_member_s=t_conv - t_member,
               join_unowned_s=unowned_gaps(evs, moved | {e["slice"] for e in handoffs}),
               steady_spread_after_join=spread, uncovered_looks_after_join=uncovered)
    # 4. failover: one supervisor (a machine) lost
    victim = pool.live()[index % len(pool.live())]
    gone = pool.identities(victim)
    fig["failover_victim_slices"] = sum(1 for h in after.holders.values() if h in gone)
    t_kill, wall_kill = pool.kill(victim)
    t_owned, _ = pool.wait(lambda o: pool.covered(o, gone), timeout, "covered after the failover")
    t_rebal, _ = pool.wait(lambda o: pool.balanced(o, m * w, gone), timeout, "balanced after the failover")
    lost = {sid for sid, h in after.holders.items() if h in gone}
    evs = slice_events(pool, wall_kill, time.time())
    first_acq: dict[str, float] = {}
    for e in evs:
        if e["event"] == "acquired" and e["slice"] in lost:
            first_acq.setdefault(e["slice"], e["t"])
    fig.update(failover_at_unix=wall_kill, failover_victim=sorted(gone),
               failover_s=t_owned - t_kill, failover_rebalanced_s=t_rebal - t_kill,
               failover_events_s=(max(first_acq.values()) - wall_kill) if len(first_acq) == len(lost) and lost
               else None)
    fig["steady_spread_end"], fig["uncovered_looks_end"], _ = pool.steady(args.steady, m * w)
    fig["observe_median_ms"] = statistics.median(pool.observe_costs) * 1000
    return fig


def history(pool: Pool) -> dict[str, Any]:
    report = check(read_events([pool.events]))
    return {"overlaps": report.count("overlap"), "token_violations": report.count("token"),
            "holds": len(report.holds),
            "violations": [f"{v.kind} {v.shard}: {v.detail}" for v in report.violations[:10]]}


def keep_evidence(pool: Pool, args: argparse.Namespace) -> Path:
    """Copy a failed run's events file and supervisor logs out of the temp dir."""
    dest = Path(args.evidence or Path.home() / ".cache") / f"shardpreempt-bench-pool-{unique()}"
    dest.mkdir(parents=True)
    if pool.events.exists():
        shutil.copy(pool.events, dest / "events.jsonl")
    shutil.copytree(pool.logs, dest / "logs")
    return dest


def naive_coverage(tmp: Path, kit: ModuleType, args: argparse.Namespace, m: int) -> float:
    """Coverage of the naive flock loop with M processes on a fresh lock dir (observed the same way)."""
    directory = tmp / f"naive-{unique()}"
    url = f"file://{directory}"
    cfg = kit.write_config(tmp, args.shards, url, args.ttl)
    pool = Pool(tmp, url, cfg, args.slices, 1, args.poll, unique("naive"))
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", NAIVE, str(cfg), str(directory), str(args.slices), str(i), str(m)],
                              start_new_session=True) for i in range(m)]
    try:
        t, _ = pool.wait(lambda o: all(h is not None for h in o.holders.values()), args.timeout, "covered (naive)")
        return t - t0
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        pool.backend.close()


def file_pool_coverage(tmp: Path, kit: ModuleType, args: argparse.Namespace, m: int) -> tuple[float, float]:
    """Coverage and balance of the pool on a fresh file:// namespace (the baseline for servers)."""
    url = f"file://{tmp}/locks-{unique()}"
    pool = Pool(tmp, url, kit.write_config(tmp, args.shards, url, args.ttl), args.slices, args.workers, args.poll,
                unique("base"))
    try:
        t0 = time.monotonic()
        for _ in range(m):
            pool.start()
        t_cov, _ = pool.wait(pool.covered, args.timeout, "covered (file baseline)")
        t_bal, _ = pool.wait(lambda o: pool.balanced(o, m * args.workers), args.timeout, "balanced (file baseline)")
        return t_cov - t0, t_bal - t0
    finally:
        pool.stop()


def cmd_pool(args: argparse.Namespace, tmp: Path, kit: ModuleType) -> None:
    """``bench.py pool``: the figures over ``--runs`` runs, medians with baselines and targets."""
    m, k, ttl, server = args.supervisors, args.slices, args.ttl, args.backend != "file"
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    with kit.url_factory(args.backend, tmp) as urls:
        for i in range(args.runs):
            url = urls()
            pool = Pool(tmp, url, kit.write_config(tmp, args.shards, url, ttl), k, args.workers, args.poll, f"run{i}")
            fig: dict[str, Any] = {}
            try:
                fig = pool_run(pool, m, args, i)
            except PoolStuck as exc:
                fig["error"] = str(exc)
            finally:
                pool.stop()
            fig.update(history(pool))
            if "error" in fig or fig["overlaps"] or fig["token_violations"] or args.keep:
                fig["evidence"] = str(keep_evidence(pool, args))
                if "error" in fig or fig["overlaps"] or fig["token_violations"]:
                    failures.append(f"run {i}: {fig.get('error', 'history violations')}; evidence in {fig['evidence']}")
            runs.append(fig)
            print(f"run {i}: " + json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in fig.items()
                                             if key not in ("join_unowned_s", "violations")}), file=sys.stderr)
    base_cov = base_bal = None
    if args.baseline:
        if server:
            pairs = [file_pool_coverage(tmp, kit, args, m) for _ in range(args.runs)]
            base_cov, base_bal = (statistics.median(x) for x in zip(*pairs, strict=True))
            where = f"the pool on file:// S={args.shards} K={k} M={m}"
            print(kit.summary(f"baseline coverage, {where}", [p[0] for p in pairs]))
            print(kit.summary(f"baseline balanced, {where}", [p[1] for p in pairs]))
        else:
            naive = [naive_coverage(tmp, kit, args, m) for _ in range(args.runs)]
            base_cov = base_bal = statistics.median(naive)
            print(kit.summary(f"baseline coverage, naive flock loop S={args.shards} K={k} M={m} (balanced by "
                              "construction)", naive))
    ok = [r for r in runs if "error" not in r]
    label = f"{args.backend} S={args.shards} K={k} M={m} W={args.workers} ttl={ttl:g}"

    def line(name: str, key: str, unit: str = "s", **kw: Any) -> None:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            print(kit.summary(f"{name} {label}", values, unit, per_run=True, key=key, **kw))

    fail_target = ("<=", ttl + 0.5) if server else ("<=", 0.05)
    line("pool coverage (first start -> every slice owned)", "coverage_s", baseline=base_cov)
    line("pool balanced (first start -> max-min <= 1)", "balanced_s", baseline=base_bal)
    line("pool steady state max-min slices per member, before the join", "steady_spread_before_join", "slices",
         target=("<=", 1), judge="max")
    line(f"pool join: slices moved (optimum ceil(K/(M+1)) = {math.ceil(k / (m + 1))})", "join_moved", "slices",
         baseline=math.ceil(k / (m + 1)), baseline_name="optimum", target=("<=", 1.05 * math.ceil(k / (m + 1))),
         judge="max")
    line("pool join: handoffs (released for a handoff)", "join_handoffs", "slices")
    line("pool join: converged (start of the new supervisor -> balanced)", "join_converge_s", baseline=ttl,
         baseline_name="ttl", target=("<=", 2 * ttl))
    line("pool join: converged (new member seen -> balanced)", "join_converge_from_member_s", baseline=ttl,
         baseline_name="ttl")
    gaps = [g for r in ok for g in r.get("join_unowned_s", [])]
    if gaps:
        print(kit.summary(f"pool join: moved slice unowned (release -> next acquire, all moved slices) {label}",
                          gaps, target=("<", 0.25), key="join_unowned_s"))
    line("pool steady state max-min, after the join", "steady_spread_after_join", "slices", target=("<=", 1),
         judge="max")
    line("pool failover (SIGKILL of a supervisor -> every slice owned)", "failover_s",
         **({"baseline": ttl, "baseline_name": "ttl"} if server else {}), target=fail_target)
    line("pool failover from the events (SIGKILL -> last of its slices acquired)", "failover_events_s",
         **({"baseline": ttl, "baseline_name": "ttl"} if server else {}))
    line("pool failover: balanced again", "failover_rebalanced_s", **({"baseline": ttl, "baseline_name": "ttl"}
                                                                       if server else {}))
    line("pool steady state max-min, after the failover", "steady_spread_end", "slices", target=("<=", 1), judge="max")
    line("pool observation by the bench (one observe of K slices + 64 member keys)", "observe_median_ms", "ms")
    print(kit.summary(f"history check: overlaps {label}", [r["overlaps"] for r in runs], "overlaps",
                      per_run=True, target=("==", 0), judge="max", key="overlaps"))
    print(kit.summary(f"history check: token violations {label}", [r["token_violations"] for r in runs],
                      "violations", per_run=True, target=("==", 0), judge="max", key="token_violations"))
    for r in runs:
        for v in r.get("violations", []):
            print(f"  violation: {v}")
    for f in failures:
        print(f"FAILED {f}")
    kit.RESULT.update(scenario="pool", backend=args.backend, shards=args.shards, slices=k, supervisors=m,
                      workers=args.workers, ttl=ttl, runs=runs, failures=failures)
