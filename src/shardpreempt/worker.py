"""One worker process: a member of the pool that holds any number of slices and works each one.

The worker is a reconcile loop: **observe** the pool (members and slice holders, see
:mod:`shardpreempt.pool`), ask the **policy** (:func:`shardpreempt.balance.decide`) what to take and
what to hand over, **apply** it, and wait for news. It holds one member key and all its slices under
one liveness session, renewed once per ttl/3 whatever it holds; when the session is lost, every
slice is lost with it: each run is stopped (SIGTERM, then SIGKILL within the grace), ``lost`` events
are written, and the worker joins again under a fresh owner id.

Each held slice has a :class:`~shardpreempt.runner.SliceRunner` running the job or command for it.
A handoff (the policy gives the slice to another member) or a warm stop stops the run first and
releases the slice the moment it has ended, so the next holder never waits for a ttl.

News comes from a watcher thread with its own backend connection: on servers the backend's release
notification; on ``file://`` a "bell" file any member rings when it joins or releases, plus a probe of
the next members' keys every poll, so a killed member is noticed in milliseconds. Without news the
worker looks again every ``period`` seconds (server expiry is only seen this way).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from . import logs, metrics
from .backends import open_backend
from .backends.inotify import drain
from .balance import Decision, Members, Params, View, decide, meant_for, targets
from .claims import Claim, Ownership
from .errors import BackendError, ConfigError, LossReason, Shutdown
from .events import EventLog
from .model import Lease, Shard, Slice
from .pool import (
    MEMBERS,
    Layout,
    Observation,
    join_margin,
    look_at,
    member_key,
    member_owner,
    observe,
    once_record,
    slots_to_watch,
)
from .pool import bell as read_bell
from .pool import ring as ring_bell
from .process import EXIT_CONFIG, EXIT_FENCED, EXIT_INTERNAL, EXIT_OK, die_with_parent, start_guard
from .runner import Job, RunSettings, SliceRunner
from .typing import Backend

#: file://: how much later than an eager member one that would keep its share if a member died looks at
#: a ring, so the members that must act (standbys, members short of their share) have the CPU first
NEWS_DEFER = 0.02
MAX_SLOTS = 1 << 16  # member slots a joining worker looks through at most
log = logging.getLogger("shardpreempt.worker")

STALL = 10.0  # seconds without a round of the main loop after which the heartbeat stops

__all__ = ["Job", "Worker", "WorkerOptions", "run_worker"]


def pool_params(server_expiry: bool, ttl: float) -> tuple[Params, float]:
    """The policy's timing and the observation period for a backend kind."""
    # grace: how long a free slice meant for another member waits for it before anyone takes it. It
    # must cover a newcomer taking its whole share one acquire at a time, or old members grab what
    # was handed to it and the slices move twice.
    if not server_expiry:  # file://: news arrives within a poll; look anyway every second
        return Params(grace=0.4, settle=0.2, min_hold=0.2), 1.0
    period = min(0.5, max(0.05, ttl / 8))
    return Params(grace=max(1.0, 4 * period), settle=max(0.5, 2 * period), min_hold=max(0.5, 2 * period)), period


@dataclass
class WorkerOptions:
    """How one worker behaves; the supervisor builds one per worker slot."""

    backend_url: str
    ttl: float
    slices: Sequence[Slice]
    layout: Layout
    identity: str
    run: RunSettings
    index: int = 0
    siblings: tuple[str, ...] = ()  # identities its supervisor starts with it: counted while it starts
    once_pass: str | None = None  # once mode: the pass whose records mark slices done
    events: EventLog = field(default_factory=lambda: EventLog(None))
    heartbeat_fd: int | None = None
    heartbeat_every: float = 1.0
    preferred_slot: int | None = None
    guard_fd: int | None = None  # the command guard's pipe (see process.start_guard)
    recorder: metrics.Recorder | None = None  # counts for the supervisor's /metrics (None: not served)


class Hold:
    """One slice held under the worker's session, and the runner working it."""

    def __init__(self, slice_: Slice, lease: Lease, session: Claim) -> None:
        self.slice = slice_
        self.lease = lease
        self.session = session
        self.lost = threading.Event()
        self.reason: LossReason | None = None
        self.detail: str | None = None  # the reason in words, as the ``lost`` events show it
        self.since = time.monotonic()
        self.runner: SliceRunner | None = None
        self.handing_over = False
        self.handoff_slot: int | None = None  # servers: the member slot of the member it is handed over to
        self.superseded = False  # another owner holds it now
        self._reported = threading.Lock()  # held once the loss has been written to the events

    def report_loss(self) -> bool:
        """True the first time only: whoever gets it writes the ``lost`` events."""
        return self._reported.acquire(blocking=False)

    def time_left(self) -> float:
        """Seconds before the session's fence time."""
        return self.session.time_left()


