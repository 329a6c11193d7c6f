"""The console script end to end: bad input, plan, status, run --once, demo."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardpreempt.testing import wait_until

from .conftest import cli, events, write_config

BAD = {
    "syntax": ("[shards.a\n", "TOML syntax error"),
    "unknown key": ("[shards.a]\n[backend]\ncolour = 1\n", "backend.colour"),
    "wrong type": ("[shards.a]\n[backend]\nttl = 'soon'\n", "backend.ttl"),
    "empty shard list": ("[backend]\nttl = 1\n", "shards"),
    "duplicate identity": ("[shards.a]\nidentity = 'x'\n[shards.b]\nidentity = 'x'\n", "shards.b"),
    "bad url": ("[shards.a]\n[backend]\nurl = 'postgres//u:hunter2@h'\n", "backend.url"),
    "negative ttl": ("[shards.a]\n[backend]\nttl = -3\n", "backend.ttl"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_clear_error_with_exit_status_2(tmp_path: Path, case: str) -> None:
    """Each bad input gives exit status 2, one message naming the file and key, no traceback, no secret."""
    text, key = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in (["plan", str(path)], ["status", str(path)], ["run", str(path), "--", "true"]):
        result = cli(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert str(path) in result.stderr and key in result.stderr
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist is reported with exit status 2."""
    result = cli("plan", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "file not found" in result.stderr and "Traceback" not in result.stderr


def test_bad_backend_flag_exits_2(tmp_path: Path) -> None:
    """A --backend URL with an unknown scheme is rejected without echoing its password."""
    cfg = write_config(tmp_path / "c.toml", 2, f"file://{tmp_path}/l")
    result = cli("status", str(cfg), "--backend", "nosuch://u:hunter2@h/")
    assert result.returncode == 2 and "--backend" in result.stderr and "hunter2" not in result.stderr


def test_plan_shows_stable_slices(tmp_path: Path) -> None:
    """plan prints the slices, the same ids on every call, without a backend."""
    cfg = write_config(tmp_path / "c.toml", 5, "redis://u:hunter2@127.0.0.1:1/0")
    first = json.loads(cli("plan", str(cfg), "-w", "2", "--json").stdout)
    again = json.loads(cli("plan", str(cfg), "-w", "2", "--json").stdout)
    assert first == again and [s["shards"] for s in first["slices"]] == [["s0", "s2", "s4"], ["s1", "s3"]]
    assert first["layout"]["slices"] == 2 and first["layout"]["strategy"] == "round-robin"
    human = cli("plan", str(cfg), "-w", "2", "--strategy", "contiguous")
    assert human.returncode == 0 and "2 slices (contiguous) of 5 shards" in human.stdout
    assert "hunter2" not in human.stdout


def test_plan_shows_ids_that_look_like_markup(tmp_path: Path) -> None:
    """plan's text output shows every shard name as written, even ones that look like rich markup tags."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[shards."[bold]"]\n[shards."[red]x[/red]"]\n')
    result = cli("plan", str(cfg))
    assert result.returncode == 0 and "[bold]" in result.stdout and "[red]x[/red]" in result.stdout


def test_run_once_processes_every_slice_exactly_once(tmp_path: Path, lockdir: str) -> None:
    """--once runs the command once per slice, then the run ends with status 0."""
    cfg = write_config(tmp_path / "c.toml", 7, lockdir)
    out = tmp_path / "done.txt"
    ev = tmp_path / "events.jsonl"
    script = f'echo "$SHARDPREEMPT_SLICE_ID $SHARDPREEMPT_WORKER" >> {out}'
    result = cli("run", str(cfg), "-w", "3", "--once", "--events", str(ev), "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    ids = [line.split()[0] for line in out.read_text().splitlines()]
    planned = [s["id"] for s in json.loads(cli("plan", str(cfg), "-w", "3", "--json").stdout)["slices"]]
    assert sorted(ids) == sorted(planned)
    kinds = [e["event"] for e in events(ev)]
    assert kinds.count("acquired") == 7 and kinds.count("released") == 7
    assert all("hunter2" not in line for line in ev.read_text().splitlines())


def test_run_once_with_a_failing_command_exits_nonzero(tmp_path: Path, lockdir: str) -> None:
    """A slice whose command keeps failing makes the --once run exit non-zero."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    result = cli("run", str(cfg), "-w", "2", "--once", "--max-failures", "2", "--backoff", "0.01", "--", "false")
    assert result.returncode == 1


def test_command_gets_slice_in_environment_and_secrets_only_in_a_0600_file(tmp_path: Path, lockdir: str) -> None:
    """The command sees the pinned variables; settings with secrets are in a 0600 file, not in env or argv."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    dump = tmp_path / "env.json"
    code = ("import json,os,stat,sys;f=os.environ['SHARDPREEMPT_SLICE_FILE'];"
            "json.dump({'env':dict(os.environ),'mode':stat.S_IMODE(os.stat(f).st_mode),"
            f"'file':json.load(open(f))}},open({str(dump)!r},'w'))")
    env = {"PATH": "/usr/bin:/bin", "SHARDPREEMPT_BACKEND": f"{lockdir}"}
    result = cli("run", str(cfg), "--once", "--", sys.executable, "-c", code, env=env)
    assert result.returncode == 0, result.stderr
    got = json.loads(dump.read_text())
    e = got["env"]
    assert json.loads(e["SHARDPREEMPT_SHARDS"]) == ["s0", "s1"]
    assert set(json.loads(e["SHARDPREEMPT_TOKENS"])) == {"s0", "s1"}
    assert e["SHARDPREEMPT_WORKER"] == "0" and e["SHARDPREEMPT_OWNER"] and e["SHARDPREEMPT_SLICE_ID"]
    assert "SHARDPREEMPT_BACKEND" not in e
    assert "hunter2" not in json.dumps(e)
    assert got["mode"] == stat.S_IRUSR | stat.S_IWUSR
    assert got["file"]["shards"]["s1"]["settings"]["api_password"] == "hunter2-1"


def test_status_json_reports_free_shards(tmp_path: Path, lockdir: str) -> None:
    """status --json lists every shard, free when nobody runs."""
    cfg = write_config(tmp_path / "c.toml", 3, lockdir)
    missing = cli("status", str(cfg), "--json")
    assert missing.returncode == 2 and "no lock directory" in missing.stderr
    assert not Path(lockdir.removeprefix("file://")).exists()  # status never creates one
    Path(lockdir.removeprefix("file://")).mkdir(mode=0o700)
    result = cli("status", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["summary"] == {"shards": 3, "owned": 0, "free": 3, "slices": 1, "owners": 0, "members": 0}
    assert snap["members"] == [] and snap["layout"] is None
    table = cli("status", str(cfg))
    assert table.returncode == 0 and "free" in table.stdout


def test_demo_passes_its_exactly_once_check(tmp_path: Path) -> None:
    """The demo kills a worker midway and still finds every item processed exactly once."""
    result = cli("demo", "--items", "40", "--dir", str(tmp_path / "demo"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "killed worker" in result.stdout


def test_events_in_a_missing_directory_is_one_clear_error(tmp_path: Path, lockdir: str) -> None:
    """--events in a directory that does not exist is refused with exit 2 and one line naming the flag."""
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    result = cli("run", str(cfg), "--events", str(tmp_path / "nope" / "ev.jsonl"), "--", "true")
    assert result.returncode == 2 and "--events" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_status_watch_json_writes_json_lines(tmp_path: Path, lockdir: str) -> None:
    """status --json --watch writes one JSON object per line."""
    Path(lockdir.removeprefix("file://")).mkdir(mode=0o700)
    cfg = write_config(tmp_path / "c.toml", 2, lockdir)
    proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "status", str(cfg), "--json", "--watch",
                             "--interval", "0.05"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.terminate()
    proc.communicate(timeout=10)
    assert all(json.loads(line)["summary"]["shards"] == 2 for line in lines)


def test_an_unreachable_backend_at_start_is_one_line_and_exit_4(tmp_path: Path) -> None:
    """A backend nobody answers on is retried for --start-timeout, then one line and exit status 4."""
    pytest.importorskip("redis")
    cfg = write_config(tmp_path / "c.toml", 2, "redis://:hunter2@127.0.0.1:1/0")
    result = cli("run", str(cfg), "--start-timeout", "1", "--", "true")
    assert result.returncode == 4, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "hunter2" not in result.stderr


def test_sigterm_while_waiting_for_the_backend_at_start_ends_the_run(tmp_path: Path) -> None:
    """SIGTERM during the start's retries of an unreachable backend ends the run at once with 143 (as PID 1
    of a container a process has no default action for SIGTERM: without a handler it waited it out)."""
    pytest.importorskip("redis")
    cfg = write_config(tmp_path / "c.toml", 2, "redis://127.0.0.1:1/0")
    err = tmp_path / "err.log"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "-v", "run", str(cfg), "--start-timeout", "60",
                                 "--", "true"], stderr=f)
    try:
        wait_until(lambda: "backend unreachable" in err.read_text(), 20, interval=0.05, message="retrying")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM, err.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_layout_is_changed_only_on_an_empty_pool(tmp_path: Path, lockdir: str, start_run: Any) -> None:
    """layout shows the pool's and the config's layouts; --apply is refused while members live and
    records the new layout once they are gone, after which the new slice count is accepted."""
    cfg = write_config(tmp_path / "c.toml", 6, lockdir)
    first = json.loads(cli("layout", str(cfg), "--slices", "2", "--json").stdout)
    assert first["pool"] is None and first["config"]["slices"] == 2
    ev = tmp_path / "ev.jsonl"
    run = start_run(str(cfg), "--slices", "2", "--events", str(ev), "--", "sleep", "1000")
    wait_until(lambda: any(e["event"] == "acquired" for e in events(ev)), 20, message="the pool runs")
    refused = cli("layout", str(cfg), "--slices", "3", "--apply")
    assert refused.returncode == 2 and "live member" in refused.stderr
    assert cli("run", str(cfg), "--slices", "3", "--", "true").returncode == 2
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 0
    applied = cli("layout", str(cfg), "--slices", "3", "--apply", "--json")
    assert applied.returncode == 0 and json.loads(applied.stdout)["pool"]["slices"] == 3
    status = json.loads(cli("status", str(cfg), "--json").stdout)
    assert status["layout"]["slices"] == 3 and status["summary"]["slices"] == 3
