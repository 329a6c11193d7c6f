"""The history checker: reads ``--events`` files and finds safety and liveness violations.

A hold of a shard starts at its ``acquired`` event and ends at the first of: the owner's ``released``
or ``lost`` event for that shard, an ``exited`` or ``killed`` event for the owner's process (matched
by ``pid`` and ``host``), or the end of the history. Violations:

* ``overlap`` — two holds of one shard by different owners at overlapping times;
* ``token`` — a shard's tokens, in order of acquisition, do not strictly increase;
* ``unowned`` — a shard had no holder for longer than ``max_unowned`` seconds while workers
  were live; time inside an ``excused`` window (a fault not yet healed, such as a backend outage)
  does not count, so what is measured is the time from the heal until the shard is owned again.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Hold:
    """One owner's hold of one shard."""

    shard: str
    owner: str
    token: int
    start: float
    end: float


@dataclass(frozen=True)
class Violation:
    """One thing the history shows went wrong."""

    kind: str  # overlap | token | unowned
    shard: str
    detail: str
    at: float | None = None  # when it began: the later hold's start, the gap's start


@dataclass
class Report:
    """What the checker found, with the figures a stress run prints."""

    holds: list[Hold] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    max_unowned: float = 0.0

    @property
    def ok(self) -> bool:
        """True when nothing was violated."""
        return not self.violations

    def count(self, kind: str) -> int:
        """Number of violations of one kind."""
        return sum(1 for v in self.violations if v.kind == kind)


def read_events(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All events of the given files, in time order; a torn last line and missing files are ignored."""
    events: list[dict[str, Any]] = []
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    events.append(json.loads(line))
    events.sort(key=lambda e: float(e["t"]))
    return events


def _proc(event: Mapping[str, Any]) -> tuple[Any, Any]:
    return (event.get("host"), event.get("pid"))


def holds_of(events: Sequence[Mapping[str, Any]], end_of_history: float | None = None) -> list[Hold]:
    """Turn events into holds (see the module docstring for when a hold ends)."""
    last = end_of_history if end_of_history is not None else math.inf
    open_holds: dict[tuple[str, str], tuple[int, float, tuple[Any, Any]]] = {}
    holds: list[Hold] = []
    for e in sorted(events, key=lambda e: float(e["t"])):
        kind, t = e["event"], float(e["t"])
        if kind == "acquired":
            key = (e["shard"], e["owner"])
            if key in open_holds:  # acquired twice without an end: close the first
                token, start, _ = open_holds.pop(key)
                holds.append(Hold(key[0], key[1], token, start, t))
            open_holds[key] = (int(e["token"]), t, _proc(e))
        elif kind in ("released", "lost"):
            found = open_holds.pop((e["shard"], e["owner"]), None)
            if found is not None:
                holds.append(Hold(e["shard"], e["owner"], found[0], found[1], t))
        elif kind in ("exited", "killed"):
            proc = _proc(e)
            for key in [k for k, v in open_holds.items() if v[2] == proc]:
                token, start, _ = open_holds.pop(key)
                holds.append(Hold(key[0], key[1], token, start, t))
    for (shard, owner), (token, start, _) in open_holds.items():
        holds.append(Hold(shard, owner, token, start, last))
    holds.sort(key=lambda h: (h.shard, h.start))
    return holds


def check(
    events: Sequence[Mapping[str, Any]],
    *,
    max_unowned: float | None = None,
    shards: Iterable[str] | None = None,
    start: float | None = None,
    end: float | None = None,
    excused: Sequence[tuple[float, float]] = (),
) -> Report:
    """Check a history; ``shards``/``start``/``end`` bound the unowned-time check."""
    report = Report(holds=holds_of(events, end))
    by_shard: dict[str, list[Hold]] = defaultdict(list)
    for h in report.holds:
        by_shard[h.shard].append(h)
    for shard, holds in by_shard.items():
        for i, a in enumerate(holds):
            for b in holds[i + 1:]:
                if b.start >= a.end:
                    continue
                if a.owner != b.owner:
                    report.violations.append(Violation(
                        "overlap", shard, f"{a.owner} [{a.start:.6f}, {a.end:.6f}] and "
                        f"{b.owner} [{b.start:.6f}, {b.end:.6f}]", b.start))
        for a, b in itertools.pairwise(holds):
            if b.token <= a.token:
                report.violations.append(Violation(
                    "token", shard, f"token {b.token} of {b.owner} after {a.token} of {a.owner}", b.start))
    if max_unowned is not None:
        _check_unowned(report, by_shard, max_unowned, shards, start, end, excused)
    return report


def _check_unowned(report: Report, by_shard: Mapping[str, list[Hold]], bound: float,
                   shards: Iterable[str] | None, start: float | None, end: float | None,
                   excused: Sequence[tuple[float, float]]) -> None:
    names = list(shards) if shards is not None else list(by_shard)
    t0 = start if start is not None else min((h.start for h in report.holds), default=0.0)
    t1 = end if end is not None else max((h.end for h in report.holds if h.end != math.inf), default=t0)
    for shard in names:
        covered_until = t0
        gaps = []
        for h in sorted(by_shard.get(shard, []), key=lambda h: h.start):
            if h.start > covered_until:
                gaps.append((covered_until, h.start))
            covered_until = max(covered_until, h.end)
        if covered_until < t1:
            gaps.append((covered_until, t1))
        for g0, g1 in gaps:
            healed = [x1 for x0, x1 in excused if x0 < g1 and g0 < x1]
            g0 = min(g1, max([g0, *healed]))
            report.max_unowned = max(report.max_unowned, g1 - g0)
            if g1 - g0 > bound:
                report.violations.append(Violation(
                    "unowned", shard, f"no owner for {g1 - g0:.3f} s from {g0:.6f} (bound {bound} s)", g0))
