"""Reading who holds many etcd keys: the prefix scanned in pages of keys only, one value per grant.

Every key one acquire chunk puts carries the same value (owner, pid, host, since, nonce), the same lease and
the same create revision (the token), so a scan needs no values: keys only (``keys_only``: about half the
bytes the gateway encodes), then the value of one key per (lease, create revision), read in one txn at the
scan's revision, so the pages and the values are one snapshot. Pages are unsorted requests: keys come back
in key order anyway, and a sort order makes etcd read the whole rest of the range for every page.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import BackendProtocolError
from ..model import Holder
from .etcd_wire import b64

Post = Callable[[str, dict[str, Any]], dict[str, Any]]
#: A grant as etcd shows it: (lease id, create revision).
Grant = tuple[int, int]


def scan(post: Post, start: bytes, end: bytes, page: int) -> tuple[list[dict[str, Any]], int]:
    """Every key in ``[start, end)`` without its value, ``page`` keys per request, every page at the first
    page's revision; the kvs and that revision."""
    found: list[dict[str, Any]] = []
    revision = 0
    while True:
        body: dict[str, Any] = {"key": b64(start), "range_end": b64(end), "limit": page, "keys_only": True}
        if revision:
            body["revision"] = revision
        reply = post("/kv/range", body)
        revision = revision or int(reply["header"]["revision"])
        kvs = reply.get("kvs", [])
        found += kvs
        if not reply.get("more") or not kvs:
            return found, revision
        start = binascii.a2b_base64(kvs[-1]["key"]) + b"\0"


def grant_of(kv: dict[str, Any]) -> Grant:
    """The (lease, create revision) of a kv: proto3 JSON omits a zero lease."""
    return int(kv.get("lease", 0)), int(kv["create_revision"])


def wanted_kvs(kvs: Iterable[dict[str, Any]], prefix: bytes, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The kvs of the ``wanted`` keys, by key (the lock key: its etcd key less ``prefix``)."""
    cut, out = len(prefix), {}
    for kv in kvs:
        key = binascii.a2b_base64(kv["key"])[cut:].decode("utf-8", "surrogatepass")
        if key in wanted:
            out[key] = kv
    return out


def holders(kvs: dict[str, dict[str, Any]], values: dict[Grant, str], ttls: dict[int, int],
            url: str) -> dict[str, Holder]:
    """A Holder per key whose grant is live (its lease has time to live; no lease: held while it exists),
    one Holder per grant; ``values`` has the base64 value of a key of each grant."""
    by_grant: dict[Grant, Holder | None] = {}
    out: dict[str, Holder] = {}
    for key, kv in kvs.items():
        grant = grant_of(kv)
        if grant not in by_grant:
            by_grant[grant] = _holder(key, grant, values.get(grant), ttls, url)
        holder = by_grant[grant]
        if holder is not None:
            out[key] = holder
    return out


def _holder(key: str, grant: Grant, value: str | None, ttls: dict[int, int], url: str) -> Holder | None:
    lease_id, token = grant
    if value is None or (lease_id and ttls.get(lease_id, -1) < 0):
        return None  # released after the scan, or its lease just expired: the key is being deleted
    try:
        info = json.loads(binascii.a2b_base64(value))
        owner = str(info["owner"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BackendProtocolError(f"etcd key {key!r} at {url} has an unreadable value") from exc
    return Holder(owner, token, float(ttls[lease_id]) if lease_id else None, pid=info.get("pid"),
                  host=info.get("host"), since=info.get("since"))
