"""What a stress run works on: the shards and the fenced job, plus how to add work and audit it.

The default is the demo's job over SQLite shard databases (:mod:`shardpreempt.demo`); the fault tests
also run the seed's MySQL scenario with ``examples/mysql_worker.py`` through the same protocol. An audit
comes back as :class:`ItemTotals`.

With ``fork`` the command does no work itself: it forks one child per shard of its slice and only
waits for them (``python -m shardpreempt.testing.workload``); each child works its shard for a short while,
exits, and is forked again. ``group`` children stay in the command's process group; ``session``
children call ``setsid()`` and so leave it — only the guard's ``SHARDPREEMPT_GUARD`` mark (and on
``file://`` the lock descriptors they inherit) stop them from outliving a worker that dies; ``mixed``
alternates the two over the slice's shards. On SIGTERM the command kills its children and exits, as a
well-behaved forking job does.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from ..config import make_shard
from ..demo import StaleToken, audit_shards, create_shard, fenced_process
from ..model import Shard
from ..process import ExitCode

#: How a forking job's children relate to its process group (see the module docstring).
FORK_MODES = ("group", "session", "mixed")
EXIT_FENCED = 3  # as the demo job: a higher token has written to the shard


@dataclass
class ItemTotals:
    """A workload's audit of the shards, summed over them (the ``items`` of a stress run's figures)."""

    items: int = 0
    processed: int = 0
    lost: int = 0  # never processed
    duplicated: int = 0  # processed more than once
    unauthorised: int = 0  # written with a token no lease of that shard was granted
    stale_accepted: int = 0  # written with a lower token than the write before it
    late_writes: int | None = None  # accepted after the shard's next grant (None: the workload cannot tell)

    @property
    def clean(self) -> bool:
        """True when no item was lost or duplicated and every write was fenced and on time."""
        return self.lost == self.duplicated == self.unauthorised == self.stale_accepted == (self.late_writes or 0) == 0

    def as_dict(self) -> dict[str, int]:
        """The totals as ``stress --json`` prints them (``late_writes`` only when known)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class Workload(Protocol):
    """The shards under test and the job that works them; the default is the demo's SQLite job."""

    def make_shards(self, directory: Path, items: int) -> list[Shard]:
        """Create the shards with ``items`` pending work items each."""
        ...

    def command(self) -> list[str]:
        """argv of the job, run by ``shardpreempt run`` for each slice; it must keep polling for work."""
        ...

    def add_work(self, shards: Sequence[Shard], items: int) -> None:
        """Add ``items`` new work items to every shard."""
        ...

    def pending(self, shards: Sequence[Shard]) -> int:
        """Work items not yet processed."""
        ...

    def audit(self, shards: Sequence[Shard], history: Sequence[dict[str, Any]]) -> ItemTotals:
        """What the shards show: items lost, duplicated, written without a lease or out of order."""
        ...


class SqliteWorkload:
    """The demo's fenced job over SQLite shard databases (:mod:`shardpreempt.demo`), optionally forking."""

    def __init__(self, count: int = 6, item_seconds: float = 0.002, fork: str | None = None) -> None:
        if fork is not None and fork not in FORK_MODES:
            raise ValueError(f"unknown fork mode {fork!r} (known: {', '.join(FORK_MODES)})")
        self.count = count
        self.item_seconds = item_seconds
        self.fork = fork

    def make_shards(self, directory: Path, items: int) -> list[Shard]:
        """One SQLite database per shard."""
        shards = []
        for i in range(self.count):
            path = directory / f"shard{i}.sqlite"
            path.unlink(missing_ok=True)
            create_shard(path, items)
            shards.append(make_shard(f"shard{i}", {"kind": "sqlite", "path": str(path)}))
        return shards

    def command(self) -> list[str]:
        """The demo job, polling; with ``fork``, the forking job around the same fenced writes."""
        args = ["--poll", "0.05", "--item-seconds", str(self.item_seconds)]
        if self.fork is not None:
            return [sys.executable, "-m", "shardpreempt.testing.workload", "--fork", self.fork, *args]
        return [sys.executable, "-m", "shardpreempt.demo", *args]

    def add_work(self, shards: Sequence[Shard], items: int) -> None:
        """Insert new items."""
        for shard in shards:
            with sqlite3.connect(shard.settings["path"], timeout=30) as db:
                db.executemany("INSERT INTO items (id) VALUES (NULL)", [()] * items)
            db.close()

    def pending(self, shards: Sequence[Shard]) -> int:
        """Unprocessed items."""
        total = 0
        for shard in shards:
            with sqlite3.connect(shard.settings["path"], timeout=30) as db:
                total += db.execute("SELECT count(*) FROM items WHERE processed_by IS NULL").fetchone()[0]
            db.close()
        return total

    def audit(self, shards: Sequence[Shard], history: Sequence[dict[str, Any]]) -> ItemTotals:
        """From the databases, plus ``late_writes`` (see :func:`late_writes`)."""
        totals = ItemTotals(**audit_shards(shards, history)["totals"], late_writes=0)
        for shard in shards:
            with sqlite3.connect(shard.settings["path"]) as db:
                writes = db.execute("SELECT owner, token, t FROM writes ORDER BY rowid").fetchall()
            db.close()
            totals.late_writes = (totals.late_writes or 0) + len(late_writes(shard.identity, writes, history))
        return totals


