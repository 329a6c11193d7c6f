"""The seed's scenario, proven: db1..db3 on a real MariaDB, the example worker, faults throughout."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from shardpreempt import Shard
from shardpreempt.config import make_shard
from shardpreempt.testing.servers import EphemeralServer, ServerUnavailable, server_for
from shardpreempt.testing.skips import missing
from shardpreempt.testing.stress import Stress, StressOptions
from shardpreempt.testing.workload import ItemTotals

pymysql = pytest.importorskip("pymysql")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mysql_worker.py"
sys.path.insert(0, str(EXAMPLE.parent))
from mysql_worker import SCHEMA  # noqa: E402 - the example is a script, not a package


class MySQLWorkload:
    """Three shard databases with the seed's credentials, worked by examples/mysql_worker.py."""

    def __init__(self, server: EphemeralServer) -> None:
        self.server = server

    def _root(self, database: str | None = None) -> Any:
        return pymysql.connect(host="127.0.0.1", port=self.server.port, user="root", database=database,
                               autocommit=True)

    def make_shards(self, directory: Path, items: int) -> list[Shard]:
        """db1..db3, user hello / password world, each with ``items`` pending items."""
        with self._root() as db, db.cursor() as cur:
            cur.execute("CREATE USER IF NOT EXISTS 'hello'@'127.0.0.1' IDENTIFIED BY 'world'")
            for name in ("db1", "db2", "db3"):
                cur.execute(f"CREATE DATABASE IF NOT EXISTS {name}")
                cur.execute(f"GRANT ALL ON {name}.* TO 'hello'@'127.0.0.1'")
                cur.execute(f"USE {name}")
                for statement in SCHEMA:
                    cur.execute(statement)
        shards = [make_shard(name, {"kind": "mysql", "host": "127.0.0.1", "port": self.server.port,
                                    "username": "hello", "password": "world", "database": name})
                  for name in ("db1", "db2", "db3")]
        self.add_work(shards, items)
        return shards

    def command(self) -> list[str]:
        """The example worker, polling."""
        return [sys.executable, str(EXAMPLE), "--poll", "0.05", "--item-seconds", "0.002"]

    def add_work(self, shards: Sequence[Shard], items: int) -> None:
        """New items in every database."""
        for shard in shards:
            with self._root(shard.settings["database"]) as db, db.cursor() as cur:
                cur.executemany("INSERT INTO items (payload) VALUES (%s)", [("job",)] * items)

    def pending(self, shards: Sequence[Shard]) -> int:
        """Items not yet processed."""
        total = 0
        for shard in shards:
            with self._root(shard.settings["database"]) as db, db.cursor() as cur:
                cur.execute("SELECT count(*) FROM items WHERE processed_by IS NULL")
                total += cur.fetchone()[0]
        return total

    def audit(self, shards: Sequence[Shard], history: Sequence[dict[str, Any]]) -> ItemTotals:
        """Exactly once, only fenced writes, read from the databases."""
        granted = {(e["shard"], e["owner"], e["token"]) for e in history if e["event"] == "acquired"}
        totals = ItemTotals()
        for shard in shards:
            with self._root(shard.settings["database"]) as db, db.cursor() as cur:
                cur.execute("SELECT count(*), count(processed_by) FROM items")
                total, done = cur.fetchone()
                cur.execute("SELECT count(*) FROM (SELECT item FROM writes GROUP BY item HAVING count(*) > 1) d")
                dup = cur.fetchone()[0]
                cur.execute("SELECT owner, token FROM writes ORDER BY seq")
                writes = cur.fetchall()
            totals.items += total
            totals.processed += done
            totals.lost += total - done
            totals.duplicated += dup
            totals.unauthorised += sum(1 for o, t in writes if (shard.identity, o, t) not in granted)
            totals.stale_accepted += sum(1 for (_, a), (_, b) in itertools.pairwise(writes) if b < a)
        return totals


@pytest.fixture
def mariadb() -> Iterator[EphemeralServer]:
    """A MariaDB server of the test's own, for the shards."""
    try:
        server = server_for("mysql")
        server.start()
    except (ServerUnavailable, ImportError) as exc:
        missing(f"mysql: {exc}")
    yield server
    server.close()


@pytest.mark.parametrize("backend", ["file", "mysql"])
def test_every_item_processed_exactly_once_under_faults(backend: str, mariadb: EphemeralServer,
                                                        tmp_path: Path) -> None:
    """Workers killed, stopped past the ttl and orphaned while they write: every item is processed
    exactly once, no stale write is accepted, and the database password never reaches the events."""
    opts = StressOptions(backend=backend, kinds=("kill-worker", "stop-worker", "kill-supervisor"), count=6,
                         ttl=1.0, workers=3, items=40, directory=tmp_path / "run", workload=MySQLWorkload(mariadb),
                         unowned_bound=0.5 if backend == "file" else None)
    figures = Stress(opts).run()
    assert figures.passed, json.dumps(figures.as_dict(), indent=1)
    assert figures.items.processed == figures.items.items == 3 * 40 * 7
    assert "world" not in (tmp_path / "run" / "events.jsonl").read_text()
