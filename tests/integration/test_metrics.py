"""``run --metrics``: a real run's /metrics, scraped and parsed with prometheus_client's parser."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shardpreempt.testing import wait_until
from shardpreempt.testing.servers import unique

from ..conftest import get_server
from .conftest import alive, cli, events, write_config

pytest.importorskip("prometheus_client", reason="the 'metrics' extra is not installed")
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
START = re.compile(r"metrics http://(\S+)/metrics")


def address_of(run: Any) -> str:
    """The bound HOST:PORT, from the run's start line (the config asks for port 0)."""
    match = wait_until(lambda: START.search(run.stderr()), timeout=30, message="the start line")
    return match[1]


def scrape(address: str) -> Samples:
    """Every sample of /metrics: name -> labels -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(v for k, v in samples.get(name, {}).items() if set(labels.items()) <= set(k))


def until(address: str, check: Callable[[Samples], bool], message: str, timeout: float = 30) -> Samples:
    """Scrape until ``check`` holds; the samples that passed."""
    return wait_until(lambda: (s := scrape(address)) and check(s) and s, timeout=timeout, interval=0.05,
                      message=message)


def test_metrics_show_ownership_acquisitions_and_a_killed_workers_loss_and_restart(
        tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """Owned shards add up to the config's; acquisitions match the events; a SIGKILLed worker's slices
    count as lost at its exit, its restart is counted, and the pool is whole again."""
    cfg = write_config(tmp_path / "c.toml", 12, lockdir)
    ev = tmp_path / "events.jsonl"
    run = start_run(str(cfg), "-w", "3", "--events", str(ev), "--metrics", "127.0.0.1:0", "--", "sleep", "3600")
    address = address_of(run)
    s = until(address, lambda s: total(s, "shardpreempt_shards_owned") == 12
              and total(s, "shardpreempt_slices_owned") == 3, "every shard owned")
    assert total(s, "shardpreempt_pool_shards") == 12 and total(s, "shardpreempt_pool_slices") == 3
    assert total(s, "shardpreempt_workers_alive") == 3
    assert {dict(k)["worker"] for k in s["shardpreempt_shards_owned"]} == {"0", "1", "2"}
    acquired = {(e["worker"], e["slice"]) for e in events(ev) if e["event"] == "acquired"}
    released = {(e["worker"], e["slice"]) for e in events(ev) if e["event"] in ("released", "lost")}
    s = until(address, lambda s: total(s, "shardpreempt_acquisitions_total") == len(acquired), "acquisitions")
    assert total(s, "shardpreempt_acquisitions_total") - len(released) == 3
    # worker 0 counts the members at its next look after the last one joined (a ring, or a second)
    s = until(address, lambda s: total(s, "shardpreempt_members_seen", worker="0") == 3, "worker 0 sees 3 members")
    assert total(s, "shardpreempt_worker_restarts_total") == 0 and total(s, "shardpreempt_lost_at_exit_total") == 0
    assert set(s["shardpreempt_worker_restarts_total"]) == {(("worker", str(i)),) for i in range(3)}

    victim = next(k for k, v in s["shardpreempt_slices_owned"].items() if v > 0)
    index, held = dict(victim)["worker"], s["shardpreempt_slices_owned"][victim]
    pid = next(e["worker_pid"] for e in reversed(events(ev)) if e["event"] == "started" and e["worker"] == int(index))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), message="the worker's death")
    s = until(address, lambda s: total(s, "shardpreempt_worker_restarts_total", worker=index) == 1
              and total(s, "shardpreempt_shards_owned") == 12 and total(s, "shardpreempt_workers_alive") == 3,
              "the restart and a whole pool again")
    assert total(s, "shardpreempt_lost_at_exit_total") == held
    assert total(s, "shardpreempt_worker_restarts_total") == 1  # only the victim was restarted
    assert total(s, "shardpreempt_losses_total") == 0  # no lease was lost by a living worker
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


def test_job_runs_failures_and_durations(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """Worker 0's command succeeds, worker 1's fails: runs, failures and the duration histogram count them;
    every reason of the fixed sets is shown from the start."""
    cfg = write_config(tmp_path / "c.toml", 4, lockdir)
    run = start_run(str(cfg), "-w", "2", "--backoff", "0", "--max-failures", "1000", "--metrics", "127.0.0.1:0",
                    "--", "sh", "-c", 'test "$SHARDPREEMPT_WORKER" = 0')
    address = address_of(run)
    s = until(address, lambda s: total(s, "shardpreempt_job_failures_total") >= 3  # worker 1's runs fail,
              and total(s, "shardpreempt_job_runs_total") - total(s, "shardpreempt_job_failures_total") >= 3,
              "runs and failures")  # worker 0's succeed
    runs = total(s, "shardpreempt_job_runs_total")
    assert total(s, "shardpreempt_job_duration_seconds_count") == runs
    assert total(s, "shardpreempt_job_duration_seconds_bucket", le="+Inf") == runs
    assert 0 < total(s, "shardpreempt_job_duration_seconds_sum") < runs * 10
    assert total(s, "shardpreempt_releases_total", reason="failed") == 0  # --max-failures is far off
    assert {dict(k)["reason"] for k in s["shardpreempt_losses_total"]} == {"expired", "superseded", "released",
                                                                          "self-fenced"}
    assert {dict(k)["reason"] for k in s["shardpreempt_releases_total"]} == {"handoff", "done", "failed", "stopped"}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{address}/other", timeout=10)
    assert err.value.code == 404
    err.value.close()


def test_renewals_on_a_server_backend(tmp_path: Path, servers: Any, start_run: Any) -> None:
    """On Redis the session's renewals are timed and the time since the last one stays below the ttl."""
    url = get_server(servers, "redis").url(unique())
    cfg = write_config(tmp_path / "c.toml", 4, url, ttl=1.5)
    run = start_run(str(cfg), "-w", "2", "--metrics", "127.0.0.1:0", "--", "sleep", "3600")
    address = address_of(run)
    s = until(address, lambda s: total(s, "shardpreempt_renewal_duration_seconds_count") >= 4
              and len(s.get("shardpreempt_seconds_since_renewal", {})) == 2, "renewals")
    assert total(s, "shardpreempt_shards_owned") == 4
    assert all(0 <= v < 1.5 for v in s["shardpreempt_seconds_since_renewal"].values())
    assert total(s, "shardpreempt_renewal_failures_total") == 0
    assert total(s, "shardpreempt_renewal_duration_seconds_bucket", le="+Inf") == total(
        s, "shardpreempt_renewal_duration_seconds_count")


