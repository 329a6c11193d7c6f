"""Several real ``shardpreempt run`` supervisors over one backend, as on several machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardpreempt.backends import open_backend
from shardpreempt.config import load_settings
from shardpreempt.events import HOST, EventLog
from shardpreempt.history import Report, check, read_events
from shardpreempt.pool import Observation, observe
from shardpreempt.slicing import make_slices
from shardpreempt.testing.servers import EphemeralServer, unique
from shardpreempt.testing.servers.base import wait_stopped
from shardpreempt.testing.wait import wait_until
from shardpreempt.testing.watch import children
from shardpreempt.typing import Backend

from ..conftest import get_server

SERVERS = ["redis", "postgresql", "mysql", "etcd", "zookeeper"]


class Pool:
    """Supervisors started as separate processes over one backend namespace, watched from outside."""

    def __init__(self, tmp: Path, url: str, *, shards: int, slices: int, ttl: float) -> None:
        self.tmp = tmp
        self.url = url
        self.ttl = ttl
        self.config = tmp / "pool.toml"
        body = [f'[backend]\nurl = "{url}"\nttl = {ttl}\n\n[slicing]\nslices = {slices}\n']
        body += [f'[shards.s{i:03d}]\npassword = "hunter2-{i}"\n' for i in range(shards)]
        self.config.write_text("\n".join(body))
        settings = load_settings(self.config)
        self.slices = make_slices(settings.shards, slices, settings.strategy)
        self.events = tmp / "events.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backend: Backend = open_backend(url)

    def start(self, workers: int, *extra: str, name: str | None = None) -> subprocess.Popen[bytes]:
        """Start one supervisor (its own session, like a machine of its own) with ``workers`` workers."""
        args = [sys.executable, "-m", "shardpreempt", "-v", "run", str(self.config), "-w", str(workers),
                "--events", str(self.events), "--stop-grace", "5", *extra]
        if name:
            args += ["--name", name]
        with open(self.tmp / f"sup{len(self.procs)}.log", "w") as log:  # the child keeps its own copy
            proc = subprocess.Popen([*args, "--", "sleep", "3600"], stdout=subprocess.DEVNULL, stderr=log,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def observe(self) -> Observation:
        """Members and slice holders now."""
        return observe(self.backend, self.slices, 64)

    def counts(self) -> Counter[str | None]:
        """Slices per holder identity (``None``: free)."""
        return Counter(self.observe().holders.values())

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a supervisor and its workers; record the kill first so the checker ends their holds.
        They are stopped before the record (as ``stress`` does): a worker that acquired between the
        record and the kill would hold for ever in the checker's eyes, and every later grant of the
        shard would show as an overlap."""
        os.killpg(proc.pid, signal.SIGSTOP)
        workers = children(proc.pid)  # from /proc: one forked a moment ago may have no started event yet
        wait_stopped([proc.pid, *workers])
        log = EventLog(self.events)
        for pid in workers:
            log.emit("killed", pid=pid, host=HOST, reason="test: kill supervisor")
        log.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def wait_balanced(self, members: int, timeout: float, message: str) -> Counter[str | None]:
        """Wait until every slice is owned and ``members`` members hold fair shares (max - min <= 1)."""
        k = len(self.slices)

        def balanced() -> bool:
            obs = self.observe()
            got = Counter(obs.holders.values())
            if None in got or len(obs.members) != members:
                return False
            per = [got.get(m, 0) for m in obs.members]
            return max(per) - min(per) <= 1 and sum(per) == k

        wait_until(balanced, timeout, interval=0.01, message=message)
        return self.counts()

    def wait_covered(self, timeout: float, message: str) -> float:
        """Wait until every slice is owned; return how long it took."""
        start = time.monotonic()
        wait_until(lambda: None not in self.counts(), timeout, interval=0.005, message=message)
        return time.monotonic() - start

    def report(self) -> Report:
        """The history checker over the events so far."""
        return check(read_events([self.events]))

    def logs(self) -> str:
        """Every supervisor's stderr."""
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("sup*.log")))

    def close(self) -> None:
        """Stop every supervisor still running (warm, then by SIGKILL)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.backend.close()


@pytest.fixture(params=["file", *SERVERS])
def pool_backend(request: pytest.FixtureRequest, servers: dict[str, EphemeralServer], tmp_path: Path) -> str:
    """A fresh namespace on each backend kind (servers started once per test session)."""
    name = str(request.param)
    if name == "file":
        path = tmp_path / "locks"
        path.mkdir(mode=0o700)
        return f"file://{path}"
    return get_server(servers, name).url(unique())


@pytest.fixture
def make_pool(pool_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Build a :class:`Pool` on the test's backend; stopped at teardown, logs printed on failure."""
    pools: list[Pool] = []
    ttl = 1.0 if pool_backend.startswith("file") else 2.0

    def make(shards: int = 24, slices: int = 6) -> Pool:
        pool = Pool(tmp_path, pool_backend, shards=shards, slices=slices, ttl=ttl)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(pool.logs()[-20000:])
            print(json.dumps([e for e in read_events([pool.events])][-200:])[:20000])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow_on_servers are slow (ttl waits) on server backends: mark those variants slow."""
    for item in items:
        if item.get_closest_marker("slow_on_servers") is not None and "[file]" not in item.nodeid:
            item.add_marker(pytest.mark.slow)
