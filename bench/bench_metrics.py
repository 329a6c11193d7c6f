"""What ``run --metrics`` costs, measured on whole runs: medians over repeated runs, each against a baseline
measured in the same invocation.

Usage (from the repository root)::

    python bench/bench_metrics.py --workers 100 --shards 1000 --runs 3
    python bench/bench_metrics.py --workers 100 --shards 1000 --runs 3 --roundtrips --json

Each run is ``shardpreempt run CONFIG -w W --events EV [--metrics 127.0.0.1:0] -- sleep 3600`` on a fresh
``file://`` lock directory; every figure is taken once the events show every shard owned and the pool has
settled (``--settle`` seconds, so every worker has sent its first heartbeat with metrics on). Runs with
and without ``--metrics`` alternate (the order flips each run).

* **scrape**: ``GET /metrics`` on a fresh connection, ``--scrapes`` times per run with metrics, timed from
  the connect to the last byte; baseline: ``GET /nothing`` on the same server (the HTTP round trip and a
  404, without collecting). Target: median under 50 ms.
* **worker RSS**: ``VmRSS`` of every worker process (``/proc/PID/status``), median over the workers of a
  run, with and without ``--metrics``; baseline: the run without. Target: the difference of the medians
  under 1 MiB.
* **backend round trips** (``--roundtrips``, needs ``redis-server``): the same runs on an ephemeral Redis
  (``--rt-workers`` workers), its ``total_commands_processed`` over ``--window`` seconds once settled,
  per second, with and without ``--metrics``. The code makes no call for metrics: a worker counts what
  it already knows (its acquires, releases and losses, the member count of the observation it makes
  anyway, its runs) and times the renewal call its session makes anyway (``metrics.MeteredBackend``
  wraps ``renew`` and nothing else); the figures go up the heartbeat pipe, never to the backend. The
  count checks that: the two rates should differ by noise only (renewals every ttl/3, observations
  every period, whatever the metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import read_events, write_config  # bench.py beside this file: one config and events reader

from shardpreempt.testing.servers import server_for, unique

HOLD = ["sleep", "3600"]
FIGURES: dict[str, Any] = {}


def line(name: str, values: list[float], unit: str, baseline: list[float] | None = None,
         baseline_name: str = "baseline", target: str | None = None, met: bool | None = None) -> None:
    """Print one figure: median (min, max, n), the baseline's median and the difference or ratio, a target."""
    med = statistics.median(values)
    text = f"{name}: median {med:.3f} {unit} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"
    entry: dict[str, Any] = {"unit": unit, "median": med, "min": min(values), "max": max(values), "values": values}
    if baseline:
        base = statistics.median(baseline)
        text += f"; {baseline_name} median {base:.3f} {unit}, difference {med - base:+.3f} {unit}"
        if base:
            text += f", ratio {med / base:.2f}"
        entry.update(baseline=base, baseline_values=baseline, baseline_name=baseline_name)
    if target is not None:
        text += f"; target {target}: {'met' if met else 'NOT met'}"
        entry.update(target=target, met=met)
    FIGURES[name] = entry
    print(text, flush=True)


