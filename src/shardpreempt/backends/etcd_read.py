"""Reading who holds many etcd keys: the prefix scanned in pages of keys only, one value per grant.

Every key one acquire chunk puts carries the same value (owner, pid, host, since, nonce), the same lease and
the same create revision (the token), so a scan needs no values: keys only (``keys_only``: about half the
bytes the gateway encodes), then the value of one key per (lease, create revision), read in one txn at the
scan's revision, so the pages and the values are one snapshot. Pages are unsorted requests: keys come back
in key order anyway, and a sort order makes etcd read the whole rest of the range for every page. The
gateway's JSON marshalling, not the store, is most of a scan's time (about 10 µs a key), so a big scan is
cut into sub-ranges whose pages are asked side by side, on connections of their own (``scan_together``).
"""

from __future__ import annotations

import binascii
import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import BackendProtocolError
from ..model import Holder
from .etcd_wire import b64

Post = Callable[[str, dict[str, Any]], dict[str, Any]]
#: A grant as etcd shows it: (lease id, create revision).
Grant = tuple[int, int]


def scan(post: Post, start: bytes, end: bytes, page: int, keys_only: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Every key in ``[start, end)`` (without its value unless ``keys_only`` is false), ``page`` keys per
    request, every page at the first page's revision; the kvs and that revision."""
    found: list[dict[str, Any]] = []
    revision = 0
    while True:
        body: dict[str, Any] = {"key": b64(start), "range_end": b64(end), "limit": page, "keys_only": keys_only}
        if revision:
            body["revision"] = revision
        reply = post("/kv/range", body)
        revision = revision or int(reply["header"]["revision"])
        kvs = reply.get("kvs", [])
        found += kvs
        if not reply.get("more") or not kvs:
            return found, revision
        start = binascii.a2b_base64(kvs[-1]["key"]) + b"\0"


def scan_together(post: Post, together: Callable[[str, list[dict[str, Any]]], list[dict[str, Any]]], start: bytes,
                  end: bytes, page: int, splits: list[bytes]) -> tuple[list[dict[str, Any]], int]:
    """:func:`scan` with ``[start, end)`` cut at ``splits`` (sorted, inside the range) into sub-ranges paged
    side by side: each round asks the next page of every unfinished sub-range at once (``together``), so
    the server marshals them in parallel. The revision comes first, from a count."""
    head = post("/kv/range", {"key": b64(start), "range_end": b64(end), "count_only": True})
    revision = int(head["header"]["revision"])
    bounds = [start, *splits, end]
    ranges = [[lo, hi] for lo, hi in itertools.pairwise(bounds) if lo < hi]
    found: list[list[dict[str, Any]]] = [[] for _ in ranges]
    active = list(range(len(ranges)))
    while active:
        replies = together("/kv/range", [{"key": b64(ranges[i][0]), "range_end": b64(ranges[i][1]), "limit": page,
                                          "keys_only": True, "revision": revision} for i in active])
        more = []
        for i, reply in zip(active, replies, strict=True):
            kvs = reply.get("kvs", [])
            found[i] += kvs
            if reply.get("more") and kvs:
                ranges[i][0] = binascii.a2b_base64(kvs[-1]["key"]) + b"\0"
                more.append(i)
        active = more
    return [kv for part in found for kv in part], revision


def grants(kvs: Iterable[dict[str, Any]], prefix: bytes, wanted: set[str]) -> dict[Grant, list[str]]:
    """The ``wanted`` keys among ``kvs`` (lock keys: their etcd keys less ``prefix``), by grant."""
    cut = len(prefix)
    raw: dict[tuple[str, str], list[str]] = {}  # (lease, create revision) as the gateway writes them -> keys
    for kv in kvs:
        key = binascii.a2b_base64(kv["key"])[cut:].decode("utf-8", "surrogatepass")
        if key in wanted:
            raw.setdefault((kv.get("lease", "0"), kv["create_revision"]), []).append(key)
    return {(int(lease), int(revision)): keys for (lease, revision), keys in raw.items()}


def holder(key: str, grant: Grant, value: str | None, ttls: dict[int, int] | None, url: str) -> Holder | None:
    """The Holder of a grant whose lease is live (no lease: held while the key exists), from the base64
    ``value`` of one of its keys (``key``); None when it was released after the scan, or its lease just
    expired (its keys are being deleted). ``ttls`` None: the leases' time left was not asked (a pool's
    look), so the Holder has no ``expires_in`` and a lease expired but not yet revoked still holds."""
    lease_id, token = grant
    if value is None or (ttls is not None and lease_id and ttls.get(lease_id, -1) < 0):
        return None
    try:
        info = json.loads(binascii.a2b_base64(value))
        owner = str(info["owner"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BackendProtocolError(f"etcd key {key!r} at {url} has an unreadable value") from exc
    left = float(ttls[lease_id]) if ttls is not None and lease_id else None
    return Holder(owner, token, left, pid=info.get("pid"),
                  host=info.get("host"), since=info.get("since"))
