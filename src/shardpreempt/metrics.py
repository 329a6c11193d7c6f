"""Prometheus metrics for ``shardpreempt run --metrics HOST:PORT``, one part per kind of process.

* A **worker** keeps a :class:`Recorder` (a few integers) and sends what changed as one line on the
  pipe it already beats on (``m {json}``): at the end of a round of its main loop (so an ownership
  change is seen at once), otherwise instead of its next heartbeat. No backend round trip, no library
  import: a renewal is timed around the call the session makes anyway (:class:`MeteredBackend`).
* The **supervisor** forwards those lines, tagged with the worker's index, to the metrics process,
  with its own news (a worker started, a worker exited) — see :class:`MetricsServer`. It never blocks
  on it: a line the metrics process cannot take at once is dropped and counted.
* The **metrics process**, forked by the supervisor before any worker (so no worker carries it), is
  the only process that imports ``prometheus_client``: it folds the lines into :class:`PoolMetrics`
  and serves them on ``/metrics``. The supervisor stays single-threaded and never waits for a scrape.

The command line calls :func:`serve` before the run starts; the supervisor picks the server up with
:func:`installed`. The metric names and labels are listed in the README (section "Metrics").
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import signal
import socket
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, LossReason, MissingExtra
from .model import Lease

log = logging.getLogger("shardpreempt.metrics")

PREFIX = "shardpreempt_"
#: Histogram bucket bounds (seconds): a renewal is one round trip, a job run anything up to an hour.
RENEWAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Why a worker releases a slice (the worker's fixed set): the ``reason`` label of releases.
RELEASE_REASONS = ("handoff", "done", "failed", "stopped")
#: The ``reason`` label of losses: the values of :class:`~shardpreempt.errors.LossReason`.
LOSS_REASONS = tuple(r.value for r in LossReason)
#: A line on the pipe to the metrics process stays within PIPE_BUF, so it is written whole or not at all.
MAX_LINE = 4000


def parse_address(text: str, *, source: str = "command line", key: str = "--metrics") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0: any free port) as ``(host, port)``."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535 or any(c in host for c in "/[] @"):
        raise ConfigError(f"expected HOST:PORT (e.g. 127.0.0.1:9100), got {text[:100]!r}", source=source, key=key)
    return host, int(port)


def require() -> None:
    """:class:`MissingExtra` unless ``prometheus_client`` can be imported (without importing it here)."""
    try:
        found = importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        found = False
    if not found:
        raise MissingExtra("needs the prometheus-client library, which is not installed: install the "
                           "'metrics' extra (pip install 'shardpreempt[metrics]')", key="--metrics")


# -- in a worker -------------------------------------------------------------------------------------
class Recorder:
    """A worker's counts since its last report; thread-safe (the main loop, runners and renewals add).

    :meth:`take` returns the changes as one line of JSON with short keys: ``p`` the pool's
    ``[slices, shards]`` (first line only), ``o`` the ``[slices, shards]`` owned and ``n`` the members
    seen (absolute, when changed), ``a`` acquisitions, ``r``/``l`` releases/losses by reason, ``rf``
    failed renewals, ``rt`` the monotonic time of the last good renewal, ``rh``/``jh`` renewal/job
    histograms (``{"b": {bucket index: count}, "s": sum}``), ``jf`` failed runs.
    """

    def __init__(self, slices: int, shards: int) -> None:
        self._lock = threading.Lock()
        self._owned = [0, 0]  # slices, shards
        self._sent_owned = [0, 0]
        self._members: int | None = None
        self._delta: dict[str, Any] = {"p": [slices, shards], "o": [0, 0]}

    def _add(self, key: str, n: int = 1) -> None:
        self._delta[key] = self._delta.get(key, 0) + n

    def _count(self, key: str, label: str) -> None:
        counts = self._delta.setdefault(key, {})
        counts[label] = counts.get(label, 0) + 1

    def _observe(self, key: str, bounds: Sequence[float], seconds: float) -> None:
        h = self._delta.setdefault(key, {"b": {}, "s": 0.0})
        i = str(bisect_left(bounds, seconds))
        h["b"][i] = h["b"].get(i, 0) + 1
        h["s"] += seconds

    def _own(self, slices: int, shards: int) -> None:
        self._owned = [max(0, self._owned[0] + slices), max(0, self._owned[1] + shards)]

    def acquired(self, shards: int) -> None:
        """A slice of ``shards`` shards is ours."""
        with self._lock:
            self._add("a")
            self._own(1, shards)

    def released(self, reason: str, shards: int) -> None:
        """A held slice was released; ``reason`` is one of :data:`RELEASE_REASONS`."""
        with self._lock:
            self._count("r", reason)
            self._own(-1, -shards)

    def lost(self, reason: LossReason, shards: int) -> None:
        """A held slice was lost."""
        with self._lock:
            self._count("l", reason.value)
            self._own(-1, -shards)

    def members(self, count: int) -> None:
        """The pool had ``count`` members at the worker's last look."""
        with self._lock:
            if count != self._members:
                self._members = self._delta["n"] = count

    def renewal(self, seconds: float, ok: bool) -> None:
        """One renewal round trip of the worker's session."""
        with self._lock:
            self._observe("rh", RENEWAL_BUCKETS, seconds)
            if ok:
                self._delta["rt"] = time.monotonic()  # one clock for every process of the machine
            else:
                self._add("rf")

    def job(self, seconds: float, failed: bool) -> None:
        """One run of the job or command (``failed``: it failed on its own, not stopped by us)."""
        with self._lock:
            self._observe("jh", JOB_BUCKETS, seconds)
            if failed:
                self._add("jf")

    def take(self) -> str | None:
        """What changed since the last call, as one short line of JSON; ``None`` when nothing did."""
        with self._lock:
            delta, self._delta = self._delta, {}
            if self._owned != self._sent_owned:
                delta["o"] = self._sent_owned = list(self._owned)
        return json.dumps(delta, separators=(",", ":")) if delta else None