def late_writes(identity: str, writes: Sequence[tuple[str, int, float]],
                history: Sequence[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """The writes ``(owner, token, t)`` to one shard made after the shard was next granted to another lease.

    The ``acquired`` event is written after the grant, so such a write was accepted while a later lease
    was already in force: its writer outlived its own lease (the fence refuses it only once the new
    holder has written, and not at all if the new token is lower). Both times come from this machine's
    clock. Writes of a lease never granted are left to the ``unauthorised`` count.
    """
    grants = {(e["owner"], int(e["token"])): float(e["t"]) for e in history
              if e["event"] == "acquired" and e["shard"] == identity}
    times = sorted(grants.values())
    late = []
    for w in writes:
        granted = grants.get((w[0], int(w[1])))
        if granted is None:
            continue
        nxt = bisect.bisect_right(times, granted)
        if nxt < len(times) and float(w[2]) > times[nxt]:
            late.append(w)
    return late


# -- the forking job (python -m shardpreempt.testing.workload) -------------------------------------
def _child(path: str, owner: str, token: int, poll: float, item_seconds: float, lifetime: float) -> int:
    """Work one shard for about ``lifetime`` seconds (fenced writes); the exit status tells the parent."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    end = time.monotonic() + lifetime
    try:
        while time.monotonic() < end:
            pending = [r[0] for r in db.execute("SELECT id FROM items WHERE processed_by IS NULL ORDER BY id")]
            for item in pending:
                time.sleep(item_seconds)
                fenced_process(db, item, owner, token)
            if not pending:
                time.sleep(poll)
        return 0
    except StaleToken as exc:
        print(f"fenced off: {exc}", file=sys.stderr)
        return EXIT_FENCED
    finally:
        db.close()


def forking_job(argv: list[str] | None = None) -> int:
    """The forking job for one slice: a child per shard does the work, forked again whenever it exits."""
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args[args.index("--fork") + 1] if "--fork" in args else "group"
    poll = float(args[args.index("--poll") + 1]) if "--poll" in args else 0.05
    item_seconds = float(args[args.index("--item-seconds") + 1]) if "--item-seconds" in args else 0.002
    with open(os.environ["SHARDPREEMPT_SLICE_FILE"], encoding="utf-8") as f:
        spec = json.load(f)
    owner, tokens = spec["owner"], spec["tokens"]
    shards = [(identity, shard["settings"]["path"]) for identity, shard in spec["shards"].items()]
    children: dict[int, int] = {}  # pid -> index of its shard

    def end(code: int) -> NoReturn:
        for pid in children:  # a session child is beyond the signal the worker sends to our group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(code)

    signal.signal(signal.SIGTERM, lambda signum, frame: end(128 + signum))
    rng = random.Random()
    while True:
        for i, (identity, path) in enumerate(shards):
            if i in children.values():
                continue
            lifetime = rng.uniform(0.3, 1.5)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # no child unrecorded at a SIGTERM
            pid = os.fork()
            if pid == 0:
                code = int(ExitCode.INTERNAL)
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                    if mode == "session" or (mode == "mixed" and i % 2 == 1):
                        os.setsid()
                    code = _child(path, owner, int(tokens[identity]), poll, item_seconds, lifetime)
                finally:
                    os._exit(code)
            children[pid] = i
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        pid, status = os.wait()
        children.pop(pid, None)
        if os.waitstatus_to_exitcode(status) == EXIT_FENCED:
            end(EXIT_FENCED)  # as the demo job: fenced off, give the slice up


if __name__ == "__main__":
    sys.exit(forking_job())