class Worker:
    """The reconcile loop of one pool member; :func:`run_worker` is its entry point."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.by_id = {s.id: s for s in opts.slices}
        self.stop_requests = 0
        self.stopping = threading.Event()
        self.cold = threading.Event()
        self.holds: dict[str, Hold] = {}
        self.member: Claim | None = None
        self.member_slot: int | None = opts.preferred_slot
        self.owner = ""
        self.join_owner: str | None = None  # the owner id a join tries under, until one succeeds
        self.free_since: dict[str, float] = {}
        self.cooldown: dict[str, float] = {}
        self.done: dict[str, str] = {}  # once mode: slice id -> "ok" | "failed"
        self.ticked = time.monotonic()  # the main loop's last round (or slice taken), for the heartbeat
        self.outages = 0  # failed tries in a row to reach the backend
        # servers: the last full look, and how long the next waits at least (its cost x members / 2)
        self.looked_at = -math.inf
        self.look_gap = 0.0
        self.linger_since: float | None = None
        self.linger = 0.0  # back-off for looking again at slices held by non-members
        self.orphans: list[Lease] = []  # keys that may still point at our session: released before anything else
        # slice id -> (until, lease): an acquire that got no answer may still be carried out later (its
        # request waiting in a paused server's or the network's buffers): released again every round
        # until a ttl has passed, unless the slice is ours by then
        self.unsure: dict[str, tuple[float, Lease]] = {}
        self.slots = 16
        self.join_view: tuple[int, list[int]] | None = None  # joining: the highest slot in use, free ones to try
        self.join_races = 0  # joins lost in a row (every slot tried was taken by others joining)
        self.started = time.monotonic()
        self.watch_keys: list[str] = []  # member keys of the two members it watches (after it in slot order)
        self.death_bell: bytes | None = None  # file: the bell when a watched member died, until the next step
        self.woken = True  # something woke the loop since its last look (a notification, a ring, a run's end)
        self.next_look = 0.0  # when the loop reads the whole pool again though nothing woke it
        self.last_bell: object = None  # the bell at the last quiet round
        self.pool_size = 1  # members seen at the last look
        # file: whether a ring wakes this member at once (see _watch_file); False only for a member
        # that would still hold its share if one member died
        self.eager = True
        # servers: news goes only to the members it concerns (docs/pool.md, "How news travels")
        self.hungry = True  # short of its share, or free slices in view: a release notification concerns it
        self.announce = False  # joined since its last look: that look tells the members the join concerns
        self.rung: dict[int, float] = {}  # member slot -> when this member last rang its bell
        self.mourning = False  # servers: a watched member's session ended; its next look tells the takers
        # servers: the last look (its observation and each slice's holder) and the member slots rung
        # since for a death, so the look after it does not ring them again
        self.last_seen: tuple[Observation, dict[str, str | None]] | None = None
        self.told: set[int] = set()
        self.notified_at = 0.0  # when a release notification last woke the loop
        self.crowd = 1  # members short of their share at the last look (this one counts if it is)
        self.watch_pids: list[int] = []  # file: pids of the members the watcher waits on
        self._watch_r, self._watch_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.params = Params()
        self.period = 1.0
        self.members = Members(self.params)

    def wake(self, *_: object) -> None:
        """Make the loop look again now (thread- and signal-safe)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    # -- signals and heartbeats -------------------------------------------------------------------
    def on_signal(self, signum: int, frame: object) -> None:
        """First SIGTERM: warm stop; second: cold stop."""
        self.stop_requests += 1
        self.stopping.set()
        if self.stop_requests >= 2:
            self.cold.set()
        self.wake()

    def _report(self, line: str) -> None:
        if self.opts.guard_fd is not None and line[:2] in ("c ", "x "):
            # the guard first: from here on a command group outlives this worker by milliseconds at most
            with contextlib.suppress(OSError):
                os.write(self.opts.guard_fd, (("+" if line[0] == "c" else "-") + line[2:] + "\n").encode())
        if self.opts.heartbeat_fd is not None:
            try:
                os.write(self.opts.heartbeat_fd, line.encode() + b"\n")
            except OSError:  # supervisor gone: the kernel's parent-death signal is on its way
                os._exit(EXIT_INTERNAL)

    def _heartbeat(self, parent: int) -> None:
        """Beat for the supervisor's watchdog while the main loop makes progress.

        A thread, so a process stopped whole (SIGSTOP, a long pause) goes silent at once; it beats only
        while the loop has gone round (or taken a slice) within ``STALL`` seconds, so a loop stuck for good
        goes silent too (a backend call blocked up to its own timeout is not a stall).
        """
        while True:
            if os.getppid() != parent:
                os._exit(EXIT_INTERNAL)  # orphaned: never work a shard unsupervised
            if time.monotonic() - self.ticked < STALL:
                self._report(self._news() or "h")  # metrics, when any changed, beat as well
            time.sleep(self.opts.heartbeat_every)

    def _news(self) -> str | None:
        """The recorder's changes as an ``m`` line for the supervisor, if there are any."""
        recorder = self.opts.recorder
        news = recorder.take() if recorder is not None else None
        return None if news is None else f"m {news}"

    def flush_metrics(self) -> None:
        """Send the recorder's changes now (after a round of the loop: an ownership change shows at once)."""
        news = self._news()
        if news is not None and self.opts.heartbeat_fd is not None:
            self._report(news)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Observe, decide, apply, wait — until stopped (or, in once mode, until every slice is done)."""
        opts = self.opts
        try:
            backend = open_backend(opts.backend_url)
        except ConfigError as exc:
            log.error("worker %d: %s", opts.index, exc)
            return EXIT_CONFIG
        self.params, self.period = pool_params(backend.capabilities.server_expiry, opts.ttl)
        self.members = Members(self.params)
        watcher = threading.Thread(target=self._watch, args=(backend,), name="watch", daemon=True)
        watcher.start()
        try:
            while not self.stopping.is_set():
                timeout = self._step(backend)
                self.flush_metrics()
                if opts.once_pass is not None and len(self.done) == len(opts.slices) and not self.holds:
                    return EXIT_OK
                self._sleep(timeout)
            self._shutdown(backend)
            return EXIT_OK
        finally:
            self.stopping.set()
            self._lose_all(LossReason.RELEASED, "worker exiting", emit=False)
            backend.close()
            self.flush_metrics()  # the last word: what it holds now (nothing, after a warm stop)

    def _sleep(self, timeout: float) -> None:
        self.ticked = time.monotonic()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        with contextlib.suppress(InterruptedError):
            poller.poll(max(0, int(timeout * 1000) + 1))
        with contextlib.suppress(BlockingIOError):
            if os.read(self._wake_r, 4096):
                self.woken = True

    def _step(self, backend: Backend) -> float:
        """One round: (re)join, reap finished runs, observe, decide, apply; the time until the next."""
        self.ticked = time.monotonic()
        self._reap(backend)
        if self.member is None or self.member.lost.is_set():
            if self.member is not None:
                self._lose_all(self.member.reason or LossReason.EXPIRED, self.member.detail or "session lost")
            joined = self._join(backend)
            if joined is None:  # every slot it tried was taken a moment before: not an outage
                return self._backoff(self.join_races, 0.01)
            if not joined:
                return self._outage("cannot join the pool")
        self._release_orphans(backend)
        wait = self.looked_at + self.look_gap - time.monotonic()
        if wait > 0 and not self._called(backend):  # a look waits its turn; what woke it is kept for then
            return min(wait, self._quiet_round())
        if not self._must_look(backend):
            return max(0.0, min(self._quiet_round(), self.next_look - time.monotonic()))
        self.woken = False
        began = time.monotonic()
        try:
            obs = observe(backend, self.opts.slices, self.slots)
            if self.opts.once_pass is not None:
                self._read_done(backend)
        except BackendError as exc:
            self._space_looks(backend, began, self.pool_size)  # a look that timed out cost the server as much
            return self._outage(f"cannot observe the pool: {exc}")
        self._space_looks(backend, began, len(obs.members))
        if self.outages:
            log.warning("worker %d: the backend answers again (after %d failed tries)", self.opts.index, self.outages)
            self.outages = 0
        window, self.slots = self.slots, slots_to_watch(obs.top_slot, self.slots)
        if self.opts.recorder is not None:
            self.opts.recorder.members(len(obs.members))
        self._update_watch(obs)
        if self.death_bell is not None:  # a neighbour died (file://): tell everyone if nobody did
            seen, self.death_bell = self.death_bell, None
            if any(h is None for h in obs.holders.values()) and backend.bell() == seen:  # type: ignore[attr-defined]
                self._ring(backend)
        recheck = self._apply(backend, obs)
        now = time.monotonic()
        if self.slots > window:  # members in slots it did not look at may exist: look again soon
            recheck = min(recheck, now + self.period) if recheck is not None else now + self.period
        self.pool_size = max(1, len(obs.members))
        self.eager = len(self.holds) < math.ceil(len(self.opts.slices) / max(1, self.pool_size - 1))
        self.next_look = recheck if recheck is not None else now + self._quiet_look_every()
        return max(0.0, min(self._quiet_round(), self.next_look - now))

    def _must_look(self, backend: Backend) -> bool:
        """Whether this round reads the whole pool (every member and every slice's holder). While the
        pool is quiet, a member on a server backend reads only the bell and the member keys of the two
        members it watches: O(1) a period whatever the pool's size (docs/pool.md, "How news
        travels"). A wake-up, a due recheck, a ring or a watched member gone makes it look."""
        if (self.woken or time.monotonic() >= self.next_look or not backend.capabilities.server_expiry
                or self.opts.once_pass is not None):
            return True
        try:
            bell = read_bell(backend, self.member_slot)
            if bell != self.last_bell:
                self.last_bell = bell
                return True
            watched = list(self.watch_keys)
            if watched:
                seen = look_at(backend, watched)
                dead = [k for k in watched if seen.get(k) is None]
                if dead:
                    # a neighbour's session ended: its slices are free. Tell the members the policy
                    # gives them to, not everyone (in a big pool, every member looking at every death
                    # kept the server from renewing anyone's session): now, from the last look, so
                    # they look while this member does; after its look, any others (see _tell).
                    self.mourning = True
                    self._tell_takers(backend, set(dead))
                    return True
        except BackendError:
            return True  # the look reports the outage
        return False

    def _called(self, backend: Backend) -> bool:
        """While a look waits its turn (servers): whether this member's own bell rang. That is news for it
        alone — a slice handed over to it, a dead member's slice meant for it — and never comes to a
        crowd at once, so it looks now: a handoff does not wait out the gap. Other news (the pool's bell)
        waits for the member's turn."""
        if self.member_slot is None:
            return False
        try:
            bell = read_bell(backend, self.member_slot)
        except BackendError:
            return False
        last = self.last_bell if isinstance(self.last_bell, tuple) else (None, None)
        if not isinstance(bell, tuple) or bell == last:
            return False
        self.last_bell, self.woken = bell, True
        return bell[1:] != last[1:]

    def _quiet_round(self) -> float:
        """How often a quiet member reads its bell and its watched members' keys: every period, and in a
        pool of more than 100 members every pool size / 200 seconds (1,000 members: 5 s), so the quiet
        rounds of the whole pool stay near 400 reads a second however big it grows."""
        return max(self.period, self.pool_size / 200)

    def _quiet_look_every(self) -> float:
        """How long a quiet pool goes without a full look (a safety net for a lost notification): longer
        in bigger pools, where each look reads every member and every slice."""
        return max(4 * self.opts.ttl, self.pool_size / 50) * random.uniform(0.8, 1.2)

    def _space_looks(self, backend: Backend, began: float, members: int) -> None:
        """Servers: the next full look waits at least this one's duration x members / 2. Every member
        reads the whole pool, so a server that answers slower, or a bigger pool, spaces the looks out:
        the looks of M members keep a shared server at most about two thirds busy however big M grows,
        instead of timing out and being sent again (docs/pool.md, "Looks on a busy server"). In a pool of
        ten a look costs a few milliseconds and the gap is a few more. The gap is never above a quarter
        ttl or, in a big pool, a second per 25 members (40 s for 1,000: the quiet look's pace at ttl 10)."""
        now = time.monotonic()
        self.looked_at = now
        if backend.capabilities.server_expiry:
            self.look_gap = min(max(self.opts.ttl / 4, members / 25), (now - began) * members / 2)

    def _backoff(self, tries: int, first: float) -> float:
        """How long to wait before try ``tries + 1``: ``first`` doubling per try, up to the larger of two
        periods and a quarter ttl (at most 4 s), each wait drawn from its upper half so members that
        failed together do not come back together."""
        cap = max(2 * self.period, min(4.0, self.opts.ttl / 4))
        return min(cap, first * 2.0 ** min(tries - 1, 30)) * random.uniform(0.5, 1.0)

    def _outage(self, what: str) -> float:
        """Try again after a back-off: a server too busy to answer in time still does the work of every
        request that timed out, so members retrying at a fixed pace keep it from catching up. The delay
        starts at a period and doubles up to max(2 periods, ttl / 4) (at most 4 s), at random in its
        upper half: never above two periods at a short ttl, where recovery after an outage must stay
        within the ttl (docs/decisions.md, 17). Log with a growing back-off too: one line at tries 1, 2,
        4, 8, ... so an outage of any length stays a handful of lines."""
        self.outages += 1
        if self.outages & (self.outages - 1) == 0:
            log.warning("worker %d: %s (try %d; next lines at try %d)", self.opts.index, what, self.outages,
                        self.outages * 2)
        return self._backoff(self.outages, self.period)

    def _update_watch(self, obs: Observation) -> None:
        """Watch the next two members after this one (in slot order): each death is seen by two. Every
        slot in use counts: a worker restarted under the same identity leaves its dead incarnation's
        key behind for up to a ttl, and that key's expiry is the news that frees its slices."""
        by_slot = obs.by_slot
        slots = sorted(by_slot)
        if self.member_slot in slots:
            i = slots.index(self.member_slot)
            slots = slots[i + 1:] + slots[:i]
        nxt = slots[:2]
        self.watch_keys = [member_key(j) for j in nxt]
        pids = [p for j in nxt if (p := by_slot[j].pid) is not None and p != os.getpid()]
        if pids != self.watch_pids:
            self.watch_pids = pids
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._watch_w, b"!")  # the watcher picks up the new set

    def _read_done(self, backend: Backend) -> None:
        assert self.opts.once_pass is not None
        wanted = [s.id for s in self.opts.slices if s.id not in self.done]
        if not wanted:
            return
        names = {once_record(self.opts.once_pass, sid): sid for sid in wanted}
        for name, value in backend.read_records(list(names)).items():
            if value is not None:
                self.done[names[name]] = value

    def _release_orphans(self, backend: Backend) -> None:
        """Free keys our session may still hold without a run on them (a failed release, until it works;
        an acquire that got no answer, every round for a ttl): the session is renewed for our other
        slices, so nothing else frees them."""
        for lease in list(self.orphans):
            try:
                backend.release(lease)
                self.orphans.remove(lease)
            except BackendError as exc:
                log.warning("worker %d: release of %d keys failed again: %s", self.opts.index, len(lease.keys), exc)
                return
        now = time.monotonic()
        for sid, (until, lease) in list(self.unsure.items()):
            if sid in self.holds or now >= until or self.member is None or lease.session != self.member.lease.session:
                del self.unsure[sid]
                continue
            try:
                backend.release(lease)
            except BackendError:
                return
            if not backend.capabilities.blocking_wait:  # others learn of a release by notification, else the bell
                self._ring(backend)

    def _orphan(self, keys: Sequence[str]) -> Lease:
        """A lease for ``keys`` under our session, for :meth:`_release_orphans` (release needs no tokens)."""
        assert self.member is not None
        return Lease(tuple(keys), self.owner, {}, self.opts.ttl, session=self.member.lease.session)

    def _apply(self, backend: Backend, obs: Observation) -> float | None:
        opts, now = self.opts, time.monotonic()
        me = opts.identity
        for s in opts.slices:
            record = obs.owners.get(s.id)
            hold = self.holds.get(s.id)
            # Someone else was granted it (the backend lost our grant): ours is gone whatever our
            # session says. Stop the run now; never release, the keys are not ours.
            if (hold is not None and record is not None and record.owner not in (self.owner, "")
                    and not hold.lost.is_set()):
                log.error("worker %d: slice %s is held by %s now; stopping its run", opts.index, s.id, record.owner,
                          extra={"slice": s.id})
                hold.reason, hold.detail = LossReason.SUPERSEDED, f"superseded by {record.owner}"
                hold.superseded = True
                hold.lost.set()
                if hold.runner is not None:
                    hold.runner.wake()
            # held by this very session but not run here: give it back
            if record is not None and record.owner == self.owner and s.id not in self.holds:
                log.warning("worker %d: slice %s is held by our session without a run; releasing it", opts.index, s.id,
                            extra={"slice": s.id})
                self.orphans.append(self._orphan(s.keys))
        self._release_orphans(backend)
        holders: dict[str, str | None] = {}
        for s in opts.slices:
            if s.id in self.done:
                continue
            holder = me if s.id in self.holds else obs.holders.get(s.id)
            holders[s.id] = holder
            if holder is None:
                self.free_since.setdefault(s.id, now)
            else:
                self.free_since.pop(s.id, None)
        present = frozenset(obs.members) | {me}
        established = {m.identity: max(0.0, time.time() - m.since) for m in obs.members.values() if m.since}
        settled, settles_at = self.members.update(present, now, established)
        window = max(1.0, self.params.settle)
        starting = now - self.started < window
        takers = present | frozenset(opts.siblings) if starting else present
        view = View(me, now, takers, settled, holders, self.free_since,
                    {sid: h.since for sid, h in self.holds.items()})
        # While starting, a slice meant for a sibling that has not joined yet waits for it.
        params = replace(self.params, grace=max(self.params.grace, window)) if starting else self.params
        decision = decide(view, params)
        # Once mode never hands a slice over mid-run: a run cut short would have to start again.
        for sid in decision.release if opts.once_pass is None else ():
            hold = self.holds.get(sid)
            if hold is not None and not hold.handing_over:
                log.info("worker %d hands slice %s over (share %d)", opts.index, sid, decision.target,
                         extra={"slice": sid})
                hold.handing_over = True
                taker = obs.members.get(decision.handoff.get(sid, ""))
                hold.handoff_slot = taker.slot if taker is not None else None
                if hold.runner is not None:
                    hold.runner.stop()
        retry: float | None = None
        assigned, contended = set(decision.assigned), False
        for sid in decision.acquire:
            if self.stopping.is_set() or sid in self.holds or self.cooldown.get(sid, 0.0) > now:
                continue
            if contended and sid not in assigned:
                continue
            got = self._acquire(backend, self.by_id[sid])
            if got:
                self.ticked = time.monotonic()  # progress: a round that takes many slices is not a stall
                continue
            retry = now + min(0.05, self.period)  # raced with another member or a probe: look again soon
            # A slice left over after the grace, taken since our look: every member that saw it free goes
            # down the same leftovers in the same order, so the rest are most likely taken too. Try only
            # our own share's slices now, then look again: one busy round trip each for hundreds of
            # leftovers made a round longer than the heartbeat's STALL, and the worker was killed as hung.
            contended = contended or (got is None and sid not in assigned)
        if starting:
            retry = min(x for x in (retry, self.started + window) if x is not None)
        # Slices still held by someone who is no longer a member (on file://, a dead worker's command
        # still exiting) will be free any moment, and nobody will ring: look again soon, backing off.
        if any(h is not None and h not in present for h in holders.values()):
            if self.linger_since is None:
                self.linger_since = now
            # every 10 ms for half a second (a dead worker's command being killed), then doubling to
            # 80 ms until two seconds, then every period
            age = now - self.linger_since
            step = 0.01 if age < 0.5 else min(0.08, self.linger * 2) if age < 2.0 else self.period
            self.linger = step
            retry = min(x for x in (retry, now + step) if x is not None)
        else:
            self.linger, self.linger_since = 0.0, None
        if backend.capabilities.server_expiry and self._tell(backend, obs, holders, present, decision, now):
            # short of its share with nothing free: look again later in case a member it rang decided
            # otherwise (views differ for a moment), less often in a big pool
            retry = min(x for x in (retry, now + max(2 * self.params.settle, self.pool_size / 50)) if x is not None)
        # A member settling changes only what members above their share hand over: the others need
        # not look again when it does (in a pool that a thousand workers join, every member looked
        # again as each newcomer settled).
        if len(self.holds) <= decision.target:
            settles_at = None
        times = [t for t in (decision.recheck, settles_at, retry) if t is not None]
        return min(times) if times else None

    def _tell(self, backend: Backend, obs: Observation, holders: dict[str, str | None], present: frozenset[str],
              decision: Decision, now: float) -> bool:
        """Servers: ring the bells of the members this look shows have something to do, and only theirs.

        A member short of its share rings the members above theirs (they hand over once it has
        settled); a member that has just joined also rings the two members before it in slot order,
        which watch it from now on. Everyone else learns nothing and reads nothing but two bells a
        period: a join costs the looks of the members it concerns, not one per member (docs/pool.md,
        "How news travels").
        True when it is short with nothing free to take."""
        me = self.opts.identity
        free = any(h is None for sid, h in holders.items() if sid not in self.holds)
        short = len(self.holds) < decision.target
        self.hungry = short or free
        counts = Counter(h for h in holders.values() if h is not None)
        share = targets(len(holders), sorted(present))
        self.crowd = max(1, sum(1 for m in present if counts[m] < share[m]))
        slots: list[int] = []
        if short and not free:
            slots += [obs.members[m].slot for m in present
                      if m != me and m in obs.members and counts[m] > share[m]]
        if self.announce:
            self.announce = False
            ring = sorted(obs.by_slot)
            if self.member_slot in ring:
                i = ring.index(self.member_slot)
                slots += [ring[(i - d) % len(ring)] for d in (1, 2)]
        again = max(2 * self.params.settle, self.period)  # a member rung lately is not rung again yet
        slots = [j for j in dict.fromkeys(slots) if j != self.member_slot and self.rung.get(j, -again) <= now - again]
        if self.mourning:  # a watched member died: the members its free slices are meant for, unless told
            self.mourning = False
            meant = meant_for(View(me, now, present, frozenset(), holders))
            slots += [j for m in set(meant.values()) if m != me and m in obs.members
                      and (j := obs.members[m].slot) not in self.told]
        self.last_seen = (obs, holders)
        self.told = set()
        if slots:
            self._ring(backend, slots)
            self.rung.update(dict.fromkeys(slots, now))
        return short and not free

    def _tell_takers(self, backend: Backend, dead_keys: set[str]) -> None:
        """Servers, when watched members died (their member keys): ring the members their slices are
        meant for, as the last look saw the pool (the same assignment every member computes; this
        member's next look tells any others)."""
        if self.last_seen is None:
            return
        obs, holders = self.last_seen
        dead = {m.identity for j, m in obs.by_slot.items() if member_key(j) in dead_keys}
        if not dead:
            return
        me = self.opts.identity
        alive = frozenset(obs.members) - dead | {me}
        freed = {sid: (None if h in dead else h) for sid, h in holders.items()}
        meant = meant_for(View(me, time.monotonic(), alive, frozenset(), freed))
        self.told = {obs.members[m].slot for m in set(meant.values()) if m != me and m in obs.members}
        if self.told:
            self._ring(backend, sorted(self.told))

    # -- joining, acquiring, releasing ----------------------------------------------------------------
    def _join(self, backend: Backend) -> bool | None:
        """Take a member key (the preferred slot first) under a fresh owner id; on file:// ring the bell (on
        a server the first look tells the members the join concerns, see :meth:`_tell`). False when
        the backend failed, None when every slot tried was taken by others joining at the same time.
        The owner id is kept across lost rounds until a join succeeds: on etcd each new owner is a new
        lease granted (and later revoked) through the cluster's log."""
        opts = self.opts
        owner = self.join_owner = self.join_owner or member_owner(opts.identity)
        try:
            if self.join_view is None:
                self.join_view = self._member_slots(backend)
            top, free = self.join_view
            # Take a free slot no further than the join margin past one in use: members read that far
            # (slots_to_watch). The preferred slot first; then one the read found free; then one just
            # above the highest slot in use; each time one of the lowest few at random (low slots
            # keep the pool dense: members that joined before read only a little past the highest
            # they saw). When the slots read free are all tried, the slots above are read again (64
            # at a time): those that others joining took since are in use now, so the next tries go
            # above them. Workers joining at once climb past each other with cheap acquires and small
            # reads, instead of all racing for the same 16 slots and reading every member slot again
            # after each lost race (a thousand joining at once kept the server busy with nothing
            # else). "Few" is 4, doubling with each lost round (up to the join margin: 16, or an eighth
            # of the slots in use in a big pool, see pool.join_margin). Only a read moves the
            # highest slot in use: an acquire refused for another reason (a server's restart grace)
            # must not send joiners further and further out, where members would not see them.
            width = 4 << min(self.join_races, 5)
            above: list[int] = []  # free slots just above the highest in use, from a read of 64 slots
            # The slot tried first: the one this worker had, else its index among its supervisor's
            # workers, so that the workers of one supervisor joining at once do not race each other
            # (those of several race per slot, one winner each). While it is beyond the margin, the
            # workers below are still joining: wait for them (a few rounds) instead of racing them.
            wanted = self.member_slot if self.member_slot is not None else opts.index
            if wanted not in free and wanted > top + join_margin(top) and self.join_races < 8:
                top, above = self._slots_above(backend, top)
                self.join_view = (top, free)
                if wanted > top + join_margin(top):
                    self.join_races += 1
                    return None
            for attempt in range(16):
                if attempt == 0 and (wanted in free or top < wanted <= top + join_margin(top)):
                    j = wanted
                elif free:
                    j = free.pop(random.randrange(min(width, len(free))))
                else:
                    if not above:
                        top, above = self._slots_above(backend, top)
                    j = above.pop(random.randrange(min(width, len(above))))
                if j in free:
                    free.remove(j)
                if j in above:
                    above.remove(j)
                if j >= MAX_SLOTS:
                    break
                key = member_key(j)
                lease = backend.try_acquire([key], owner, opts.ttl)
                if lease is None:
                    continue
                # the session's renewals are timed for /metrics around the calls it makes anyway
                session = backend if opts.recorder is None else metrics.MeteredBackend(backend, opts.recorder)
                claim = Claim(session, Slice(-1, (Shard(key),)), lease)
                if claim.time_left() <= 0:
                    claim.release()
                    continue
                claim.on_lost(self.wake)
                claim.on_lost(self._session_lost)
                claim.start()
                self.member, self.member_slot, self.owner = claim, j, owner
                self.join_view, self.join_races, self.join_owner = None, 0, None
                if backend.capabilities.server_expiry and lease.ttl != opts.ttl:
                    self._report(f"t {lease.ttl}")  # the watchdog follows the ttl actually granted
                self.started = time.monotonic()
                self.woken = True  # look at once
                if backend.capabilities.server_expiry:
                    self.announce = True  # the first look rings the members a join concerns, not everyone
                else:
                    self._ring(backend)
                log.info("worker %d joined the pool as %s (member slot %d)", opts.index, opts.identity, j)
                return True
        except BackendError as exc:
            log.debug("worker %d: cannot join the pool: %s", opts.index, exc)  # _outage() says it once
            return False
        self.join_races += 1
        # read the slots again now and then: the pool may have shrunk, or holes opened below
        self.join_view = (top, free) if self.join_races % 8 else None
        return None

    @staticmethod
    def _slots_above(backend: Backend, top: int) -> tuple[int, list[int]]:
        """Joining: from the highest member slot known in use, the highest in use now and the free slots a
        worker may take above it (up to :func:`join_margin` past it), read 64 slots at a time (or the
        margin, if more)."""
        while True:
            span = range(top + 1, top + 1 + max(64, join_margin(top)))
            seen = look_at(backend, [member_key(j) for j in span])
            used = {j for j in span if seen.get(member_key(j)) is not None}
            if len(used) < len(span):
                high = max(used, default=top)
                return high, [j for j in range(top + 1, high + join_margin(high) + 1) if j not in used]
            top = span[-1]

    def _member_slots(self, backend: Backend) -> tuple[int, list[int]]:
        """The highest member slot in use and the free ones a joining worker may take (below it, and up to
        :func:`join_margin` above it). Reads the member window, then twice as many slots while the
        highest in use is within the margin of the end (only the slots not read yet: a worker joining a
        pool of 1,000 read 16, 32, ..., 2,048 slots, each from 0)."""
        seen: dict[str, object] = {}
        read = 0
        while True:
            seen.update(look_at(backend, [member_key(j) for j in range(read, self.slots)], under=MEMBERS))
            read = self.slots
            top = max((j for j in range(read) if seen.get(member_key(j)) is not None), default=-1)
            if top + join_margin(top) < read or read >= MAX_SLOTS:
                return top, [j for j in range(min(read, top + join_margin(top) + 1))
                             if seen.get(member_key(j)) is None]
            self.slots = min(MAX_SLOTS, slots_to_watch(read - 1, read))

    def _session_lost(self, claim: Claim) -> None:
        """Called from the fence or renewal thread: every slice under the session is lost now."""
        for hold in list(self.holds.values()):
            hold.reason, hold.detail = claim.reason, claim.detail
            hold.lost.set()
            if hold.runner is not None:
                hold.runner.wake()

    def _give_back(self, backend: Backend, lease: Lease) -> None:
        """Release a lease we will not use; if that fails, keep it to retry (it must not pin the slice)."""
        try:
            backend.release(lease)
        except BackendError:
            self.orphans.append(lease)

    def _acquire(self, backend: Backend, slice_: Slice) -> bool | None:
        """Take ``slice_`` and start its run: True when it is ours (or, in once mode, done already); None
        when the backend says it is taken; False when the acquire failed otherwise."""
        assert self.member is not None
        try:
            lease = backend.try_acquire(slice_.keys, self.owner, self.opts.ttl)
        except BackendError as exc:
            log.warning("worker %d: acquire of slice %s failed: %s", self.opts.index, slice_.id, exc,
                        extra={"slice": slice_.id})
            if backend.capabilities.server_expiry:  # the grant may have happened: never let it pin the slice
                self.unsure[slice_.id] = (time.monotonic() + self.opts.ttl, self._orphan(slice_.keys))
            return False
        if lease is None:
            return None
        if not self.member.covers(lease):  # our session expired and the backend started another
            self._give_back(backend, lease)
            self.member.lose(LossReason.EXPIRED, "liveness session replaced (it had expired)")
            return False
        hold = Hold(slice_, lease, self.member)
        if hold.time_left() <= 0:
            self._give_back(backend, lease)
            return False
        if self.opts.once_pass is not None:
            # Check again now that we hold it: another member may have done it and released it
            # between our look at the pool and this acquire.
            try:
                result = backend.read_records([once_record(self.opts.once_pass, slice_.id)])
            except BackendError as exc:
                log.warning("worker %d: cannot read slice %s's once result: %s", self.opts.index, slice_.id, exc,
                            extra={"slice": slice_.id})
                self._give_back(backend, lease)
                return False
            done = next(iter(result.values()))
            if done is not None:
                self.done[slice_.id] = done
                self._give_back(backend, lease)
                return True
        self.holds[slice_.id] = hold
        self.unsure.pop(slice_.id, None)
        self.free_since.pop(slice_.id, None)
        self._events("acquired", hold)
        ownership = Ownership(hold, worker=self.opts.index)
        # file://: the command inherits the locks' descriptors, so the slice stays locked until every
        # process it started has ended, even if this worker dies first.
        lease_fds = getattr(backend, "lease_fds", None)
        inherit = tuple(lease_fds(lease)) if lease_fds is not None and self.opts.run.command else ()
        hold.runner = SliceRunner(ownership, self.opts.run, report=self._report,
                                  on_exit=lambda runner: self._run_ended(hold), inherit_fds=inherit)
        hold.runner.start()
        return True

    def _run_ended(self, hold: Hold) -> None:
        """In the runner's thread, the moment its run has ended: a lost slice's loss is written now —
        the run is over — even while the main loop is stuck on an unreachable backend."""
        if hold.lost.is_set() and hold.report_loss():
            self._events("lost", hold, reason=hold.detail or "lost")
        self.wake()

    def _reap(self, backend: Backend) -> None:
        """Release the slices whose runs have ended (recording once-mode results first)."""
        for sid, hold in list(self.holds.items()):
            runner = hold.runner
            if hold.superseded and (runner is None or runner.finished.is_set()):
                self.holds.pop(sid, None)
                if hold.report_loss():
                    self._events("lost", hold, reason=hold.detail or "superseded")
                continue
            if runner is None or not runner.finished.is_set() or hold.lost.is_set():
                continue
            result = runner.result
            if self.opts.once_pass is not None and result in ("ok", "failed"):
                try:
                    backend.swap_record(once_record(self.opts.once_pass, sid), None, result)
                    self.done[sid] = result
                except BackendError as exc:  # keep the slice and try again next round
                    log.warning("worker %d: cannot record slice %s as done: %s", self.opts.index, sid, exc,
                                extra={"slice": sid})
                    continue
            elif result == "failed":
                self.cooldown[sid] = time.monotonic() + self.opts.run.backoff_max
            reason = "handoff" if hold.handing_over else "done" if result == "ok" else result
            self._release(backend, hold, reason)

    def _release(self, backend: Backend, hold: Hold, reason: str) -> None:
        self.holds.pop(hold.slice.id, None)
        self._events("released", hold, reason=reason)
        try:
            backend.release(hold.lease)
        except BackendError as exc:  # our session lives on for the other slices: retry until it goes
            log.warning("worker %d: release of slice %s failed (will retry): %s", self.opts.index, hold.slice.id, exc,
                        extra={"slice": hold.slice.id})
            self.orphans.append(hold.lease)
        if reason == "handoff" and hold.handoff_slot is not None and backend.capabilities.server_expiry:
            self._ring(backend, [hold.handoff_slot])  # the member it is meant for; the others need not look
        else:
            self._ring(backend)

    def _lose_all(self, reason: LossReason, detail: str, *, emit: bool = True) -> None:
        """Every slice is lost (session gone, or exiting): stop each run within the grace, then forget them."""
        holds = list(self.holds.values())
        for hold in holds:
            if hold.reason is None:
                hold.reason, hold.detail = reason, detail
            hold.lost.set()
            if hold.runner is not None:
                hold.runner.wake()
        end = time.monotonic() + self.opts.run.grace + 0.5
        for hold in holds:
            if hold.runner is not None:
                hold.runner.join(max(0.0, end - time.monotonic()))
                if not hold.runner.finished.is_set() and self.opts.run.job is not None:
                    log.error("worker %d: job did not stop after losing its lease; exiting", self.opts.index)
                    for h in holds:
                        if h.report_loss():
                            self._events("lost", h, reason=h.detail or detail)
                    os._exit(EXIT_FENCED)
            if emit and hold.report_loss():
                self._events("lost", hold, reason=hold.detail or detail)
        self.holds.clear()
        if self.member is not None and (emit or self.member.lost.is_set()):
            self.member = None

    def _shutdown(self, backend: Backend) -> None:
        """Warm stop: end every run, release each slice as its run ends, then the member key."""
        for hold in self.holds.values():
            if hold.runner is not None:
                hold.runner.stop(cold=self.cold.is_set())
        while self.holds:
            if self.member is not None and self.member.lost.is_set():
                self._lose_all(self.member.reason or LossReason.EXPIRED, self.member.detail or "session lost")
                break
            if self.cold.is_set():
                for hold in self.holds.values():
                    if hold.runner is not None:
                        hold.runner.stop(cold=True)
            self._reap(backend)
            if self.holds:
                self._sleep(0.5)
        if self.member is not None:
            self.member.release()
            self.member = None
            self._ring(backend)

    def _events(self, kind: str, hold: Hold, **extra: object) -> None:
        """An ownership change (``acquired``, ``released`` or ``lost``): its events, its log line, its counts."""
        lease = hold.lease
        rows = [{"shard": k, "token": lease.tokens[k]} for k in lease.keys]
        self.opts.events.emit_many(kind, rows, owner=lease.owner, worker=self.opts.index, slice=hold.slice.id,
                                   **extra)
        shards, reason = len(hold.slice.shards), extra.get("reason")
        logs.ownership(kind, worker=self.opts.index, slice_id=hold.slice.id, shards=shards,
                       reason=None if reason is None else str(reason))
        recorder = self.opts.recorder
        if recorder is None:
            return
        if kind == "acquired":
            recorder.acquired(shards)
        elif kind == "released":
            recorder.released(str(reason), shards)
        else:
            recorder.lost(hold.reason or LossReason.EXPIRED, shards)

    # -- news from the pool ----------------------------------------------------------------------------
    @staticmethod
    def _ring(backend: Backend, slots: Sequence[int] = ()) -> None:
        with contextlib.suppress(OSError, BackendError):
            ring_bell(backend, slots)

    def _watch(self, main: Backend) -> None:
        """Wake the loop when the pool changes: the backend's notification, or on file:// the bell and
        a probe of the next members' keys."""
        try:
            backend = open_backend(self.opts.backend_url)
        except Exception:  # the main loop reports backend problems; without news it still polls
            log.debug("watcher could not open the backend", exc_info=True)
            return
        try:
            if hasattr(backend, "bell"):
                self._watch_file(backend)
            elif backend.capabilities.blocking_wait:  # MySQL has no notification: the bell and the period
                self._watch_server(backend)
        except Exception:
            log.debug("watcher stopped", exc_info=True)
        finally:
            backend.close()

    def _watch_file(self, backend: Backend) -> None:
        """Sleep in ``poll`` on the bell (inotify) and on pidfds of the next members: a ring or a death
        wakes the loop within microseconds, and costs nothing while nothing happens. A member that
        sees its neighbour die rings for everyone (its slices are free: the kernel dropped the locks
        before the pidfd became readable — or, where its commands still hold them, the dead worker's
        guard rings once it has ended them). A member that would keep its share even if one member
        died looks at a ring ``NEWS_DEFER`` later: on a busy machine the members that must act (a
        standby, a member short of its share) get the CPU first."""
        bell_fd = backend.bell_watch()  # type: ignore[attr-defined]
        deferred: float | None = None  # a ring this member looks at a little later (not eager)
        if bell_fd is None or not hasattr(os, "pidfd_open"):
            if bell_fd is not None:
                os.close(bell_fd)
            self._watch_file_polling(backend)
            return
        pidfds: dict[int, int] = {}  # watched member pid -> its pidfd
        gone: set[int] = set()  # pids seen dead, until the next observation forgets them
        try:
            while not self.stopping.is_set():
                want = set(self.watch_pids)
                gone &= want
                for pid in [p for p in pidfds if p not in want]:
                    os.close(pidfds.pop(pid))
                for pid in want - pidfds.keys() - gone:
                    try:
                        pidfds[pid] = os.pidfd_open(pid)
                    except OSError:  # already gone (and reaped)
                        gone.add(pid)
                        self._member_died(backend)
                poller = select.poll()
                for fd in (bell_fd, self._watch_r, *pidfds.values()):
                    poller.register(fd, select.POLLIN)
                wait_ms = 1000 if deferred is None else max(0, int((deferred - time.monotonic()) * 1000) + 1)
                ready = set()
                with contextlib.suppress(InterruptedError):
                    ready = {fd for fd, _ in poller.poll(wait_ms)}
                if bell_fd in ready:
                    drain(bell_fd)
                    if self.eager:
                        self.wake()
                    elif deferred is None:
                        deferred = time.monotonic() + NEWS_DEFER
                if deferred is not None and time.monotonic() >= deferred:
                    deferred = None
                    self.wake()
                if self._watch_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._watch_r, 4096)
                for pid, fd in list(pidfds.items()):
                    if fd in ready:
                        os.close(pidfds.pop(pid))
                        gone.add(pid)
                        self._member_died(backend)
        finally:
            os.close(bell_fd)
            for fd in pidfds.values():
                os.close(fd)

    def _member_died(self, backend: Backend) -> None:
        """A watched member died: look now; the next step rings for everyone if its slices are free and
        nobody rang since (a dead worker's guard rings once its commands are gone: one wake-up of the
        pool, not two)."""
        self.death_bell = backend.bell()  # type: ignore[attr-defined]
        self.wake()

    def _watch_file_polling(self, backend: Backend) -> None:
        """Without inotify and pidfds: read the bell and probe the next members' keys every poll."""
        poll = float(getattr(backend, "poll", 0.01))
        last = backend.bell()  # type: ignore[attr-defined]
        while not self.stopping.is_set():
            time.sleep(poll)
            bell = backend.bell()  # type: ignore[attr-defined]
            if bell != last:
                last = bell
                self.wake()
                continue
            for key in list(self.watch_keys):
                if not backend.held(key):  # type: ignore[attr-defined]
                    self.watch_keys = [k for k in self.watch_keys if k != key]
                    backend.ring()  # type: ignore[attr-defined]  # a member died: tell everyone
                    last = backend.bell()  # type: ignore[attr-defined]
                    self.wake()
                    break

    def _watch_server(self, backend: Backend) -> None:
        keys = [s.first_key for s in self.opts.slices]
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                backend.wait(keys, 5.0)
            except BackendError:
                time.sleep(1.0)
                continue
            if time.monotonic() - start >= 4.9 or not self.hungry:
                continue  # a release concerns only members short of their share or waiting for a free slice
            # Many members may be short at once (a supervisor of many workers joining a big pool): each
            # looks on notifications at most once per 20 ms x the members short at its last look, so
            # the pool's looks stay under about 50 a second however many wait (each reads every member
            # and every slice); one short member alone looks at once.
            gap = min(5.0, 0.02 * self.crowd)
            if self.stopping.wait(max(0.0, self.notified_at + gap - time.monotonic())):
                return
            self.notified_at = time.monotonic()
            self.wake()


