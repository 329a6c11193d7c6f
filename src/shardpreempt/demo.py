"""``shardpreempt demo``: the embedded end-to-end run, and the job it runs (``python -m shardpreempt.demo``).

It creates SQLite shard databases filled with work items, runs workers over them through the file
backend with ``--once`` semantics, shows ownership live, SIGKILLs one worker midway, and ends by
checking from the databases themselves that every item was processed exactly once and that every
write carries the fencing token of a lease its writer was granted for that shard. It writes the
run's timeline (:mod:`shardpreempt.timeline`) and removes its temporary directory unless asked to
keep it (or the check failed: then the directory is the evidence).

The job shows the fencing pattern: each write happens in a transaction that first reads the shard's
``fence`` (the highest token that has written to it), refuses to write with a lower token, and
raises the fence to its own token.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .backends import open_backend
from .config import Settings, make_shard
from .events import HOST, EventLog
from .history import check, read_events
from .model import Shard
from .poller import Poller
from .slicing import make_slices
from .status import snapshot, table
from .supervisor import Supervisor
from .timeline import bars_of, worker_of, write_timeline

ITEM_SECONDS = 0.02  # simulated work per item


class StaleToken(Exception):
    """A higher token has already written to this shard: this writer was fenced off."""


def create_shard(path: Path, items: int) -> None:
    """A shard database with ``items`` unprocessed work items and a fence at token 0."""
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE items (id INTEGER PRIMARY KEY, processed_by TEXT, token INTEGER);
            CREATE TABLE writes (item INTEGER, owner TEXT, token INTEGER, t REAL);
            CREATE TABLE fence (token INTEGER NOT NULL);
            INSERT INTO fence VALUES (0);
        """)
        db.executemany("INSERT INTO items (id) VALUES (?)", [(i,) for i in range(items)])
    db.close()


