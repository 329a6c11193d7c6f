"""``postgresql://`` — leases in PostgreSQL tables, one round trip per operation, ``LISTEN/NOTIFY`` wake-ups.

URL grammar::

    postgresql://[user[:password]@]host[:port]/dbname[?option=value&...]     (also postgres://)

e.g. ``postgresql://worker:secret@db.internal:5432/app?schema=shardpreempt&timeout=2``. Options (query
string or keyword arguments):

``schema`` (default ``shardpreempt``)
    Schema holding the lease tables and functions; created on first use (or by ``init()``).
``connect_timeout`` (seconds, default 2)
    Bound on opening a connection (libpq rounds it up to whole seconds, at least 2).
``timeout`` (seconds, default 2)
    Server-side ``statement_timeout`` of every call, and a client-side bound on waiting for an answer
    (``timeout`` + 1 s, so a paused or partitioned server is noticed even though it cannot cancel
    anything); either raises ``BackendUnavailable``.
``restart_grace`` (seconds, default: the ttl asked)
    Nothing is granted until the server has been up this long (``backends.sqlcommon``).

Tables (in ``schema``): ``sessions(id, owner, expires_at, pid, host)``, one row per worker session,
expiring by the server's ``clock_timestamp()``; ``shards(key, session, token, since)``, one row per key
ever used; and ``records(name, value)``, the backend's records. Every key points at a session; a key
whose session is missing or expired is free. ``init()`` creates them with the plpgsql functions
``acquire`` and ``release``; it is idempotent, and reruns when ``SCHEMA_VERSION`` changed. The SQL
text is in ``postgres_sql``.

try_acquire is one call of ``acquire()`` (one round trip, one transaction): create missing key rows,
lock them ``FOR UPDATE`` in key order (no deadlocks between overlapping slices), lock the sessions they
point at ``FOR SHARE`` (so a renewal racing with an expiry is seen), and only if every key is free
extend or create the owner's session and point the keys at it, setting each key's token to
``GREATEST(token + 1, clock in µs)``. A key held by the caller's own live session counts as busy, as in
``memory://``. A deadlock or lock timeout reports busy (``None``), never a partial hold. renew is one
``UPDATE sessions ... RETURNING`` that succeeds only while the session has not expired and the lease's first
key still points at it with the lease's token (O(1) whatever the number of keys: slices are all or nothing,
so the first key tells); the same statement reads whether the session lives, so ``LeaseLost`` says which
failed: the session expired, or the key was released or granted to another (a stale lease object).
release is one call of ``release()``, which clears the keys still pointing at the session and sends
``pg_notify('<schema>_released', <keys as JSON, or '' when too long>)`` in the same transaction.
``wait`` listens on a dedicated connection kept open across calls, so releases between calls queue up;
the first ``wait`` (and the first after a reconnect) returns at once, because it cannot know what it
missed before it listened. ``read_records`` is one ``SELECT ... name = ANY(...)``; ``swap_record`` one
autocommitted statement: ``INSERT ... ON CONFLICT DO NOTHING``, ``UPDATE`` or ``DELETE ... WHERE value =
expected`` (a row lock and a re-check of the newest version make it atomic), or a read when nothing changes.

Token source: ``GREATEST(last token + 1, clock_timestamp() in µs since the epoch)`` (``NEXT_TOKEN``),
computed in the acquiring transaction and kept in ``shards.token`` (bigint), as ``redis://`` does. ``last + 1``
makes tokens strictly increase per key across holders; the clock keeps them from repeating when the server
loses its latest commits (restored from an older snapshot, a lagging standby promoted, ``fsync=off`` and a
crash): the surviving row has an older token, but every lost grant's token was at most the clock of its
grant, so the next grant, later by the clock, is above them all. This assumes the server's clock (the new
primary's, after a failover) never steps back further than the time between two grants of a key, and a key
is granted at most once per microsecond. Tokens are near 1.7e15 (below 2**53). Schema 3 brought this; the
first backend of this version replaces ``acquire()`` of an older installation (``CREATE OR REPLACE``).
Capabilities: server expiry, cross-host, not session-bound, blocking wait.
Caveats: keys are at most 2,048 bytes of UTF-8 without NUL. A connection error is classified by libpq's
message, which assumes English server messages: too many connections (53300) and "starting up",
"shutting down", "in recovery" (57P03) -> ``BackendUnavailable``; authentication, a missing role or
database -> ``ConfigError``; anything else -> ``BackendUnavailable``. An acquire whose answer timed out
may still have committed: its keys then stay held by a fresh session nobody renews until ``ttl`` passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import psycopg
from psycopg import errors, sql
from psycopg.abc import PQGen
from psycopg.rows import TupleRow

from ..errors import BackendError, BackendProtocolError, BackendUnavailable, ConfigError
from ..typing import Capabilities
from . import option, reject_unknown
from .postgres_sql import (
    ACQUIRE,
    INSPECT,
    INSTALLED,
    NEXT_TOKEN,
    READ_RECORDS,
    RELEASE,
    RENEW,
    SCHEMA_DDL,
    SCHEMA_VERSION,
    SWAP_RECORD,
    UPTIME,
)
from .sqlcommon import EXPIRED, RENEWED, SUPERSEDED, HeldRow, SqlBackend, parse_db_url

log = logging.getLogger("shardpreempt.backends.postgres")

# libpq reports no SQLSTATE for a failed connection, so its failures are told apart by message.
#: Refusals that mean "not now", checked first: 53300 (too many connections: server, reserved slots,
#: a role's or a database's CONNECTION LIMIT), 57P03 (cannot connect now), 53xxx out of resources.
TRANSIENT_FAILURES = ("too many clients", "too many connections", "remaining connection slots are reserved",
                      "the database system is starting up", "the database system is shutting down",
                      "the database system is not yet accepting connections",
                      "the database system is not accepting connections", "the database system is in recovery",
                      "out of memory", "could not fork")
#: Failures that retrying will not fix.
CONFIG_FAILURES = ("authentication failed", "does not exist", "no pg_hba.conf entry", "password",
                   "permission denied", "not permitted to log in", "invalid", "role")
#: libpq's prefix naming the server: a host or socket name must not be mistaken for the reason.
SERVER_PREFIX = re.compile(r'connection to server (?:at|on socket) "[^"]*".*? failed:')


class _Connection(psycopg.Connection[TupleRow]):
    """A connection whose every wait for the server is bounded (libpq has no read timeout)."""

    answer_timeout: float | None = None
    server_started = 0.0  # monotonic time by which the server it talks to had started (UPTIME)

    def wait(self, gen: PQGen[Any], interval: float = 0.1, timeout: float | None = None) -> Any:
        """Like ``Connection.wait``, with ``answer_timeout`` when the caller gives no timeout."""
        return super().wait(gen, interval, self.answer_timeout if timeout is None else timeout)


class PostgresBackend(SqlBackend):
    """Leases in PostgreSQL: sessions with server-side expiry, per-key tokens, LISTEN/NOTIFY."""

    capabilities = Capabilities(server_expiry=True, cross_host=True, session_bound=False, blocking_wait=True)
    inspect_batch = 200_000  # one query covers 100,000 keys

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, options)
        self.schema = option(self.opts, "schema", str, "shardpreempt", url=url)
        reject_unknown(self.opts, url)
        if not self.schema:
            raise ConfigError("option 'schema' must not be empty", source=self.url)
        self._db = parse_db_url(url, 5432)
        channel = f"{self.schema}_released"
        if len(channel.encode()) > 63:  # NAMEDATALEN: longer channel names are refused
            channel = "sp_" + hashlib.sha256(channel.encode()).hexdigest()[:32] + "_released"
        self.channel = channel
        s = sql.Identifier(self.schema)
        self._q = {name: sql.SQL(text).format(s=s) for name, text in
                   (("acquire", ACQUIRE), ("renew", RENEW), ("release", RELEASE), ("inspect", INSPECT),
                    ("read_records", READ_RECORDS))}
        self._swap_q = {shape: sql.SQL(text).format(s=s) for shape, text in SWAP_RECORD.items()}
        self._ddl = sql.SQL(SCHEMA_DDL).format(s=s, version=sql.Literal(SCHEMA_VERSION),
                                               next_token=sql.SQL(NEXT_TOKEN))
        self._marker = sql.SQL("{}.release(text[], text, text)").format(s).as_string()
        self._conn: _Connection | None = None
        self._listener: _Connection | None = None
        self._initialized = False
        self._missing = False  # a table or function was found missing: rerun the DDL whatever its version says
        # psycopg serialises use of a connection itself; this keeps two threads from both reconnecting
        self._conn_lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------
    def _connect(self) -> _Connection:
        db = self._db
        try:
            conn = _Connection.connect(
                host=db.host, port=db.port, dbname=db.database, user=db.user, password=db.password,
                connect_timeout=max(1, round(self.connect_timeout)), autocommit=True, prepare_threshold=None,
                application_name="shardpreempt",
                options=f"-c statement_timeout={int(self.timeout * 1000)}",
            )
        except psycopg.Error as exc:
            reason = SERVER_PREFIX.sub("", str(exc)).lower()
            if isinstance(exc, psycopg.OperationalError) and (
                    any(m in reason for m in TRANSIENT_FAILURES) or not any(m in reason for m in CONFIG_FAILURES)):
                raise BackendUnavailable(f"{self.url}: cannot connect: {exc}") from exc
            raise ConfigError(f"cannot connect: {exc}", source=self.url) from exc
        conn.answer_timeout = self.timeout + 1.0 if self.timeout else None
        return conn

    def _open(self) -> _Connection:
        with self._conn_lock:
            if self._conn is None or self._conn.closed:
                conn = self._connect()
                try:
                    row = conn.execute(UPTIME).fetchone()
                except psycopg.Error as exc:
                    conn.close()
                    raise BackendUnavailable(f"{self.url}: reading the server's uptime failed: {exc}") from exc
                assert row is not None
                conn.server_started = time.monotonic() - float(row[0])
                self._conn = conn
            return self._conn

    def _connection(self) -> _Connection:
        conn = self._open()
        if not self._initialized:
            self._init_on(conn)
        return conn

    def init(self) -> None:
        """Create the schema, tables and functions if missing (idempotent, safe to run concurrently)."""
        self._init_on(self._open())

    def _init_on(self, conn: _Connection) -> None:
        for attempt in range(5):
            try:
                # up to date already: skip the DDL, which needs CREATE rights and takes catalog locks
                row = conn.execute(INSTALLED, (self._marker,)).fetchone()
                if row is not None and row[0] == SCHEMA_VERSION and not self._missing:
                    break
                with conn.transaction():
                    conn.execute(self._ddl)
                break
            except (errors.UniqueViolation, errors.DuplicateObject, errors.InternalError_) as exc:
                # concurrent CREATE ... IF NOT EXISTS / OR REPLACE by another worker: try again
                log.debug("init of schema %s raced (%s), retrying", self.schema, exc.sqlstate)
                if attempt == 4:
                    raise self._translate("init", exc) from exc
            except psycopg.Error as exc:
                raise self._translate("init", exc) from exc
        self._initialized, self._missing = True, False

    def _translate(self, op: str, exc: psycopg.Error) -> Exception:
        """The project's exception for a driver error; drops a connection that may be unusable."""
        if exc.sqlstate is None or self._conn is None or self._conn.broken:
            self._drop()  # a timeout or a dropped link: the connection is mid-protocol or dead
        if isinstance(exc, (errors.UndefinedTable, errors.UndefinedFunction, errors.InvalidSchemaName)):
            # somebody dropped the schema or a table: recreate it on the next call
            self._initialized, self._missing = False, True
            return BackendUnavailable(f"{self.url}: {op}: lease tables missing, recreating: {exc}")
        if isinstance(exc, errors.InsufficientPrivilege):
            return ConfigError(f"{op}: {exc}", source=self.url)
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return BackendUnavailable(f"{self.url}: {op} failed: {exc}")
        return BackendError(f"{self.url}: {op} failed: {exc}")

    def _drop(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self, op: str, params: Sequence[Any] | dict[str, Any],
             query: sql.Composed | None = None, conn: _Connection | None = None) -> list[TupleRow]:
        conn = conn or self._connection()
        try:
            return conn.execute(self._q[op] if query is None else query, params).fetchall()
        except psycopg.Error as exc:
            raise self._translate(op, exc) from exc

    # -- the four server calls -------------------------------------------------------------------
    def _acquire(self, keys: list[str], session: str | None, owner: str,
                 ttl: float) -> tuple[str, dict[str, int]] | None:
        conn = self._connection()
        if self._restarting(conn.server_started, ttl):
            return None  # the server that would answer may have forgotten grants still in use
        try:
            rows = self._run("acquire", (keys, session, owner, ttl, self._pid, self._host), conn=conn)
        except BackendError as exc:
            if isinstance(exc.__cause__, (errors.DeadlockDetected, errors.LockNotAvailable)):
                log.debug("acquire of %d keys hit a lock conflict: reporting busy", len(keys))
                return None
            raise
        status, new_session, got_keys, tokens = rows[0]
        if status == "busy":
            return None
        if status != "acquired":
            raise BackendProtocolError(f"{self.url}: acquire() returned unknown status {status!r}")
        return cast(str, new_session), dict(zip(got_keys, tokens, strict=True))

    def _renew(self, session: str, ttl: float, key: str | None, token: int | None) -> str:
        rows = self._run("renew", {"ttl": ttl, "session": session, "key": key, "token": token})
        renewed, alive = rows[0]
        return RENEWED if renewed else SUPERSEDED if alive else EXPIRED

    def _release(self, keys: list[str], session: str) -> None:
        self._run("release", (keys, session, self.channel))

    def _inspect(self, keys: list[str]) -> list[HeldRow]:
        rows = self._run("inspect", (keys,))
        try:
            return [(owner, left, pid, host, json.loads(held), json.loads(tokens), json.loads(sinces))
                    for owner, left, pid, host, held, tokens, sinces in rows]
        except ValueError as exc:
            raise BackendProtocolError(f"{self.url}: unreadable inspect answer: {exc}") from exc

    def _read_records(self, names: list[str]) -> dict[str, str]:
        return {str(name): str(value) for name, value in self._run("read_records", (names,))}

    def _swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        query = self._swap_q[expected is not None, value is not None]
        return bool(self._run("swap_record", {"name": name, "expected": expected, "value": value}, query))

    # -- notifications -------------------------------------------------------------------------
    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Block until a release that may concern ``keys`` is notified, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._connect()
                self._listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                return  # releases before LISTEN are unknown: let the caller look again at once
            wanted = set(keys)
            while (left := deadline - time.monotonic()) > 0:
                # exhaust the generator: an abandoned one keeps the connection's lock held
                notes = list(self._listener.notifies(timeout=left, stop_after=1))
                if any(self._concerns(note.payload, wanted) for note in notes):
                    self._drain()
                    return
        except psycopg.Error as exc:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            raise BackendUnavailable(f"{self.url}: wait failed: {exc}") from exc

    def _drain(self) -> None:
        """Consume notifications already queued, so the next wait does not wake for the same release."""
        assert self._listener is not None
        list(self._listener.notifies(timeout=0))

    @staticmethod
    def _concerns(payload: str, wanted: set[str]) -> bool:
        if not payload or not wanted:
            return True
        try:
            released = json.loads(payload)
        except ValueError:
            return True
        return not isinstance(released, list) or not wanted.isdisjoint(released)

    def close(self) -> None:
        """Close both connections; leases stay on the server until released or expired."""
        self._drop()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
