"""The ``scale`` scenario of ``bench/bench.py``: S shards over M supervisors x W workers (100,000 x 1,000).

Each supervisor is ``python -m shardpreempt run CONFIG -w W --slices K --events EV -- sleep 100000``
in its own session, as a user would start one per machine; the config names the shards with one
``[[shard_sets]]`` range. The supervisors are started one after another (a fleet's machines do not
all boot in the same millisecond); the bench observes the pool from its own connection, as the pool
scenario does (``bench/pool.py``). One run, in order:

1. **coverage** — time from the first start until every slice is held by a live member, and until
   all M x W workers are members;
2. **steady state** — for ``--steady`` seconds: the server's CPU (its process's utime + stime per
   second, from ``/proc``) and, on Redis, the commands it processed per second (``INFO stats``),
   against the bound the renewals allow (every worker renews once per ttl/3: W x M x 3 / ttl);
   the RSS, PSS and USS of every worker, guard and supervisor (``/proc/PID/smaps_rollup``): RSS counts
   the pages a worker shares with its supervisor (copy-on-write after the fork), PSS divides them among
   the sharers, USS counts its private pages only (what ending it frees); and the machine's memory the
   pool uses (``MemAvailable`` before the start less now), per worker;
3. **status** — ``shardpreempt status CONFIG --json`` as a whole process, ``--runs`` times;
4. **failover** — SIGKILL of one supervisor and everything under it: time until every slice is
   held by a live member again (the bound: the ttl, plus a poll), and, from the events, until each
   slice the killed members held was acquired by a live member (in a big pool a moment with every
   slice held comes only between handoffs to newcomers);
5. **history** — ``shardpreempt.history.check`` over the events: overlaps and token violations.

With ``--claimers`` each "supervisor" is one ``bench/claimers.py`` process hosting its W members in
threads (the product's own ``Worker``, each with its own backend connections): 1,000 forked workers
(about 20 MiB of the machine each) do not fit on a small box beside the server, and the issue allows
claimers sharing processes. Memory is then reported per process and per member; the failover step
SIGKILLs one such process (a machine lost).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pool import Pool, PoolStuck, history, keep_evidence, slice_events
from shardpreempt.testing.servers import EphemeralServer, server_for, unique


def write_config(tmp: Path, shards: int, url: str, ttl: float) -> Path:
    path = tmp / f"scale-{unique()}.toml"
    path.write_text(f'[backend]\nurl = "{url}"\nttl = {ttl}\n\n[[shard_sets]]\ntemplate = "shard-{{n}}"\n'
                    f"range = [1, {shards}]\n")
    return path


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def server_cpu(server: EphemeralServer | None) -> float | None:
    """CPU seconds of the server and every process under it (PostgreSQL forks one per connection)."""
    if server is None or server.proc is None:
        return None
    pids = [server.pid, *descendants(server.pid)]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def children(pid: int) -> list[int]:
    """The direct children of a process."""
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def commands(pid: int) -> set[int]:
    """A worker's children that run a command (not Python: its guard is a fork of the worker)."""
    out = set()
    for kid in children(pid):
        with contextlib.suppress(OSError), open(f"/proc/{kid}/comm") as f:
            if not f.read().startswith("python"):
                out.add(kid)
    return out


def descendants(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def redis_commands(url: str) -> dict[str, int] | None:
    """Redis: the commands it has processed (``total``) and the calls of each command (``INFO
    commandstats``); both count the calls a script makes inside as commands of their own."""
    if not url.startswith("redis"):
        return None
    import redis  # the redis extra: installed wherever this bench runs on Redis

    client = redis.Redis.from_url(url.split("?")[0])
    try:
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}
        return {"total": int(client.info("stats")["total_commands_processed"]), **calls}
    finally:
        client.close()


def memory(pids: list[int]) -> dict[str, list[float]]:
    """RSS, PSS and USS (private pages: what ending the process frees) in MiB, of each process."""
    out: dict[str, list[float]] = {"rss": [], "pss": [], "uss": []}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            values = {line.split(":")[0]: int(line.split()[1]) for line in f if ":" in line and line[0].isupper()}
            out["rss"].append(values["Rss"] / 1024)
            out["pss"].append(values["Pss"] / 1024)
            out["uss"].append((values["Private_Clean"] + values["Private_Dirty"]) / 1024)
    return out


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024


