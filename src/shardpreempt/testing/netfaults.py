"""Network faults for ``shardpreempt stress --network``: every supervisor in its own network namespace.

Supervisor *i* runs inside :class:`~shardpreempt.testing.netns.NetHost` *i* and reaches the harness's
server through a relay on its own link, so a link can be cut or slowed without touching the others.
Two fault kinds:

* ``partition-worker`` — cut the link of the supervisor whose worker holds a random shard for
  1.5 x ttl, then heal it. Its workers' renewals stall; they must self-fence (``lost`` event, command
  stopped) before the server expires their sessions, and the other supervisors' standbys take the
  shards over. The cut..heal window is excused for the unowned-time check.
* ``slow-backend`` — add latency on every link (ttl x 100 ms, kept within 100..200 ms, in each
  direction) for max(3 s, 2 x ttl), then remove it; excused too.

:class:`NetFaults` knows nothing of the run: the stress harness chooses whom to cut and records each
fault's window (which :meth:`NetFaults.partition` and :meth:`NetFaults.slow` return) itself.
:meth:`NetFaults.figures` reports (:class:`NetworkFigures`), for the partitions: shards held by the cut
supervisor at the cut, how many of those holds ended by self-fencing and how many by the holder's own
release before its fence (a handoff or a stop that was under way when the link went), the smallest
lead of a hold's end over the next holder's acquisition (positive: the fence came first), and the
longest time from a cut until another worker owned the shard.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..claims import SELF_FENCED
from ..history import holds_of
from .netns import NetHost

NETWORK_FAULTS = ("partition-worker", "slow-backend")


@dataclass(frozen=True)
class Partition:
    """One cut: which supervisor, its workers at the time, and when."""

    index: int
    workers: frozenset[int]
    start: float
    end: float


@dataclass(frozen=True)
class NetworkFigures:
    """What the network faults did (the ``network`` of a stress run's figures)."""

    namespaces: list[str]
    delay_by: str | None
    partitions: int
    slowdowns: int
    holds_cut: int  # holds of the cut supervisor's workers open at the cut
    self_fenced: int  # of those, ended by the holder's own fence
    released_cut: int  # of those, released by the holder before its fence (a handoff or stop under way)
    min_fence_lead_s: float | None  # least time from a hold's end to the next holder's acquisition
    max_takeover_s: float | None  # longest time from a cut until another worker owned the shard

    def as_dict(self) -> dict[str, Any]:
        """The figures as ``stress --json`` prints them."""
        return asdict(self)


class NetFaults:
    """The namespaces, relays and per-supervisor configs of one stress run, and its network faults."""

    def __init__(self, supervisors: int, url: str) -> None:
        self.hosts: list[NetHost] = []
        self.urls: list[str] = []  # the backend URL as seen from inside each namespace
        self.partitions: list[Partition] = []
        self.slowdowns = 0
        try:
            for _ in range(supervisors):
                host = NetHost()
                self.hosts.append(host)
                host.start()
                self.urls.append(host.rewrite(url))
        except BaseException:
            self.close()
            raise
        self.names = [h.name for h in self.hosts]

    def command(self, index: int, argv: Sequence[str]) -> list[str]:
        """``shardpreempt run ... -- job`` of supervisor ``index``: in its namespace, via its relay."""
        argv = list(argv)
        end = argv.index("--") if "--" in argv else len(argv)
        return self.hosts[index].argv([*argv[:end], "--backend", self.urls[index], *argv[end:]])

    def partition(self, index: int, workers: frozenset[int], seconds: float) -> tuple[float, float]:
        """Cut the link of supervisor ``index`` (whose workers are ``workers``) for ``seconds``, then heal
        it; the window cut..heal."""
        host = self.hosts[index]
        t0 = time.time()
        host.cut()
        try:
            time.sleep(seconds)
        finally:
            host.heal()
        t1 = time.time()
        self.partitions.append(Partition(index, workers, t0, t1))
        return t0, t1

    def slow(self, ms: float, seconds: float) -> tuple[float, float]:
        """Delay every link by ``ms`` each way for ``seconds``, then restore it; the window."""
        t0 = time.time()
        try:
            for host in self.hosts:
                host.delay(ms)
            time.sleep(seconds)
        finally:
            for host in self.hosts:
                host.undelay()
        self.slowdowns += 1
        return t0, time.time()

    def figures(self, history: Sequence[Mapping[str, Any]]) -> NetworkFigures:
        """What the partitions did to the holds (see the module docstring)."""
        return NetworkFigures(
            namespaces=list(self.names),
            delay_by=next((h.delay_by for h in self.hosts if h.delay_by), None),
            partitions=len(self.partitions),
            slowdowns=self.slowdowns,
            **cut_holds(self.partitions, history),
        )

    def close(self) -> None:
        """Remove every namespace, link and relay (the supervisors inside must have stopped)."""
        for host in self.hosts:
            host.close()


def cut_holds(partitions: Sequence[Partition], history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The holds the ``partitions`` cut off and how each ended (the hold fields of :class:`NetworkFigures`)."""
    holds = holds_of(history)
    pid_of = {e["owner"]: e["pid"] for e in history if e["event"] == "acquired"}
    # how each hold ended: the claimer's words for a self-fence, or the holder's own release
    ends = {(e["shard"], e["owner"], float(e["t"])): "fenced" if e.get("reason") == SELF_FENCED else e["event"]
            for e in history if e["event"] in ("lost", "released")}
    by_shard = defaultdict(list)
    for h in holds:
        by_shard[h.shard].append(h)
    held = fenced = released = 0
    leads: list[float] = []
    takeovers: list[float] = []
    for p in partitions:
        for h in holds:
            if pid_of.get(h.owner) not in p.workers or not h.start < p.start < h.end:
                continue
            held += 1
            end = ends.get((h.shard, h.owner, h.end))
            fenced += end == "fenced"
            released += end == "released"
            after = [n for n in by_shard[h.shard] if n.owner != h.owner and n.start >= h.start]
            if after:
                leads.append(after[0].start - h.end)
                takeovers.append(after[0].start - p.start)
    return {
        "holds_cut": held,
        "self_fenced": fenced,
        "released_cut": released,
        "min_fence_lead_s": round(min(leads), 3) if leads else None,
        "max_takeover_s": round(max(takeovers), 3) if takeovers else None,
    }
