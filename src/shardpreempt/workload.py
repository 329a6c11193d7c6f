"""What a stress run works on: the shards and the fenced job, plus how to add work and audit it.

The default is the demo's job over SQLite shard databases (:mod:`shardpreempt.demo`); the fault tests
also run the seed's MySQL scenario with ``examples/mysql_worker.py`` through the same protocol.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import make_shard
from .demo import audit_shards, create_shard
from .model import Shard


class Workload(Protocol):
    """The shards under test and the job that works them; the default is the demo's SQLite job."""

    def make_shards(self, directory: Path, items: int) -> list[Shard]:
        """Create the shards with ``items`` pending work items each."""
        ...

    def command(self) -> list[str]:
        """argv of the job, run by ``shardpreempt run`` for each slice; it must keep polling for work."""
        ...

    def add_work(self, shards: Sequence[Shard], items: int) -> None:
        """Add ``items`` new work items to every shard."""
        ...

    def pending(self, shards: Sequence[Shard]) -> int:
        """Work items not yet processed."""
        ...

    def audit(self, shards: Sequence[Shard], history: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Totals: items, processed, lost, duplicated, unauthorised, stale_accepted."""
        ...


class SqliteWorkload:
    """The demo's fenced job over SQLite shard databases (:mod:`shardpreempt.demo`)."""

    def __init__(self, count: int = 6, item_seconds: float = 0.002) -> None:
        self.count = count
        self.item_seconds = item_seconds

    def make_shards(self, directory: Path, items: int) -> list[Shard]:
        """One SQLite database per shard."""
        shards = []
        for i in range(self.count):
            path = directory / f"shard{i}.sqlite"
            path.unlink(missing_ok=True)
            create_shard(path, items)
            shards.append(make_shard(f"shard{i}", {"kind": "sqlite", "path": str(path)}))
        return shards

    def command(self) -> list[str]:
        """The demo job, polling."""
        return [sys.executable, "-m", "shardpreempt.demo", "--poll", "0.05", "--item-seconds", str(self.item_seconds)]

    def add_work(self, shards: Sequence[Shard], items: int) -> None:
        """Insert new items."""
        for shard in shards:
            with sqlite3.connect(shard.settings["path"], timeout=30) as db:
                db.executemany("INSERT INTO items (id) VALUES (NULL)", [()] * items)
            db.close()

    def pending(self, shards: Sequence[Shard]) -> int:
        """Unprocessed items."""
        total = 0
        for shard in shards:
            with sqlite3.connect(shard.settings["path"], timeout=30) as db:
                total += db.execute("SELECT count(*) FROM items WHERE processed_by IS NULL").fetchone()[0]
            db.close()
        return total

    def audit(self, shards: Sequence[Shard], history: Sequence[dict[str, Any]]) -> dict[str, int]:
        """From the databases."""
        totals: dict[str, int] = audit_shards(shards, history)["totals"]
        return totals
