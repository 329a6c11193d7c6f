"""The ZooKeeper backend's sessions: one kazoo client per owner, how it is started (its pings switched off:
renew is the heartbeat), what its state listener records, and when a lost owner's client is closed.

kazoo starts threads of its own for each client (a connection thread and two callback threads); the
listener runs on the connection thread and only sets flags, so clients are stopped and closed only by the
backend's callers. Every kazoo error is translated here, once (``edge``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kazoo import exceptions as kz
from kazoo.client import KazooClient, KazooState
from kazoo.handlers.threading import KazooTimeoutError

from ..errors import BackendProtocolError, BackendUnavailable, ConfigError

log = logging.getLogger("shardpreempt.backends.zookeeper")


@dataclass
class Owner:
    """One owner's kazoo client and what the backend knows of its sessions."""

    client: Any  # KazooClient
    negotiated: list[float]  # seconds, set on each (re)connect
    marked: int | None = None  # session id whose marker node exists
    held: dict[str, int] = field(default_factory=dict)  # node path -> session id that created it
    claims: dict[int, str] = field(default_factory=dict)  # token -> claim record path
    limbo: tuple[list[str], str] | None = None  # paths and claim record of an acquire whose reply was lost
    changed: threading.Event = field(default_factory=threading.Event)  # set on every state change
    lost: threading.Event = field(default_factory=threading.Event)  # set when a session of it expired
    busy: threading.Lock = field(default_factory=threading.Lock)  # held by acquire and release: never reaped then
    closed: bool = False  # its client was stopped: the owner gets a new one

    def settle(self, timeout: float) -> None:
        """Give kazoo up to ``timeout`` to learn whether a dropped connection's session still lives."""
        deadline = time.monotonic() + timeout
        while self.client.state == KazooState.SUSPENDED and (left := deadline - time.monotonic()) > 0:
            self.changed.clear()
            if self.client.state == KazooState.SUSPENDED:
                self.changed.wait(left)

    def stop(self) -> None:
        """Stop and close the client: its session ends, and its ephemeral nodes with it."""
        self.closed = True
        self.client.stop()
        self.client.close()


@contextlib.contextmanager
def edge(what: str, url: str) -> Iterator[None]:
    """Translate kazoo's errors, once, into the project's (``url`` already redacted)."""
    try:
        yield
    except (KazooTimeoutError, kz.ConnectionLoss, kz.OperationTimeoutError, kz.SessionMovedError,
            kz.ConnectionDropped, kz.SessionExpiredError) as exc:
        raise BackendUnavailable(f"ZooKeeper {what} failed at {url}: {type(exc).__name__}") from exc
    except (kz.NoAuthError, kz.AuthFailedError, kz.InvalidACLError, kz.BadArgumentsError) as exc:
        raise ConfigError(f"ZooKeeper refused {what}: {type(exc).__name__}", source=url) from exc
    except kz.KazooException as exc:
        raise BackendProtocolError(f"ZooKeeper {what} at {url}: {type(exc).__name__}") from exc


