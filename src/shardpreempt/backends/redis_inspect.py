"""Who holds ``redis://`` keys (``RedisBackend.inspect``): one round trip, however many keys.

A pipeline of read-only scripts (``redis_scripts.INSPECT``), each reading ``BATCH`` shard keys and, for
each distinct session their values name, that session's remaining time and info; each answers as one
JSON string, which the client parses at C speed (redis-py parses a reply per value in Python, and a
look at a big pool has a session per member). A held key's value is ``"<token> <since µs> <session>"``;
the keys one acquire granted share it, and so share one Holder; a key whose session is gone is free.
redis-py's errors are translated by the caller (``redis_errors``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import BackendProtocolError
from ..model import Holder
from .redis_scripts import INSPECT

BATCH = 10_000  # keys per script run: few commands, none stalling the server long


def holders(client: Any, shard_keys: list[str], session_key: Callable[[str], str], url: str) -> list[Holder | None]:
    """The holder of each shard key (full Redis key names), in order."""
    values: list[Any] = []
    sessions: dict[str, Any] = {}
    if shard_keys:
        pipe = client.pipeline(transaction=False)
        prefix = session_key("")
        for i in range(0, len(shard_keys), BATCH):
            pipe.eval(INSPECT, 0, json.dumps(shard_keys[i:i + BATCH], ensure_ascii=False), prefix)
        for reply in pipe.execute():
            batch, seen = _reply(reply, url)
            values += batch
            sessions.update(seen)
    live: dict[str, Holder] = {}
    owners: dict[str, tuple[str, float | None, Any, Any] | None] = {}  # sid -> what its holders share
    for value in set(values):
        fields = value.split(" ", 2) if isinstance(value, str) else ()
        if len(fields) != 3:  # missing (false) or released ("<token>")
            continue
        try:
            token, since_us, sid = int(fields[0]), int(fields[1]), fields[2]
        except ValueError:
            raise BackendProtocolError(f"{url}: unreadable shard record: {value!r:.80}") from None
        if sid not in owners:
            pttl, raw = sessions.get(sid, (-2, None))
            if not isinstance(raw, str) or pttl == -2:
                owners[sid] = None  # the session expired: its keys are free
            else:
                info = _session_info(raw)
                owners[sid] = (owner_of(sid), pttl / 1000 if pttl >= 0 else None, info.get("pid"), info.get("host"))
        shared = owners[sid]
        if shared is not None:
            owner, expires_in, pid, host = shared
            live[value] = Holder(owner, token, expires_in, pid, host, since_us / 1e6)
    return [live.get(value) if isinstance(value, str) else None for value in values]


def owner_of(sid: str) -> str:
    """The owner of a session id ``owner/random``."""
    return sid.rsplit("/", 1)[0]


def _reply(reply: Any, url: str) -> tuple[list[Any], dict[str, Any]]:
    """The values and sessions of one script run's answer."""
    try:
        answer = json.loads(reply)
        values, sessions = answer["v"], answer["s"] or {}
    except (TypeError, ValueError, KeyError):
        values = sessions = None
    if not isinstance(values, list) or not isinstance(sessions, dict):
        raise BackendProtocolError(f"{url}: unexpected reply from the inspect script: {reply!r:.99}")
    return values, sessions


def _session_info(raw: Any) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
