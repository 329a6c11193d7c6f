"""``shardpreempt timeline``: who owned which shard when, drawn from ``--events`` files as one HTML page.

The page is self-contained (inline CSS and SVG, no script, nothing fetched): one lane per shard, per
slice or per worker, a bar per hold coloured by its worker (by slice in worker lanes), a mark at every
acquisition and at how each hold ended (released, lost, killed, the process exited), hatched stretches
where a shard or slice had no owner, red bands where two owners overlapped, and a dashed line at every
``killed`` event. Holds are reconstructed by the history checker's rules
(:func:`shardpreempt.history.holds_of`), so the picture and the checker never disagree.
With many shards the lanes are grouped by slice: a slice's shards are acquired and released together.
"""

from __future__ import annotations

import datetime
import html
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .history import holds_of, read_events

MODES = ("auto", "shard", "slice", "worker")
AUTO_SHARD_LANES = 200  # above this many shards, ``auto`` draws one lane per slice
TITLE_LIMIT = 5000  # above this many bars, tooltips are per lane only (keeps 100,000-event pages small)
LABEL_W, PLOT_W, RIGHT, AXIS_H = 300, 1200, 24, 40
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
           "#86bcb6", "#a0cbe8", "#8cd17d", "#d4a6c8")
ENDS = ("released", "lost", "killed", "exited", "open")  # how a hold ended; "open": held at the end

CSS = """body{font:13px system-ui,sans-serif;margin:16px;color:#222}h1{font-size:18px;margin:0 0 6px}
p{margin:4px 0}.bad{color:#c00;font-weight:bold}.legend span{margin-right:14px;white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:4px;border:1px solid #999}
.axis{position:sticky;top:0;background:#fff;z-index:1}svg{display:block}
text{font:11px ui-monospace,monospace;fill:#333}.alt{fill:#f4f4f4}.grid{stroke:#ddd;stroke-width:1}
.gap{fill:url(#hatch)}.ovl{fill:#e00;opacity:.55}.acq{stroke:#1a7f37;stroke-width:1.5}
.released{stroke:#555;stroke-width:1.5}.lost{stroke:#d00;stroke-width:2;fill:none}
.killed{stroke:#000;stroke-width:2.5;fill:none}.exited{stroke:#e67e00;stroke-width:2;fill:none}
.kill{stroke:#000;stroke-width:1;stroke-dasharray:4 3}.tri{fill:#000}"""


@dataclass(frozen=True)
class Bar:
    """One hold as drawn: of one shard, or of a slice's shards taken together."""

    owner: str
    token: int
    start: float
    end: float
    ended: str  # one of ENDS
    shards: tuple[str, ...]
    slice: str | None


@dataclass
class Lane:
    """One row of the chart: a shard, a slice or a worker, with its bars and its unowned stretches."""

    key: str
    title: str
    bars: list[Bar] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)
    overlaps: list[tuple[float, float]] = field(default_factory=list)
    rows: int = 1
    row_of: list[int] = field(default_factory=list)  # worker lanes: each bar's sub-row


def worker_of(owner: str) -> str:
    """The worker an owner id belongs to: a pool member's ``host/NAME.INDEX``, else ``host:pid``."""
    parts = owner.rsplit(":", 2)
    if len(parts) == 3:
        return parts[0] if "/" in parts[0] else f"{parts[0]}:{parts[1]}"
    return owner


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def bars_of(events: Sequence[Mapping[str, Any]]) -> tuple[list[Bar], float, float]:
    """Every hold of the history as a one-shard bar with how it ended, and the history's first and last time."""
    if not events:
        return [], 0.0, 0.0
    t0 = min(float(e["t"]) for e in events)
    t1 = max(float(e["t"]) for e in events)
    by_hold: dict[tuple[str, str, float], str] = {}  # a hold's own end event
    slices: dict[tuple[str, str, float], str] = {}
    by_time: dict[float, str] = {}  # the process events that end every hold of a process
    for e in events:
        kind, t = e["event"], float(e["t"])
        if kind in ("released", "lost"):
            by_hold[(e["shard"], e["owner"], t)] = kind
        elif kind == "acquired" and e.get("slice") is not None:
            slices[(e["shard"], e["owner"], t)] = str(e["slice"])
        elif kind == "killed" or (kind == "exited" and by_time.get(t) != "killed"):
            by_time[t] = kind
    bars = []
    for h in holds_of(events, t1):
        ended = by_hold.get((h.shard, h.owner, h.end)) or by_time.get(h.end) or "open"
        bars.append(Bar(h.owner, h.token, h.start, h.end, ended, (h.shard,), slices.get((h.shard, h.owner, h.start))))
    return bars, t0, t1