class MeteredBackend:
    """The worker's backend as its session's :class:`~shardpreempt.claims.Claim` sees it: renewals timed.

    It makes no call of its own; every method but ``renew`` is the backend's, untouched.
    """

    def __init__(self, backend: Any, recorder: Recorder) -> None:
        self._backend = backend
        self._recorder = recorder

    def renew(self, lease: Lease) -> Lease:
        """The backend's renew, timed; an error or a loss counts as a failed renewal."""
        start = time.monotonic()
        try:
            renewed: Lease = self._backend.renew(lease)
        except Exception:  # LeaseLost included
            self._recorder.renewal(time.monotonic() - start, ok=False)
            raise
        self._recorder.renewal(time.monotonic() - start, ok=True)
        return renewed

    def __getattr__(self, name: str) -> Any:  # every other attribute as it is
        return getattr(self._backend, name)


_recording = False


def recording() -> bool:
    """Whether this process is a worker whose supervisor serves metrics (see :meth:`MetricsServer.in_worker`)."""
    return _recording


# -- in the supervisor ---------------------------------------------------------------------------------
class MetricsServer:
    """The supervisor's end: binds ``address`` at once (a bad or busy address is a config error before
    anything starts), forks the metrics process with :meth:`start`, and forwards lines to it without
    blocking."""

    def __init__(self, address: str) -> None:
        require()
        host, port = parse_address(address)
        if not host.isascii():
            raise ConfigError(f"cannot listen on {address!r}: not an ASCII host name", key="--metrics")
        try:  # the host as bytes: no IDNA codec (and its tables) loaded into the supervisor and its workers
            infos = socket.getaddrinfo(host.encode(), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address!r}: {exc.strerror}", key="--metrics") from None
        family, _, _, _, sockaddr = infos[0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(sockaddr)
            self.sock.listen(64)
        except OSError as exc:
            self.sock.close()
            raise ConfigError(f"cannot listen on {address!r}: {exc.strerror}", key="--metrics") from None
        bound = self.sock.getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        self.pid: int | None = None
        self._w: int | None = None
        self._dropped = 0

    @property
    def url(self) -> str:
        """Where to scrape."""
        return f"http://{self.address}/metrics"

    def start(self) -> None:
        """Fork the metrics process (before any worker, so no worker carries it); idempotent."""
        if self.pid is not None:
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(w)
                code = _serve(self.sock, r, parent)
            finally:
                os._exit(code)
        os.close(r)
        self.sock.close()  # the metrics process serves it; workers forked later must not hold it
        os.set_blocking(w, False)
        self.pid, self._w = pid, w

    def in_worker(self) -> None:
        """In a freshly forked worker: drop the supervisor's end of the pipe, and record from now on."""
        global _recording
        if self._w is not None:
            os.close(self._w)
            self._w = None
        self.pid = None  # not this process's child
        _recording = True

    def _send(self, line: str) -> None:
        if self._w is None:
            return
        data = line.encode()
        if len(data) >= MAX_LINE:
            return  # never a partial line (workers' lines are far shorter)
        try:
            os.write(self._w, data + b"\n")
        except BlockingIOError:  # the metrics process is behind: drop, never block the supervisor
            self._dropped += 1
            if self._dropped & (self._dropped - 1) == 0:
                log.warning("the metrics process is not keeping up: %d updates dropped so far", self._dropped)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                log.error("the metrics process is gone: /metrics is no longer served")
                os.close(self._w)
                self._w = None

    def forward(self, index: int, payload: bytes) -> None:
        """A worker's ``m`` line."""
        self._send(f"W {index} {payload.decode(errors='replace')}")

    def started(self, index: int) -> None:
        """Worker ``index`` was (re)started."""
        self._send(f"S {index}")

    def exited(self, index: int) -> None:
        """Worker ``index`` exited: what it still held by its last report is lost with it."""
        self._send(f"E {index}")

    def close(self) -> None:
        """End the metrics process and reap it (idempotent)."""
        if self._w is not None:
            os.close(self._w)
            self._w = None
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):  # the supervisor's reaping may have got it
                os.waitpid(self.pid, 0)
            self.pid = None
        self.sock.close()


