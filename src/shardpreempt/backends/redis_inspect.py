"""Who holds ``redis://`` keys (``RedisBackend.inspect``): two round trips, however many keys.

First a pipeline of read-only scripts (``redis_scripts.INSPECT``), each reading ``BATCH`` shard keys and
answering their values as one JSON string, which the client parses at C speed (redis-py parses a reply per
value in Python). A held key's value is ``"<token> <since µs> <session>"``; the keys one acquire granted
share it, and so share one Holder. Then a pipeline of ``PTTL`` and ``GET`` of each distinct session: a
key whose session is gone is free. redis-py's errors are translated by the caller (``redis_errors``).
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
    if shard_keys:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(shard_keys), BATCH):
            pipe.eval(INSPECT, 0, json.dumps(shard_keys[i:i + BATCH], ensure_ascii=False))
        for reply in pipe.execute():
            values += _values(reply, url)
    grants: dict[str, tuple[int, int, str]] = {}  # value of a held key -> token, since µs, session
    for value in set(values):
        fields = value.split(" ", 2) if isinstance(value, str) else ()
        if len(fields) == 3:  # else missing (false) or released ("<token>")
            try:
                grants[value] = (int(fields[0]), int(fields[1]), fields[2])
            except ValueError:
                raise BackendProtocolError(f"{url}: unreadable shard record: {value!r:.80}") from None
    sids = list(dict.fromkeys(sid for _, _, sid in grants.values()))
    sessions: dict[str, tuple[int, Any]] = {}
    if sids:
        pipe = client.pipeline(transaction=False)
        for sid in sids:
            pipe.pttl(session_key(sid))
            pipe.get(session_key(sid))
        answers = pipe.execute()
        sessions = {sid: (answers[2 * i], answers[2 * i + 1]) for i, sid in enumerate(sids)}
    live: dict[str, Holder] = {}
    for value, (token, since_us, sid) in grants.items():
        pttl, raw = sessions[sid]
        if raw is None or pttl == -2:
            continue  # the session expired: the key is free
        info = _session_info(raw)
        live[value] = Holder(owner_of(sid), token, pttl / 1000 if pttl >= 0 else None, info.get("pid"),
                             info.get("host"), since_us / 1e6)
    return [live.get(value) if isinstance(value, str) else None for value in values]


def owner_of(sid: str) -> str:
    """The owner of a session id ``owner/random``."""
    return sid.rsplit("/", 1)[0]


def _values(reply: Any, url: str) -> list[Any]:
    try:
        values = json.loads(reply)
    except (TypeError, ValueError):
        values = None
    if not isinstance(values, list):
        raise BackendProtocolError(f"{url}: unexpected reply from the inspect script: {reply!r:.99}")
    return values


def _session_info(raw: Any) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