def test_bad_or_busy_address_is_refused_with_exit_status_2(tmp_path: Path, lockdir: str) -> None:
    """A malformed, out-of-range, busy or foreign address: exit status 2, one line naming where it came from."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = f"127.0.0.1:{busy.getsockname()[1]}"
    try:
        for value in ("nonsense", "127.0.0.1:99999", "127.0.0.1", taken, "192.0.2.1:9100"):
            result = cli("run", str(cfg), "--metrics", value, "--", "true")
            assert result.returncode == 2, (value, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "--metrics" in lines[0] and "Traceback" not in result.stderr, lines
        env = {**os.environ, "SHARDPREEMPT_METRICS": "nonsense"}
        result = cli("run", str(cfg), "--", "true", env=env)
        assert result.returncode == 2 and "SHARDPREEMPT_METRICS" in result.stderr
        (tmp_path / "bad.toml").write_text(cfg.read_text() + '\n[run]\nmetrics = "localhost"\n')
        result = cli("run", str(tmp_path / "bad.toml"), "--", "true")
        assert result.returncode == 2 and "run.metrics" in result.stderr and str(tmp_path / "bad.toml") in result.stderr
    finally:
        busy.close()


def test_flag_over_variable_over_file(tmp_path: Path, lockdir: str) -> None:
    """The address comes from the flag, else SHARDPREEMPT_METRICS, else [run] metrics (a busy port loses)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = f"127.0.0.1:{busy.getsockname()[1]}"
    cfg = write_config(tmp_path / "c.toml", 2, lockdir, extra=f'[run]\nmetrics = "{taken}"\n')
    try:
        refused = cli("run", str(cfg), "--once", "--", "true")
        assert refused.returncode == 2 and taken in refused.stderr
        env = {**os.environ, "SHARDPREEMPT_METRICS": "127.0.0.1:0"}
        by_variable = cli("run", str(cfg), "--once", "--", "true", env=env)
        assert by_variable.returncode == 0, by_variable.stderr
        env["SHARDPREEMPT_METRICS"] = taken
        by_flag = cli("run", str(cfg), "--once", "--metrics", "127.0.0.1:0", "--", "true", env=env)
        assert by_flag.returncode == 0, by_flag.stderr
        for result in (by_variable, by_flag):
            shown = START.findall(result.stderr)
            assert len(shown) == 1 and shown[0] != taken and shown[0].startswith("127.0.0.1:")
    finally:
        busy.close()


def test_without_the_library_one_line_names_the_extra(tmp_path: Path, lockdir: str) -> None:
    """prometheus_client not importable: exit status 2 and one line saying which extra to install."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    blocked = ("import sys; sys.modules['prometheus_client'] = None; "
               "from shardpreempt.cli import main; main(prog_name='shardpreempt')")
    result = subprocess.run([sys.executable, "-c", blocked, "run", str(cfg), "--metrics", "127.0.0.1:0", "--",
                             "true"], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "shardpreempt[metrics]" in lines[0] and "--metrics" in lines[0] and "prometheus-client" in lines[0]
    without = subprocess.run([sys.executable, "-c", blocked, "run", str(cfg), "--once", "--", "true"],
                             capture_output=True, text=True, timeout=60)
    assert without.returncode == 0, without.stderr  # the library is needed only with --metrics