def fenced_process(db: sqlite3.Connection, item: int, owner: str, token: int) -> None:
    """Mark one item processed, refusing the write if a higher token has written to the shard."""
    db.execute("BEGIN IMMEDIATE")  # takes SQLite's write lock: the check and the write are atomic
    try:
        (fence,) = db.execute("SELECT token FROM fence").fetchone()
        if token < fence:
            raise StaleToken(f"token {token} < fence {fence}")
        db.execute("UPDATE fence SET token = ?", (token,))
        db.execute("UPDATE items SET processed_by = ?, token = ? WHERE id = ? AND processed_by IS NULL",
                   (owner, token, item))
        db.execute("INSERT INTO writes VALUES (?, ?, ?, ?)", (item, owner, token, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def work(argv: list[str] | None = None) -> int:
    """The demo's job, run by ``shardpreempt run`` for one slice: process every pending item.

    ``--poll SECONDS`` keeps polling the shards for new items instead of exiting when none are left
    (the seed's poll-a-shard job as a continuous poller); ``--item-seconds`` sets the simulated work.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    poll = float(args[args.index("--poll") + 1]) if "--poll" in args else None
    item_seconds = float(args[args.index("--item-seconds") + 1]) if "--item-seconds" in args else ITEM_SECONDS
    with open(os.environ["SHARDPREEMPT_SLICE_FILE"], encoding="utf-8") as f:
        spec = json.load(f)
    owner, tokens = spec["owner"], spec["tokens"]
    dbs = {identity: sqlite3.connect(shard["settings"]["path"], isolation_level=None, timeout=30)
           for identity, shard in spec["shards"].items()}
    try:
        while True:
            done = 0
            for identity, db in dbs.items():
                pending = [r[0] for r in db.execute("SELECT id FROM items WHERE processed_by IS NULL ORDER BY id")]
                for item in pending:
                    time.sleep(item_seconds)
                    fenced_process(db, item, owner, tokens[identity])
                    done += 1
            if poll is None:
                return 0
            if not done:
                time.sleep(poll)
    except StaleToken as exc:
        print(f"fenced off: {exc}", file=sys.stderr)
        return 3
    finally:
        for db in dbs.values():
            db.close()


def audit_shards(shards: Sequence[Shard], history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Figures from the shard databases and the events: exactly once, fenced, no overlaps."""
    granted = {(e["shard"], e["owner"], e["token"]) for e in history if e["event"] == "acquired"}
    report = check(history)
    totals = {"items": 0, "processed": 0, "lost": 0, "duplicated": 0, "unauthorised": 0, "stale_accepted": 0}
    per_shard = []
    for shard in shards:
        with sqlite3.connect(shard.settings["path"]) as db:
            total = db.execute("SELECT count(*) FROM items").fetchone()[0]
            done = db.execute("SELECT count(*) FROM items WHERE processed_by IS NOT NULL").fetchone()[0]
            dup = db.execute(
                "SELECT count(*) FROM (SELECT item FROM writes GROUP BY item HAVING count(*) > 1)").fetchone()[0]
            writes = db.execute("SELECT owner, token FROM writes ORDER BY rowid").fetchall()
        db.close()
        bad = sum(1 for owner, token in writes if (shard.identity, owner, token) not in granted)
        stale = sum(1 for (_, a), (_, b) in itertools.pairwise(writes) if b < a)  # the fence must forbid these
        row = {"shard": shard.name, "items": total, "processed": done, "lost": total - done, "duplicated": dup,
               "unauthorised": bad, "stale_accepted": stale, "tokens": sorted({t for _, t in writes})}
        per_shard.append(row)
        for key in totals:
            totals[key] += row[key]
    return {"shards": per_shard, "totals": totals, "overlaps": report.count("overlap"),
            "token_violations": report.count("token"), "holds": len(report.holds)}


def verify(settings: Settings, events_path: Path) -> tuple[bool, Table]:
    """Check every shard database against the events; a table for people."""
    figures = audit_shards(settings.shards, read_events([events_path]))
    result = Table(title="exactly-once check (from the shard databases)", title_justify="left")
    for col in ("shard", "items", "processed", "lost", "duplicated", "unauthorised writes", "tokens seen"):
        result.add_column(col)
    for row in figures["shards"]:
        result.add_row(row["shard"], str(row["items"]), str(row["processed"]), str(row["lost"]),
                       str(row["duplicated"]), str(row["unauthorised"] + row["stale_accepted"]),
                       ", ".join(map(str, row["tokens"])))
    result.caption = (f"history: {figures['holds']} holds, {figures['overlaps']} overlaps, "
                      f"{figures['token_violations']} token violations")
    t = figures["totals"]
    ok = (figures["overlaps"] == figures["token_violations"] == 0 and t["lost"] == t["duplicated"] == 0
          and t["unauthorised"] == t["stale_accepted"] == 0)
    return ok, result


def final_ownership(settings: Settings, history: Sequence[dict[str, Any]]) -> Table:
    """Each shard's last holder as the events tell it: worker, token, holds, how the last hold ended."""
    bars, _, _ = bars_of(history)
    last = {b.shards[0]: b for b in sorted(bars, key=lambda b: b.start)}
    holds = {identity: sum(1 for b in bars if b.shards[0] == identity) for identity in last}
    result = Table(title=f"final ownership (from the events): {len(last)}/{len(settings.shards)} shards were held",
                   title_justify="left")
    for col in ("shard", "last owner", "token", "holds", "last hold ended"):
        result.add_column(col)
    for shard in settings.shards:
        b = last.get(shard.identity)
        if b is None:
            result.add_row(shard.name, Text("never held", style="red"), "", "", "")
        else:
            result.add_row(shard.name, Text(worker_of(b.owner)), str(b.token), str(holds[shard.identity]),
                           "still held" if b.ended == "open" else b.ended)
    return result


def run_demo(*, workers: int = 3, shards: int = 6, items: int = 60, backend: str | None = None,
             directory: str | None = None, kill: bool = True, keep: bool = False) -> int:
    """Run the demo; 0 when the exactly-once check passes.

    Without ``directory`` the files go to a temporary directory, removed at the end unless ``keep``
    (or the check failed); the timeline is then written beside it, as a file of its own.
    """
    console = Console()
    temporary = not directory
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="shardpreempt-demo-"))
    try:
        code = _demo(console, base, workers=workers, shards=shards, items=items, backend=backend, kill=kill,
                     keep=keep or not temporary)
    except BaseException:
        if temporary and not keep:
            console.print(f"files kept in {base}", soft_wrap=True, highlight=False)
        raise
    if temporary and not keep and code == 0:
        shutil.rmtree(base, ignore_errors=True)
    elif temporary:
        console.print(f"files kept in {base}", soft_wrap=True, highlight=False)
    return code


