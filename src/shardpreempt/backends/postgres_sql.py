"""The SQL of the ``postgresql://`` backend: schema, functions and statements, with ``{s}`` for the schema.

Kept apart from :mod:`shardpreempt.backends.postgres` so the backend module stays readable; what each statement
does for the backend, and the locking order they keep, is described there.
"""

from __future__ import annotations

SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.sessions (
    id text PRIMARY KEY, owner text NOT NULL, expires_at timestamptz NOT NULL, pid integer, host text);
CREATE INDEX IF NOT EXISTS sessions_expires_at ON {s}.sessions (expires_at);
CREATE TABLE IF NOT EXISTS {s}.shards (
    key text COLLATE "C" PRIMARY KEY, session text, token bigint NOT NULL DEFAULT 0, since timestamptz);
-- "C": names and values compare as exact bytes, as everywhere else
CREATE TABLE IF NOT EXISTS {s}.records (name text COLLATE "C" PRIMARY KEY, value text COLLATE "C" NOT NULL);

CREATE OR REPLACE FUNCTION {s}.acquire(p_keys text[], p_session text, p_owner text, p_ttl float8,
    p_pid integer, p_host text,
    OUT o_status text, OUT o_session text, OUT o_keys text[], OUT o_tokens bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
BEGIN
    -- cheap refusal first: a live holder means busy, whatever we would lock
    IF EXISTS (SELECT 1 FROM {s}.shards h JOIN {s}.sessions x ON x.id = h.session
               WHERE h.key = ANY(p_keys) AND x.expires_at > clock_timestamp()) THEN
        o_status := 'busy';
        RETURN;
    END IF;
    INSERT INTO {s}.shards (key) SELECT DISTINCT k FROM unnest(p_keys) AS k ORDER BY 1 ON CONFLICT DO NOTHING;
    -- key order: two overlapping acquires never wait for each other in a cycle
    PERFORM 1 FROM {s}.shards h WHERE h.key = ANY(p_keys) ORDER BY h.key FOR UPDATE;
    -- a renewal of one of these sessions that started before its expiry commits before we judge it
    PERFORM 1 FROM {s}.sessions x
        WHERE x.id IN (SELECT h.session FROM {s}.shards h WHERE h.key = ANY(p_keys)) ORDER BY x.id FOR SHARE;
    v_now := clock_timestamp();
    IF EXISTS (SELECT 1 FROM {s}.shards h JOIN {s}.sessions x ON x.id = h.session
               WHERE h.key = ANY(p_keys) AND x.expires_at > v_now) THEN
        o_status := 'busy';
        RETURN;
    END IF;
    IF p_session IS NOT NULL THEN
        -- GREATEST: a short-ttl acquire must not cut short the owner's other leases
        UPDATE {s}.sessions x SET expires_at = GREATEST(x.expires_at, v_now + make_interval(secs => p_ttl))
            WHERE x.id = p_session AND x.expires_at > v_now RETURNING x.id INTO o_session;
    END IF;
    IF o_session IS NULL THEN
        -- a dead session is never revived: keys still pointing at it stay free
        o_session := p_owner || '/' || gen_random_uuid()::text;
        INSERT INTO {s}.sessions
            VALUES (o_session, p_owner, v_now + make_interval(secs => p_ttl), p_pid, p_host);
        DELETE FROM {s}.sessions x WHERE x.id IN (
            SELECT y.id FROM {s}.sessions y WHERE y.expires_at < v_now - interval '1 minute'
            ORDER BY y.id LIMIT 100 FOR UPDATE SKIP LOCKED);
    END IF;
    -- past the key's last token, and at least the server clock in µs: a token lost with the latest writes
    -- (an older snapshot restored, a lagging replica promoted) is never granted again
    WITH u AS (
        UPDATE {s}.shards h SET session = o_session, token = {next_token}, since = v_now
        WHERE h.key = ANY(p_keys) RETURNING h.key, h.token)
    SELECT coalesce(array_agg(u.key), '{{}}'), coalesce(array_agg(u.token), '{{}}')
        INTO o_keys, o_tokens FROM u;
    o_status := 'acquired';
END $$;

CREATE OR REPLACE FUNCTION {s}.release(p_keys text[], p_session text, p_channel text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
BEGIN
    WITH l AS (SELECT h.key FROM {s}.shards h WHERE h.key = ANY(p_keys) AND h.session = p_session
               ORDER BY h.key FOR UPDATE),
         u AS (UPDATE {s}.shards h SET session = NULL, since = NULL FROM l WHERE h.key = l.key
               RETURNING h.key)
    SELECT array_agg(u.key) INTO v_keys FROM u;
    IF v_keys IS NULL THEN
        RETURN 0;
    END IF;
    -- NOTIFY payloads stop at 8000 bytes; '' tells waiters "any key"
    PERFORM pg_notify(p_channel, CASE WHEN octet_length(to_json(v_keys)::text) < 7900
                                      THEN to_json(v_keys)::text ELSE '' END);
    RETURN cardinality(v_keys);
END $$;
COMMENT ON FUNCTION {s}.release(text[], text, text) IS {version};
"""

#: A key's next token in ``acquire()``: above its last one, and at least the server clock in µs.
NEXT_TOKEN = "GREATEST(h.token + 1, (extract(epoch FROM v_now) * 1000000)::bigint)"

#: Bumped whenever SCHEMA_DDL changes, so existing installations get the new functions.
SCHEMA_VERSION = "shardpreempt schema 3"  # 2: the records table; 3: tokens from the server clock
INSTALLED = "SELECT obj_description(to_regprocedure(%s), 'pg_proc')"

ACQUIRE = "SELECT o_status, o_session, o_keys, o_tokens FROM {s}.acquire(%s, %s, %s, %s, %s, %s)"
# One statement: extend the session only while it lives and (for a lease with keys) its first key still points
# at it with the lease's token (one primary-key lookup, no row lock on the key); the second column, read after
# the update, tells an expired session from a superseded key (only the reason depends on it: either is lost).
RENEW = """WITH u AS (
    UPDATE {s}.sessions
    SET expires_at = GREATEST(expires_at, clock_timestamp() + make_interval(secs => %(ttl)s))
    WHERE id = %(session)s AND expires_at > clock_timestamp()
        AND (%(key)s::text IS NULL OR EXISTS (
            SELECT 1 FROM {s}.shards h WHERE h.key = %(key)s::text AND h.session = %(session)s
                AND (%(token)s::bigint IS NULL OR h.token = %(token)s::bigint)))
    RETURNING id)
SELECT EXISTS (SELECT 1 FROM u),
    EXISTS (SELECT 1 FROM {s}.sessions WHERE id = %(session)s AND expires_at > clock_timestamp())"""
RELEASE = "SELECT {s}.release(%s, %s, %s)"
# One row per live session holding some of the keys, with those keys, their tokens and since as JSON arrays in
# one order: a few rows and three parses at C speed instead of a row (and Python tuple) per key.
INSPECT = """SELECT x.owner, extract(epoch FROM x.expires_at - clock_timestamp())::float8, x.pid, x.host,
    json_agg(h.key)::text, json_agg(h.token)::text, json_agg(extract(epoch FROM h.since)::float8)::text
FROM {s}.shards h JOIN {s}.sessions x ON x.id = h.session
WHERE h.key = ANY(%s) AND x.expires_at > clock_timestamp()
GROUP BY x.id"""
READ_RECORDS = "SELECT name, value FROM {s}.records WHERE name = ANY(%s)"
#: How long the server has been up, read on every new connection (the restart grace, ``sqlcommon``).
UPTIME = "SELECT extract(epoch FROM clock_timestamp() - pg_postmaster_start_time())::float8"
# One statement each, autocommitted: a concurrent writer of the same row is waited for and the newest
# version re-checked (READ COMMITTED), so a compare-and-set never acts on a value that was replaced.
SWAP_RECORD = {
    (False, True): "INSERT INTO {s}.records (name, value) VALUES (%(name)s, %(value)s) ON CONFLICT DO NOTHING"
                   " RETURNING 1",
    (True, True): "UPDATE {s}.records SET value = %(value)s WHERE name = %(name)s AND value = %(expected)s"
                  " RETURNING 1",
    (True, False): "DELETE FROM {s}.records WHERE name = %(name)s AND value = %(expected)s RETURNING 1",
    (False, False): "SELECT 1 WHERE NOT EXISTS (SELECT FROM {s}.records WHERE name = %(name)s)",
}