def _grouped(bars: Iterable[Bar]) -> list[Bar]:
    """A slice's shards held together (same owner, slice and start) as one bar."""
    groups: dict[tuple[str, str | None, float], list[Bar]] = defaultdict(list)
    for b in bars:
        groups[(b.owner, b.slice if b.slice is not None else b.shards[0], b.start)].append(b)
    out = []
    for (owner, _, start), members in groups.items():
        last = max(members, key=lambda b: b.end)
        shards = tuple(sorted((s for b in members for s in b.shards), key=_natural))
        out.append(Bar(owner, min(b.token for b in members), start, last.end, last.ended, shards, members[0].slice))
    return out


def lanes_of(bars: Sequence[Bar], t0: float, t1: float, by: str = "auto") -> tuple[str, list[Lane]]:
    """Sort bars into lanes (``auto``: per shard up to AUTO_SHARD_LANES shards, else per slice)."""
    if by not in MODES:
        raise ValueError(f"lanes by one of {', '.join(MODES)}, not {by!r}")
    if by == "auto":
        many = len({b.shards[0] for b in bars}) > AUTO_SHARD_LANES
        by = "slice" if many and any(b.slice is not None for b in bars) else "shard"
    lanes: dict[str, Lane] = {}
    if by == "shard":
        for b in bars:
            lanes.setdefault(b.shards[0], Lane(b.shards[0], f"shard {b.shards[0]}")).bars.append(b)
    elif by == "slice":
        for b in _grouped(bars):
            key = f"slice {b.slice}" if b.slice is not None else f"shard {b.shards[0]}"
            lanes.setdefault(key, Lane(key, key)).bars.append(b)
    else:
        for b in _grouped(bars):
            key = worker_of(b.owner)
            lanes.setdefault(key, Lane(key, f"worker {key}")).bars.append(b)
    for lane in lanes.values():
        lane.bars.sort(key=lambda b: b.start)
        if by == "worker":
            lane.row_of = _pack(lane.bars)
            lane.rows = max(lane.row_of) + 1
        else:
            lane.gaps, lane.overlaps = _gaps_and_overlaps(lane.bars, t0, t1)
        if by == "slice" and lane.key.startswith("slice"):
            shards = sorted({s for b in lane.bars for s in b.shards}, key=_natural)
            lane.title = f"{lane.key}: {len(shards)} shard(s) {shards[0]} … {shards[-1]}"
    def order(lane: Lane) -> list[Any]:
        return _natural(lane.key if by != "slice" else min((b.shards[0] for b in lane.bars), key=_natural))
    return by, sorted(lanes.values(), key=order)


def _gaps_and_overlaps(bars: Sequence[Bar], t0: float, t1: float) -> tuple[list[tuple[float, float]],
                                                                             list[tuple[float, float]]]:
    gaps, overlaps = [], []
    covered, owner = t0, ""
    for b in bars:  # sorted by start
        if b.start > covered:
            gaps.append((covered, b.start))
        elif b.start < covered and b.owner != owner:
            overlaps.append((b.start, min(b.end, covered)))
        if b.end > covered:
            covered, owner = b.end, b.owner
    if covered < t1:
        gaps.append((covered, t1))
    return gaps, overlaps


def _pack(bars: Sequence[Bar]) -> list[int]:
    """A sub-row for each bar (sorted by start), so that a worker's concurrent holds do not hide each other."""
    ends: list[float] = []
    rows = []
    for b in bars:
        row = next((i for i, e in enumerate(ends) if e <= b.start), len(ends))
        if row == len(ends):
            ends.append(b.end)
        else:
            ends[row] = b.end
        rows.append(row)
    return rows


def _lane_height(rows: int) -> int:
    return 22 if rows <= 60 else 14 if rows <= 300 else 6 if rows <= 2000 else 3