class Run:
    """One ``shardpreempt run`` holding every slice with an idle command, stopped by pid."""

    def __init__(self, tmp: Path, url: str, shards: int, workers: int, ttl: float, metrics: bool) -> None:
        self.events = tmp / f"events-{unique()}.jsonl"
        self.stderr = tmp / f"stderr-{unique()}"
        self.shards, self.workers = shards, workers
        extra = ["--metrics", "127.0.0.1:0"] if metrics else []
        cfg = write_config(tmp, shards, url, ttl)
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "run", str(cfg), "-w", str(workers),
                                          "--events", str(self.events), *extra, "--", *HOLD],
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def address(self) -> str:
        text = self.stderr.read_text()
        start = text.index("metrics http://") + len("metrics http://")
        return text[start:text.index("/metrics", start)]

    def wait_owned(self, timeout: float) -> float:
        """Seconds until every shard was acquired and every worker had started."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the run ended with {self.proc.returncode}: {self.stderr.read_text()[-2000:]}")
            evs = read_events(self.events)
            owned = {e["shard"] for e in evs if e["event"] == "acquired"}
            if len(owned) == self.shards and len(self.worker_pids(evs)) == self.workers:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"not every shard owned within {timeout} s")

    def worker_pids(self, evs: list[dict[str, Any]] | None = None) -> dict[int, int]:
        pids: dict[int, int] = {}
        for e in evs if evs is not None else read_events(self.events):
            if e["event"] == "started":
                pids[e["worker"]] = e["worker_pid"]
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for text in f:
            if text.startswith("VmRSS:"):
                return int(text.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def timed_get(url: str) -> float:
    """Seconds for one GET on a fresh connection, the body read to the end (an error status counts too)."""
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        exc.read()
        exc.close()
    return time.perf_counter() - start


def redis_commands(host: str, port: int) -> int:
    """The server's total_commands_processed (one INFO: counted the same with and without metrics)."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"INFO stats\r\n")
        data = b""
        while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for text in data.decode().splitlines():
        if text.startswith("total_commands_processed:"):
            return int(text.split(":")[1])
    raise ValueError("no total_commands_processed in INFO")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="runs with and as many without --metrics")
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes per run with metrics")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after every shard is owned")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take to own every shard")
    parser.add_argument("--roundtrips", action="store_true", help="also count Redis commands with and without")
    parser.add_argument("--rt-workers", type=int, default=10)
    parser.add_argument("--rt-shards", type=int, default=1000)
    parser.add_argument("--ttl", type=float, default=3.0, help="ttl of the Redis runs")
    parser.add_argument("--window", type=float, default=15.0, help="seconds of Redis commands counted")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {load()}", flush=True)

    scrape: list[float] = []
    not_found: list[float] = []
    rss: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp_name:
        tmp = Path(tmp_name)
        for i in range(args.runs):
            for metrics in ((False, True) if i % 2 == 0 else (True, False)):
                run = Run(tmp, f"file://{tmp}/locks-{unique()}", args.shards, args.workers, 10.0, metrics)
                try:
                    took = run.wait_owned(args.timeout)
                    time.sleep(args.settle)
                    pids = run.worker_pids()
                    per_worker = [rss_mib(pid) for pid in pids.values()]
                    rss[metrics].append(statistics.median(per_worker))
                    note = f"run {i + 1} {'with' if metrics else 'without'} --metrics: owned in {took:.1f} s, " \
                           f"worker RSS median {statistics.median(per_worker):.2f} MiB"
                    if metrics:
                        address = run.address()
                        times = [timed_get(f"http://{address}/metrics") for _ in range(args.scrapes)]
                        base = [timed_get(f"http://{address}/nothing") for _ in range(args.scrapes)]
                        scrape.append(statistics.median(times) * 1000)
                        not_found.append(statistics.median(base) * 1000)
                        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
                            size = len(response.read())
                        note += f", scrape median {scrape[-1]:.2f} ms ({size} bytes)"
                    print(note + f" ({load()})", flush=True)
                finally:
                    run.stop()
        line(f"GET /metrics, {args.workers} workers, {args.shards} shards (per-run medians of {args.scrapes})",
             scrape, "ms", not_found, "GET /nothing", "median < 50 ms", statistics.median(scrape) < 50)
        diff = statistics.median(rss[True]) - statistics.median(rss[False])
        line("worker RSS with --metrics (per-run medians over the workers)", rss[True], "MiB", rss[False],
             "without --metrics", "difference < 1 MiB", abs(diff) < 1.0)

        if args.roundtrips:
            server = server_for("redis")
            server.start()
            try:
                rates: dict[bool, list[float]] = {True: [], False: []}
                host, port = "127.0.0.1", server.port
                for i in range(args.runs):
                    for metrics in ((False, True) if i % 2 == 0 else (True, False)):
                        run = Run(tmp, server.url(unique("bm")), args.rt_shards, args.rt_workers, args.ttl, metrics)
                        try:
                            run.wait_owned(args.timeout)
                            time.sleep(args.settle)
                            before, t0 = redis_commands(host, port), time.monotonic()
                            time.sleep(args.window)
                            rate = (redis_commands(host, port) - before) / (time.monotonic() - t0)
                            rates[metrics].append(rate)
                            print(f"redis run {i + 1} {'with' if metrics else 'without'} --metrics: "
                                  f"{rate:.1f} commands/s ({load()})", flush=True)
                        finally:
                            run.stop()
                line(f"Redis commands per second, {args.rt_workers} workers, {args.rt_shards} shards, ttl {args.ttl:g}",
                     rates[True], "/s", rates[False], "without --metrics")
            finally:
                server.close()
    print(f"machine: {load()}", flush=True)
    if args.json:
        print(json.dumps(FIGURES, indent=2))


if __name__ == "__main__":
    main()
