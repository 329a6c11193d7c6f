"""``shardpreempt timeline`` and the demo's timeline: lanes, bars and marks drawn from real event files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from shardpreempt.history import check, read_events
from shardpreempt.testing.skips import missing
from shardpreempt.timeline import PALETTE, render, worker_of

from .conftest import cli

SVG = "{http://www.w3.org/2000/svg}"


def svgs(page: str) -> list[ET.Element]:
    """The page's inline SVG elements, parsed (each must be well-formed XML)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg xmlns=.*?</svg>", page, re.S)]


def lanes(page: str) -> list[ET.Element]:
    """The chart's lanes: one ``<g>`` per shard, slice or worker in the second SVG."""
    return svgs(page)[1].findall(f"{SVG}g")


def by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == cls]


def bars(chart: ET.Element) -> list[ET.Element]:
    """The hold bars: rectangles in a worker's (or slice's) colour class ``cN``."""
    return [e for e in chart.iter(f"{SVG}rect") if re.fullmatch(r"c\d+", e.get("class", ""))]


def segments(paths: list[ET.Element]) -> int:
    """How many marks some paths draw (each mark starts with one ``M``)."""
    return sum(p.get("d", "").count("M") for p in paths)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``shardpreempt demo --keep`` run in a private TMPDIR: its output, directory and events."""
    tmp = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "TMPDIR": str(tmp)}
    result = cli("demo", "--items", "25", "--keep", timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (base,) = tmp.glob("shardpreempt-demo-*")
    return {"stdout": result.stdout, "dir": base, "events": base / "events.jsonl"}


def test_demo_keep_keeps_its_directory_with_events_and_timeline(demo_run: dict[str, Any]) -> None:
    """With --keep the demo's temporary directory stays, holding the events and the timeline it prints."""
    base = demo_run["dir"]
    assert base.is_dir() and demo_run["events"].is_file()
    page = base / "timeline.html"
    assert f"timeline: {page}" in demo_run["stdout"] and f"files kept in {base}" in demo_run["stdout"]
    assert len(lanes(page.read_text())) == 6  # one lane per shard


