"""``memory://NAME`` — an in-process backend for unit tests and examples.

URL grammar: ``memory://NAME`` (backends opened with the same NAME in one process share state;
``memory://`` alone gets a private store). Options: ``clock`` (a :class:`~shardpreempt.typing.Clock`
object, keyword only) so tests control expiry without sleeping.

It follows the server design exactly: one session per owner with server-side expiry, each key points
at a session, a key whose session expired is free, tokens are a per-key counter that never resets.
Capabilities: server expiry, not cross-host, not session-bound, blocking wait (a condition variable).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import LeaseLost
from ..model import Holder, Lease
from ..typing import SYSTEM_CLOCK, Capabilities, Clock
from . import check_record, reject_unknown, renewal_check, superseded


@dataclass
class _Store:
    lock: threading.Condition = field(default_factory=threading.Condition)
    sessions: dict[str, float] = field(default_factory=dict)  # session id -> expiry (clock.monotonic)
    holds: dict[str, str] = field(default_factory=dict)  # key -> session id
    tokens: dict[str, int] = field(default_factory=dict)  # key -> last token, never reset
    since: dict[str, float] = field(default_factory=dict)
    records: dict[str, str] = field(default_factory=dict)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()
_counter = itertools.count(1)


def _owner_of(session: str) -> str:
    return session.rsplit("/", 1)[0]


class MemoryBackend:
    """In-process lock store with server-style sessions and an injectable clock."""

    capabilities = Capabilities(server_expiry=True, cross_host=False, session_bound=False, blocking_wait=True)

    def __init__(self, url: str = "memory://", *, clock: Clock = SYSTEM_CLOCK, **options: Any) -> None:
        reject_unknown(options, url)
        self.url = url
        self.clock = clock
        name = urlsplit(url).netloc or f"private-{uuid.uuid4().hex}"
        with _STORES_LOCK:
            self._store = _STORES.setdefault(name, _Store())
        self._sessions: dict[str, str] = {}  # owner -> its live session id

    def _alive(self, session: str | None, now: float) -> bool:
        return session is not None and self._store.sessions.get(session, -1.0) > now

    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key or none."""
        start = self.clock.monotonic()
        store = self._store
        with store.lock:
            now = self.clock.monotonic()
            if any(self._alive(store.holds.get(k), now) for k in keys):
                return None
            session = self._sessions.get(owner)
            if session is None or not self._alive(session, now):
                session = f"{owner}/{next(_counter)}"
                self._sessions[owner] = session
            store.sessions[session] = max(store.sessions.get(session, now), now + ttl)  # never shorten
            tokens = {}
            for key in keys:
                tokens[key] = store.tokens.get(key, 0) + 1
                store.tokens[key] = tokens[key]
                store.holds[key] = session
                store.since[key] = self.clock.time()
        return Lease(tuple(keys), owner, tokens, ttl, start + ttl, session)

    def renew(self, lease: Lease) -> Lease:
        """Extend the owner's session if the lease's first key still points at it with the lease's token:
        O(1), whatever the number of keys. LeaseLost if the session expired or the key was released or
        granted again (a stale lease object)."""
        start = self.clock.monotonic()
        store = self._store
        check = renewal_check(lease)
        with store.lock:
            if not self._alive(lease.session, self.clock.monotonic()):
                if self._sessions.get(lease.owner) == lease.session:
                    del self._sessions[lease.owner]
                raise LeaseLost("session expired", lease.keys)
            if check is not None:
                key, token = check
                holder = store.holds.get(key)
                if holder != lease.session:
                    raise superseded(lease, "was released" if holder is None else "is held by another session")
                if token is not None and store.tokens.get(key) != token:
                    raise superseded(lease, f"was granted again (token {store.tokens.get(key)}, ours {token})")
            store.sessions[lease.session] = max(store.sessions[lease.session], self.clock.monotonic() + lease.ttl)
        return lease.with_deadline(start + lease.ttl)

    def release(self, lease: Lease) -> None:
        """Free the keys still pointing at this lease's session."""
        store = self._store
        with store.lock:
            for key in lease.keys:
                if store.holds.get(key) == lease.session:
                    del store.holds[key]
            store.lock.notify_all()

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Holder of each key."""
        store = self._store
        out: dict[str, Holder | None] = {}
        with store.lock:
            now = self.clock.monotonic()
            for key in keys:
                session = store.holds.get(key)
                if session is not None and self._alive(session, now):
                    out[key] = Holder(
                        _owner_of(session), store.tokens[key], store.sessions[session] - now,
                        since=store.since.get(key),
                    )
                else:
                    out[key] = None
        return out

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Wait for a release notification (any key) or the timeout."""
        with self._store.lock:
            self._store.lock.wait(timeout)

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """The value of each record, or None."""
        for name in names:
            check_record(name)
        with self._store.lock:
            return {name: self._store.records.get(name) for name in names}

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """Compare-and-set one record (``None``: absent / delete)."""
        check_record(name, value)
        with self._store.lock:
            if self._store.records.get(name) != expected:
                return False
            if value is None:
                self._store.records.pop(name, None)
            else:
                self._store.records[name] = value
            return True

    def expire(self, owner: str) -> None:
        """Test helper: end ``owner``'s session now, as if it had stopped renewing."""
        with self._store.lock:
            session = self._sessions.get(owner)
            for sid in list(self._store.sessions):
                if sid == session or _owner_of(sid) == owner:
                    self._store.sessions[sid] = -1.0
            self._store.lock.notify_all()

    def close(self) -> None:
        """Nothing to close."""