def _demo(console: Console, base: Path, *, workers: int, shards: int, items: int, backend: str | None,
          kill: bool, keep: bool) -> int:
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    (base / "locks").mkdir(mode=0o700, exist_ok=True)
    shard_list = []
    for i in range(1, shards + 1):
        path = base / f"shard{i}.sqlite"
        path.unlink(missing_ok=True)
        create_shard(path, items)
        shard_list.append(make_shard(f"shard{i}", {"kind": "sqlite", "path": str(path)}))
    url = backend or f"file://{base / 'locks'}"
    settings = Settings(shards=tuple(shard_list), backend_url=url, ttl=2.0, workers=workers)
    events = base / "events.jsonl"
    events.unlink(missing_ok=True)
    slices = make_slices(settings.shards, workers)
    store = open_backend(url)
    console.print(f"[bold]shardpreempt demo[/bold]: {shards} SQLite shards x {items} items, {workers} workers, "
                  f"{len(slices)} slices, backend {store.url}")
    console.print(f"files in {base}", soft_wrap=True, highlight=False)
    start = time.monotonic()
    killed: dict[str, Any] = {}

    with Live(console=console, auto_refresh=False, transient=False) as live:

        def tick(sup: Supervisor) -> None:
            snap = snapshot(store, slices)
            live.update(table(snap), refresh=True)
            # A worker that holds shards, once they were all owned or (a loaded machine, where some
            # slices finish before others start) a second has passed.
            holding = {row["holder"]["pid"] for row in snap["shards"] if row["holder"]}
            pids = {i: p for i, p in sup.worker_pids().items() if p in holding}
            if kill and not killed and pids and (snap["summary"]["owned"] == len(settings.shards)
                                                 or time.monotonic() - start > 1.0):
                index, pid = min(pids.items())
                # Recorded first, as a machine's death would be: its holds end now in the history. On
                # file:// its command keeps the locks until its guard has killed it a moment later.
                EventLog(events).emit("killed", pid=pid, host=HOST, reason="demo: SIGKILL")
                os.kill(pid, signal.SIGKILL)
                killed.update(worker=index, pid=pid, t=time.time())
                console.print(f"[yellow]killed worker {index} (pid {pid}) with SIGKILL[/yellow]")

        poller = Poller(settings, command=[sys.executable, "-m", "shardpreempt.demo"], once=True, events=events,
                        on_tick=tick)
        poller.set_worker_count(workers)
        code = poller.poll()
        history = read_events([events])
        # The last frame: who held each shard in the end (the backend shows them all free by now).
        live.update(final_ownership(settings, history), refresh=True)
    if not console.is_terminal:
        console.line()  # Live ends a terminal's last frame with a newline, a file's not
    store.close()
    ok, result = verify(settings, events)
    console.print(result)
    console.line()
    if killed:
        after = [e for e in history if e["event"] == "acquired" and e["t"] > killed["t"]]
        if after:
            console.print(f"failover: the killed worker's shards were owned again "
                          f"{(after[0]['t'] - killed['t']) * 1000:.0f} ms after the SIGKILL")
    elapsed = time.monotonic() - start
    page = base / "timeline.html" if keep else Path(tempfile.mkstemp(prefix="shardpreempt-demo-", suffix=".html")[1])
    write_timeline([events], page, title="shardpreempt demo")
    if ok and code == 0:
        console.print(f"[green]PASS[/green]: every item processed exactly once, every write fenced ({elapsed:.1f} s)")
    else:
        console.print(f"[red]FAIL[/red] (run exit status {code}); see {events}", soft_wrap=True)
    console.print(f"timeline: {page}", soft_wrap=True, highlight=False)
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(work())
