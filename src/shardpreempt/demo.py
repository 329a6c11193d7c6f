"""``shardpreempt demo``: the embedded end-to-end run, and the job it runs (``python -m shardpreempt.demo``).

It creates SQLite shard databases filled with work items, runs workers over them through the file
backend with ``--once`` semantics, shows ownership live, SIGKILLs one worker midway, and ends by
checking from the databases themselves that every item was processed exactly once and that every
write carries the fencing token of a lease its writer was granted for that shard.

The job shows the fencing pattern: each write happens in a transaction that first reads the shard's
``fence`` (the highest token that has written to it), refuses to write with a lower token, and
raises the fence to its own token.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .backends import open_backend
from .config import Settings, make_shard
from .poller import Poller
from .slicing import make_slices
from .status import snapshot, table
from .supervisor import Supervisor
from .testing.history import check, read_events

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


def work() -> int:
    """The demo's job, run by ``shardpreempt run`` for one slice: process every pending item."""
    with open(os.environ["SHARDPREEMPT_SLICE_FILE"], encoding="utf-8") as f:
        spec = json.load(f)
    owner, tokens = spec["owner"], spec["tokens"]
    for identity, shard in spec["shards"].items():
        db = sqlite3.connect(shard["settings"]["path"], isolation_level=None, timeout=30)
        try:
            pending = [row[0] for row in db.execute("SELECT id FROM items WHERE processed_by IS NULL ORDER BY id")]
            for item in pending:
                time.sleep(ITEM_SECONDS)
                fenced_process(db, item, owner, tokens[identity])
        except StaleToken as exc:
            print(f"fenced off on {identity}: {exc}", file=sys.stderr)
            return 3
        finally:
            db.close()
    return 0


def verify(settings: Settings, events_path: Path) -> tuple[bool, Table]:
    """Check every shard database against the events: exactly once, tokens granted, no overlaps."""
    granted = {(e["shard"], e["owner"], e["token"]) for e in read_events([events_path]) if e["event"] == "acquired"}
    report = check(read_events([events_path]))
    result = Table(title="exactly-once check (from the shard databases)", title_justify="left")
    for col in ("shard", "items", "processed", "lost", "duplicated", "unauthorised writes", "tokens seen"):
        result.add_column(col)
    ok = report.ok
    for shard in settings.shards:
        with sqlite3.connect(shard.settings["path"]) as db:
            total = db.execute("SELECT count(*) FROM items").fetchone()[0]
            done = db.execute("SELECT count(*) FROM items WHERE processed_by IS NOT NULL").fetchone()[0]
            dup = db.execute("SELECT count(*) FROM (SELECT item FROM writes GROUP BY item HAVING count(*) > 1)").fetchone()[0]
            writes = db.execute("SELECT owner, token FROM writes").fetchall()
        db.close()
        bad = sum(1 for owner, token in writes if (shard.identity, owner, token) not in granted)
        tokens = sorted({t for _, t in writes})
        ok = ok and done == total and dup == 0 and bad == 0
        result.add_row(shard.name, str(total), str(done), str(total - done), str(dup), str(bad),
                       ", ".join(map(str, tokens)))
    result.caption = (f"history: {len(report.holds)} holds, {report.count('overlap')} overlaps, "
                      f"{report.count('token')} token violations")
    return ok, result


def run_demo(*, workers: int = 3, shards: int = 6, items: int = 60, backend: str | None = None,
             directory: str | None = None, kill: bool = True) -> int:
    """Run the demo; 0 when the exactly-once check passes."""
    console = Console()
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="shardpreempt-demo-"))
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
                  f"{len(slices)} slices, backend {store.url}\nfiles in {base}")
    start = time.monotonic()
    killed: dict[str, Any] = {}

    with Live(console=console, auto_refresh=False, transient=False) as live:

        def tick(sup: Supervisor) -> None:
            snap = snapshot(store, slices)
            live.update(table(snap), refresh=True)
            pids = sup.worker_pids()
            if kill and not killed and snap["summary"]["owned"] == len(settings.shards) and \
                    time.monotonic() - start > 1.0 and pids:
                index, pid = min(pids.items())
                os.kill(pid, signal.SIGKILL)
                killed.update(worker=index, pid=pid, t=time.time())
                console.print(f"[yellow]killed worker {index} (pid {pid}) with SIGKILL[/yellow]")

        poller = Poller(settings, command=[sys.executable, "-m", "shardpreempt.demo"], once=True, events=events,
                        on_tick=tick)
        poller.set_worker_count(workers)
        code = poller.poll()
        live.update(table(snapshot(store, slices)), refresh=True)
    store.close()
    ok, result = verify(settings, events)
    console.print(result)
    if killed:
        after = [e for e in read_events([events]) if e["event"] == "acquired" and e["t"] > killed["t"]]
        if after:
            console.print(f"failover: the killed worker's shards were owned again "
                          f"{(after[0]['t'] - killed['t']) * 1000:.0f} ms after the SIGKILL")
    elapsed = time.monotonic() - start
    if ok and code == 0:
        console.print(f"[green]PASS[/green]: every item processed exactly once, every write fenced ({elapsed:.1f} s)")
        return 0
    console.print(f"[red]FAIL[/red] (run exit status {code}); see {events}")
    return 1


if __name__ == "__main__":
    sys.exit(work())