def taken_again(pool: Pool, theirs: set[str], gone: set[str], since: float) -> list[float]:
    """For each of ``theirs`` (slices the killed members held), seconds from ``since`` (unix time) until a
    live member acquired it, from the events. In a big pool the moment with every slice held at once
    comes only between handoffs to newcomers; this is when the dead members' own slices were taken."""
    first: dict[str, float] = {}
    for e in slice_events(pool, since, float("inf")):
        if e["event"] == "acquired" and e["slice"] in theirs and e["owner"].rsplit(":", 2)[0] not in gone:
            first.setdefault(e["slice"], e["t"] - since)
    return sorted(first.values())


def cmd_scale(args: argparse.Namespace, tmp: Path, kit: ModuleType) -> None:
    m, w, k = args.supervisors, args.workers, args.slices
    server: EphemeralServer | None = None
    if args.backend == "file":
        url = f"file://{tmp}/locks-{unique()}"
    else:
        server = server_for(args.backend)
        if hasattr(server, "max_connections"):  # PostgreSQL: a main and a watcher connection per member
            server.max_connections = max(server.max_connections, 2 * m * w + 100)
        server.start()
        url = server.url(unique("scale"))
    figures: dict[str, Any] = {"backend": args.backend, "shards": args.shards, "supervisors": m,
                               "workers_per_supervisor": w, "slices": k, "ttl": args.ttl}
    cfg = write_config(tmp, args.shards, url, args.ttl)
    pool = Pool(tmp, url, cfg, k, w, args.poll, f"scale-{unique()}")
    pool.slots = m * w * 2 + 64  # every member slot in use, and more
    pool.claimers = args.claimers
    failed = True
    try:
        available0 = mem_available_mib()
        t0 = time.monotonic()
        for _ in range(m):
            pool.start()
        t_cov, _ = pool.wait(pool.covered, args.timeout, "every slice held")
        figures["coverage_s"] = t_cov - t0
        print(f"coverage: every slice held {t_cov - t0:.2f} s after the first start")
        # A pool that never gets there within the timeout is a figure too: say so, and go on measuring
        # the rest (steady state, memory, status, failover) on the pool as it is.
        for key, what, done in (
                ("all_members_s", f"every worker a member ({m * w})",
                 lambda o: len(o.members) == m * w and pool.covered(o)),
                ("balanced_s", "balanced (max - min <= 1)", lambda o: pool.balanced(o, m * w))):
            try:
                t, _ = pool.wait(done, max(1.0, args.timeout - (time.monotonic() - t0)), what)
                figures[key] = t - t0
                print(f"coverage: {what} after {t - t0:.2f} s")
            except PoolStuck as exc:
                figures[key] = None
                print(f"coverage: {exc}"[:400])

        cpu0, cmd0, t = server_cpu(server), redis_commands(url), time.monotonic()
        time.sleep(args.steady)  # the measurement window itself (nothing waits for a state here)
        cpu1, cmd1, dt = server_cpu(server), redis_commands(url), time.monotonic() - t
        bound = m * w * 3 / args.ttl
        if cpu0 is not None and cpu1 is not None:
            figures["server_cpu_percent"] = (cpu1 - cpu0) / dt * 100
            print(f"steady state: server CPU {figures['server_cpu_percent']:.1f} % of a core")
        if cmd0 is not None and cmd1 is not None:
            rates = {name: (n - cmd0.get(name, 0)) / dt for name, n in cmd1.items()}
            figures["server_commands_per_s"] = rates.pop("total")
            figures["server_calls_per_s"] = {name: round(r, 1) for name, r in sorted(rates.items()) if r >= 0.5}
            top = ", ".join(f"{name} {r:.0f}" for name, r in sorted(rates.items(), key=lambda x: -x[1])[:6] if r >= 0.5)
            print(f"steady state: Redis commands {figures['server_commands_per_s']:.0f}/s (renewal bound "
                  f"M x W x 3 / ttl = {bound:.0f}/s; the bench's own observations add {1 / args.poll:.0f}/s); "
                  f"calls/s by command: {top}")
        figures["renewal_bound_per_s"] = bound
        if args.claimers:  # every member a thread: memory per process, and per member
            mem = memory([p.pid for p in pool.procs])
            for kind in ("rss", "pss", "uss"):
                figures[f"claimers_process_{kind}_mib_median"] = statistics.median(mem[kind])
                figures[f"member_{kind}_mib"] = statistics.median(mem[kind]) / w
            print(f"claimer process memory ({w} members each): RSS median {statistics.median(mem['rss']):.1f} MiB, "
                  f"USS {statistics.median(mem['uss']):.1f} MiB: {statistics.median(mem['rss']) / w:.2f} MiB RSS "
                  f"per member")
        else:
            workers = sorted({e["worker_pid"] for e in kit.read_events(pool.events) if e["event"] == "started"})
            mem = memory(workers)
            guards = [k for pid in workers for k in set(children(pid)) - commands(pid)]  # each worker's guard
            gmem, smem = memory(guards), memory([p.pid for p in pool.procs])
            for what, values in (("worker", mem), ("guard", gmem), ("supervisor", smem)):
                for kind in ("rss", "pss", "uss"):
                    if values[kind]:
                        figures[f"{what}_{kind}_mib_median"] = statistics.median(values[kind])
            print(f"worker memory: RSS median {statistics.median(mem['rss']):.1f} MiB (max {max(mem['rss']):.1f}), "
                  f"PSS {statistics.median(mem['pss']):.1f}, USS {statistics.median(mem['uss']):.1f} MiB over "
                  f"{len(mem['rss'])} workers; guard USS {statistics.median(gmem['uss'] or [0]):.1f} MiB; "
                  f"supervisor RSS {statistics.median(smem['rss']):.1f} MiB")
        used = available0 - mem_available_mib()
        figures["machine_mib_per_worker"] = used / (m * w)
        print(f"machine memory used by the pool (MemAvailable before the start - now): {used:.0f} MiB, "
              f"{used / (m * w):.1f} MiB per worker (with its guard, command and share of the supervisor)")

        times = []
        for _ in range(args.runs):
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "shardpreempt", "status", str(cfg), "--json"],
                                  capture_output=True)
            if done.returncode != 0:  # an overloaded server times out: a figure too
                print(f"status failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()[-300:]}")
                continue
            times.append(time.monotonic() - start)
        figures["status_s_median"] = statistics.median(times) if times else None
        if times:
            print(kit.summary(f"status at {args.shards} shards", times))

        if m < 2:
            raise SystemExit("scale: the failover step needs at least 2 supervisors")
        victim = pool.procs[0]
        gone = pool.identities(victim)
        _, before = pool.wait(lambda o: True, args.timeout, "observed")
        theirs = {sid for sid, holder in before.holders.items() if holder in gone}
        t_kill, unix_kill = pool.kill(victim)
        try:
            t_back, _ = pool.wait(lambda o: pool.covered(o, gone), args.timeout, "every slice held again")
            figures["failover_s"] = t_back - t_kill
            print(f"failover: SIGKILL of a supervisor ({w} workers) -> every slice held by a live member "
                  f"{t_back - t_kill:.2f} s later (bound: ttl {args.ttl} s + a poll)")
        except PoolStuck as exc:
            figures["failover_s"] = None
            print(f"failover: {exc}"[:400])
        taken = taken_again(pool, theirs, gone, unix_kill)
        figures["failover_victims_slices"] = len(theirs)
        figures["failover_taken_again_s"] = max(taken) if len(taken) == len(theirs) and taken else None
        if taken:
            print(f"failover: the killed members' {len(theirs)} slices taken by live members: "
                  f"{len(taken)} of them, the last {max(taken):.2f} s after the kill (median "
                  f"{statistics.median(taken):.2f} s; from the events)")
        failed = figures["failover_s"] is None
    except PoolStuck as exc:  # the pool never got there: what it looked like, and the evidence below
        print(f"scale: {exc}"[:600])
    finally:
        pool.stop()
        if server is not None:
            server.close()
    figures.update(history(pool))
    if failed or figures["overlaps"] or figures["token_violations"] or args.keep:
        figures["evidence"] = str(keep_evidence(pool, args))  # the events and every process's log
        print(f"evidence kept in {figures['evidence']}")
    print(f"history: {figures.get('overlaps')} overlaps, {figures.get('token_violations')} token violations")
    if pool.ended:  # claimers processes that ended by themselves (their log says why)
        figures["ended_by_themselves"] = dict(pool.ended)
        for i, proc in enumerate(pool.procs):
            if proc.pid in pool.ended:
                lines = (pool.logs / f"supervisor{i}.log").read_text(errors="replace").strip().splitlines()
                last = lines[-1] if lines else ""
                print(f"claimers process {i} ended by itself (exit {pool.ended[proc.pid]}): {last}"[:300])
    kit.FIGURES.append({"name": f"scale {args.backend} S={args.shards} M={m} W={w} K={k}", **figures})
