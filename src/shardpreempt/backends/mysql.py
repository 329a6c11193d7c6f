"""``mysql://`` — leases in MySQL 8 / MariaDB 10.6+ tables, one round trip per operation, polling wait.

URL grammar::

    mysql://[user[:password]@]host[:port]/dbname[?option=value&...]     (also mariadb://)

e.g. ``mysql://worker:secret@db.internal:3306/app?table_prefix=shardpreempt_&timeout=2``. Options (query
string or keyword arguments):

``table_prefix`` (default ``shardpreempt_``)
    Prefix of the two tables and the procedure in ``dbname`` (letters, digits, ``_``; at most 40).
``connect_timeout`` (seconds, default 2)
    Bound on opening a connection.
``timeout`` (seconds, default 2)
    Socket read and write timeout of every call (a paused server or a cut link raises
    ``BackendUnavailable``); lock waits inside the server are bounded by ``innodb_lock_wait_timeout``
    = ``timeout`` / 2 (at least 1 s). ``0`` turns both off.
``poll`` (seconds, default 0.05)
    How long ``wait`` sleeps: MySQL has no notification a client could block on, so a waiting worker
    polls (the fallback the Backend contract allows, ``docs/backends/mysql.md``); use ``postgresql://``
    or ``redis://`` where hand-over latency below ``poll`` matters.
``restart_grace`` (seconds, default: the ttl asked)
    Nothing is granted until the server has been up this long (``backends.sqlcommon``).

Tables: ``<prefix>sessions(id, owner, expires_at, pid, host)``, one row per worker session, expiring
by the server clock (``SYSDATE(6)`` in a UTC session; SYSDATE rather than NOW because NOW is the
statement's start, which a lock wait makes stale); ``<prefix>shards(key, session, token, since)``, one
row per key ever used, keys as VARBINARY (exact, case-sensitive); and ``<prefix>records(name, value)``,
the records, both binary (exact: no collation, no trailing-space padding). A key whose session is
missing or expired is free. ``init()`` creates them and the procedures ``<prefix>acquire`` and
``<prefix>release``; it is idempotent, and reruns when ``SCHEMA_VERSION`` changed. The SQL
text is in ``mysql_sql``.

try_acquire is one ``CALL <prefix>acquire(keys as JSON, ...)``: refuse at once if a key has a live holder;
otherwise, in one READ COMMITTED transaction, create or lock the key rows in key order (the keys are sent
sorted by their UTF-8 bytes, and rows are inserted ``ORDER BY key``, so overlapping slices never deadlock),
lock their sessions in share mode and check again, extend or create the owner's session and point the keys at
it with ``token = GREATEST(token + 1, clock in µs)``. A key held by the caller's own live session counts as
busy. A deadlock (1213) or lock wait timeout (1205) is reported as busy (``None``), not retried: the claimer
tries again on its own schedule. renew is one ``UPDATE`` of the session row that matches only while it has not
expired and extends it only if the lease's first key still points at it with the lease's token (O(1) whatever
the number of keys: slices are all or nothing, so the first key tells); the same statement reports, through
``LAST_INSERT_ID(expr)`` (the insert id of its answer), whether the session was expired or the key superseded
(released or granted to another: a stale lease object); release is one ``CALL <prefix>release``, clearing the
keys still pointing at the session (READ COMMITTED and key order too: no gap locks to deadlock with an
acquire). inspect is one ``SELECT`` per 10,000 keys (sent as one JSON array), answering one row per live holder
session with its keys as JSON. read_records is one ``SELECT``; swap_record is one autocommitted ``INSERT`` (a
duplicate key: not absent), ``UPDATE`` or ``DELETE ... WHERE value = expected`` — InnoDB evaluates the
condition of a write on the newest committed row under its lock, never on a snapshot, at any isolation level —
or a ``SELECT`` when nothing changes. A deadlock victim (1213: inserts racing with a delete) is run again, up
to 3 times; a lock wait timeout (1205) raises ``BackendUnavailable``: nothing was changed. One connection per
backend object, used by one thread at a time (a lock), so a worker may renew from one thread while it acquires
from another.

Token source: ``GREATEST(last token + 1, SYSDATE(6) in µs since the epoch)`` (``NEXT_TOKEN``), computed in
the acquiring transaction and kept in ``<prefix>shards.token`` (BIGINT), as ``redis://`` does. ``last + 1``
makes tokens strictly increase per key across holders; the clock keeps them from repeating when the server
loses its latest commits (restored from an older snapshot, failover to a lagging replica, a crash with
``innodb_flush_log_at_trx_commit`` = 0 or 2): every lost grant's token was at most the clock of its grant, so
the next grant, later by the clock, is above them all. This assumes the server's clock (the new primary's,
after a failover) never steps back further than the time between two grants of a key, and a key is granted
at most once per microsecond. Tokens are near 1.7e15 (below 2**53). Schema 3 brought this: the first backend
of this version replaces ``<prefix>acquire`` of an older installation (drop and create: a call racing with it
fails once with ``BackendUnavailable``) and relabels ``<prefix>release``, whose body is unchanged.
Capabilities: server expiry, cross-host, not session-bound, no blocking wait (polling).
Caveats: keys are at most 2,048 bytes of UTF-8 without NUL. Do not run the server with
``--sysdate-is-now``. With statement-based binary logging the procedure is unsafe (SYSDATE, UUID): use
ROW or MIXED. MySQL 8's ``caching_sha2_password`` over a non-TLS link needs the ``cryptography``
package. An acquire whose answer timed out may still have committed: its keys then stay held by a
fresh session nobody renews until ``ttl`` passes. Refusals for too many connections (1040, 1203, 1226) are
``BackendUnavailable``; access denied, unknown database, missing privileges are ``ConfigError``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import pymysql
from pymysql.constants import CLIENT

from ..errors import BackendError, BackendProtocolError, BackendUnavailable, ConfigError
from ..typing import Capabilities
from . import option, reject_unknown
from .mysql_sql import (
    INSPECT,
    INSTALLED,
    PROCEDURES,
    READ_RECORDS,
    RENEW,
    RENEW_KEY_LOST,
    RENEW_KEY_OK,
    SAME_PROCEDURES,
    SCHEMA_VERSION,
    SWAP_RECORD,
    TABLES,
    UPTIME,
    procedure_ddl,
)
from .sqlcommon import EXPIRED, RENEWED, SUPERSEDED, HeldRow, SqlBackend, parse_db_url

log = logging.getLogger("shardpreempt.backends.mysql")

DUPLICATE_KEY, DEADLOCK = 1062, 1213
SWAP_ATTEMPTS = 3

#: Server error codes: refusals that mean "not now" (too many connections: 1040 for the server, 1203 for
#: max_user_connections, 1226 for a user's MAX_USER_CONNECTIONS), what retrying will not fix (access
#: denied, unknown database, missing privileges, host not allowed), and lock conflicts (busy).
TRANSIENT_CODES = {1040, 1203, 1226}
CONFIG_CODES = {1044, 1045, 1049, 1130, 1142, 1227, 1370, 1698}
MISSING_CODES = {1146, 1305}  # table or procedure gone: recreate on the next call
BUSY_CODES = {1205, 1213}
PREFIX = re.compile(r"[A-Za-z0-9_]{0,40}")


def _utf8_order(key: str) -> bytes:
    return key.encode("utf-8")


class MySQLBackend(SqlBackend):
    """Leases in MySQL/MariaDB: sessions with server-side expiry, per-key tokens, polling wait."""

    capabilities = Capabilities(server_expiry=True, cross_host=True, session_bound=False, blocking_wait=False)

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, options)
        self.prefix = option(self.opts, "table_prefix", str, "shardpreempt_", url=url)
        self.poll = option(self.opts, "poll", float, 0.05, url=url)
        reject_unknown(self.opts, url)
        if not PREFIX.fullmatch(self.prefix):
            raise ConfigError(f"table_prefix must be letters, digits and _ (at most 40), got {self.prefix!r}",
                              source=self.url)
        self._db = parse_db_url(url, 3306)
        self._sql = {name: text.replace("{p}", self.prefix) for name, text in
                     (("renew", RENEW), ("inspect", INSPECT), ("read_records", READ_RECORDS))}
        self._swap_sql = {shape: text.replace("{p}", self.prefix) for shape, text in SWAP_RECORD.items()}
        self._conn: pymysql.connections.Connection[Any] | None = None
        self._server_started = 0.0  # monotonic time by which the server of ``_conn`` had started (UPTIME)
        self._initialized = False
        self._missing = False  # a table or procedure was found missing: rerun the DDL whatever the versions say
        # A PyMySQL connection is not thread-safe: two threads interleaving packets corrupt the protocol.
        # Reentrant: a call that finds the tables missing runs init() while holding it.
        self._lock = threading.RLock()

    # -- connections ---------------------------------------------------------------------------
    def _connect(self) -> pymysql.connections.Connection[Any]:
        db = self._db
        lock_wait = max(1, int(self.timeout / 2)) if self.timeout else 50
        try:
            return pymysql.connect(
                host=db.host, port=db.port, user=db.user or "", password=db.password or "",
                database=db.database, charset="utf8mb4", autocommit=True,
                connect_timeout=self.connect_timeout or None, read_timeout=self.timeout or None,
                write_timeout=self.timeout or None,
                client_flag=CLIENT.FOUND_ROWS,  # renew counts the matched row even when unchanged
                init_command=f"SET time_zone = '+00:00', innodb_lock_wait_timeout = {lock_wait}, "
                             "group_concat_max_len = 1073741824",
            )
        except pymysql.err.MySQLError as exc:
            code = exc.args[0] if exc.args else None
            if code in CONFIG_CODES:
                raise ConfigError(f"cannot connect: {exc.args[-1]}", source=self.url) from exc
            raise BackendUnavailable(f"{self.url}: cannot connect: {exc}") from exc
        except RuntimeError as exc:  # PyMySQL lacks a package the server's authentication method needs
            raise ConfigError(f"cannot connect: {exc}", source=self.url) from exc

    def _open(self) -> pymysql.connections.Connection[Any]:
        if self._conn is None or not self._conn.open:
            conn = self._connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(UPTIME)
                    row = cur.fetchone()
                uptime = float(row[1]) if row else None
            except (pymysql.err.MySQLError, ValueError) as exc:
                conn.close()
                raise BackendUnavailable(f"{self.url}: reading the server's uptime failed: {exc}") from exc
            if uptime is None:
                conn.close()
                raise BackendProtocolError(f"{self.url}: the server reports no Uptime status")
            # Uptime counts whole seconds: the server started this long ago at the latest
            self._server_started = time.monotonic() - uptime
            self._conn = conn
        return self._conn

    def init(self) -> None:
        """Create the tables and procedures if missing (idempotent, safe to run concurrently)."""
        with self._lock:
            self._init()

    def _init(self) -> None:
        conn = self._open()
        names = {f"{self.prefix}{name}": name for name in PROCEDURES}
        for attempt in range(5):
            try:
                with conn.cursor() as cur:
                    cur.execute(INSTALLED, (tuple(names),))
                    installed = dict(cur.fetchall())
                    if all(installed.get(name) == SCHEMA_VERSION for name in names) and not self._missing:
                        break  # up to date: skip DDL, which needs more rights and takes locks
                    for ddl in TABLES:
                        cur.execute(ddl.replace("{p}", self.prefix))
                    for name, proc in names.items():
                        if installed.get(name) == SCHEMA_VERSION:
                            continue  # never drop a current procedure: a concurrent worker may be using it
                        if installed.get(name) in SAME_PROCEDURES[proc]:
                            cur.execute(f"ALTER PROCEDURE `{name}` COMMENT '{SCHEMA_VERSION}'")
                            continue
                        if name in installed:
                            cur.execute(f"DROP PROCEDURE IF EXISTS `{name}`")  # an older version
                        cur.execute(procedure_ddl(proc, self.prefix))
                break
            except pymysql.err.MySQLError as exc:
                # 1304: another worker created the procedure since we looked; look again
                if exc.args and exc.args[0] in (1304, 1050) and attempt < 4:
                    log.debug("init of %s* raced with another worker, retrying", self.prefix)
                    continue
                raise self._translate("init", exc) from exc
        self._initialized, self._missing = True, False

    def _translate(self, op: str, exc: pymysql.err.MySQLError) -> Exception:
        """The project's exception for a driver error; drops a connection that may be unusable."""
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code in TRANSIENT_CODES:
            self._drop()
            return BackendUnavailable(f"{self.url}: {op}: server refused: {exc.args[-1]}")
        if code in CONFIG_CODES:
            return ConfigError(f"{op}: {exc.args[-1]}", source=self.url)
        if code in MISSING_CODES:
            self._initialized, self._missing = False, True
            return BackendUnavailable(f"{self.url}: {op}: lease tables missing, recreating: {exc.args[-1]}")
        if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            if code not in BUSY_CODES:
                self._drop()  # timed out mid-answer, or the link is gone
            return BackendUnavailable(f"{self.url}: {op} failed: {exc}")
        return BackendError(f"{self.url}: {op} failed: {exc}")

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and conn.open:
                try:
                    conn.close()
                except pymysql.err.MySQLError:
                    conn._force_close()  # the polite COM_QUIT failed: just drop the socket

    def _ready(self) -> pymysql.connections.Connection[Any]:
        """The open connection, with the tables and procedures in place (call with the lock held)."""
        conn = self._open()
        if not self._initialized:
            self._init()
        return conn

    def _cursor(self) -> pymysql.cursors.Cursor:
        return self._ready().cursor()

    # -- the server calls -----------------------------------------------------------------------
    def _run(self, op: str, query: str, args: tuple[Any, ...] | dict[str, Any],
             accept: frozenset[int] = frozenset()) -> tuple[int, list[list[tuple[Any, ...]]]]:
        """One statement, one round trip: (affected rows, every result set), errors translated; a server
        error whose code is in ``accept`` answers ``(-1, [])`` instead."""
        count, results, _ = self._run_with_id(op, query, args, accept)
        return count, results

    def _run_with_id(self, op: str, query: str, args: tuple[Any, ...] | dict[str, Any],
                     accept: frozenset[int] = frozenset()) -> tuple[int, list[list[tuple[Any, ...]]], int]:
        """:meth:`_run`, plus the insert id the server sent with the statement's answer (0 if none)."""
        with self._lock:
            try:
                with self._cursor() as cur:
                    count = cur.execute(query, args)
                    insert_id = int(cur.lastrowid or 0)
                    results = [list(cur.fetchall())]
                    while cur.nextset():  # a CALL answers with one set per SELECT, then its own status
                        results.append(list(cur.fetchall()))
                    return count, results, insert_id
            except pymysql.err.MySQLError as exc:
                if exc.args and exc.args[0] in accept:
                    return -1, [], 0
                raise self._translate(op, exc) from exc

    def _call(self, proc: str, keys: list[str], *args: Any) -> list[list[tuple[Any, ...]]]:
        # sorted by UTF-8 bytes, the order of the VARBINARY primary key: every caller locks alike
        ordered = json.dumps(sorted(set(keys), key=_utf8_order), ensure_ascii=False)
        marks = ", ".join(["%s"] * (len(args) + 1))
        return self._run(proc, f"CALL `{self.prefix}{proc}`({marks})", (ordered, *args))[1]

    def _acquire(self, keys: list[str], session: str | None, owner: str,
                 ttl: float) -> tuple[str, dict[str, int]] | None:
        try:
            with self._lock:  # the connection checked is the one the call runs on
                self._ready()
                if self._restarting(self._server_started, ttl):
                    return None  # the server that would answer may have forgotten grants still in use
                results = self._call("acquire", keys, session, owner, max(1, round(ttl * 1e6)), self._pid,
                                     self._host[:255])
        except BackendUnavailable as exc:
            code = getattr(exc.__cause__, "args", (None,))[0]
            if code in BUSY_CODES:
                log.debug("acquire of %d keys hit lock conflict %s: reporting busy", len(keys), code)
                return None
            raise
        status, new_session = results[0][0] if results[0] else (None, None)
        if status == "busy":
            return None
        tokens = {bytes(k).decode("utf-8"): int(t) for k, t in results[1]} if len(results) > 1 else {}
        if status != "acquired" or not isinstance(new_session, str) or len(tokens) != len(set(keys)):
            raise BackendProtocolError(f"{self.url}: acquire returned {status!r} with {len(tokens)} tokens")
        return new_session, tokens

    def _renew(self, session: str, ttl: float, key: str | None, token: int | None) -> str:
        args = {"key": None if key is None else key.encode("utf-8"), "token": token,
                "ttl_us": max(1, round(ttl * 1e6)), "session": session}
        matched, _, verdict = self._run_with_id("renew", self._sql["renew"], args)
        if matched <= 0:
            return EXPIRED
        if verdict == RENEW_KEY_OK:
            return RENEWED
        if verdict == RENEW_KEY_LOST:
            return SUPERSEDED
        raise BackendProtocolError(f"{self.url}: renew matched its session but reported {verdict!r}")

    def _release(self, keys: list[str], session: str) -> None:
        self._call("release", keys, session)

    def _inspect(self, keys: list[str]) -> list[HeldRow]:
        rows = self._run("inspect", self._sql["inspect"], (json.dumps(keys, ensure_ascii=False),))[1][0]
        out: list[HeldRow] = []
        for owner, left, pid, host, held in rows:
            try:
                grants = json.loads(held)  # [[key, token, since], ...]
            except ValueError as exc:
                raise BackendProtocolError(f"{self.url}: unreadable inspect answer: {exc}") from exc
            out.append((owner, float(left), pid, host, *zip(*grants, strict=True)))
        return out

    def _read_records(self, names: list[str]) -> dict[str, str]:
        rows = self._run("read_records", self._sql["read_records"], ([n.encode("utf-8") for n in names],))[1][0]
        return {bytes(name).decode("utf-8"): bytes(value).decode("utf-8") for name, value in rows}

    def _swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        args = {"name": name.encode("utf-8"), "expected": None if expected is None else expected.encode("utf-8"),
                "value": None if value is None else value.encode("utf-8")}
        query = self._swap_sql[expected is not None, value is not None]
        for _ in range(SWAP_ATTEMPTS - 1):
            try:
                return self._swap_once(query, args)
            except BackendUnavailable as exc:
                # Inserts racing with a delete of one name can deadlock (shared locks of the duplicate check
                # both upgraded); InnoDB rolled the victim back whole, so running it again is safe.
                if getattr(exc.__cause__, "args", (None,))[0] != DEADLOCK:
                    raise
                log.debug("swap_record of %r was a deadlock victim: running it again", name)
        return self._swap_once(query, args)

    def _swap_once(self, query: str, args: dict[str, Any]) -> bool:
        # inserting a record that exists is a duplicate key: the record was not absent
        return self._run("swap_record", query, args, accept=frozenset({DUPLICATE_KEY}))[0] > 0

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """No server notification exists: sleep ``poll`` seconds (at most ``timeout``)."""
        time.sleep(max(0.0, min(timeout, self.poll)))

    def close(self) -> None:
        """Close the connection; leases stay on the server until released or expired."""
        self._drop()