def connect(hosts: str, url: str, *, timeout: float, connect_timeout: float, ping: bool,
            options: dict[str, Any]) -> Owner:
    """A started client with session timeout ``timeout`` (the negotiated one is recorded on each connect);
    without ``ping`` kazoo sends no heartbeat, so the session lives only while its owner renews."""
    retry = {"max_tries": -1, "delay": 0.05, "backoff": 2, "max_delay": 1.0}
    client = KazooClient(hosts=hosts, timeout=timeout, logger=logging.getLogger(f"{log.name}.kazoo"),
                         connection_retry=retry, **options)
    negotiated = [timeout]
    connection = client._connection
    original = connection._connect

    refused_since: list[float | None] = [None]

    def record(*args: Any) -> Any:
        try:
            read_timeout, connect_timeout = original(*args)
        except Exception:
            # A server restored from an older snapshot refuses every client that has seen a later zxid,
            # for ever (nobody can write to move it on). Once the session timeout has passed without a
            # connection, this client's session is gone on any server: forget the zxid, so the server
            # answers "session expired" and the owner gets a new session (docs/faults.md, restores).
            now = time.monotonic()
            since = refused_since[0] = refused_since[0] or now
            if client.last_zxid and now - since > negotiated[0]:
                log.warning("ZooKeeper at %s refused this client for %.1f s (a server restored from an older "
                            "snapshot?): reconnecting as a client that has seen nothing", url, now - since)
                client.last_zxid = 0
            raise
        refused_since[0] = None
        negotiated[0] = read_timeout * 1.5 / 1000.0  # kazoo's read timeout is 2/3 of the negotiated one
        return read_timeout, connect_timeout

    connection._connect = record
    # kazoo waits for the answer to a connect request up to session timeout / hosts. A server that
    # restarts accepts connections before it serves, and ZooKeeper 3.8 leaves such a connection
    # unanswered: the client would hang for the whole session, which then expires. Wait at most
    # ``connect_timeout`` (the documented time to establish a session) and let kazoo try again.
    invoke, limit = connection._invoke, connect_timeout

    def bounded(timeout: float, request: Any, xid: Any = None) -> Any:
        return invoke(min(timeout, limit), request, xid)

    connection._invoke = bounded
    if not ping:  # renew is the heartbeat: a holder that stops renewing must lose its session
        connection._send_ping = lambda connect_timeout: None
    try:
        client.start(timeout=connect_timeout)
    except KazooTimeoutError as exc:
        client.stop()
        client.close()
        raise BackendUnavailable(f"ZooKeeper unreachable at {url} within {connect_timeout} s") from exc
    state = Owner(client, negotiated)

    def changed(new: str) -> None:  # runs on kazoo's connection thread: only flags, never closes here
        if new == KazooState.LOST:
            state.lost.set()
        state.changed.set()

    client.add_listener(changed)
    return state


class Owners:
    """Each owner's client, by owner id; used from the worker's thread and the claimer's (renew)."""

    def __init__(self, start: Callable[[float], Owner]) -> None:
        self._start = start  # a new client for a session timeout
        self._owners: dict[str, Owner] = {}
        self._lock = threading.Lock()

    def __contains__(self, owner: object) -> bool:
        return owner in self._owners

    def __len__(self) -> int:
        return len(self._owners)

    def get(self, owner: str) -> Owner | None:
        """The owner's client, if it has one."""
        with self._lock:
            return self._owners.get(owner)

    def session(self, owner: str, ttl: float) -> Owner:
        """The owner's client, a new one if it has none or its session was lost."""
        state = self.get(owner)
        if state is not None and state.client.state == KazooState.LOST:
            self.drop(owner, state)
            state = None
        if state is None:
            state = self._start(ttl)
            with self._lock:
                self._owners[owner] = state
        return state

    def drop(self, owner: str, state: Owner | None = None) -> None:
        """Close the owner's client (only if it is still ``state``, when given); its nodes go at once."""
        with self._lock:
            current = self._owners.get(owner)
            if current is None or (state is not None and current is not state):
                return
            del self._owners[owner]
        current.stop()

    def reap(self) -> None:
        """Close the client of every owner whose session was lost and that holds nothing on its current one.

        kazoo replaces an expired session at once, and again after each timeout while the owner is idle
        (its pings are off); a claimer takes a new owner id after a loss, so without this every loss would
        leave a client re-creating sessions for ever. Called at the start of every public method."""
        with self._lock:
            lost = [(owner, state) for owner, state in self._owners.items() if state.lost.is_set()]
        for owner, state in lost:
            if not state.busy.acquire(blocking=False):
                continue  # an acquire or release is using it: a later call decides
            try:
                sid = state.client._session_id
                if sid is None or sid not in state.held.values():
                    self.drop(owner, state)
            finally:
                state.busy.release()

    def close(self) -> None:
        """Close every client."""
        with self._lock:
            owners = list(self._owners)
        for owner in owners:
            self.drop(owner)
