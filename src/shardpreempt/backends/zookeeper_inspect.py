"""Who holds ZooKeeper keys, read on the backend's reader session (``ZooKeeperBackend.inspect``).

Few keys: a pipelined ``exists`` of their nodes, then a pipelined ``get`` of the markers of the sessions
owning them (2 round trips). Many: one listing of the claim records (one per acquire held: owner, pid,
host, its keys) and a pipelined ``get`` of each, so the cost grows with the acquires held, not the keys; the
keys of one claim share one Holder. kazoo's errors are translated by the caller.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection
from typing import Any

from kazoo import exceptions as kz

from ..errors import BackendProtocolError
from ..model import Holder


def by_nodes(client: Any, paths: dict[str, str], marker: Callable[[int], str], timeout: float,
             url: str) -> dict[str, Holder]:
    """The holder of each key (key -> its node path) whose node exists and whose session's marker does."""
    stats = [(k, client.exists_async(path)) for k, path in paths.items()]
    held = [(k, s) for k, r in stats if (s := r.get(timeout=timeout)) is not None]
    owners = {s.ephemeralOwner: client.get_async(marker(s.ephemeralOwner)) for _, s in held}
    out: dict[str, Holder] = {}
    for key, stat in held:
        with contextlib.suppress(kz.NoNodeError):  # the session ended meanwhile: free
            info = parse(owners[stat.ephemeralOwner].get(timeout=timeout)[0], key, url)
            out[key] = Holder(str(info["owner"]), int(stat.czxid), None, pid=info.get("pid"),
                              host=info.get("host"), since=stat.ctime / 1000)
    return out


def by_claims(client: Any, claims_dir: str, wanted: Collection[str], timeout: float, url: str) -> dict[str, Holder]:
    """The holder of each of the ``wanted`` keys that a live claim record names."""
    out: dict[str, Holder] = {}
    names = client.get_children(claims_dir)
    for reply in [client.get_async(f"{claims_dir}/{name}") for name in names]:
        try:
            data, stat = reply.get(timeout=timeout)
        except kz.NoNodeError:
            continue  # released meanwhile
        info = parse(data, claims_dir, url)
        holder = Holder(str(info["owner"]), int(stat.czxid), None, pid=info.get("pid"), host=info.get("host"),
                        since=stat.ctime / 1000)
        for key in info.get("keys", []):
            if key in wanted:
                out[key] = holder
    return out


def parse(data: bytes, where: str, url: str) -> dict[str, Any]:
    """A claim record or session marker: JSON with at least an owner."""
    try:
        info = json.loads(data.decode("utf-8", "surrogatepass"))
        if not isinstance(info, dict) or "owner" not in info:
            raise ValueError("no owner")
    except ValueError as exc:
        raise BackendProtocolError(f"unreadable ZooKeeper record for {where!r} at {url}") from exc
    return info
