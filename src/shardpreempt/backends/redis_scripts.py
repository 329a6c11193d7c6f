"""The Lua scripts of the ``redis://`` backend: each runs atomically on the server, in one round trip.

Kept apart from :mod:`shardpreempt.backends.redis` so the backend module stays readable; the layout
they work on (session, shard, record and boot keys) is described there.
"""

from __future__ import annotations

# Codes the acquire script returns first; anything else is a BackendProtocolError.
BUSY, GRANTED, CORRUPT, QUARANTINE = 0, 1, 2, 3

ACQUIRE = """
-- KEYS[1] cached session key, KEYS[2] fresh session key, KEYS[3..] shard keys
-- ARGV[1] ttl ms, ARGV[2] cached sid, ARGV[3] fresh sid, ARGV[4] session key prefix, ARGV[5] session value,
-- ARGV[6] restart grace ms, ARGV[7] boot key
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes on Redis < 5
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- the boot key: "<run_id> <µs>", when this namespace first saw the server process that runs now
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local boot_run, since = string.match(redis.call('GET', ARGV[7]) or '', '^(%x+) (%d+)$')
if boot_run ~= run then  -- a new namespace, lost data, a restart or a failover: old holders may be at work
  since = now
  redis.call('SET', ARGV[7], run .. ' ' .. string.format('%d', now))
end
local grace_end = tonumber(since) + tonumber(ARGV[6]) * 1000
if now < grace_end then return {3, string.format('%d', grace_end), string.format('%d', grace_end - now)} end
local sid, skey = ARGV[2], KEYS[1]
if redis.call('EXISTS', skey) == 0 then sid, skey = ARGV[3], KEYS[2] end
local last = {}
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    local token, holder = string.match(v, '^(%d+) %d+ (.*)$')  -- held: token, since, sid
    if not token then token = string.match(v, '^(%d+)$') end  -- released: the last token only
    if not token then return {2, KEYS[i]} end
    if holder and holder ~= sid and redis.call('EXISTS', ARGV[4] .. holder) == 1 then return {0} end
    last[i] = tonumber(token)
  else
    last[i] = 0
  end
end
local ttl = tonumber(ARGV[1])
if redis.call('PTTL', skey) < ttl then redis.call('SET', skey, ARGV[5], 'PX', ttl) end
local out = {1, sid}
for i = 3, #KEYS do
  local token = math.max(last[i] + 1, now)
  redis.call('SET', KEYS[i], string.format('%d %d %s', token, now, sid))
  out[#out + 1] = string.format('%d', token)
end
return out
"""

# Codes the renew script returns; anything else is a BackendProtocolError.
SESSION_GONE, RENEWED, SUPERSEDED, KEY_RELEASED = 0, 1, 2, 3

RENEW = """
-- KEYS[1] session key, KEYS[2] (optional) the lease's first shard key; ARGV[1] ttl ms, ARGV[2] sid,
-- ARGV[3] the lease's token of that key ('' when unknown).
-- 1 = extended (never shortened); 0 = session gone; 2 = the key names another session or another grant
-- (a different token); 3 = the key names no session (released). Only 1 extends the session.
local left = redis.call('PTTL', KEYS[1])
if left == -2 then return 0 end
if KEYS[2] then
  local v = redis.call('GET', KEYS[2])
  if not v then return 3 end
  local token, holder = string.match(v, '^(%d+) %d+ (.*)$')
  if not holder then return 3 end
  if holder ~= ARGV[2] or (ARGV[3] ~= '' and token ~= ARGV[3]) then return 2 end
end
if left < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

RELEASE = """
-- KEYS shard keys, ARGV[1] sid, ARGV[2] channel; returns how many keys were freed
local n = 0
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    local token, holder = string.match(v, '^(%d+) %d+ (.*)$')
    if holder == ARGV[1] then
      redis.call('SET', KEYS[i], token)
      n = n + 1
    end
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[2], n) end
return n
"""

SWAP_RECORD = """
-- KEYS[1] record key; ARGV[1] '1' if a value is expected ('0': absence), ARGV[2] the expected value,
-- ARGV[3] '1' to store ARGV[4] ('0': delete); 1 = swapped, 0 = the record did not hold what was expected
local current = redis.call('GET', KEYS[1])  -- false when absent; '' is a value
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[3] == '1' then redis.call('SET', KEYS[1], ARGV[4]) else redis.call('DEL', KEYS[1]) end
return 1
"""

INSPECT = """
-- ARGV[1] a JSON array of shard keys, ARGV[2] the session key prefix. Returns one JSON string the client
-- parses at C speed (redis-py parses a reply per value in Python): {"v": the keys' values, false where
-- missing; "s": for each distinct session a held value names, [its PTTL, its info or false]}. A held
-- value is "<token> <since us> <session>"; a released one is "<token>".
local keys = cjson.decode(ARGV[1])
if #keys == 0 then return '{"v":[],"s":null}' end
local values, sessions, any = {}, {}, false
for i = 1, #keys do
  local v = redis.call('GET', keys[i])
  values[i] = v
  if v then
    local sid = string.match(v, '^%S+ %S+ (.+)$')
    if sid and not sessions[sid] then
      local key = ARGV[2] .. sid
      sessions[sid] = {redis.call('PTTL', key), redis.call('GET', key)}
      any = true
    end
  end
end
return cjson.encode({v = values, s = any and sessions or cjson.null})  -- an empty table would be an array
"""

PREPARE = """
-- KEYS[1] the boot key: a new namespace's, written as if this server had started long ago (no restart grace)
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
return redis.call('SET', KEYS[1], run .. ' 0', 'NX') and 1 or 0
"""
