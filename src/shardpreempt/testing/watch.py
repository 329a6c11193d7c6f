"""What a stress run watches while it runs: the events file as it grows, and processes that outlive their lease.

:class:`EventTail` reads the ``--events`` file incrementally and knows the current holders and live
workers; :class:`Watcher` scans ``/proc`` for the run's processes (marked with :data:`RUN_MARK` in their
environment) that are still alive after their lease went to another owner, their guard or their worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Marks every process of one run (supervisors, workers, commands, their children) for the watcher.
RUN_MARK = "SPSTRESS_RUN"  # not SHARDPREEMPT_*: the runner passes no such variable on to commands


class EventTail:
    """The events file read incrementally (a whole re-read at every poll grows with the run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        self._lock = threading.Lock()
        self._holds: dict[tuple[str, str], dict[str, Any]] = {}  # (shard, owner) -> its acquired event
        self._ended: dict[tuple[Any, Any], float] = {}  # (host, pid) -> last exited/killed time
        self._workers: dict[int, tuple[float, int]] = {}  # worker pid -> (started at, supervisor pid)

    def update(self) -> None:
        """Read the lines appended since the last call."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            self._offset += len(data)
            *lines, self._rest = (self._rest + data).split(b"\n")
            for line in lines:
                if line.strip():
                    self._apply(json.loads(line))

    def _apply(self, e: dict[str, Any]) -> None:
        kind, t, proc = e["event"], float(e["t"]), (e.get("host"), e.get("pid"))
        if kind == "acquired":
            if self._ended.get(proc, -1.0) < t:  # lines of different processes may land out of time order
                self._holds[(e["shard"], e["owner"])] = e
        elif kind in ("released", "lost"):
            self._holds.pop((e["shard"], e["owner"]), None)
        elif kind in ("exited", "killed"):
            self._ended[proc] = max(t, self._ended.get(proc, t))
            for key in [k for k, v in self._holds.items() if (v.get("host"), v.get("pid")) == proc]:
                del self._holds[key]
            started = self._workers.get(int(e["pid"]))
            if started is not None and started[0] <= t:
                del self._workers[int(e["pid"])]
        elif kind == "started":
            self._workers[int(e["worker_pid"])] = (t, int(e["pid"]))

    def holders(self) -> dict[str, dict[str, Any]]:
        """shard -> the acquired event of its current holder (the latest, should there be several)."""
        self.update()
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for (shard, _), e in self._holds.items():
                if shard not in out or e["t"] > out[shard]["t"]:
                    out[shard] = e
            return out

    def workers(self, supervisor: int | None = None) -> list[int]:
        """Pids of the workers started and not yet reported gone (of one supervisor, if given)."""
        self.update()
        with self._lock:
            return [pid for pid, (_, sup) in self._workers.items() if supervisor in (None, sup)]


@dataclass(frozen=True)
class Outlived:
    """A process of the run found alive after its lease ended."""

    pid: int
    owner: str
    at: float | None  # when it was seen; None: after the run had ended
    why: str = ""

    def __str__(self) -> str:
        if self.at is None:
            return f"pid {self.pid} of {self.owner} alive after the run ended"
        return f"pid {self.pid} of {self.owner} alive at {self.at:.3f}: {self.why}"


class Watcher:
    """Finds the processes of a run that outlive their lease, in a thread, five times a second.

    A process carrying the run's mark and a ``SHARDPREEMPT_OWNER`` (a command, or anything it forked)
    is suspect while another owner holds one of its ``SHARDPREEMPT_SHARDS``, while the guard named by
    its ``SHARDPREEMPT_GUARD`` is gone (the guard kills everything marked with its pid before it exits),
    or while the worker whose pid its owner id carries is gone; still suspect and alive at the next
    look, it has outlived its lease.
    """

    def __init__(self, mark: str, tail: EventTail, interval: float = 0.2) -> None:
        self.mark = f"{RUN_MARK}={mark}".encode()
        self.tail = tail
        self.interval = interval
        self.found: dict[tuple[int, int], Outlived] = {}  # (pid, start time) -> what was seen
        self._suspects: dict[tuple[int, int], Outlived] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching."""
        self._thread = threading.Thread(target=self._loop, name="stress-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.scan()

    def scan(self) -> None:
        """One look at every marked process."""
        holders = self.tail.holders()
        suspects: dict[tuple[int, int], Outlived] = {}
        for key, env in _marked(self.mark):
            owner = env.get("SHARDPREEMPT_OWNER")
            if owner is None:
                continue  # a supervisor, a worker or a guard
            why = None
            for shard in json.loads(env.get("SHARDPREEMPT_SHARDS", "[]")):
                holder = holders.get(shard)
                if holder is not None and holder["owner"] != owner:
                    why = f"{shard} is held by {holder['owner']} (token {holder['token']})"
                    break
            guard = env.get("SHARDPREEMPT_GUARD", "")
            worker = owner.rsplit(":", 2)[-2] if owner.count(":") >= 2 else ""  # IDENTITY:pid:random
            if why is None and guard.isdigit() and not alive(int(guard)):
                why = f"its guard {guard} is gone"
            if why is None and worker.isdigit() and not alive(int(worker)):
                why = f"its worker {worker} is gone"
            if why is not None:
                suspects[key] = Outlived(key[0], owner, time.time(), why)
        for key, seen in suspects.items():
            if key in self._suspects and key not in self.found:
                self.found[key] = seen
        self._suspects = suspects

    def leftovers(self, timeout: float = 10.0) -> None:
        """After the run: every marked process still alive outlived it; each is recorded and killed."""
        deadline = time.monotonic() + timeout
        while (left := list(_marked(self.mark))) and time.monotonic() < deadline:
            time.sleep(0.05)
        for (pid, started), env in left:
            self.found.setdefault((pid, started), Outlived(pid, env.get("SHARDPREEMPT_OWNER", "(no owner)"), None))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _marked(mark: bytes) -> Iterator[tuple[tuple[int, int], dict[str, str]]]:
    """((pid, start time), environment) of every live process whose environment holds ``mark``."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                raw = f.read().split(b"\0")
            if mark not in raw:
                continue
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] in ("Z", "X"):
            continue
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
        yield (int(entry), int(fields[19])), env


def children(pid: int) -> list[int]:
    """Pids of the live children of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