def test_demo_removes_its_temporary_directory_and_keeps_the_timeline(tmp_path: Path) -> None:
    """Without --keep the demo removes its temporary directory; the timeline it prints is a file of its own."""
    result = cli("demo", "--items", "10", "--no-kill", timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [p for p in tmp_path.glob("shardpreempt-demo-*") if p.is_dir()]
    (page,) = re.findall(r"^timeline: (.+\.html)$", result.stdout, re.M)
    assert Path(page).parent == tmp_path and Path(page).is_file()
    assert len(lanes(Path(page).read_text())) == 6


def test_demo_output_separates_its_tables_and_ends_with_the_final_owners(demo_run: dict[str, Any]) -> None:
    """Piped, the demo's last frame is the final ownership (not an all-free table), and tables do not run together."""
    out = demo_run["stdout"]
    assert "final ownership (from the events): 6/6 shards were held" in out
    assert "0/6 shards owned" not in out
    assert not re.search(r"[┘╯]\S", out), "a table's last line runs into the next text"
    owners = re.findall(r"│ shard\d │ (\S+) +│ \d+ +│ \d+ +│ released", out)
    assert len(owners) == 6


def test_timeline_of_the_demo_draws_every_hold_and_the_kill(demo_run: dict[str, Any], tmp_path: Path) -> None:
    """Each shard is a lane; every hold a bar with an acquisition mark; the SIGKILL a line and killed marks."""
    out = tmp_path / "t.html"
    result = cli("timeline", str(demo_run["events"]), "-o", str(out))
    assert result.returncode == 0, result.stderr
    history = read_events([demo_run["events"]])
    holds = check(history).holds
    page = out.read_text()
    axis, chart = svgs(page)
    assert len(lanes(page)) == len({h.shard for h in holds}) == 6
    assert len(bars(chart)) == len(holds)
    assert segments(by_class(chart, "acq")) == len(holds)
    ended = Counter(e["event"] for e in history)
    assert segments(by_class(chart, "released")) == ended["released"]
    assert ended["killed"] == 1 and segments(by_class(chart, "kill")) == 1
    assert len(by_class(axis, "tri")) == 1
    # the killed worker's holds end at the kill, each with a killed mark, and its shards are taken over
    assert segments(by_class(chart, "killed")) == len(holds) - ended["released"]
    assert by_class(chart, "gap"), "unowned stretches (before the first acquisition) are hatched"
    assert not by_class(chart, "ovl") and 'class="bad"' not in page
    titles = [t.text or "" for t in chart.iter(f"{SVG}title")]
    assert any("killed" in t for t in titles) and any("released" in t for t in titles)
    assert "<script" not in page and "href=" not in page and "src=" not in page  # nothing to fetch


def test_timeline_lanes_by_worker_and_by_slice(demo_run: dict[str, Any], tmp_path: Path) -> None:
    """--by worker gives one lane per worker identity, --by slice one per slice id."""
    history = read_events([demo_run["events"]])
    acquired = [e for e in history if e["event"] == "acquired"]
    for by, expected in (("worker", {worker_of(e["owner"]) for e in acquired}),
                         ("slice", {e["slice"] for e in acquired})):
        out = tmp_path / f"{by}.html"
        assert cli("timeline", str(demo_run["events"]), "-o", str(out), "--by", by).returncode == 0
        drawn = [g.find(f"{SVG}title").text or "" for g in lanes(out.read_text())]  # type: ignore[union-attr]
        assert sorted(t.split(":")[0].split(" ", 1)[1] for t in drawn) == sorted(expected)


def write_events(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_timeline_marks_a_loss_and_an_overlap(tmp_path: Path) -> None:
    """A lost lease is marked, and two owners holding one shard at once show a red band and a warning."""
    ev = [{"t": 100.0, "event": "acquired", "shard": "a", "owner": "h/1.0:10:x", "token": 1, "pid": 10, "host": "h"},
          {"t": 101.0, "event": "lost", "shard": "a", "owner": "h/1.0:10:x", "pid": 10, "host": "h", "reason": "r"},
          {"t": 102.0, "event": "acquired", "shard": "a", "owner": "h/1.1:11:y", "token": 2, "pid": 11, "host": "h"},
          {"t": 102.5, "event": "acquired", "shard": "a", "owner": "h/1.0:12:z", "token": 3, "pid": 12, "host": "h"},
          {"t": 104.0, "event": "released", "shard": "a", "owner": "h/1.1:11:y", "pid": 11, "host": "h"}]
    out = tmp_path / "t.html"
    result = cli("timeline", str(write_events(tmp_path / "e.jsonl", ev)), "-o", str(out))
    assert result.returncode == 0 and "5 events" in result.stdout
    page = out.read_text()
    chart = svgs(page)[1]
    assert segments(by_class(chart, "lost")) == 1 and segments(by_class(chart, "ovl")) == 1
    assert segments(by_class(chart, "gap")) == 1  # 101 -> 102, nobody held it
    assert "1 overlap(s)" in page


def test_timeline_groups_ten_thousand_shards_by_slice(tmp_path: Path) -> None:
    """With 10,000 shards the lanes are the 100 slices, each slice's shards one bar per hold."""
    rows = []
    for s in range(100):
        owner = f"h/1.{s % 7}:{s}:x"
        for i in range(100):
            base = {"shard": f"s{s * 100 + i}", "owner": owner, "slice": f"slice{s:03}", "pid": s, "host": "h"}
            rows.append({"t": 10.0 + s / 100, "event": "acquired", "token": 1, **base})
            rows.append({"t": 20.0 + s / 100, "event": "released", **base})
    page = render(rows)
    assert len(lanes(page)) == 100 and "one lane per slice (100 lanes)" in page
    assert len(bars(svgs(page)[1])) == 100


def test_a_bad_events_file_is_one_clear_error(tmp_path: Path) -> None:
    """A file that is not JSON lines of events gives exit status 2 and one line naming it."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = cli("timeline", str(bad), "-o", str(tmp_path / "t.html"))
    assert result.returncode == 2 and str(bad) in result.stderr and "Traceback" not in result.stderr


def test_chromium_draws_the_timeline(demo_run: dict[str, Any], tmp_path: Path) -> None:
    """Headless Chromium loads the page (no network) and paints each worker's colour and the unowned hatching."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        missing("chromium is not installed (Debian package chromium)")
    page = demo_run["dir"] / "timeline.html"
    shot = tmp_path / "timeline.png"
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1560,400"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 2 + 5  # axis, chart, and the legend's five mark swatches
    assert dom.stdout.count("<rect") == page.read_text().count("<rect")
    done = subprocess.run([*args, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=60)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    raw = rgb.tobytes()
    seen = Counter(raw[i:i + 3] for i in range(0, len(raw), 3))
    workers = len({worker_of(e["owner"]) for e in read_events([demo_run["events"]]) if e["event"] == "acquired"})
    painted = [c for c in PALETTE[:workers] if seen[bytes.fromhex(c[1:])] > 2000]
    assert len(painted) == workers, (painted, seen.most_common(8))
    assert seen[bytes.fromhex("cc3333")] > 20, "the unowned hatching is painted"
    assert seen[b"\xff\xff\xff"] < width * height, "not a blank page"
