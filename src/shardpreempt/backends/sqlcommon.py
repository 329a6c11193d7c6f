"""What the SQL backends (``postgresql://``, ``mysql://``) share: URL parsing and the lease logic.

Both keep the same three tables: ``sessions`` (one row per live worker session, with a server-side
``expires_at``), ``shards`` (one row per key ever used: the session it points at and its last token)
and ``records`` (name, value: the backend's records, apart from the keys). Each grant's token is
``GREATEST(last token + 1, server clock in µs since the epoch)``, as in ``redis://``: strictly
increasing per key across holders, and never a repeat of a token lost with the server's latest
writes (an older snapshot restored, a lagging replica promoted), as long as the server's clock does
not step back further than the time between two grants of a key. :class:`SqlBackend` turns the
one-round-trip server calls each dialect provides (acquire, renew, release, inspect, read and swap
records) into the Backend contract.

Restart grace (``backends.grace``): when it opens a connection, each dialect reads how long the server
has been up (PostgreSQL ``pg_postmaster_start_time()``, MySQL/MariaDB ``Uptime``) and notes when, by
the local monotonic clock, the server started at the latest. A server restart breaks every
connection, so the connection an acquire runs on tells which server process answers it; until that
process has been up for ``restart_grace`` seconds (default: the ttl asked), ``try_acquire`` grants
nothing and sends nothing: a restored snapshot has forgotten the grants made since, and their holders
may still be inside their local deadline. Renewals go on: one of a lease the server forgot fails, and
its holder fences itself. A pooler between the backend and the server (pgbouncer, ProxySQL) keeps the
client's connection across a server restart and hides it: connect to the server itself.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BackendProtocolError, ConfigError, LeaseLost
from ..model import Holder, Lease
from ..redact import redact_url
from . import check_record, option, renewal_check, superseded, url_options
from .grace import RestartGrace

#: Longest key accepted, in UTF-8 bytes: it must fit in a primary-key index entry on both servers.
MAX_KEY_BYTES = 2048

#: What a dialect's ``_renew`` reports: the session was extended; it had expired; it lives but the lease's
#: first key no longer points at it with the lease's token (nothing was extended).
RENEWED, EXPIRED, SUPERSEDED = "renewed", "expired", "superseded"

#: One live session holding keys of an inspect batch: (owner, seconds left by the server clock, pid, host, and
#: the keys of the batch it holds with their tokens and since as unix time, in the same order). The servers
#: answer one row per session with the keys as JSON, not a row per key: the drivers parse rows in Python,
#: JSON is parsed at C speed.
HeldRow = tuple[str, float, "int | None", "str | None", Sequence[str], Sequence[int], "Sequence[float | None]"]
#: Bound on the UTF-8 bytes of the keys of one inspect query, so that the query and the JSON of a session
#: holding all its keys stay well inside a server's packet limit (MariaDB's test servers: 8 MiB).
INSPECT_BYTES = 1 << 20


@dataclass(frozen=True)
class DbUrl:
    """The parts of a database URL the drivers need."""

    user: str | None
    password: str | None
    host: str
    port: int
    database: str


def parse_db_url(url: str, default_port: int) -> DbUrl:
    """Split ``scheme://user[:password]@host[:port]/database``; ConfigError naming the redacted URL."""
    parts = urlsplit(url)
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError("the port must be a number", source=redact_url(url)) from None
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigError("name the database in the path: scheme://user@host:port/dbname",
                          source=redact_url(url))
    return DbUrl(
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        host=parts.hostname or "127.0.0.1",
        port=port,
        database=database,
    )


def check_keys(keys: Sequence[str], url: str) -> list[str]:
    """The keys as a list; ConfigError for a key no SQL server can store as a primary key."""
    out = list(keys)
    for key in out:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise ConfigError(f"key {key[:60]!r} is not valid UTF-8", source=url) from None
        if size > MAX_KEY_BYTES or "\x00" in key:
            raise ConfigError(f"key {key[:60]!r}... is longer than {MAX_KEY_BYTES} bytes or holds NUL",
                              source=url)
    return out


