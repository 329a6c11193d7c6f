"""A read-only snapshot of ownership for humans (a rich table) and machines (JSON)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from .model import Slice
from .typing import Backend


def snapshot(backend: Backend, slices: Sequence[Slice]) -> dict[str, Any]:
    """Every shard's holder (one ``inspect`` call), grouped by slice, with totals."""
    keys = [k for s in slices for k in s.keys]
    holders = backend.inspect(keys)
    shards: list[dict[str, Any]] = []
    for s in slices:
        for shard in s.shards:
            h = holders.get(shard.identity)
            shards.append({"name": shard.name, "identity": shard.identity, "slice": s.id, "slice_index": s.index,
                           "holder": h.public() if h else None})
    owned = sum(1 for row in shards if row["holder"])
    owners = sorted({row["holder"]["owner"] for row in shards if row["holder"]})
    return {"t": time.time(), "backend": backend.url, "shards": shards,
            "summary": {"shards": len(shards), "owned": owned, "free": len(shards) - owned,
                        "slices": len(slices), "owners": len(owners)}}


def _left(seconds: float | None) -> str:
    return "while alive" if seconds is None else f"{seconds:.1f} s"


def table(snap: dict[str, Any], limit: int | None = None) -> Table:
    """The snapshot as a rich table (at most ``limit`` rows)."""
    s = snap["summary"]
    t = Table(title=f"{s['owned']}/{s['shards']} shards owned by {s['owners']} owner(s) — {snap['backend']}",
              title_justify="left")
    for col in ("shard", "slice", "owner", "pid", "token", "time left"):
        t.add_column(col)
    rows = snap["shards"] if limit is None else snap["shards"][:limit]
    for row in rows:
        h = row["holder"]
        if h:
            t.add_row(row["name"], str(row["slice_index"]), h["owner"], str(h["pid"] or ""), str(h["token"]),
                      _left(h["expires_in"]))
        else:
            t.add_row(row["name"], str(row["slice_index"]), "[red]free[/red]", "", "", "")
    if limit is not None and len(snap["shards"]) > limit:
        t.caption = f"... {len(snap['shards']) - limit} more (use --json for all)"
    return t
