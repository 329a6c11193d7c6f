"""What ``run`` writes to stderr: a start line and ownership lines, JSON lines, no secrets, repeats limited."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardpreempt.testing import wait_until
from shardpreempt.testing.fixtures import running_server
from shardpreempt.testing.servers import unique
from shardpreempt.testing.servers.redis import RedisServer

from .conftest import cli, events, write_config

FIELDS = {"time", "level", "worker", "slice", "event", "message"}
OWNERSHIP = re.compile(r" INFO shardpreempt\.ownership: worker (\d+) (acquired|released|lost) slice (\w+) \(")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object with exactly the six fields (a failure names the line)."""
    out = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict) and set(obj) == FIELDS, line
        out.append(obj)
    return out


def test_by_default_a_run_writes_its_start_line_and_one_line_per_ownership_change(tmp_path: Path,
                                                                                   lockdir: str) -> None:
    """Without -v: one start line (layout, backend, workers, events, metrics), then only ownership lines."""
    cfg = write_config(tmp_path / "c.toml", 6, lockdir)
    ev = tmp_path / "events.jsonl"
    result = cli("run", str(cfg), "-w", "2", "--once", "--events", str(ev), "--", "true")
    assert result.returncode == 0, result.stderr
    start, *rest = result.stderr.splitlines()
    assert " INFO shardpreempt.run: started: 2 slices (round-robin) of 6 shards" in start
    assert f"on {lockdir}, 2 workers, events {ev}, metrics off" in start
    changes = [OWNERSHIP.search(line) for line in rest]
    assert all(changes), rest
    logged = sorted((int(m[1]), m[2], m[3]) for m in changes if m)
    written = sorted({(e["worker"], e["event"], e["slice"]) for e in events(ev) if "slice" in e})
    assert logged == written and any(kind == "released" for _, kind, _ in logged)
    assert "hunter2" not in result.stderr


def test_json_lines_on_a_backend_with_a_password_show_no_secret(tmp_path: Path) -> None:
    """--log-format json with -v: every line one object with the six fields; neither the backend's password
    nor a shard's appears anywhere, even in a dead worker's warnings."""
    with running_server("redis", lambda: RedisServer(password="s3cr3t-url-pw")) as server:
        url = server.url(unique())
        assert "s3cr3t-url-pw" in url
        cfg = write_config(tmp_path / "c.toml", 4, url, ttl=2.0)  # each shard has api_password = "hunter2-N"
        ev = tmp_path / "events.jsonl"
        err_path = tmp_path / "stderr"
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "-vv", "run", str(cfg), "-w", "2",
                                     "--events", str(ev), "--log-format", "json", "--", "sleep", "3600"],
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                wait_until(lambda: len({e["shard"] for e in events(ev) if e["event"] == "acquired"}) == 4,
                           timeout=30, message="every shard owned")
                pid = next(e["worker_pid"] for e in events(ev) if e["event"] == "started" and e["worker"] == 0)
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: "died with signal 9" in err_path.read_text(), timeout=30, message="the warning")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    text = err_path.read_text()
    assert "s3cr3t-url-pw" not in text and "hunter2" not in text
    lines = json_lines(text)
    start = [line for line in lines if line["event"] == "start"]
    assert len(start) == 1 and "redis://:***@" in start[0]["message"] and start[0]["worker"] is None
    acquired = [line for line in lines if line["event"] == "acquired"]
    assert acquired and all(isinstance(line["worker"], int) and line["slice"] for line in acquired)
    died = next(line for line in lines if "died with signal 9" in line["message"])
    assert died["worker"] == 0 and died["level"] == "warning" and died["event"] == "supervisor"
    assert {line["level"] for line in lines} <= {"debug", "info", "warning", "error"}
    assert all(line["time"].endswith("Z") for line in lines)


def test_log_format_from_the_variable_and_the_file_and_a_fatal_error_as_json(tmp_path: Path,
                                                                             lockdir: str) -> None:
    """SHARDPREEMPT_LOG_FORMAT and [run] log_format choose JSON (the flag wins over both); a bad value is
    exit status 2 naming where it came from; with JSON chosen, a fatal error is one JSON line too."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    env = {**os.environ, "SHARDPREEMPT_LOG_FORMAT": "json"}
    by_variable = cli("run", str(cfg), "--once", "--", "true", env=env)
    assert by_variable.returncode == 0 and json_lines(by_variable.stderr)[0]["event"] == "start"
    by_flag = cli("run", str(cfg), "--once", "--log-format", "text", "--", "true", env=env)
    assert by_flag.returncode == 0 and " INFO shardpreempt.run: started: " in by_flag.stderr.splitlines()[0]
    in_file = write_config(tmp_path / "j.toml", 2, lockdir, extra='[run]\nlog_format = "json"\n')
    by_file = cli("run", str(in_file), "--once", "--", "true")
    assert by_file.returncode == 0 and len(json_lines(by_file.stderr)) >= 3
    bad = cli("run", str(cfg), "--once", "--", "true", env={**os.environ, "SHARDPREEMPT_LOG_FORMAT": "yaml"})
    assert bad.returncode == 2 and "SHARDPREEMPT_LOG_FORMAT" in bad.stderr and len(bad.stderr.splitlines()) == 1
    bad_file = write_config(tmp_path / "b.toml", 2, lockdir, extra='[run]\nlog_format = "xml"\n')
    result = cli("run", str(bad_file), "--", "true")
    assert result.returncode == 2 and "run.log_format" in result.stderr
    fatal = cli("run", str(cfg), "--log-format", "json", "--backend", "nosuch://u:hunter2@h/", "--", "true")
    (line,) = json_lines(fatal.stderr)
    assert fatal.returncode == 2 and line["event"] == "fatal" and "--backend" in line["message"]
    assert "hunter2" not in fatal.stderr


def test_a_repeating_warning_is_written_once_per_ten_seconds(tmp_path: Path, lockdir: str) -> None:
    """A command failing again and again: one warning line, not one per failure."""
    cfg = write_config(tmp_path / "c.toml", 1, lockdir)
    runs = tmp_path / "runs"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "run", str(cfg), "--backoff", "0",
                             "--max-failures", "1000", "--", "sh", "-c", f"echo x >> {runs}; exit 3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 20, timeout=60,
                   message="20 failed runs")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    warnings = [line for line in stderr.splitlines() if "command exited with 3" in line]
    assert 1 <= len(warnings) <= elapsed / 10 + 1, warnings
    assert all("(repeated " in line for line in warnings[1:])