def _bell_ringer(url: str) -> Callable[[], None] | None:
    """On file://, a way to ring the pool's bell later without opening anything (other backends notify
    through the server)."""
    if not url.startswith("file:"):
        return None
    backend = open_backend(url)
    try:
        return backend.ringer()  # type: ignore[attr-defined, no-any-return]
    finally:
        backend.close()


def run_worker(opts: WorkerOptions, parent: int) -> int:
    """Entry point in a freshly forked worker process."""
    die_with_parent(parent)
    logs.set_worker(opts.index)
    if opts.recorder is None and metrics.recording():
        opts.recorder = metrics.Recorder(opts.layout.slices, opts.layout.shards)
    if opts.recorder is not None:
        opts.run = replace(opts.run, on_run=opts.recorder.job)
    if opts.run.command is not None and opts.guard_fd is None:
        guard_pid, opts.guard_fd = start_guard(_bell_ringer(opts.backend_url))  # before any thread starts
        opts.run = replace(opts.run, guard=guard_pid)
    worker = Worker(opts)
    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if opts.heartbeat_fd is not None:
        threading.Thread(target=worker._heartbeat, args=(parent,), daemon=True, name="heartbeat").start()
    try:
        return worker.run()
    except Shutdown:
        return EXIT_OK
    except BackendError as exc:
        log.error("worker %d: %s", opts.index, exc)
        return EXIT_INTERNAL
    except Exception:
        log.exception("worker %d crashed", opts.index)
        return EXIT_INTERNAL
