"""shardpreempt.logs: repeats limited by a fake clock, JSON lines with their fields, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from shardpreempt import logs
from shardpreempt.testing import FakeClock


def record(msg: str, *args: object, level: int = logging.WARNING, name: str = "shardpreempt.worker",
           **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_a_repeated_warning_is_written_once_per_interval_then_says_how_many_were_held_back() -> None:
    """Same logger, template and worker: one line per interval; the next one written carries the count."""
    clock = FakeClock()
    limit = logs.RateLimit(10.0, clock.monotonic)
    assert limit.filter(record("renewal of slice %s failed", "a"))
    clock.advance(1)
    assert not limit.filter(record("renewal of slice %s failed", "b"))  # the template repeats, whatever the args
    assert not limit.filter(record("renewal of slice %s failed", "c"))
    clock.advance(8.9)
    assert not limit.filter(record("renewal of slice %s failed", "d"))
    clock.advance(0.2)  # 10.1 s after the first line written
    again = record("renewal of slice %s failed", "e")
    assert limit.filter(again) and again.__dict__["repeated"] == 3
    clock.advance(10)
    quiet = record("renewal of slice %s failed", "f")
    assert limit.filter(quiet) and quiet.__dict__["repeated"] == 0


def test_the_limit_keeps_loggers_templates_workers_and_levels_apart() -> None:
    """Another template, logger or worker is another key; info and debug lines are never held back."""
    clock = FakeClock()
    limit = logs.RateLimit(10.0, clock.monotonic)
    assert limit.filter(record("worker %d died", 1, worker=1))
    assert limit.filter(record("worker %d died", 2, worker=2))
    assert not limit.filter(record("worker %d died", 1, worker=1))
    assert limit.filter(record("worker %d died", 1, worker=1, name="shardpreempt.supervisor"))
    assert limit.filter(record("something else"))
    assert limit.filter(record("x", level=logging.ERROR))
    for _ in range(3):
        assert limit.filter(record("worker %d owns slice %s", 1, "a", level=logging.INFO))
        assert limit.filter(record("looked", level=logging.DEBUG))


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The package's handler, set up as the command line does, writing to a buffer."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup(0, "json", run=True)
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    logs.setup(0, "text")
    logs.set_worker(None)
    logging.captureWarnings(False)
    root.handlers[:], root.level = saved


def test_json_lines_carry_time_level_worker_slice_event_and_message(captured: io.StringIO) -> None:
    """One object per line with the six fields; the start line and ownership lines show without -v."""
    logs.start_line(layout="2 slices (round-robin) of 4 shards", url="redis://app:hunter2@db:6379/0", workers=2,
                    events=None, metrics="127.0.0.1:9100")
    logs.set_worker(1)
    logs.ownership("acquired", worker=1, slice_id="ab12", shards=2)
    logging.getLogger("shardpreempt.worker").info("not shown without -v")
    logging.getLogger("shardpreempt.worker").warning("login to %s failed (password=%s)", "redis://u:hunter2@h/",
                                                     "hunter2")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [set(line) for line in lines] == [{"time", "level", "worker", "slice", "event", "message"}] * 3
    start, owned, warning = lines
    assert start["event"] == "start" and start["worker"] is None and start["level"] == "info"
    assert "http://127.0.0.1:9100/metrics" in start["message"] and "2 workers" in start["message"]
    assert start["time"].endswith("Z")
    assert owned == {**owned, "event": "acquired", "worker": 1, "slice": "ab12", "level": "info"}
    assert warning["worker"] == 1 and warning["event"] == "worker" and warning["level"] == "warning"
    assert "hunter2" not in captured.getvalue()


def test_scrub_masks_url_passwords_and_secret_pairs() -> None:
    """Credentials in URLs and values of secret-named key=value pairs are masked; the rest stays."""
    text = logs.scrub("connect postgresql://app:s3cr3t@db:5432/x?sslmode=require failed; api_token=abc shard=s1")
    assert "s3cr3t" not in text and "abc" not in text
    assert "db:5432" in text and "shard=s1" in text and "api_token=***" in text
