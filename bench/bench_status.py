"""``shardpreempt status`` on a big pool, timed as whole command runs, on every backend.

Usage (from the repository root)::

    python bench/bench_status.py                                   # every backend, 100,000 shards
    python bench/bench_status.py --backends file,redis --runs 3
    python bench/bench_status.py --backends etcd --profile /tmp/prof   # also one cProfile of status

For each backend an ephemeral server is started from its binary (as the tests do; ``file`` uses a fresh
lock directory), and a config of ``--shards`` shards is written (one ``[[shard_sets]]`` template and
range). ``--workers`` holder processes then join the pool as a real one does: the first records the
layout (``--slices`` slices), and each holds one member key and every ``--workers``-th slice under its
own owner, renewing until the bench ends. So ``status`` reads a full pool: every shard owned, the
members, the recorded layout.

Then, ``--runs`` times each, as separate processes: ``shardpreempt status CONFIG --backend URL`` (the
table), the same with ``--json`` (every shard), and two baselines from the same invocation:
``shardpreempt plan CONFIG`` (starting the CLI, reading and slicing the config, which status pays too)
and ``python -c "import shardpreempt"``. Each line gives the median (min, max) and the ratio to the
``plan`` baseline. The machine has two cores shared with others: keep ``--runs`` small.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pstats
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ALL = ("file", "redis", "postgresql", "mysql", "etcd", "zookeeper")
TARGET = 2.0  # seconds: issue 10 item 5


def write_config(path: Path, shards: int, url: str, ttl: float) -> Path:
    path.write_text(f'[backend]\nurl = "{url}"\nttl = {ttl}\n\n'
                    f'[[shard_sets]]\ntemplate = "s{{n}}"\nrange = [0, {shards - 1}]\n')
    return path


@contextlib.contextmanager
def backend_url(name: str, tmp: Path) -> Iterator[str]:
    """A fresh namespace on a new ephemeral server (or a new lock directory for ``file``)."""
    from shardpreempt.testing.servers import server_for, unique

    if name == "file":
        where = tmp / f"locks-{unique()}"
        where.mkdir(mode=0o700)
        yield f"file://{where}"
        return
    server = server_for(name)
    server.start()
    try:
        yield server.url(unique("st"))
    finally:
        server.close()


# -- the holders ----------------------------------------------------------------------------------
def hold(args: argparse.Namespace) -> None:
    """One worker of the pool (run as a child): join, hold every ``workers``-th slice, renew until told."""
    from shardpreempt import open_backend
    from shardpreempt.config import load_settings
    from shardpreempt.pool import default_identity, member_key, member_owner, resolve_layout
    from shardpreempt.slicing import make_slices

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # file:// holds one descriptor per key
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 1 << 16)), hard))
    settings = load_settings(args.config)
    # a long timeout: ten holders taking 1,000-key slices at once on a loaded machine are slow to answer
    backend = open_backend(args.url, **({} if args.url.startswith("file:") else {"timeout": 60.0}))
    layout = resolve_layout(backend, settings.shards, settings.strategy, args.slices, args.slices)
    cut = make_slices(settings.shards, layout.slices, layout.strategy)
    owner = member_owner(default_identity("bench", args.worker))
    leases = []
    for keys in [[member_key(args.worker)]] + [list(s.keys) for s in cut[args.worker::args.workers]]:
        for _ in range(100):
            lease = backend.try_acquire(keys, owner, args.ttl)
            if lease is not None:
                leases.append(lease)
                break
            backend.wait(keys, 0.2)
        else:
            raise SystemExit(f"holder {args.worker}: could not acquire {len(keys)} keys")
    print(f"ready {sum(len(lease.keys) for lease in leases)}", flush=True)
    renew_every = max(0.5, min(lease.ttl for lease in leases) / 3)
    while True:  # until the bench closes our stdin
        ready, _, _ = select.select([sys.stdin], [], [], renew_every)
        if ready and not sys.stdin.readline():
            break
        leases = [backend.renew(lease) for lease in leases]
    for lease in leases:
        backend.release(lease)
    backend.close()


@contextlib.contextmanager
def holders(args: argparse.Namespace, url: str, cfg: Path) -> Iterator[int]:
    """Start the holder processes (the first alone: it records the layout); yield the keys they hold."""
    procs: list[subprocess.Popen[str]] = []

    def start(worker: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, __file__, "--hold", "--url", url, "--config", str(cfg),
                                 "--worker", str(worker), "--workers", str(args.workers), "--slices",
                                 str(args.slices), "--ttl", str(args.ttl)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    def ready(proc: subprocess.Popen[str]) -> int:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"a holder failed (exit {proc.wait()})")
        return int(line.split()[1])

    try:
        held = ready(start(0))
        rest = [start(w) for w in range(1, args.workers)]
        held += sum(ready(p) for p in rest)
        yield held
    finally:
        for proc in procs:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- timing ---------------------------------------------------------------------------------------
def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    took = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {out.returncode}: {out.stderr[-800:]}")
    return took, out.stdout


def line(name: str, values: list[float], base: float | None = None, target: float | None = None) -> str:
    med = statistics.median(values)
    text = f"  {name}: median {med:.3f} s (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"
    if base:
        text += f"; ratio to plan {med / base:.2f}"
    if target is not None:
        text += f"; target < {target:g} s {'met' if med < target else 'MISSED'}"
    return text


def profile(cmd: list[str], out: Path) -> None:
    """One run of the CLI under cProfile in this process's child; the top of the cumulative listing."""
    code = (f"import cProfile, sys; sys.argv = {['shardpreempt', *cmd]!r}; from shardpreempt.cli import main\n"
            f"cProfile.run('main(standalone_mode=False)', {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    text = io.StringIO()
    pstats.Stats(str(out), stream=text).sort_stats("cumulative").print_stats(25)
    print(text.getvalue())


def bench(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with backend_url(name, tmp) as url:
        cfg = write_config(tmp / f"{name}.toml", args.shards, url, args.ttl)
        t0 = time.monotonic()
        with holders(args, url, cfg) as held:
            setup = time.monotonic() - t0
            cli = [sys.executable, "-m", "shardpreempt"]
            status = [*cli, "status", str(cfg), "--backend", url]
            figures: dict[str, list[float]] = {"status": [], "status --json": [], "plan": [], "import": []}
            snap: dict[str, Any] = {}
            for _ in range(args.runs):
                figures["status"].append(timed(status)[0])
                took, out = timed([*status, "--json"])
                figures["status --json"].append(took)
                snap = json.loads(out)
                figures["plan"].append(timed([*cli, "plan", str(cfg)])[0])
                figures["import"].append(timed([sys.executable, "-c", "import shardpreempt"])[0])
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                profile(["status", str(cfg), "--backend", url], Path(args.profile) / f"{name}.prof")
    summary = snap["summary"]
    base = statistics.median(figures["plan"])
    print(f"status {name} S={args.shards}: {held} keys held by {args.workers} holders (set up in {setup:.1f} s); "
          f"status saw {summary['owned']} owned, {summary['members']} members, {summary['slices']} slices")
    print(line("baseline `plan`", figures["plan"]))
    print(line("baseline `import shardpreempt`", figures["import"]))
    print(line("status", figures["status"], base, TARGET))
    print(line("status --json", figures["status --json"], base))
    sys.stdout.flush()
    return {"backend": name, "shards": args.shards, "held": held, "owned": summary["owned"],
            **{k: statistics.median(v) for k, v in figures.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(ALL), help="comma-separated, from: " + ", ".join(ALL))
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--workers", type=int, default=10, help="holder processes (pool members)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=30.0)
    parser.add_argument("--profile", default=None, metavar="DIR", help="also profile one status run per backend")
    parser.add_argument("--json", action="store_true", help="also print every median as one JSON object")
    # the holder's own arguments (the bench starts it as a child)
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        hold(args)
        return
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        os.chmod(tmp, 0o700)
        for name in names:
            results.append(bench(name, args, Path(tmp)))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
