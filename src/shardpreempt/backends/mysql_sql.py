"""The SQL of the ``mysql://`` backend: tables, procedures and statements, with ``{p}`` for the table prefix.

Kept apart from :mod:`shardpreempt.backends.mysql` so the backend module stays readable; what each statement
does for the backend, and the locking order they keep, is described there.
"""

from __future__ import annotations

#: Bumped whenever the DDL changes, so existing installations get the new tables and procedures.
SCHEMA_VERSION = "shardpreempt schema 3"  # 2: the records table; 3: tokens from the server clock
#: Per procedure, the versions whose body is the current one: init relabels such a procedure in place
#: (ALTER PROCEDURE) instead of dropping it, so workers of that version still running never find it missing.
SAME_PROCEDURES = {"acquire": frozenset(), "release": frozenset({"shardpreempt schema 1", "shardpreempt schema 2"})}

#: The keys of a call as rows.
KEY_ROWS = "JSON_TABLE(p_keys, '$[*]' COLUMNS (k VARCHAR(2048) CHARACTER SET utf8mb4 PATH '$')) AS j"
# The key rows of a call: the JSON array of keys (JSON_TABLE: MariaDB >= 10.6, MySQL >= 8.0.4) joined to
# the shards. STRAIGHT_JOIN and FORCE INDEX pin the plan to one primary-key lookup per key, in the
# (sorted) array order; a small table otherwise gets scanned, and a scan in a join locks every row it
# reads, out of key order: deadlocks. Sessions are joined the same way.
KEYS = KEY_ROWS + """
        STRAIGHT_JOIN `{p}shards` h FORCE INDEX (PRIMARY) ON h.`key` = CAST(j.k AS BINARY)"""

