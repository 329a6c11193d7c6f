"""``shardpreempt timeline`` on a big events file: time and size of the page.

    python bench/bench_timeline.py [--lines 100000] [--shards 10000] [--runs 3]

Writes an events file of ``--lines`` lines as a pool of 100 workers over ``--shards`` shards in
100 slices makes them (every slice acquired, then handed over again and again: ``acquired`` and
``released`` per shard, a few ``killed``), then runs ``shardpreempt timeline EVENTS -o PAGE`` as a
whole process ``--runs`` times. The baseline, in the same invocation, is a process that only reads
and parses the same file (``shardpreempt.history.read_events``). Reported: medians and the page size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_events(path: Path, lines: int, shards: int) -> None:
    slices = 100
    per = shards // slices
    t, token, n = 1_700_000_000.0, 1, 0
    with open(path, "w") as f:
        rnd = 0
        while n < lines:
            for s in range(slices):
                worker = (s + rnd) % 100
                owner = f"host/1.{worker}:{1000 + worker}:r{rnd}"
                for event in ("acquired", "released"):
                    for i in range(per):
                        shard = f"shard-{s * per + i}"
                        f.write(json.dumps({"t": t, "event": event, "shard": shard, "owner": owner, "token": token,
                                            "worker": worker, "slice": f"{s:016x}", "pid": 1000 + worker,
                                            "host": "host", **({"reason": "handoff"} if event == "released" else {})})
                                + "\n")
                        n += 1
                    t += 0.5
                token += 1
                if n >= lines:
                    return
            f.write(json.dumps({"t": t, "event": "killed", "pid": 1000 + rnd % 100, "host": "host",
                                "reason": "bench"}) + "\n")
            n += 1
            rnd += 1


def timed(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(args, check=True, capture_output=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        events, page = Path(tmp) / "events.jsonl", Path(tmp) / "timeline.html"
        write_events(events, args.lines, args.shards)
        read = [timed([sys.executable, "-c", "import sys; from shardpreempt.history import read_events; "
                       "read_events([sys.argv[1]])", str(events)]) for _ in range(args.runs)]
        draw = [timed([sys.executable, "-m", "shardpreempt", "timeline", str(events), "-o", str(page)])
                for _ in range(args.runs)]
        base, median = statistics.median(read), statistics.median(draw)
        print(f"baseline: read and parse {args.lines} events: median {base:.2f} s")
        print(f"timeline of {args.lines} events, {args.shards} shards: median {median:.2f} s "
              f"(min {min(draw):.2f}, max {max(draw):.2f}, n={len(draw)}); ratio to baseline {median / base:.1f}; "
              f"page {page.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
