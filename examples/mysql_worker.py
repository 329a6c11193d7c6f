#!/usr/bin/env python3
"""A shard worker for ``shardpreempt run``: process work items in MySQL/MariaDB shards, fenced.

Copy it and put your own work where ``process`` is. Run it as, for example::

    shardpreempt run shards.toml -w 3 -- python examples/mysql_worker.py --poll 1

Each shard is a database (``kind = "mysql"`` in the config) holding ``items`` to process and a
one-row ``fence`` table. The pattern that makes a paused or partitioned worker harmless:

    in ONE transaction: lock the fence row; if its token is higher than ours, a newer owner has
    written to this shard — stop, we are stale; otherwise raise the fence to our token and write.

The token is the fencing token shardpreempt granted with the lease (``SHARDPREEMPT_TOKENS``); it
only ever grows, so once a new owner has written, every write of an old one is refused by the
database itself, whatever the old one believes about its lease. Settings, including passwords,
come from the 0600 file named by ``SHARDPREEMPT_SLICE_FILE``, never from the environment.

Exit status: 0 when there was nothing (more) to do, 3 when fenced off (the worker gives the slice
up after repeated failures; shardpreempt restarts the command on a fresh lease).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import pymysql

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS fence (id TINYINT PRIMARY KEY, token BIGINT NOT NULL)",
    "INSERT IGNORE INTO fence VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS items (id INT AUTO_INCREMENT PRIMARY KEY, payload TEXT,"
    " processed_by VARCHAR(255), token BIGINT)",
    "CREATE TABLE IF NOT EXISTS writes (item INT NOT NULL, owner VARCHAR(255) NOT NULL, token BIGINT NOT NULL,"
    " seq INT AUTO_INCREMENT PRIMARY KEY)",
]


class Fenced(Exception):
    """A higher token has written to this shard: we no longer own it."""


def connect(settings: dict[str, Any]) -> pymysql.connections.Connection:
    """A connection to one shard database, from its settings."""
    return pymysql.connect(host=settings["host"], port=int(settings.get("port", 3306)),
                           user=settings.get("username") or settings.get("user"),
                           password=settings.get("password", ""), database=settings["database"],
                           autocommit=False, connect_timeout=5, read_timeout=30, write_timeout=30)


def process(payload: str) -> None:
    """The real work for one item would go here."""


def fenced_write(db: pymysql.connections.Connection, item: int, owner: str, token: int) -> None:
    """Record one processed item, refused if a newer owner has written to the shard."""
    with db.cursor() as cur:
        cur.execute("SELECT token FROM fence WHERE id = 1 FOR UPDATE")  # serialises writers of this shard
        (fence,) = cur.fetchone()
        if token < fence:
            db.rollback()
            raise Fenced(f"token {token} < fence {fence}")
        cur.execute("UPDATE fence SET token = %s WHERE id = 1", (token,))
        cur.execute("UPDATE items SET processed_by = %s, token = %s WHERE id = %s AND processed_by IS NULL",
                    (owner, token, item))
        cur.execute("INSERT INTO writes (item, owner, token) VALUES (%s, %s, %s)", (item, owner, token))
    db.commit()


def work_shard(db: pymysql.connections.Connection, owner: str, token: int, item_seconds: float) -> int:
    """Process the shard's pending items; return how many."""
    with db.cursor() as cur:
        cur.execute("SELECT id, payload FROM items WHERE processed_by IS NULL ORDER BY id LIMIT 1000")
        pending = cur.fetchall()
    db.commit()
    for item, payload in pending:
        process(payload)
        time.sleep(item_seconds)
        fenced_write(db, item, owner, token)
    return len(pending)


def main() -> int:
    """Process this slice's shards until no work is left (or forever, with --poll)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll", type=float, default=None, help="keep polling, sleeping this long when idle")
    parser.add_argument("--item-seconds", type=float, default=0.0, help="simulated work per item")
    args = parser.parse_args()
    with open(os.environ["SHARDPREEMPT_SLICE_FILE"], encoding="utf-8") as f:
        spec = json.load(f)
    owner, tokens = spec["owner"], spec["tokens"]
    dbs = {identity: connect(shard["settings"]) for identity, shard in spec["shards"].items()}
    try:
        while True:
            done = sum(work_shard(db, owner, tokens[identity], args.item_seconds) for identity, db in dbs.items())
            if args.poll is None and not done:
                return 0
            if not done:
                time.sleep(args.poll or 0)
    except Fenced as exc:
        print(f"fenced off: {exc}", file=sys.stderr)
        return 3
    finally:
        for db in dbs.values():
            db.close()


if __name__ == "__main__":
    sys.exit(main())