def storable(text: str) -> bool:
    """Whether a SQL text column can hold ``text``: valid UTF-8 (no lone surrogate) without NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def batches(keys: list[str], count: int, size: int) -> list[list[str]]:
    """The keys a SQL server can hold (``storable``: nothing else was ever granted), cut into runs of at most
    ``count`` keys and, past the first key of each, ``size`` UTF-8 bytes."""
    out: list[list[str]] = [[]]
    used = 0
    for key in keys:
        if key.isascii():
            length = len(key)
        elif storable(key):
            length = len(key.encode("utf-8"))
        else:
            continue
        if "\x00" in key:
            continue
        run = out[-1]
        if run and (len(run) >= count or used + length > size):
            run = []
            out.append(run)
            used = 0
        run.append(key)
        used += length
    return [run for run in out if run]


class SqlBackend:
    """The lease and record logic over a dialect's server calls; subclasses provide them and connections."""

    inspect_batch = 10_000

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = redact_url(url)
        self._raw_url = url
        self.opts = {**url_options(url), **options}
        self.connect_timeout = option(self.opts, "connect_timeout", float, 2.0, url=url)
        self.timeout = option(self.opts, "timeout", float, 2.0, url=url)
        self.grace = RestartGrace(self.opts, url)
        self._sessions: dict[str, str] = {}  # owner -> its live session id, as the server named it
        self._pid = os.getpid()
        self._host = socket.gethostname()

    def _restarting(self, started: float, ttl: float) -> bool:
        """Whether a server that started at ``started`` (monotonic) is inside the restart grace of an acquire
        of ``ttl`` seconds: then the dialect grants nothing (``_acquire`` answers busy without a query)."""
        left = started + self.grace.for_ttl(ttl) - time.monotonic()
        if left <= 0:
            return False
        self.grace.holding_back(started, left)
        return True

    # -- dialect -------------------------------------------------------------------------------
    def _acquire(self, keys: list[str], session: str | None, owner: str,
                 ttl: float) -> tuple[str, dict[str, int]] | None:
        """One round trip: (session id, key -> token), or None when a key is held elsewhere or the server
        connected to is inside the restart grace (:meth:`_restarting`, checked on the connection used)."""
        raise NotImplementedError

    def _renew(self, session: str, ttl: float, key: str | None, token: int | None) -> str:
        """One statement: extend a live session if ``key`` (``None``: no check) still points at it with
        ``token`` (``None``: any); ``RENEWED``, ``EXPIRED`` (the session) or ``SUPERSEDED`` (the key)."""
        raise NotImplementedError

    def _release(self, keys: list[str], session: str) -> None:
        """One round trip: free the keys still pointing at ``session`` and notify waiters."""
        raise NotImplementedError

    def _inspect(self, keys: list[str]) -> list[HeldRow]:
        """One round trip: a row for each live session holding some of ``keys``, with those keys."""
        raise NotImplementedError

    def _read_records(self, names: list[str]) -> dict[str, str]:
        """One round trip: the value of each of ``names`` that exists."""
        raise NotImplementedError

    def _swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """One statement (its own transaction): compare-and-set, ``None`` meaning absent or delete."""
        raise NotImplementedError

    # -- contract ------------------------------------------------------------------------------
    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key for ``owner`` or none, in one server transaction (one round trip)."""
        if ttl <= 0:
            raise ConfigError(f"ttl must be positive, got {ttl!r}", source=self.url)
        wanted = check_keys(keys, self.url)
        start = time.monotonic()
        granted = self._acquire(wanted, self._sessions.get(owner), owner, ttl)
        if granted is None:
            return None
        session, tokens = granted
        self._sessions[owner] = session
        return Lease(tuple(keys), owner, tokens, ttl, start + ttl, session)

    def renew(self, lease: Lease) -> Lease:
        """Extend the owner's session if the lease's first key still points at it with the lease's token
        (one statement, O(1) whatever the number of keys); LeaseLost if the session already expired or
        the key was released or granted to another session (or again: a stale lease object)."""
        start = time.monotonic()
        check = renewal_check(lease)
        key, token = check if check is not None else (None, None)
        outcome = self._renew(lease.session, lease.ttl, key, token) if lease.session else EXPIRED
        if outcome == SUPERSEDED:
            raise superseded(lease, "no longer points at this lease's session and grant (released or taken)")
        if outcome == EXPIRED:
            if self._sessions.get(lease.owner) == lease.session:
                del self._sessions[lease.owner]  # the next acquire gets a new session id
            raise LeaseLost("session expired on the server", lease.keys)
        if outcome != RENEWED:
            raise BackendProtocolError(f"{self.url}: unexpected renewal outcome {outcome!r:.80}")
        return lease.with_deadline(start + lease.ttl)

    def release(self, lease: Lease) -> None:
        """Free the keys still pointing at the lease's session; idempotent."""
        if lease.keys and lease.session:
            self._release(list(lease.keys), lease.session)

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Holder of every key by the server clock: one query per ``inspect_batch`` keys (fewer when the keys
        are long: ``INSPECT_BYTES``), answered per session; keys granted together share one Holder."""
        wanted = list(dict.fromkeys(keys))
        out: dict[str, Holder | None] = dict.fromkeys(wanted)
        for batch in batches(wanted, self.inspect_batch, INSPECT_BYTES):  # a key no server stores is free
            for owner, left, pid, host, held, tokens, sinces in self._inspect(batch):
                shared: dict[tuple[int, float | None], Holder] = {}
                expires_in = max(0.0, float(left))
                for key, token, since in zip(held, tokens, sinces, strict=True):
                    holder = shared.get((token, since))
                    if holder is None:
                        holder = shared[token, since] = Holder(owner, int(token), expires_in, pid, host, since)
                    out[key] = holder
        return out

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """The value of each record (``None`` when absent), in one query."""
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            self._check_record(name)
        found = self._read_records(wanted) if wanted else {}
        return {name: found.get(name) for name in wanted}

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """Compare-and-set one record in one statement; ``None`` means absent (expected) or delete (value)."""
        self._check_record(name, value)
        if expected is not None and not (isinstance(expected, str) and storable(expected)):
            return False  # no record can hold it: nothing to ask the server
        return self._swap_record(name, expected, value)

    def _check_record(self, name: str, value: str | None = None) -> None:
        check_record(name, value)
        if not (storable(name) and (value is None or storable(value))):
            raise ConfigError(f"record {name!r:.80}: names and values must be valid UTF-8", source=self.url)
