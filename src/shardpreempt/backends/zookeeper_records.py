"""The ZooKeeper backend's records: persistent nodes ``/CHROOT/r/<sha256(name)>`` holding the value.

``read`` is a ``sync`` and one ``get`` per name, pipelined (one round trip's wait); ``swap`` creates the node
(expected absent), or reads its version and sets or deletes at that version. Both run on the backend's
reader session; kazoo's errors are translated by the caller (``zookeeper_session.edge``).
"""

from __future__ import annotations

from typing import Any

from kazoo import exceptions as kz


def read(client: Any, where: str, paths: dict[str, str], timeout: float) -> dict[str, str | None]:
    """The value of each record (name -> node path), ``None`` when its node is missing; ``where`` is the
    records' parent node, synced first."""
    out: dict[str, str | None] = {}
    # a session's requests are answered in order: after the sync, the gets see the leader's state
    synced = client.sync_async(where)
    replies = {name: client.get_async(path) for name, path in paths.items()}
    synced.get(timeout=timeout)
    for name, reply in replies.items():
        try:
            out[name] = reply.get(timeout=timeout)[0].decode("utf-8", "surrogatepass")
        except kz.NoNodeError:
            out[name] = None
    return out


def swap(client: Any, path: str, expected: str | None, value: str | None, timeout: float) -> bool:
    """Compare-and-set the record at ``path``: ``None`` means absent (``expected``) or delete (``value``)."""
    data = None if value is None else value.encode("utf-8", "surrogatepass")
    if expected is None:
        txn = client.transaction()
        txn.create(path, data or b"")
        if data is None:
            txn.delete(path)  # absent to absent: succeeds only while absent, leaves nothing
        results = txn.commit_async().get(timeout=timeout)
        failures = [r for r in results if isinstance(r, Exception)
                    and not isinstance(r, (kz.RolledBackError, kz.RuntimeInconsistency))]
        if failures and not isinstance(failures[0], kz.NodeExistsError):
            raise failures[0]
        return not failures
    want = expected.encode("utf-8", "surrogatepass")
    while True:
        synced = client.sync_async(path)  # so the read below is not a lagging member's
        reply = client.get_async(path)
        synced.get(timeout=timeout)
        try:
            current, stat = reply.get(timeout=timeout)
        except kz.NoNodeError:
            return False
        if current != want:
            return False
        write = (client.delete_async(path, version=stat.version) if data is None
                 else client.set_async(path, data, version=stat.version))
        try:
            write.get(timeout=timeout)
            return True
        except (kz.BadVersionError, kz.NoNodeError):
            continue  # changed since the read: compare again with what is there now