def _ticks(span: float) -> float:
    raw = span / 10
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * step for m in (1, 2, 5, 10) if m * step >= raw)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _short(text: str, n: int = 44) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def render(events: Sequence[Mapping[str, Any]], *, by: str = "auto", title: str = "shardpreempt timeline",
           sources: Sequence[str] = ()) -> str:
    """The timeline of a history as one self-contained HTML page."""
    bars, t0, t1 = bars_of(events)
    mode, lanes = lanes_of(bars, t0, t1, by)
    span = (t1 - t0) or 1.0
    width = LABEL_W + PLOT_W + RIGHT

    def x(t: float) -> str:
        return f"{LABEL_W + (t - t0) / span * PLOT_W:.1f}"

    workers = sorted({worker_of(b.owner) for b in bars}, key=_natural)
    slices = sorted({b.slice for b in bars if b.slice is not None})
    colour_keys = slices if mode == "worker" else workers
    colour = {k: f"c{i % len(PALETTE)}" for i, k in enumerate(colour_keys)}
    h = _lane_height(sum(lane.rows for lane in lanes))
    every = max(1, math.ceil(10 / h))  # label every lane when they are tall enough to read
    titled = sum(len(lane.bars) for lane in lanes) <= TITLE_LIMIT
    kills = [e for e in events if e["event"] == "killed"]
    step = _ticks(span)
    ticks = [t0 + i * step for i in range(int(span / step) + 1)]

    out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           "<style>" + CSS + "".join(f".c{i}{{fill:{c}}}" for i, c in enumerate(PALETTE)) + "</style></head><body>"]
    out.append(f"<h1>{html.escape(title)}</h1>")
    counts = {k: sum(1 for e in events if e["event"] == k) for k in ("acquired", "released", "lost", "killed")}
    shards = {b.shards[0] for b in bars}
    out.append(f"<p>{len(events)} events" + (f" from {html.escape(', '.join(sources))}" if sources else "")
               + (f"; {_when(t0)} to {_when(t1)} ({t1 - t0:.3f} s)" if events else "") + "</p>")
    out.append(f"<p>{len(shards)} shards, {len(slices)} slices, {len(workers)} workers, {len(bars)} holds: "
               f"{counts['acquired']} acquisitions, {counts['released']} releases, {counts['lost']} losses, "
               f"{counts['killed']} kills; one lane per {mode} ({len(lanes)} lanes)</p>")
    overlaps = sum(len(lane.overlaps) for lane in lanes)
    if overlaps:
        out.append(f'<p class="bad">{overlaps} overlap(s): two owners held a {mode} at once (red bands)</p>')
    gaps = [(g1 - g0, lane.key) for lane in lanes for g0, g1 in lane.gaps if g0 > t0 and g1 < t1]
    if gaps:
        longest = max(gaps)
        out.append(f"<p>longest unowned stretch between two holds: {longest[0]:.3f} s ({html.escape(longest[1])})</p>")
    if not titled:
        out.append(f"<p>{sum(len(lane.bars) for lane in lanes)} bars: hover a lane's label for its figures</p>")
    out.append('<p class="legend">' + "".join(
        f'<span><svg width="16" height="12" style="display:inline"><path class="{k}" d="{d}"/></svg>{label}</span>'
        for k, d, label in (("acq", "M8 0v12", "acquired"), ("released", "M8 0v12", "released"),
                            ("lost", "M4 2l8 8m0-8l-8 8", "lost"), ("killed", "M4 2l8 8m0-8l-8 8", "killed"),
                            ("exited", "M4 2l8 8m0-8l-8 8", "process exited"))) +
        ("" if mode == "worker" else '<span><span class="sw" style="background:repeating-linear-gradient('
         '45deg,#fff 0 2px,#c33 2px 3px)"></span>unowned</span>') + "".join(
        f'<span><span class="sw" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
        f'{"slice " if mode == "worker" else ""}{html.escape(_short(k, 30))}</span>'
        for i, k in enumerate(colour_keys[:24]))
        + (f"<span>… {len(colour_keys) - 24} more</span>" if len(colour_keys) > 24 else "") + "</p>")

    axis = [f'<div class="axis"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{AXIS_H}">']
    axis.append(f'<text x="4" y="{AXIS_H - 8}">seconds from {html.escape(_when(t0))}</text>')
    for t in ticks:
        axis.append(f'<text x="{x(t)}" y="14" text-anchor="middle">{t - t0:g}</text>')
    axis.append('<path class="grid" d="' + "".join(f"M{x(t)} 18v{AXIS_H - 18}" for t in ticks) + '"/>')
    for e in kills:
        tx = float(x(float(e["t"])))
        axis.append(f'<path class="tri" d="M{tx - 5:.1f} 22h10l-5 10z"><title>{html.escape(_kill_text(e, t0))}'
                    "</title></path>")
    axis.append("</svg></div>")
    out.extend(axis)

    total = sum(lane.rows for lane in lanes) * h
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{max(total, h)}">',
            '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
            '<rect width="1.5" height="6" fill="#c33"/></pattern></defs>']
    body.append('<path class="grid" d="' + "".join(f"M{x(t)} 0v{total}" for t in ticks) + '"/>')
    y = 0
    for n, lane in enumerate(lanes):
        lh = lane.rows * h
        body.append(f"<g><title>{html.escape(_lane_text(lane))}</title>")
        if n % 2:
            body.append(f'<rect class="alt" x="0" y="{y}" width="{width}" height="{lh}"/>')
        if n % every == 0:
            body.append(f'<text x="4" y="{y + min(lh, h) / 2 + 4:.1f}" font-size="{min(11, h)}">'
                        f"{html.escape(_short(lane.title))}</text>")
        if lane.gaps:
            body.append('<path class="gap" d="' + "".join(
                f"M{x(a)} {y}H{x(b)}v{lh}H{x(a)}z" for a, b in lane.gaps) + '"/>')
        marks: dict[str, list[str]] = defaultdict(list)
        pad = 1 if h > 4 else 0
        for i, b in enumerate(lane.bars):
            by_ = y + (lane.row_of[i] if lane.row_of else 0) * h
            x0, x1 = x(b.start), x(b.end)
            w = max(float(x1) - float(x0), 0.5)
            rect = f'<rect class="{colour.get((b.slice or "") if mode == "worker" else worker_of(b.owner), "c0")}" ' \
                   f'x="{x0}" y="{by_ + pad}" width="{w:.1f}" height="{h - 2 * pad}"'
            body.append(rect + (f"><title>{html.escape(_bar_text(b, t0))}</title></rect>" if titled else "/>"))
            marks["acq"].append(f"M{x0} {by_}v{h}")
            if b.ended == "released":
                marks["released"].append(f"M{x1} {by_}v{h}")
            elif b.ended != "open":
                r = min(4, h / 2)
                marks[b.ended].append(f"M{float(x1) - r:.1f} {by_ + h / 2 - r:.1f}l{2 * r:g} {2 * r:g}"
                                      f"m0 {-2 * r:g}l{-2 * r:g} {2 * r:g}")
        for kind, parts in marks.items():
            body.append(f'<path class="{kind}" d="{"".join(parts)}"/>')
        if lane.overlaps:
            body.append('<path class="ovl" d="' + "".join(
                f"M{x(a)} {y}H{max(float(x(b)), float(x(a)) + 1):.1f}v{lh}H{x(a)}z" for a, b in lane.overlaps)
                + '"/>')
        body.append("</g>")
        y += lh
    if kills:
        body.append('<path class="kill" d="' + "".join(f"M{x(float(e['t']))} 0v{total}" for e in kills) + '"/>')
    body.append("</svg>")
    out.extend(body)
    if not events:
        out.append("<p>no events: nothing to draw</p>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _bar_text(b: Bar, t0: float) -> str:
    what = f"{len(b.shards)} shards" if len(b.shards) > 1 else b.shards[0]
    return (f"{what}: {b.owner} token {b.token}, {b.start - t0:.3f} s to {b.end - t0:.3f} s "
            f"({b.end - b.start:.3f} s), {'held at the end' if b.ended == 'open' else b.ended}"
            + (f", slice {b.slice}" if b.slice else ""))


def _lane_text(lane: Lane) -> str:
    unowned = sum(b - a for a, b in lane.gaps)
    return (f"{lane.title}: {len(lane.bars)} holds, {len({b.owner for b in lane.bars})} owners, "
            f"unowned {unowned:.3f} s" + (f", {len(lane.overlaps)} overlaps" if lane.overlaps else ""))


def _kill_text(e: Mapping[str, Any], t0: float) -> str:
    return f"killed pid {e.get('pid')} on {e.get('host')} at {float(e['t']) - t0:.3f} s: {e.get('reason', '')}"


def write_timeline(paths: Sequence[str | Path], out: str | Path, *, by: str = "auto",
                   title: str = "shardpreempt timeline") -> int:
    """Read ``--events`` files and write their timeline to ``out``; the number of events drawn."""
    events = read_events(paths)
    page = render(events, by=by, title=title, sources=[str(p) for p in paths])
    Path(out).write_text(page, encoding="utf-8")
    return len(events)
