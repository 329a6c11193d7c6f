"""etcd transactions of any size: each is split into chunks the server takes in one txn.

etcd refuses a txn with more operations than its ``--max-txn-ops`` (default 128) or more bytes than its
``--max-request-bytes``. Until a server refuses one, a txn goes whole (one round trip, as before); after a
refusal, which changes nothing, the same work is retried in chunks of etcd's default limit, halved again
on every further refusal, and that size is kept for the backend's later txns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .etcd_wire import DEFAULT_MAX_TXN_OPS, TxnTooLarge, b64, unb64

log = logging.getLogger("shardpreempt.backends.etcd")


class Txns:
    """Chunked txns through ``post`` (the backend's one request path, which translates errors)."""

    def __init__(self, post: Callable[[str, dict[str, Any]], dict[str, Any]], url: str, max_ops: int) -> None:
        self.post = post
        self.url = url
        self.max_ops = max_ops  # 0: unknown, every txn goes whole until the server refuses one

    def txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> dict[str, Any]:
        """One txn, as it is."""
        return self.post("/kv/txn", {"compare": compare, "success": success, "failure": failure})

    def in_chunks(self, items: list[Any], run: Callable[[list[Any]], bool], reserve: int = 0) -> bool:
        """Call ``run`` on consecutive chunks of ``items`` that fit one txn beside ``reserve`` more operations
        until it returns False (then False); a chunk the server refuses is run again smaller."""
        pos = 0
        while pos < len(items):
            chunk = items[pos:pos + max(1, self.max_ops - reserve)] if self.max_ops else items[pos:]
            try:
                if not run(chunk):
                    return False
            except TxnTooLarge:
                if len(chunk) <= 1:
                    raise
                self.max_ops = DEFAULT_MAX_TXN_OPS if len(chunk) > DEFAULT_MAX_TXN_OPS else len(chunk) // 2
                log.info("etcd at %s refused a txn of %d keys; using chunks of %d", self.url, len(chunk),
                         self.max_ops)
                continue
            pos += len(chunk)
        return True

    def read(self, keys: list[bytes], revision: int = 0) -> dict[bytes, dict[str, Any]]:
        """The kv of each key that exists: one txn of range reads (one per chunk, all at one revision: ``revision``,
        or the first chunk's)."""
        found: dict[bytes, dict[str, Any]] = {}

        def read(chunk: list[bytes]) -> bool:
            nonlocal revision
            at = {"revision": revision} if revision else {}  # later chunks read the first one's snapshot
            reply = self.txn([], [{"request_range": {"key": b64(k), **at}} for k in chunk], [])
            revision = revision or int(reply["header"]["revision"])
            found.update((unb64(kv["key"]), kv) for r in reply.get("responses", [])
                         for kv in r["response_range"].get("kvs", []))
            return True

        self.in_chunks(keys, read)
        return found

    def delete_ours(self, keys: list[bytes], test: dict[str, Any], ours: Callable[[dict[str, Any]], bool],
                    also: tuple[dict[str, Any], ...] = ()) -> int:
        """Delete the keys that pass ``test`` (a compare target: our lease or our value). Per chunk, one txn
        compares and deletes them all (and does ``also``, more operations); if one fails the compare, its
        failure branch reads the chunk back in the same round trip and a second txn deletes those still
        ``ours`` (etcd 3.4 has no nested txn). Returns the revision of the last txn."""
        revision = 0
        keys_only = test["target"] == "LEASE"  # a lease compare needs no values read back

        def delete(chunk: list[bytes]) -> bool:
            nonlocal revision
            for _ in range(3):
                if not chunk:
                    return True
                reply = self.txn([{"key": b64(k), "result": "EQUAL", **test} for k in chunk],
                                 [*({"request_delete_range": {"key": b64(k)}} for k in chunk), *also],
                                 [{"request_range": {"key": b64(k), "keys_only": keys_only}} for k in chunk])
                revision = int(reply["header"]["revision"])
                if reply.get("succeeded"):
                    return True
                chunk = [k for k, r in zip(chunk, reply.get("responses", []), strict=True)
                         if any(ours(kv) for kv in r["response_range"].get("kvs", []))]
            log.warning("deleting %d keys kept failing its comparison; lease expiry will free them", len(chunk))
            return True

        self.in_chunks(keys, delete, reserve=len(also))
        return revision

    def delete_valued(self, keys: list[bytes], value: bytes) -> int:
        """Delete those of ``keys`` that still hold ``value`` (unique to one acquire, by its nonce)."""
        return self.delete_ours(keys, {"target": "VALUE", "value": b64(value)},
                                lambda kv: unb64(kv.get("value", "")) == value)
