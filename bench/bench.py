"""Whole-run benchmarks of shardpreempt, quoted as medians over repeated runs.

Usage (from the repository root)::

    python bench/bench.py coverage --shards 100 --workers 10 --runs 5
    python bench/bench.py coverage --shards 10000 --workers 100 --runs 5 --backend redis
    python bench/bench.py failover --shards 100 --workers 10 --runs 10 [--backend postgresql --ttl 2]
    python bench/bench.py handoff --shards 100 --workers 10 --runs 10 --backend redis
    python bench/bench.py idle --shards 1000 --workers 4
    python bench/bench.py status --shards 100000 --backend redis
    python bench/bench.py renew --backend etcd
    python bench/bench.py pool --backend file --shards 10000 --slices 100 --supervisors 10 --workers 1 --runs 3

``--backend`` is ``file`` (default), a server name (redis, postgresql, mysql, etcd, zookeeper: an
ephemeral server is started from its binary, as the tests do) or a full URL. Every figure is printed
with the median, the min and max, and a ratio against a baseline measured in the same invocation
(``coverage``/``failover``: the file backend; ``status``: the time to read the config and cut the
slices; ``renew``: one renew with 1 key held). ``pool`` runs M supervisors, one per "machine", over one
namespace and measures coverage, balance, a join and a failover from outside (see ``bench/pool.py``).
``--json`` adds one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import shardpreempt
from shardpreempt.testing.servers import EphemeralServer, server_for, unique

SERVERS = ("redis", "postgresql", "mysql", "etcd", "zookeeper")
HOLD = ["sleep", "3600"]  # an idle command that costs no CPU to start


@contextlib.contextmanager
def url_factory(spec: str, tmp: Path) -> Iterator[Callable[[], str]]:
    """Hand out URLs of fresh namespaces: a new lock dir, a new prefix on an ephemeral server, or ``spec``."""
    if spec == "file":
        yield lambda: f"file://{tmp}/locks-{unique()}"
    elif spec in SERVERS:
        server: EphemeralServer = server_for(spec)
        server.start()
        try:
            yield lambda: server.url(unique("b"))
        finally:
            server.close()
    else:
        yield lambda: spec


def write_config(tmp: Path, shards: int, url: str, ttl: float) -> Path:
    path = tmp / f"bench-{unique()}.toml"
    body = [f'[backend]\nurl = "{url}"\nttl = {ttl}\n'] + [f"[shards.s{i}]\n" for i in range(shards)]
    path.write_text("\n".join(body))
    return path


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


class Run:
    """``shardpreempt run`` holding every slice with an idle command."""

    def __init__(self, tmp: Path, url: str, shards: int, workers: int, ttl: float, extra: list[str] | None = None):
        self.events = tmp / f"events-{unique()}.jsonl"
        self.shards = shards
        cfg = write_config(tmp, shards, url, ttl)
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "run", str(cfg), "-w", str(workers),
                                      "--events", str(self.events), *(extra or []), "--", *HOLD],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_owned(self, since: float, shards: set[str] | None = None, timeout: float = 120) -> float:
        """Unix time at which every shard (or those given) had an acquired event after ``since``."""
        want = shards if shards is not None else {f"s{i}" for i in range(self.shards)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen: dict[str, float] = {}
            for e in read_events(self.events):
                if e["event"] == "acquired" and e["t"] >= since and e["shard"] in want:
                    seen.setdefault(e["shard"], e["t"])
            if len(seen) == len(want):
                return max(seen.values())
            time.sleep(0.02)
        raise TimeoutError(f"shards not owned within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


#: every summary line of this invocation, for --json
FIGURES: list[dict[str, Any]] = []
#: extra detail a scenario adds for --json (the pool scenario: every run's figures)
RESULT: dict[str, Any] = {}
OPS: dict[str, Callable[[float, float], bool]] = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
                                                  "==": lambda a, b: a == b}


def summary(name: str, values: list[float], unit: str = "s", baseline: float | None = None, *,
            baseline_name: str = "baseline", target: tuple[str, float] | None = None, judge: str = "median",
            per_run: bool = False, key: str | None = None) -> str:
    """One line: median (min, max, n), optionally each run, the ratio to a baseline and a target met or not.

    ``judge`` is the statistic held against the target: ``median``, or ``max`` (every run must meet it).
    """
    med = statistics.median(values)

    def fmt(v: float) -> str:
        return f"{v:.4f}" if unit in ("s", "ms") else f"{v:g}"

    text = f"{name}: median {fmt(med)} {unit} (min {fmt(min(values))}, max {fmt(max(values))}, n={len(values)})"
    if per_run:
        text += f" [runs: {', '.join(fmt(v) for v in values)}]"
    if baseline:
        text += f"; ratio to {baseline_name} {med / baseline:.2f}"
    met = None
    if target is not None:
        stat = med if judge == "median" else max(values)
        met = OPS[target[0]](stat, target[1])
        text += f"; target {judge} {target[0]} {target[1]:g} {unit}: {'met' if met else 'NOT met'}"
    FIGURES.append({"name": name, "key": key, "unit": unit, "median": med, "min": min(values), "max": max(values),
                    "n": len(values), "values": list(values), "baseline": baseline, "baseline_name": baseline_name,
                    "ratio": med / baseline if baseline else None,
                    "target": f"{judge} {target[0]} {target[1]:g}" if target else None, "met": met})
    return text


@dataclasses.dataclass
class Coverage:
    seconds: float  # start -> every shard owned
    forked: float  # the first worker's start -> the last start of any (a restart counts)
    handoffs: int  # slices released before every shard was owned (taken, then handed over)


def coverage_once(tmp: Path, url: str, shards: int, workers: int, ttl: float) -> Coverage:
    run = Run(tmp, url, shards, workers, ttl)
    try:
        owned = run.wait_owned(0.0)
    finally:
        run.stop()
    evs = read_events(run.events)
    started = [e["t"] for e in evs if e["event"] == "started"]
    handoffs = {(e["slice"], e["owner"]) for e in evs if e["event"] == "released" and e["t"] <= owned}
    return Coverage(owned - run.t0, max(started) - min(started), len(handoffs))


def coverage(tmp: Path, urls: Callable[[], str], args: argparse.Namespace) -> tuple[Coverage, list[Coverage]]:
    """The first run on a fresh namespace (lock files or rows created), then repeated runs on it."""
    url = urls()
    cold = coverage_once(tmp, url, args.shards, args.workers, args.ttl)
    return cold, [coverage_once(tmp, url, args.shards, args.workers, args.ttl) for _ in range(args.runs)]


def cmd_coverage(args: argparse.Namespace, tmp: Path) -> None:
    with url_factory(args.backend, tmp) as urls:
        cold, runs = coverage(tmp, urls, args)
    base = None
    if args.backend != "file" and args.baseline:
        base = statistics.median(c.seconds for c in coverage(tmp, lambda: f"file://{tmp}/locks-{unique()}", args)[1])
        print(summary(f"baseline file:// S={args.shards} W={args.workers}", [base]))
    print(f"first run on a fresh namespace: {cold.seconds:.4f} s")
    print(summary(f"coverage {args.backend} S={args.shards} W={args.workers}", [c.seconds for c in runs],
                  baseline=base, per_run=True))
    print(summary("  workers forked within (first start to last, restarts too)", [c.forked for c in runs],
                  per_run=True))
    print(summary("  handed over before every shard was owned", [c.handoffs for c in runs], unit="slices",
                  per_run=True))


def failover_samples(tmp: Path, urls: Callable[[], str], args: argparse.Namespace, graceful: bool) -> list[float]:
    run = Run(tmp, urls(), args.shards, args.workers + 1, args.ttl, ["--slices", str(args.workers)])
    samples = []
    try:
        run.wait_owned(0.0)
        for i in range(args.runs):
            evs = read_events(run.events)
            holders: dict[str, dict[str, Any]] = {}
            for e in evs:
                if e["event"] == "acquired":
                    holders[e["shard"]] = e
                elif e["event"] in ("released", "lost") and holders.get(e["shard"], {}).get("owner") == e["owner"]:
                    holders.pop(e["shard"])
            victim = holders[f"s{i % args.shards}"]
            theirs = {s for s, e in holders.items() if e["owner"] == victim["owner"]}
            t_kill = time.time()
            os.kill(victim["pid"], signal.SIGTERM if graceful else signal.SIGKILL)
            t_owned = run.wait_owned(t_kill, theirs)
            samples.append(t_owned - t_kill)
            # let the supervisor restart the victim as the next standby, and its start window (1 s, in
            # which slices meant for its siblings wait for them) pass
            time.sleep(1.5)
    finally:
        run.stop()
    return samples


def cmd_failover(args: argparse.Namespace, tmp: Path, graceful: bool = False) -> None:
    kind = "handoff (SIGTERM of a holder)" if graceful else "failover (SIGKILL of a holder)"
    with url_factory(args.backend, tmp) as urls:
        samples = failover_samples(tmp, urls, args, graceful)
    base = None
    if args.backend != "file":
        base = statistics.median(failover_samples(tmp, lambda: f"file://{tmp}/locks-{unique()}", args, graceful))
        print(summary("baseline file://", [base]))
    print(summary(f"{kind} {args.backend} S={args.shards} W={args.workers} ttl={args.ttl}", samples,
                  baseline=base))


def cmd_idle(args: argparse.Namespace, tmp: Path) -> None:
    with url_factory(args.backend, tmp) as urls:
        run = Run(tmp, urls(), args.shards, args.workers, args.ttl)
        try:
            run.wait_owned(0.0)
            pids = [e["worker_pid"] for e in read_events(run.events) if e["event"] == "started"]

            def cpu() -> float:
                total = 0
                for pid in pids:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    total += int(fields[11]) + int(fields[12])
                return total / os.sysconf("SC_CLK_TCK")

            before, t = cpu(), time.monotonic()
            time.sleep(args.seconds)
            used = (cpu() - before) / (time.monotonic() - t) / len(pids) * 100
            rss = []
            for pid in pids:
                with open(f"/proc/{pid}/status") as f:
                    rss += [int(line.split()[1]) for line in f if line.startswith("VmRSS")]
        finally:
            run.stop()
    print(f"idle worker {args.backend} S={args.shards} W={args.workers}: {used:.3f} % of a core per worker over "
          f"{args.seconds} s; RSS median {statistics.median(rss) / 1024:.1f} MiB")
    FIGURES.append({"name": f"idle worker {args.backend} S={args.shards} W={args.workers}", "key": "idle_cpu_percent",
                    "unit": "% of a core", "median": used, "rss_median_mib": statistics.median(rss) / 1024})


def cmd_status(args: argparse.Namespace, tmp: Path) -> None:
    with url_factory(args.backend, tmp) as urls:
        u = urls()
        cfg = write_config(tmp, args.shards, u, args.ttl)
        half = write_config(tmp, args.shards // 2, u, args.ttl)
        # The first half of the shards held while status runs: 5 workers over 100 slices, so that no
        # worker needs more descriptors than a default hard limit allows on file:// (one per shard).
        events, log = tmp / f"status-holder-{unique()}.jsonl", tmp / f"status-holder-{unique()}.log"
        with open(log, "wb") as err:
            holder = subprocess.Popen([sys.executable, "-m", "shardpreempt", "run", str(half), "-w", "5", "--slices",
                                       "100", "--events", str(events), "--", *HOLD],
                                      stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_half_owned(holder, events, log, args.shards // 2)
            times, plans = [], []
            for _ in range(args.runs):
                t = time.monotonic()
                out = subprocess.run([sys.executable, "-m", "shardpreempt", "status", str(cfg), "--json"],
                                     capture_output=True, check=True)
                times.append(time.monotonic() - t)
                t = time.monotonic()
                subprocess.run([sys.executable, "-m", "shardpreempt", "plan", str(cfg), "--json"],
                               capture_output=True, check=True)
                plans.append(time.monotonic() - t)
            owned = json.loads(out.stdout)["summary"]["owned"]
        finally:
            holder.send_signal(signal.SIGTERM)
            holder.wait(60)
    base = statistics.median(plans)
    print(summary(f"baseline `plan` S={args.shards}", plans))
    print(summary(f"status {args.backend} S={args.shards} (owned at the time: {owned})", times, baseline=base))


def wait_half_owned(holder: subprocess.Popen[bytes], events: Path, log: Path, shards: int,
                    timeout: float = 300) -> None:
    """Wait until the status scenario's holder owns all its shards; its error if it exits first."""
    deadline = time.monotonic() + timeout
    while len({e["shard"] for e in read_events(events) if e["event"] == "acquired"}) < shards:
        if holder.poll() is not None:
            raise RuntimeError(f"the holder exited with {holder.returncode}: {log.read_text()[-500:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the holder did not own its {shards} shards within {timeout} s")
        time.sleep(0.5)