_installed: MetricsServer | None = None


def serve(address: str) -> MetricsServer:
    """Bind ``address`` now and make it this process's metrics server: the next supervisor run forks the
    metrics process and feeds it. :class:`ConfigError` (exit status 2) for a bad or busy address,
    :class:`MissingExtra` without ``prometheus_client``."""
    global _installed
    server = MetricsServer(address)
    if _installed is not None:
        _installed.close()
    _installed = server
    return server


def installed() -> MetricsServer | None:
    """The server :func:`serve` installed, if any."""
    return _installed


def uninstall() -> None:
    """Close and forget the installed server."""
    global _installed
    if _installed is not None:
        _installed.close()
        _installed = None


# -- in the metrics process ------------------------------------------------------------------------------
@dataclass
class _Worker:
    alive: bool = False
    starts: int = 0
    slices: int = 0
    shards: int = 0
    members: int | None = None
    last_renewal: float | None = None


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def add(self, h: dict[str, Any]) -> int:
        n = 0
        for i, count in h.get("b", {}).items():
            self.counts[min(int(i), len(self.bounds))] += int(count)
            n += int(count)
        self.sum += float(h.get("s", 0.0))
        return n

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class PoolMetrics:
    """Everything ``/metrics`` shows, folded from the supervisor's lines; :meth:`collect` for a registry.

    Gauges are per worker (label ``worker``); counters and histograms are for the supervisor's workers
    together, so a page stays a few hundred samples with a hundred workers.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.slices: int | None = None
        self.shards: int | None = None
        self.clock = clock
        self.workers: dict[int, _Worker] = {}
        self.acquisitions = 0
        self.releases: Counter[str] = Counter(dict.fromkeys(RELEASE_REASONS, 0))
        self.losses: Counter[str] = Counter(dict.fromkeys(LOSS_REASONS, 0))
        self.lost_at_exit = 0
        self.renewal_failures = 0
        self.runs = 0
        self.failures = 0
        self.renewals = _Histogram(RENEWAL_BUCKETS)
        self.jobs = _Histogram(JOB_BUCKETS)
        self.lock = threading.Lock()

    def apply(self, line: str) -> None:
        """One line from the supervisor: ``S i`` started, ``E i`` exited, ``W i {json}`` a worker's news."""
        kind, _, rest = line.partition(" ")
        index_text, _, payload = rest.partition(" ")
        if not index_text.isdigit():
            return
        with self.lock:
            w = self.workers.setdefault(int(index_text), _Worker())
            if kind == "S":
                w.alive, w.starts = True, w.starts + 1
            elif kind == "E":
                self.lost_at_exit += w.slices  # a clean exit released everything and said so first
                w.alive, w.slices, w.shards, w.members, w.last_renewal = False, 0, 0, None, None
            elif kind == "W":
                with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError, IndexError):
                    self._update(w, json.loads(payload))

    def _update(self, w: _Worker, d: dict[str, Any]) -> None:
        if "p" in d:
            self.slices, self.shards = int(d["p"][0]), int(d["p"][1])
        if "o" in d:
            w.slices, w.shards = int(d["o"][0]), int(d["o"][1])
        if "n" in d:
            w.members = int(d["n"])
        if "rt" in d:
            w.last_renewal = float(d["rt"])
        self.acquisitions += int(d.get("a", 0))
        self.releases.update({str(k): int(v) for k, v in d.get("r", {}).items()})
        self.losses.update({str(k): int(v) for k, v in d.get("l", {}).items()})
        self.renewal_failures += int(d.get("rf", 0))
        if "rh" in d:
            self.renewals.add(d["rh"])
        if "jh" in d:
            self.runs += self.jobs.add(d["jh"])
        self.failures += int(d.get("jf", 0))

    def collect(self) -> Iterator[Any]:
        """The metric families, for a ``prometheus_client`` registry."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p = PREFIX
        with self.lock:
            now = self.clock()
            ws = sorted(self.workers.items())
            if self.slices is not None and self.shards is not None:
                yield GaugeMetricFamily(p + "pool_slices", "Slices in the pool's layout.", value=self.slices)
                yield GaugeMetricFamily(p + "pool_shards", "Shards in the pool's layout.", value=self.shards)
            yield GaugeMetricFamily(p + "workers_alive", "Worker processes of this supervisor running now.",
                                    value=sum(w.alive for _, w in ws))

            def per_worker(kind: type[Any], name: str, doc: str, get: Callable[[_Worker], float | None]) -> Any:
                family = kind(p + name, doc, labels=["worker"])
                for i, w in ws:
                    value = get(w)
                    if value is not None:
                        family.add_metric([str(i)], value)
                return family

            def by_reason(name: str, doc: str, counts: Counter[str]) -> Any:
                family = CounterMetricFamily(p + name, doc, labels=["reason"])
                for reason, n in sorted(counts.items()):
                    family.add_metric([reason], n)
                return family

            yield per_worker(GaugeMetricFamily, "slices_owned", "Slices the worker holds.", lambda w: w.slices)
            yield per_worker(GaugeMetricFamily, "shards_owned", "Shards the worker holds.", lambda w: w.shards)
            yield per_worker(GaugeMetricFamily, "members_seen", "Pool members at the worker's last look.",
                             lambda w: w.members)
            yield per_worker(GaugeMetricFamily, "seconds_since_renewal",
                             "Seconds since the worker's session was last renewed (backends with server expiry).",
                             lambda w: None if w.last_renewal is None else max(0.0, now - w.last_renewal))
            yield per_worker(CounterMetricFamily, "worker_restarts", "Times the worker process was started again.",
                             lambda w: max(0, w.starts - 1))
            yield CounterMetricFamily(p + "acquisitions", "Slices acquired.", value=self.acquisitions)
            yield by_reason("releases", "Slices released, by reason.", self.releases)
            yield by_reason("losses", "Slices lost by a living worker, by reason.", self.losses)
            yield CounterMetricFamily(p + "lost_at_exit", "Slices a worker still held when its process ended.",
                                      value=self.lost_at_exit)
            yield CounterMetricFamily(p + "renewal_failures", "Session renewals that failed.",
                                      value=self.renewal_failures)
            yield CounterMetricFamily(p + "job_runs", "Runs of the job or command that ended.", value=self.runs)
            yield CounterMetricFamily(p + "job_failures", "Runs that failed on their own.", value=self.failures)
            for name, doc, h in (("renewal_duration_seconds", "Session renewal round trips.", self.renewals),
                                 ("job_duration_seconds", "How long runs of the job or command took.", self.jobs)):
                yield HistogramMetricFamily(p + name, doc, buckets=h.cumulative(), sum_value=h.sum)


def _serve(sock: socket.socket, read_fd: int, parent: int) -> int:
    """The metrics process: serve ``/metrics`` on ``sock`` from the lines read on ``read_fd`` until EOF."""
    from http.server import ThreadingHTTPServer

    from prometheus_client.exposition import MetricsHandler
    from prometheus_client.registry import CollectorRegistry

    from .process import die_with_parent

    os.setpgid(0, 0)  # out of the terminal's group: a Ctrl-C is the supervisor's to handle
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent(parent)
    state = PoolMetrics()
    ours = CollectorRegistry()
    ours.register(state)  # a collector is anything with collect()

    class Handler(MetricsHandler):
        registry = ours  # not the library's global registry

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "see /metrics")
                return
            super().do_GET()

    server = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock  # bound and listening already, by the supervisor
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    buffer = b""
    while data := os.read(read_fd, 65536):
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            state.apply(line.decode(errors="replace"))
    return 0
