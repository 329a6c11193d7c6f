"""A read-only snapshot of the pool for humans (rich tables) and machines (JSON): its layout, its
members, and every shard's holder."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .model import Slice
from .pool import Layout, Member, identity_of, join_margin, look_at, member_key, recorded_layout
from .typing import Backend


def members(backend: Backend) -> list[Member]:
    """Every live member, found by reading member slots until as many in a row are free as a worker may
    join past the highest in use (:func:`~shardpreempt.pool.join_margin`)."""
    found: list[Member] = []
    start, step, last = 0, 64, -1
    while True:
        keys = [member_key(j) for j in range(start, start + step)]
        seen = look_at(backend, keys)
        for j, key in enumerate(keys, start):
            h = seen.get(key)
            if h is not None:
                found.append(Member(identity_of(h.owner), j, h.owner, h.pid, h.host, h.since))
                last = j
        if last + join_margin(last) < start + step:
            return found
        start += step


def snapshot(backend: Backend, slices: Sequence[Slice], layout: Layout | None = None) -> dict[str, Any]:
    """The pool's recorded layout, its members, and every shard's holder (grouped by slice), with totals.

    One ``inspect`` of every key; rows whose keys one acquire granted share one holder dict (backends hand
    out one Holder per grant), so 100,000 rows cost 100,000 small dicts and no more.
    """
    holders = backend.inspect([k for s in slices for k in s.keys])
    shards: list[dict[str, Any]] = []
    add = shards.append
    public: dict[int, dict[str, Any]] = {}  # id(holder) -> its public dict (holders keeps every one alive)
    owned = 0
    for s in slices:
        slice_id, index = s.id, s.index
        for shard in s.shards:
            h = holders.get(shard.identity)
            row = None
            if h is not None:
                owned += 1
                row = public.get(id(h))
                if row is None:
                    row = public[id(h)] = h.public()
            add({"name": shard.name, "identity": shard.identity, "slice": slice_id, "slice_index": index,
                 "holder": row})
    owners = {row["owner"] for row in public.values()}
    per_member = Counter(identity_of(h.owner) for s in slices if (h := holders.get(s.first_key)) is not None)
    recorded = recorded_layout(backend)
    live = members(backend)
    return {"t": time.time(), "backend": backend.url,
            "layout": recorded.public() if recorded else None,
            "config_layout": layout.public() if layout else None,
            "members": [m.public(per_member.get(m.identity, 0)) for m in live],
            "shards": shards,
            "summary": {"shards": len(shards), "owned": owned, "free": len(shards) - owned,
                        "slices": len(slices), "owners": len(owners), "members": len(live)}}


def _left(seconds: float | None) -> str:
    return "while alive" if seconds is None else f"{seconds:.1f} s"


def _since(unix: float | None) -> str:
    return "" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def describe_layout(layout: dict[str, Any] | None) -> str:
    """One line for a layout dict (or its absence)."""
    if layout is None:
        return "no layout recorded yet (the first supervisor records its own)"
    return str(Layout(**layout))


def table(snap: dict[str, Any], limit: int | None = None) -> Group:
    """The snapshot as rich renderables: the layout, the members, then at most ``limit`` shard rows."""
    s = snap["summary"]
    head = Text(f"pool layout: {describe_layout(snap['layout'])}")
    if snap.get("config_layout") and snap["layout"] and snap["config_layout"] != snap["layout"]:
        head.append(f"\nthis config asks for: {describe_layout(snap['config_layout'])}", style="yellow")
    m = Table(title=f"{s['members']} member(s)", title_justify="left")
    for col in ("member", "host", "pid", "slices", "since"):
        m.add_column(col)
    for row in snap["members"]:
        m.add_row(Text(row["identity"]), Text(str(row["host"] or "")), str(row["pid"] or ""), str(row["slices"]),
                  _since(row["since"]))
    t = Table(title=f"{s['owned']}/{s['shards']} shards owned by {s['owners']} owner(s) — {snap['backend']}",
              title_justify="left")
    for col in ("shard", "slice", "owner", "pid", "token", "time left"):
        t.add_column(col)
    rows = snap["shards"] if limit is None else snap["shards"][:limit]
    for row in rows:
        h = row["holder"]
        if h:
            t.add_row(Text(row["name"]), str(row["slice_index"]), Text(h["owner"]), str(h["pid"] or ""),
                      str(h["token"]), _left(h["expires_in"]))
        else:
            t.add_row(Text(row["name"]), str(row["slice_index"]), Text("free", style="red"), "", "", "")
    if limit is not None and len(snap["shards"]) > limit:
        t.caption = f"... {len(snap['shards']) - limit} more (use --json for all)"
    return Group(head, m, t)
