"""``zookeeper://HOST:PORT[,HOST2:PORT2...]/CHROOT`` — Apache ZooKeeper through kazoo.

URL grammar: ``zookeeper://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/CHROOT][?OPTIONS]``, e.g.
``zookeeper://zk1:2181,zk2:2181,zk3:2181/billing?timeout=2``. Nodes live under ``/CHROOT`` (default
``/shardpreempt``), created on first use. USER:PASSWORD adds a ``digest`` identity to every session and
creates every node with a digest ACL for that user only; a wrong password shows as ``NoAuth`` on the
first write and is a ``ConfigError``.

Options (query string or keywords), with defaults: ``connect_timeout`` (2 s: to establish a session),
``timeout`` (2 s: per request), ``tls`` (false), ``ca``, ``certfile``, ``keyfile`` (TLS files) and
``verify_certs`` (true), passed to kazoo.

Design: one kazoo client, so one ZooKeeper session, per owner, with session timeout = ttl; ZooKeeper
bounds it to its min/max session timeout (2..20 x tickTime by default) and the NEGOTIATED timeout is
``Lease.ttl`` and sets the deadline. Each held key is an empty ephemeral node ``/CHROOT/k/<sha256(key)>``
(so any key works: ``/``, NUL, 1 MB); each acquire also writes one ephemeral claim record
``/CHROOT/c/<random>`` (owner, pid, host, the keys) and each session one marker ``/CHROOT/s/<session>``;
all die with the session. Records are persistent nodes ``/CHROOT/r/<sha256(name)>`` holding the value:
``read_records`` is a ``sync`` and one ``get`` per name, pipelined (one round trip's wait);
``swap_record`` creates (expected absent), or reads the version and sets or deletes at that version.
Kazoo's heartbeat pings are switched off on owner sessions, so ``renew`` (one ``exists`` of the lease's
first key's node, checking that its ephemeral owner is the lease's session and its czxid the lease's token;
of the session's marker for a lease without keys) is what keeps the session alive: a holder that stops
renewing loses its keys after the session timeout, by the server's clock, like every other backend. A key
node that is gone, another session's, or of another grant raises ``LeaseLost`` (superseded) and leaves
the session, which the answer proved alive, to the owner's other leases. While kazoo is reconnecting
(SUSPENDED) ``renew`` waits up to ``timeout`` for the verdict: same session (renewed), expired
(``LeaseLost``) or still unknown (``BackendUnavailable``; the claimer's local deadline does the rest).
``try_acquire`` is one multi: create every key node, the claim record (plus the marker on a session's
first acquire) and a ``setData`` on the record whose returned stat gives the czxid. ``release`` is one
multi: check the marker (so it runs only while the lease's session lives) and delete the nodes this
session still holds (tracked locally; a multi that finds one gone falls back to ``exists`` reads).
``inspect``: up to 64 keys, pipelined ``exists`` on their nodes then ``get`` of their owners' markers
(2 round trips); more, one listing of the claim records and a pipelined ``get`` of each (cost grows with
the number of acquires held, not of keys). ``wait`` sets ``exists`` watches (check and watch are one
atomic call, so a release before the wait is seen at once).

Token source: the node's czxid, the zxid of the multi that created it: strictly increasing and durable.
Capabilities: server expiry, cross-host, not session-bound (a killed holder's nodes go when its session
times out), blocking wait. Caveats: kazoo starts threads of its own (a connection thread and two
callback threads per client: unavoidable with kazoo); switching its pings off uses two private kazoo hooks
(``ConnectionHandler._send_ping``/``_connect``, kazoo 2.11). ``Holder.expires_in`` is None: ZooKeeper
does not tell other clients when a session will expire. kazoo replaces an expired session at once;
an owner whose session was lost and that holds nothing on the new one has its client closed by the
backend's next call (any method, e.g. the claimer's next renewal), so lost owners leave no client behind.
Parts: sessions and their clients in ``zookeeper_session``, reading holders in ``zookeeper_inspect``,
records in ``zookeeper_records``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from kazoo import exceptions as kz
from kazoo.client import KazooState
from kazoo.security import make_digest_acl

from ..errors import BackendUnavailable, ConfigError, LeaseLost
from ..model import Holder, Lease
from ..typing import Capabilities
from . import (
    check_record,
    option,
    redact_url,
    reject_unknown,
    renewal_check,
    superseded,
    url_options,
    zookeeper_records,
)
from .zookeeper_inspect import by_claims, by_nodes
from .zookeeper_session import Owner, Owners, connect, edge

SMALL = 64  # inspect asks for up to this many nodes directly, lists the children first above it
READER_TIMEOUT = 10.0  # session timeout of the pinging client used by inspect and wait


def node_name(key: str) -> str:
    """The node name of a key: a hash, so any identity is a valid ZooKeeper name."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ZooKeeperBackend:
    """Lock store on ZooKeeper: a session per owner, ephemeral nodes, one multi per acquire/release."""

    capabilities = Capabilities(server_expiry=True, cross_host=True, session_bound=False, blocking_wait=True)

    def __init__(self, url: str, **options: Any) -> None:
        self.url = redact_url(url)
        opts = {**url_options(url), **options}
        self.connect_timeout = float(option(opts, "connect_timeout", float, 2.0, url=url))
        self.timeout = float(option(opts, "timeout", float, 2.0, url=url))
        tls = bool(option(opts, "tls", bool, False, url=url))
        self._tls: dict[str, Any] = {"use_ssl": tls, "ca": option(opts, "ca", str, None, url=url),
                                     "certfile": option(opts, "certfile", str, None, url=url),
                                     "keyfile": option(opts, "keyfile", str, None, url=url),
                                     "verify_certs": bool(option(opts, "verify_certs", bool, True, url=url))}
        reject_unknown(opts, url)
        parts = urlsplit(url)
        userinfo, _, self.hosts = parts.netloc.rpartition("@")
        if not self.hosts:
            raise ConfigError("no ZooKeeper host given", source=self.url)
        user, _, password = userinfo.partition(":")
        self._auth: dict[str, Any] = {}
        if user:
            user, password = unquote(user), unquote(password)
            self._auth = {"auth_data": [("digest", f"{user}:{password}")],
                          "default_acl": [make_digest_acl(user, password, all=True)]}
        self.root = "/" + (unquote(parts.path).strip("/") or "shardpreempt")
        self.keys_dir = f"{self.root}/k"  # one ephemeral node per held key: the lock itself
        self.claims_dir = f"{self.root}/c"  # one ephemeral record per acquire: owner, keys; czxid = token
        self.sessions_dir = f"{self.root}/s"  # one ephemeral marker per owner session
        self.records_dir = f"{self.root}/r"  # one persistent node per record, named by the name's hash
        self._owners = Owners(lambda ttl: self._connect(ttl, ping=False))
        self._reader: Owner | None = None
        self._paths_ready = False
        self._wake = threading.Event()
        self._host = socket.gethostname()

    # -- sessions (zookeeper_session) ------------------------------------------------------------
    def _edge(self, what: str) -> contextlib.AbstractContextManager[None]:
        return edge(what, self.url)

    def _connect(self, timeout: float, ping: bool) -> Owner:
        state = connect(self.hosts, self.url, timeout=timeout, connect_timeout=self.connect_timeout, ping=ping,
                        options={**self._auth, **self._tls})
        if not self._paths_ready:
            with self._edge("creating the chroot"):
                for path in (self.keys_dir, self.claims_dir, self.sessions_dir, self.records_dir):
                    state.client.ensure_path(path)
            self._paths_ready = True
        return state

    def _reader_client(self) -> Any:
        if self._reader is None:
            self._reader = self._connect(READER_TIMEOUT, ping=True)
        return self._reader.client

    def _marker(self, session: int) -> str:
        return f"{self.sessions_dir}/{session:x}"

    def _path(self, key: str) -> str:
        return f"{self.keys_dir}/{node_name(key)}"

    def _session_id(self, state: Owner) -> int:
        sid = state.client.client_id
        if sid is None:
            raise BackendUnavailable(f"ZooKeeper session at {self.url} is {state.client.state}")
        return int(sid[0])

    # -- the contract ----------------------------------------------------------------------------
    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key or none: one multi creating an ephemeral node per key and a claim record."""
        start = time.monotonic()
        self._owners.reap()
        while True:
            state = self._owners.session(owner, ttl)
            with state.busy:
                if not state.closed:  # else reaped between the two lines above: take a new client
                    return self._acquire(state, keys, owner, start)

    def _acquire(self, state: Owner, keys: Sequence[str], owner: str, start: float) -> Lease | None:
        if state.limbo is not None:
            self._clear_limbo(state)
        paths = [self._path(k) for k in keys]
        for _ in range(2):
            state.settle(self.timeout)
            sid = self._session_id(state)
            if state.marked is not None and state.marked != sid:  # the old session died with its nodes
                state.held.clear()
                state.claims.clear()
            claim = f"{self.claims_dir}/{uuid.uuid4().hex}"
            record = json.dumps({"owner": owner, "pid": os.getpid(), "host": self._host, "keys": list(keys)},
                                separators=(",", ":")).encode("utf-8", "surrogatepass")
            txn = state.client.transaction()
            if state.marked != sid:
                marker = {"owner": owner, "pid": os.getpid(), "host": self._host}
                txn.create(self._marker(sid), json.dumps(marker).encode(), ephemeral=True)
            for path in paths:
                txn.create(path, b"", ephemeral=True)
            txn.create(claim, record, ephemeral=True)
            txn.set_data(claim, record)  # the only multi result with a stat: it carries the czxid
            try:
                with self._edge("acquire"):
                    results = txn.commit_async().get(timeout=self.timeout)
            except BackendUnavailable:
                state.limbo = (paths, claim)
                raise
            failures = [r for r in results if isinstance(r, Exception)
                        and not isinstance(r, (kz.RolledBackError, kz.RuntimeInconsistency))]
            if not failures:
                stat = results[-1]
                if stat.ephemeralOwner != sid:  # the session changed under us: closing it undoes the multi
                    self._owners.drop(owner, state)
                    raise BackendUnavailable(f"ZooKeeper session at {self.url} changed during an acquire")
                state.marked = sid
                state.held.update(dict.fromkeys([*paths, claim], sid))
                state.claims[int(stat.czxid)] = claim
                ttl_granted = state.negotiated[0]
                return Lease(tuple(keys), owner, dict.fromkeys(keys, int(stat.czxid)), ttl_granted,
                             start + ttl_granted, f"{sid:x}")
            failure = failures[0]
            if isinstance(failure, kz.NodeExistsError) and state.marked != sid and results[0] is failure:
                state.marked = sid  # our marker exists (an earlier reply was lost): again without it
                continue
            if isinstance(failure, kz.NodeExistsError):
                return None
            with self._edge("acquire"):
                raise failure
        return None

    def _clear_limbo(self, state: Owner) -> None:
        """Delete the nodes of an acquire whose reply was lost, if it did take effect."""
        assert state.limbo is not None
        paths, claim = state.limbo
        sid = self._session_id(state)
        with self._edge("cleanup"):
            stat = state.client.exists_async(claim).get(timeout=self.timeout)
        state.limbo = None
        if stat is not None and stat.ephemeralOwner == sid:  # it did: its nodes are ours (same multi)
            state.marked = sid
            state.held.update(dict.fromkeys([*paths, claim], sid))
            self._delete(state, sid, [*paths, claim])

    def renew(self, lease: Lease) -> Lease:
        """One ``exists``, which proves the session alive and resets its timeout: of the lease's first key's
        node, whose owner must be this session and whose czxid the lease's token (slices are all or nothing,
        so the first key tells, whatever the number of keys); of the session's marker for a lease without
        keys."""
        start = time.monotonic()
        sid = int(lease.session, 16)
        check = renewal_check(lease)
        path = self._marker(sid) if check is None else self._path(check[0])
        self._owners.reap()
        state = self._owners.get(lease.owner)
        if state is None:  # closed, or reaped after its session was lost
            raise LeaseLost(f"ZooKeeper session {sid:x} expired", lease.keys)
        for attempt in (1, 2):
            state.settle(self.timeout)  # after a drop kazoo reconnects: same session, or expired
            if state.client._session_id != sid:
                self._owners.reap()  # the session was lost: its client goes unless it holds a newer acquire
                raise LeaseLost(f"ZooKeeper session {sid:x} expired", lease.keys)
            if state.client.state != KazooState.CONNECTED:
                raise BackendUnavailable(f"ZooKeeper session at {self.url} is {state.client.state}")
            try:
                with self._edge("renew"):
                    stat = state.client.exists_async(path).get(timeout=self.timeout)
                break
            except BackendUnavailable as exc:
                if isinstance(exc.__cause__, kz.SessionExpiredError) and not isinstance(
                        exc.__cause__, kz.ConnectionClosedError):
                    self._owners.reap()
                    raise LeaseLost(f"ZooKeeper session {sid:x} expired", lease.keys) from exc
                if attempt == 2 or not isinstance(exc.__cause__, kz.ConnectionLoss):
                    raise
                # the connection dropped under the request (as when the server ends an expired session):
                # kazoo queues the retry until it has reconnected, so it gets the verdict, not a guess
        if check is None and (stat is None or stat.ephemeralOwner != sid):
            with state.busy:  # no lease of a session without its marker can be proven or released: end it
                self._owners.drop(lease.owner, state)
            raise LeaseLost(f"ZooKeeper session {sid:x} is gone", lease.keys)
        if check is not None:
            if state.client._session_id != sid:  # replaced while the request was queued: the session died
                self._owners.reap()
                raise LeaseLost(f"ZooKeeper session {sid:x} expired", lease.keys)
            # the answer came on our session, so it lives: only the key can be lost (its other leases stand)
            if stat is None:
                raise superseded(lease, "was released (its node is gone)")
            if stat.ephemeralOwner != sid:
                raise superseded(lease, f"is held by ZooKeeper session {stat.ephemeralOwner:x}")
            if check[1] is not None and stat.czxid != check[1]:
                raise superseded(lease, f"was granted again (token {stat.czxid}, ours {check[1]})")
        return lease.with_deadline(start + state.negotiated[0])

    def release(self, lease: Lease) -> None:
        """Delete the nodes this lease's session still holds: one multi guarded by the session marker."""
        sid = int(lease.session, 16)
        self._owners.reap()
        state = self._owners.get(lease.owner)
        if state is None:
            return  # closed: its sessions are over, and their ephemeral nodes with them
        with state.busy:
            if state.closed or state.client._session_id != sid:
                return
            paths = [self._path(k) for k in lease.keys]
            claim = state.claims.get(next(iter(lease.tokens.values()), -1))
            self._delete(state, sid, [*paths, claim] if claim else paths)
            if claim and claim not in state.held:
                state.claims = {t: c for t, c in state.claims.items() if c != claim}

    def _delete(self, state: Owner, sid: int, paths: list[str]) -> None:
        ours = [p for p in paths if state.held.get(p) == sid]
        for _ in range(3):
            if not ours:
                return
            txn = state.client.transaction()
            txn.check(self._marker(sid), -1)
            for path in ours:
                txn.delete(path)
            try:
                with self._edge("release"):
                    results = txn.commit_async().get(timeout=self.timeout)
            except BackendUnavailable as exc:
                if isinstance(exc.__cause__, kz.SessionExpiredError) and not isinstance(
                        exc.__cause__, kz.ConnectionClosedError):
                    return  # the session expired: its nodes are gone already
                raise
            if not any(isinstance(r, Exception) for r in results):
                for path in ours:
                    state.held.pop(path, None)
                return
            if isinstance(results[0], kz.NoNodeError):
                return  # the marker is gone, so is the session: nothing of ours is left
            with self._edge("release"):  # a node went missing: re-read which are still ours
                replies = [state.client.exists_async(p) for p in ours]
                stats = [r.get(timeout=self.timeout) for r in replies]
            for path, stat in zip(ours, stats, strict=True):
                if stat is None or stat.ephemeralOwner != sid:
                    state.held.pop(path, None)
            ours = [p for p in ours if p in state.held]

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Few keys: their nodes and owners' markers (2 round trips); many: every claim record, pipelined
        (``zookeeper_inspect``)."""
        self._owners.reap()
        client = self._reader_client()
        out: dict[str, Holder | None] = dict.fromkeys(keys)
        with self._edge("inspect"):
            if len(out) <= SMALL:
                out.update(by_nodes(client, {k: self._path(k) for k in out}, self._marker, self.timeout, self.url))
            else:
                out.update(by_claims(client, self.claims_dir, out, self.timeout, self.url))
        return out

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Set an ``exists`` watch on every key; return when one is deleted or free, or at the timeout."""
        deadline = time.monotonic() + timeout
        self._owners.reap()
        client = self._reader_client()
        self._wake.clear()
        with self._edge("wait"):
            replies = [client.exists_async(self._path(k), watch=self._on_watch) for k in keys]
            if any(r.get(timeout=self.timeout) is None for r in replies):
                return  # already free: the check and the watch are one atomic server call
        self._wake.wait(max(0.0, deadline - time.monotonic()))

    def _on_watch(self, event: Any) -> None:
        self._wake.set()

    # -- records ---------------------------------------------------------------------------------
    def _record_path(self, name: str) -> str:
        return f"{self.records_dir}/{node_name(name)}"

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """A ``sync`` and a ``get`` per name, issued together and then collected (pipelined)."""
        for name in names:
            check_record(name)
        self._owners.reap()
        client = self._reader_client()
        with self._edge("reading records"):
            found = zookeeper_records.read(client, self.records_dir, {n: self._record_path(n) for n in names},
                                           self.timeout)
        return {name: found[name] for name in names}

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """Expected absent: a multi creating the node (and deleting it again for ``None``); else the node's
        version is read and the set or delete is made at that version."""
        check_record(name, value)
        self._owners.reap()
        client = self._reader_client()
        with self._edge("swapping a record"):
            return zookeeper_records.swap(client, self._record_path(name), expected, value, self.timeout)

    def close(self) -> None:
        """Close every session (their ephemeral nodes go at once) and stop kazoo's threads."""
        self._owners.close()
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
