"""``redis://`` and ``rediss://`` — locks in one Redis server (redis-py), atomic by Lua scripts.

URL grammar::

    redis://[[user]:password@]host[:port][/db][?option=value&...]
    rediss://...                      (TLS)

Host defaults to ``localhost``, port to 6379, db to 0. Options (query string or keywords):

=================== =============== ==========================================================
``prefix``          ``shardpreempt:`` prepended to every key and to the pub/sub channel
``connect_timeout`` 2.0             seconds to open a connection (TCP, TLS and AUTH)
``timeout``         2.0             seconds to wait for any one reply
``restart_grace``   the ttl asked   seconds, from the first acquire on a new namespace or after the
                                    server process changed (restart, restore, failover), during
                                    which nothing is granted, so holders of leases the server may
                                    have forgotten have fenced themselves; set it to the longest ttl
                                    your workers use (``backends.grace``)
``ssl_ca_certs``    (system CAs)    ``rediss://`` only: CA bundle file to verify the server with
``ssl_ca_path``     —               ``rediss://`` only: directory of CA certificates
``ssl_certfile``    —               ``rediss://`` only: client certificate (mutual TLS)
``ssl_keyfile``     —               ``rediss://`` only: the client certificate's private key
``ssl_cert_reqs``   ``required``    ``rediss://`` only: ``required``, ``optional`` or ``none``
``ssl_check_hostname`` true         ``rediss://`` only: check the certificate names the host
=================== =============== ==========================================================

Layout: ``{prefix}session:{sid}`` is the owner's liveness session (value: JSON with pid and host),
with a ``PX`` expiry; ``sid`` is ``owner + "/" + random``. ``{prefix}shard:{key}`` holds
``"<token> <since µs> <sid>"`` while held and ``"<token>"`` once released (the last token is kept).
A key is free when its value names no session or a session key that no longer exists, so renewing
writes only the session (``PEXPIRE``, never shortening it) and per-shard state is written only when
ownership changes. ``renew`` is one ``EVALSHA`` that also reads the lease's first shard key (passed in
``KEYS``): the session is extended only if that key still names it with the lease's token, otherwise
``LeaseLost`` says the key was released or superseded (slices are all or nothing, so the first key
tells; O(1) whatever the number of keys). ``try_acquire`` and ``release`` are one ``EVALSHA`` each,
whatever the number of keys; ``release`` publishes on ``{prefix}released`` and ``wait`` listens
there on a subscription kept open across calls. Records live at ``{prefix}record:{name}`` (a plain
string; absent key = no record), a namespace apart from the shard keys: ``read_records`` is one
``MGET``, ``swap_record`` one ``EVALSHA`` of a compare-and-set script (scripts: ``redis_scripts``).
``inspect`` is one pipelined round trip of read-only scripts answering 10,000 values each as one JSON
string (Redis's bundled ``cjson``), and one for the live sessions of their holders (``redis_inspect``).

Restarts that lose data: a lost session would let the server grant a shard while its old holder is
still working until its next renewal fails. So the acquire script keeps ``{prefix}boot``: the run id
of the server process (``INFO server``) and the server time at which the namespace first saw it. When
the key is missing (a new namespace, data lost) or names another run id (a restart, an RDB or AOF
restored from an older snapshot, a promoted replica), the script writes it anew, and nothing is
granted for ``restart_grace`` seconds from then: every lease the server may have forgotten has passed
its holder's local deadline by then, and renewing it failed. The check is in the acquire script, so it
costs no round trip. The price: the first acquire in a brand-new namespace, and the first after any
restart, wait that long (test servers pass ``restart_grace=0``; one log line says so). The
``{prefix}epoch`` key of versions before the boot key is no longer read.

Token source: ``max(last token + 1, TIME in µs)`` in the acquire script, from the server's own clock.
While Redis keeps its data, ``last + 1`` alone guarantees growth; after a restart that lost
everything (no persistence, failover to a lagging replica), growth rests on the assumption that the
server's clock never steps back further than the time between two grants of a shard, and that a
shard is granted at most once per microsecond. Tokens are near 1.7e15 (below 2**53, exact in Lua).

Capabilities: server expiry (``PX``, the server's clock), cross host, not session bound, blocking
wait (pub/sub; any release wakes every waiter, which then retries; expiry does not notify).
Caveats: one Redis server (no Cluster: the scripts touch keys outside their ``KEYS``); replication
is asynchronous, so a failover can lose a fresh grant (use one primary, or accept the risk); records
are as durable as the server's persistence (none: a restart loses them). The
client never retries (the claimer does); pooled connections are checked before use, so after a
dropped connection at most one call raises ``BackendUnavailable`` and the next one reconnects.
Each backend object uses one connection per calling thread, plus one for pub/sub once it waits;
redis-py starts no threads for this. Errors are translated in ``redis_errors``. Full guide:
``docs/backends/redis.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.client
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import BackendError, BackendProtocolError, ConfigError, LeaseLost
from ..model import Holder, Lease
from ..redact import redact_url
from ..typing import Capabilities
from . import check_record, option, redis_inspect, reject_unknown, renewal_check, superseded, url_options
from .grace import RestartGrace
from .redis_errors import translated
from .redis_scripts import (
    ACQUIRE,
    BUSY,
    CORRUPT,
    GRANTED,
    KEY_RELEASED,
    PREPARE,
    QUARANTINE,
    RELEASE,
    RENEW,
    RENEWED,
    SESSION_GONE,
    SUPERSEDED,
    SWAP_RECORD,
)

log = logging.getLogger("shardpreempt.backends.redis")


TLS_OPTIONS: dict[str, type] = {"ssl_ca_certs": str, "ssl_ca_path": str, "ssl_certfile": str,
                                "ssl_keyfile": str, "ssl_cert_reqs": str, "ssl_check_hostname": bool}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class RedisBackend:
    """Locks in Redis: one session key per owner, shard keys pointing at it, Lua for atomicity."""

    capabilities = Capabilities(server_expiry=True, cross_host=True, session_bound=False, blocking_wait=True)

    def __init__(self, url: str, **options: Any) -> None:
        self.url = redact_url(url)
        opts = {**url_options(url), **options}
        self.prefix = option(opts, "prefix", str, "shardpreempt:", url=url)
        self.connect_timeout = option(opts, "connect_timeout", float, 2.0, url=url)
        self.timeout = option(opts, "timeout", float, 2.0, url=url)
        self.grace = RestartGrace(opts, url)
        parts = urlsplit(url)
        tls = {name: option(opts, name, kind, None, url=url) for name, kind in TLS_OPTIONS.items()}
        tls = {name: value for name, value in tls.items() if value is not None}
        reject_unknown(opts, url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError("URL scheme must be redis:// or rediss://", source=self.url)
        if tls and parts.scheme != "rediss":
            raise ConfigError(f"TLS options need rediss://: {', '.join(sorted(tls))}", source=self.url)
        try:
            port = parts.port or 6379
            db = int(parts.path.strip("/") or 0)
        except ValueError:
            raise ConfigError("expected redis://host:port/db, port and db numbers", source=self.url) from None
        self._password = unquote(parts.password) if parts.password else None
        self._client = redis.Redis(
            host=parts.hostname or "localhost", port=port, db=db,
            username=unquote(parts.username) if parts.username else None, password=self._password,
            socket_connect_timeout=self.connect_timeout, socket_timeout=self.timeout, socket_keepalive=True,
            # No retries in the client: the claimer owns retry and backoff, and a quick failure is the
            # signal it needs. The pool reconnects on the next call after a dropped connection.
            retry=Retry(NoBackoff(), 0), decode_responses=True, driver_info=None,
            ssl=parts.scheme == "rediss", **tls,
        )
        self._acquire = self._client.register_script(ACQUIRE)
        self._renew = self._client.register_script(RENEW)
        self._release = self._client.register_script(RELEASE)
        self._swap = self._client.register_script(SWAP_RECORD)
        self._channel = f"{self.prefix}released"
        self._pubsub: redis.client.PubSub | None = None
        self._sessions: dict[str, str] = {}  # owner -> the sid it last held; replaced when found dead
        self._host = socket.gethostname()

    # -- helpers --------------------------------------------------------------------------------
    def _shard_key(self, key: str) -> str:
        return f"{self.prefix}shard:{key}"

    def _session_key(self, sid: str) -> str:
        return f"{self.prefix}session:{sid}"

    def _record_key(self, name: str) -> str:
        return f"{self.prefix}record:{name}"

    def _edge(self, operation: str) -> AbstractContextManager[None]:
        """Translate redis-py errors, once, into the project's exceptions (URL redacted): ``redis_errors``."""
        return translated(operation, self.url, self._password)

    @staticmethod
    def _ms(ttl: float) -> int:
        if not ttl > 0 or math.isinf(ttl):
            raise ConfigError(f"ttl must be a positive number of seconds, got {ttl!r}")
        return max(1, math.ceil(ttl * 1000))

    # -- the contract ---------------------------------------------------------------------------
    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key or none, in one script run (one round trip)."""
        unique = list(dict.fromkeys(keys))
        fresh = f"{owner}/{uuid.uuid4().hex}"
        cached = self._sessions.get(owner, fresh)
        value = json.dumps({"pid": os.getpid(), "host": self._host}, separators=(",", ":"))
        start = time.monotonic()
        with self._edge("acquire"):
            reply = self._acquire(
                keys=[self._session_key(cached), self._session_key(fresh), *map(self._shard_key, unique)],
                args=[self._ms(ttl), cached, fresh, self._session_key(""), value,
                      math.ceil(self.grace.for_ttl(ttl) * 1000), f"{self.prefix}boot"],
            )
        code = reply[0] if isinstance(reply, list) and reply else None
        if code == BUSY:
            return None
        if code == QUARANTINE and len(reply) == 3:
            self.grace.holding_back(reply[1], int(reply[2]) / 1e6)  # once per grace (its end, in µs)
            return None
        if code == GRANTED and len(reply) == len(unique) + 2:
            sid = str(reply[1])
            self._sessions[owner] = sid
            tokens = {key: int(token) for key, token in zip(unique, reply[2:], strict=True)}
            log.debug("acquired %d keys for %s (session %s)", len(unique), owner, sid)
            return Lease(tuple(keys), owner, tokens, ttl, start + ttl, sid)
        if code == CORRUPT:
            raise BackendProtocolError(f"{self.url}: unreadable shard record at {reply[1]!r}")
        raise BackendProtocolError(f"{self.url}: unexpected reply from the acquire script: {reply!r:.200}")

    def renew(self, lease: Lease) -> Lease:
        """Extend the owner's session (never shortening it) if the lease's first key still names it with
        the lease's token: one script run (one round trip), whatever the key count."""
        start = time.monotonic()
        check = renewal_check(lease)
        keys = [self._session_key(lease.session)]
        args: list[Any] = [self._ms(lease.ttl), lease.session, ""]
        if check is not None:
            keys.append(self._shard_key(check[0]))
            args[2] = "" if check[1] is None else str(check[1])
        with self._edge("renew"):
            reply = self._renew(keys=keys, args=args)
        if reply == RENEWED:
            return lease.with_deadline(start + lease.ttl)
        if reply == SESSION_GONE:
            if self._sessions.get(lease.owner) == lease.session:
                del self._sessions[lease.owner]  # the next acquire must start a new session
            raise LeaseLost("session expired", lease.keys)
        if reply == SUPERSEDED:
            raise superseded(lease, "names another session or a later grant")
        if reply == KEY_RELEASED:
            raise superseded(lease, "was released")
        raise BackendProtocolError(f"{self.url}: unexpected reply from the renew script: {reply!r:.200}")

    def release(self, lease: Lease) -> None:
        """Free the keys still pointing at this lease's session and notify waiters; idempotent."""
        if not lease.keys:
            return
        with self._edge("release"):
            reply = self._release(keys=[self._shard_key(k) for k in dict.fromkeys(lease.keys)],
                                  args=[lease.session, self._channel])
        if not isinstance(reply, int):
            raise BackendProtocolError(f"{self.url}: unexpected reply from the release script: {reply!r:.99}")
        log.debug("released %d of %d keys of %s", reply, len(lease.keys), lease.owner)

    def init(self) -> None:
        """Mark a new namespace as new (``shardpreempt init``): its first acquire then skips the restart grace.
        A namespace that has its boot key already is left as it is; never run it after a server lost data."""
        with self._edge("init"):
            self._client.eval(PREPARE, 1, f"{self.prefix}boot")

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Holder of each key: one pipelined round trip of read-only scripts answering 10,000 values and
        their sessions each as one JSON string (``redis_inspect``)."""
        unique = list(dict.fromkeys(keys))
        with self._edge("inspect"):
            found = redis_inspect.holders(self._client, [self._shard_key(k) for k in unique], self._session_key,
                                          self.url)
        out: dict[str, Holder | None] = dict.fromkeys(keys)
        out.update(zip(unique, found, strict=True))
        return out

    def _check_record(self, name: str, value: str | None = None) -> None:
        """``check_record``, and valid UTF-8 (no lone surrogate), before any connection is opened."""
        check_record(name, value)
        if not (_utf8(name) and (value is None or _utf8(value))):
            raise ConfigError(f"record {name!r:.80}: names and values must be valid UTF-8", source=self.url)

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """The value of each record (``None`` when absent): one ``MGET``."""
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            self._check_record(name)
        if not wanted:
            return {}
        with self._edge("read_records"):
            values = self._client.mget([self._record_key(name) for name in wanted])
        return {name: None if value is None else str(value) for name, value in zip(wanted, values, strict=True)}

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """Compare-and-set one record in one script run; ``None`` means absent (expected) or delete (value)."""
        self._check_record(name, value)
        if expected is not None and not _utf8(expected):
            return False  # no record can hold it
        with self._edge("swap_record"):
            reply = self._swap(keys=[self._record_key(name)],
                               args=["0" if expected is None else "1", expected or "",
                                     "0" if value is None else "1", value or ""])
        if reply not in (0, 1):
            raise BackendProtocolError(f"{self.url}: unexpected reply from the swap script: {reply!r:.99}")
        return bool(reply == 1)

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Block until a release is published on the prefix's channel, or ``timeout`` passes.

        The subscription starts on the first call and stays open, so releases between a failed
        acquire and the next ``wait`` queue up. The first call returns as soon as the subscription is
        confirmed: a release may have happened before it, and the caller should simply try again.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            with self._edge("wait"):
                if self._pubsub is None:
                    pubsub = self._client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # redis-py lacks the hint
                    pubsub.subscribe(self._channel)
                    self._pubsub = pubsub
                    pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                    return
                if self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic())) is None:
                    return
                while self._pubsub.get_message(timeout=0.0) is not None:
                    pass  # coalesce queued notifications: one wake-up is enough to retry
        except BackendError:
            # Notifications may have been lost with the connection: start over on the next call.
            self._drop_pubsub()
            raise

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.exceptions.RedisError, OSError):
                log.debug("ignoring error while closing the pub/sub connection", exc_info=True)

    def close(self) -> None:
        """Drop the connections (held keys stay held until their session expires)."""
        self._drop_pubsub()
        try:
            self._client.close()
        except (redis.exceptions.RedisError, OSError):
            log.debug("ignoring error while closing %s", self.url, exc_info=True)