TABLES = (
    """CREATE TABLE IF NOT EXISTS `{p}sessions` (
        id VARCHAR(512) NOT NULL PRIMARY KEY, owner VARCHAR(400) NOT NULL, expires_at DATETIME(6) NOT NULL,
        pid INT NULL, host VARCHAR(255) NULL, KEY expires_at (expires_at)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
    """CREATE TABLE IF NOT EXISTS `{p}shards` (
        `key` VARBINARY(2048) NOT NULL PRIMARY KEY, session VARCHAR(512) NULL,
        token BIGINT NOT NULL DEFAULT 0, since DATETIME(6) NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
    # binary, not utf8mb4_bin: that collation pads, so 'v' = 'v ' would let a compare-and-set match
    """CREATE TABLE IF NOT EXISTS `{p}records` (
        name VARBINARY(800) NOT NULL PRIMARY KEY, value BLOB NOT NULL
    ) ENGINE=InnoDB""",
)

ACQUIRE_PROC = """CREATE PROCEDURE `{p}acquire`(IN p_keys LONGTEXT CHARACTER SET utf8mb4,
    IN p_session VARCHAR(512) CHARACTER SET utf8mb4, IN p_owner VARCHAR(400) CHARACTER SET utf8mb4,
    IN p_ttl_us BIGINT, IN p_pid INT, IN p_host VARCHAR(255) CHARACTER SET utf8mb4)
MODIFIES SQL DATA COMMENT '{version}'
proc: BEGIN
    DECLARE v_now DATETIME(6);
    DECLARE v_busy INT DEFAULT 0;
    DECLARE v_session VARCHAR(512) CHARACTER SET utf8mb4 DEFAULT NULL;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    -- cheap refusal first: a live holder means busy, whatever we would lock
    SELECT COUNT(*) INTO v_busy FROM {keys}
        STRAIGHT_JOIN `{p}sessions` x FORCE INDEX (PRIMARY) ON x.id = h.session
        WHERE x.expires_at > SYSDATE(6);
    IF v_busy > 0 THEN
        SELECT 'busy', NULL;
        LEAVE proc;
    END IF;
    SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
    START TRANSACTION;
    -- creates the missing rows and locks every row, in key order: no deadlock between slices
    INSERT INTO `{p}shards` (`key`)
        SELECT CAST(j.k AS BINARY) FROM {key_rows} ORDER BY 1 ON DUPLICATE KEY UPDATE token = token;
    -- a renewal of one of these sessions that started before its expiry commits before we judge it
    SELECT COUNT(*) INTO v_busy FROM {keys}
        STRAIGHT_JOIN `{p}sessions` x FORCE INDEX (PRIMARY) ON x.id = h.session
        WHERE x.expires_at > SYSDATE(6) LOCK IN SHARE MODE;
    IF v_busy > 0 THEN
        ROLLBACK;
        SELECT 'busy', NULL;
        LEAVE proc;
    END IF;
    SET v_now = SYSDATE(6);
    IF p_session IS NOT NULL THEN
        SELECT MAX(x.id) INTO v_session FROM `{p}sessions` x
            WHERE x.id = p_session AND x.expires_at > v_now FOR UPDATE;
    END IF;
    IF v_session IS NULL THEN
        -- a dead session is never revived: keys still pointing at it stay free
        SET v_session = CONCAT(p_owner, '/', UUID());
        INSERT INTO `{p}sessions` (id, owner, expires_at, pid, host)
            VALUES (v_session, p_owner, v_now + INTERVAL p_ttl_us MICROSECOND, p_pid, p_host);
        DELETE FROM `{p}sessions` WHERE expires_at < v_now - INTERVAL 60 SECOND ORDER BY expires_at LIMIT 100;
    ELSE
        -- GREATEST: a short-ttl acquire must not cut short the owner's other leases
        UPDATE `{p}sessions` SET expires_at = GREATEST(expires_at, v_now + INTERVAL p_ttl_us MICROSECOND)
            WHERE id = v_session;
    END IF;
    -- past the key's last token, and at least the server clock in µs: a token lost with the latest writes
    -- (an older snapshot restored, a lagging replica promoted) is never granted again
    UPDATE {keys} SET h.session = v_session, h.token = {next_token}, h.since = v_now;
    SELECT 'acquired', v_session;
    SELECT h.`key`, h.token FROM {keys};
    COMMIT;
END"""

RELEASE_PROC = """CREATE PROCEDURE `{p}release`(IN p_keys LONGTEXT CHARACTER SET utf8mb4,
    IN p_session VARCHAR(512) CHARACTER SET utf8mb4)
MODIFIES SQL DATA COMMENT '{version}'
BEGIN
    -- READ COMMITTED: row locks only, taken in the (sorted) key order, like acquire: no gap locks to
    -- deadlock with an acquire inserting new keys
    SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
    UPDATE {keys} SET h.session = NULL, h.since = NULL WHERE h.session = p_session;
END"""

PROCEDURES = {"acquire": ACQUIRE_PROC, "release": RELEASE_PROC}
#: A key's next token in the acquire procedure: above its last one, and at least the server clock in µs
#: since the epoch (``v_now`` is UTC: every connection of the backend sets ``time_zone = '+00:00'``).
NEXT_TOKEN = "GREATEST(h.token + 1, TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', v_now))"

INSTALLED = """SELECT ROUTINE_NAME, ROUTINE_COMMENT FROM information_schema.ROUTINES
WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME IN %s AND ROUTINE_TYPE = 'PROCEDURE'"""
# One statement: matches the session row while it lives; LAST_INSERT_ID(expr) hands the client (in the OK
# packet's insert id: ``cursor.lastrowid``) whether the lease's first key still points at the session with the
# lease's token (2, and the session is extended) or not (1, and nothing changes); no row matched leaves it 0.
# Under REPEATABLE READ InnoDB reads the key's row with a shared lock after locking the session row, the
# reverse of acquire's order; the two can only meet on a session at its very expiry (acquire goes past its
# lock-free check only for an expired holder), where a deadlock victim is a busy acquire or a failed renewal,
# and a lease renewed that late is past its local deadline anyway.
RENEW = """UPDATE `{p}sessions` x SET x.expires_at = IF(LAST_INSERT_ID(IF(
        %(key)s IS NULL OR EXISTS (SELECT 1 FROM `{p}shards` h WHERE h.`key` = %(key)s AND h.session = x.id
                                   AND (%(token)s IS NULL OR h.token = %(token)s)), 2, 1)) = 2,
    GREATEST(x.expires_at, SYSDATE(6) + INTERVAL %(ttl_us)s MICROSECOND), x.expires_at)
WHERE x.id = %(session)s AND x.expires_at > SYSDATE(6)"""
#: ``cursor.lastrowid`` after RENEW: the session was extended; it lives but the first key is not the lease's.
RENEW_KEY_OK, RENEW_KEY_LOST = 2, 1
# One row per live session holding some of the keys (sent as one JSON array), with those keys as JSON: a few rows
# instead of a row per key, which PyMySQL would parse in Python (``sqlcommon.HeldRow``). MAX() over one session's
# row: MariaDB has no ANY_VALUE. The connection raises group_concat_max_len, MariaDB's bound on JSON_ARRAYAGG.
INSPECT = """SELECT MAX(x.owner), MAX(TIMESTAMPDIFF(MICROSECOND, SYSDATE(6), x.expires_at)) / 1e6, MAX(x.pid),
    MAX(x.host), JSON_ARRAYAGG(JSON_ARRAY(CAST(h.`key` AS CHAR CHARACTER SET utf8mb4), h.token,
                                          UNIX_TIMESTAMP(h.since)))
FROM """ + KEYS.replace("p_keys", "%s") + """
    STRAIGHT_JOIN `{p}sessions` x FORCE INDEX (PRIMARY) ON x.id = h.session
WHERE x.expires_at > SYSDATE(6)
GROUP BY x.id"""
READ_RECORDS = "SELECT name, value FROM `{p}records` WHERE name IN %s"
#: How long the server has been up (whole seconds), read on every new connection (the restart grace).
UPTIME = "SHOW GLOBAL STATUS LIKE 'Uptime'"
# One autocommitted statement each; its row count says whether it swapped. FOUND_ROWS makes an UPDATE
# to the same value count as matched.
SWAP_RECORD = {
    (False, True): "INSERT INTO `{p}records` (name, value) VALUES (%(name)s, %(value)s)",
    (True, True): "UPDATE `{p}records` SET value = %(value)s WHERE name = %(name)s AND value = %(expected)s",
    (True, False): "DELETE FROM `{p}records` WHERE name = %(name)s AND value = %(expected)s",
    (False, False): "SELECT 1 FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM `{p}records` WHERE name = %(name)s)",
}


def procedure_ddl(proc: str, prefix: str, version: str = SCHEMA_VERSION, next_token: str = NEXT_TOKEN) -> str:
    """The ``CREATE PROCEDURE`` statement of ``proc`` (a key of PROCEDURES) for tables named ``prefix``*."""
    ddl = PROCEDURES[proc].replace("{keys}", KEYS).replace("{key_rows}", KEY_ROWS)
    return ddl.replace("{next_token}", next_token).replace("{p}", prefix).replace("{version}", version)