def cmd_renew(args: argparse.Namespace, tmp: Path) -> None:
    from shardpreempt import open_backend

    with url_factory(args.backend, tmp) as urls:
        b = open_backend(urls())
        rates = {}
        for size in (1, 100, 1000):
            lease = b.try_acquire([f"r{size}-{i}" for i in range(size)], f"bench-{size}", args.ttl)
            assert lease is not None
            n, t = 0, time.monotonic()
            while time.monotonic() - t < args.seconds:
                lease = b.renew(lease)
                n += 1
            rates[size] = n / (time.monotonic() - t)
            b.release(lease)
        b.close()
    for size, rate in rates.items():
        print(f"renew {args.backend}, {size} keys held: {rate:.0f} renewals/s from one worker "
              f"(ratio to 1 key: {rate / rates[1]:.2f})")
        FIGURES.append({"name": f"renew {args.backend}, {size} keys held", "key": f"renew_{size}", "unit": "renewals/s",
                        "median": rate, "baseline": rates[1], "ratio": rate / rates[1]})


def compiled() -> None:
    """Let the processes the bench starts load shardpreempt from bytecode, as an installed package does.
    Some machines set PYTHONDONTWRITEBYTECODE: every ``shardpreempt run`` then compiled every module
    again (0.3 s of each start on the development machine)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(shardpreempt.__file__).parent, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["coverage", "failover", "handoff", "idle", "status", "renew", "pool", "scale"])
    parser.add_argument("--backend", default="file")
    parser.add_argument("--shards", type=int, default=None, help="default 100; pool: 10000")
    parser.add_argument("--workers", type=int, default=None, help="default 10; pool: 1 per supervisor")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=None, help="default 10; pool: 2")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    pool = parser.add_argument_group("pool")
    pool.add_argument("--slices", type=int, default=100, help="K, the pool's slice count")
    pool.add_argument("--supervisors", type=int, default=10, help="M, supervisors started at first")
    pool.add_argument("--poll", type=float, default=0.005, help="seconds between the bench's observations")
    pool.add_argument("--steady", type=float, default=1.0, help="seconds of steady-state observation")
    pool.add_argument("--timeout", type=float, default=120.0, help="seconds a pool may take to reach a state")
    pool.add_argument("--claimers", action="store_true",
                      help="scale: each supervisor is one process hosting its W members in threads (bench/claimers.py)")
    pool.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the coverage baseline")
    pool.add_argument("--evidence", default=None, help="where a failed run's events and logs are kept")
    pool.add_argument("--keep", action="store_true", help="keep every run's events and logs, not only failed ones")
    args = parser.parse_args()
    is_pool = args.what in ("pool", "scale")
    args.shards = args.shards if args.shards is not None else 10000 if is_pool else 100
    args.workers = args.workers if args.workers is not None else 1 if is_pool else 10
    args.ttl = args.ttl if args.ttl is not None else 2.0 if is_pool else 10.0
    compiled()
    # Not /tmp: on some machines file creation there is very slow; this sits beside the default lock dir.
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shardpreempt-bench-", dir=base) as tmp:
        os.chmod(tmp, 0o700)
        path = Path(tmp)
        {"coverage": cmd_coverage, "failover": cmd_failover, "idle": cmd_idle, "status": cmd_status,
         "renew": cmd_renew, "handoff": lambda a, p: cmd_failover(a, p, graceful=True), "pool": cmd_pool,
         "scale": cmd_scale,
         }[args.what](args, path)
    # Other processes on the machine skew every figure: say how busy it was (1-minute load average).
    load_end = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores; load average (1 min) {load_start[0]:.2f} at the start, "
          f"{load_end[0]:.2f} at the end")
    if args.json:
        print(json.dumps({"what": args.what, "args": vars(args), "figures": FIGURES, **RESULT,
                          "cores": os.cpu_count(), "load_start": load_start, "load_end": load_end}, default=str))


def cmd_pool(args: argparse.Namespace, tmp: Path) -> None:
    """M supervisors over one namespace: coverage, balance, join, failover, history (see bench/pool.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pool

    pool.cmd_pool(args, tmp, sys.modules[__name__])


def cmd_scale(args: argparse.Namespace, tmp: Path) -> None:
    """S shards over M supervisors x W workers: coverage, server load, memory, status, failover (bench/scale.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale

    scale.cmd_scale(args, tmp, sys.modules[__name__])


if __name__ == "__main__":
    main()
