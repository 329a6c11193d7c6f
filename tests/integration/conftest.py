"""Helpers for running the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def write_config(path: Path, shards: int, url: str, ttl: float = 2.0, extra: str = "") -> Path:
    """A config with ``shards`` plain shards on ``url``."""
    lines = [f'[backend]\nurl = "{url}"\nttl = {ttl}\n', extra]
    lines += [f'[shards.s{i}]\napi_password = "hunter2-{i}"\n' for i in range(shards)]
    path.write_text("\n".join(lines))
    return path


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``shardpreempt ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "shardpreempt", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def events(path: Path) -> list[dict[str, Any]]:
    """The events written so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Run:
    """A ``shardpreempt run`` in the background, stopped by pid at teardown."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.err = open(tmp / "run.stderr", "w")  # noqa: SIM115 - closed in stop()
        self.err_path = tmp / "run.stderr"
        self.proc = subprocess.Popen([sys.executable, "-m", "shardpreempt", "-v", "run", *args],
                                     stdout=subprocess.DEVNULL, stderr=self.err)

    def stderr(self) -> str:
        return self.err_path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.err.close()


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Any]:
    """Start ``shardpreempt run ARGS`` in the background."""
    runs: list[Run] = []

    def start(*args: str) -> Run:
        run = Run(tmp_path, list(args))
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


@pytest.fixture
def lockdir(tmp_path: Path) -> str:
    """A file:// URL of a fresh private lock directory."""
    return f"file://{tmp_path}/locks"


os.environ.setdefault("PYTHONUNBUFFERED", "1")
