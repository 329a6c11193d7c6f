"""``etcd://HOST:PORT[,HOST2:PORT2...]/PREFIX`` — etcd v3 through its JSON gateway (etcd3gw).

URL grammar: ``etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/PREFIX][?OPTIONS]``, e.g.
``etcd://127.0.0.1:2379,127.0.0.1:22379/shardpreempt?timeout=2``. Keys live under ``/PREFIX/``
(default ``/shardpreempt/``). Endpoints are tried in order; a connection error moves on to the next
(``etcd_http``).
With USER:PASSWORD the backend calls ``Authenticate`` and sends the token with every request
(re-authenticating once when the server says the token expired).

Options (query string or keywords), with defaults: ``connect_timeout`` (2 s), ``timeout`` (2 s, per
request), ``poll`` (0.05 s: how long ``wait`` sleeps when no watch can be opened), ``page`` (10000:
keys per range page in ``inspect``), ``max_txn_ops`` (0: unknown, learnt when the server refuses a txn;
else the servers' ``--max-txn-ops``), ``tls`` (false: https), ``ca_cert``, ``cert_cert``, ``cert_key``
(TLS files, passed to the client).

Design: one etcd lease per owner (the session), TTL = ttl rounded UP to whole seconds; the server may
grant more (its minimum is about 2 s) and the granted TTL is what ``Lease.ttl`` and the deadline use.
``try_acquire`` is one txn: compare ``create_revision == 0`` for every key; on success put every key
with the lease and a JSON value (owner, pid, host, since, nonce). A slice above the server's txn limit
is taken in chunks that fit, one txn each, in order; when a chunk finds a key held, the chunks already
taken are deleted again (compared on their unique value) before ``None`` is returned, so an acquire
still holds all or nothing. ``renew`` is one LeaseKeepAlive plus one txn comparing the lease's first
key's lease and create revision with ours (a txn cannot refresh a lease): two round trips whatever the
number of keys (slices are all or nothing, so the first key tells), one for a lease without keys.
``release`` is one txn per chunk: compare every key's lease with ours and delete them all; if some key
is no longer ours the failure branch reads the keys back and a second txn deletes the ones still ours.
``inspect`` reads the keys (one txn for up to 64 keys, else the prefix in pages of keys only and one
value per grant: ``etcd_read``) plus one LeaseTimeToLive per distinct holder session; ``peek``, the
pool's look, reads the keys by txns and asks no time left. Every release txn also puts the news key
``/PREFIX/\\xffnews``; ``wait`` reads an etcd watch of it (see ``etcd_watch``) from the revision of the
last failed acquire, kept open across calls until an acquire succeeds: one event per release for each
waiter (a watch of the lock keys sent every deleted shard key to every waiter). Records live under
``/PREFIX/\\xffrecords/``: 0xff never occurs in UTF-8, so no lock key can collide with them.

Token source: the key's ``create_revision`` (the revision of the txn that created it), strictly
increasing cluster-wide and durable; keys taken in different chunks get different tokens. Round trips
for a slice that fits one txn: acquire 1 (plus one LeaseGrant/KeepAlive when the owner's session is new
or more than half used), renew 2 (the keepalive and the first key's txn), release 1; above the limit,
one per chunk (and one refused txn per backend until the limit is learnt). Capabilities: server expiry,
cross-host, not session-bound, blocking wait. Caveats: an acquire whose reply is lost may have taken
effect: its keys are deleted before the owner's next acquire (they carry a unique nonce); while a
chunked acquire is under way its first chunks are briefly held (and shown by ``inspect``) even if it
then rolls them back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BackendError, BackendProtocolError, BackendUnavailable, ConfigError, LeaseLost
from ..model import Holder, Lease
from ..typing import Capabilities
from . import (
    check_record,
    etcd_read,
    option,
    redact_url,
    reject_unknown,
    renewal_check,
    superseded,
    url_options,
)
from .etcd_http import Gateway, parse_endpoints
from .etcd_txn import Txns
from .etcd_watch import WatchStream
from .etcd_wire import b64, unb64

log = logging.getLogger("shardpreempt.backends.etcd")
SMALL = 64  # inspect reads up to this many keys in one txn, more by scanning the prefix
SPLITS = 8  # sub-ranges a big inspect scans side by side: the gateway marshals each on its own
RECORDS = b"\xffrecords/"  # after the prefix; 0xff is never part of UTF-8, so never of a lock key
NEWS = b"\xffnews"  # after the prefix: a release puts it in its txn; waiters watch it (one event a release)


@dataclass
class _Session:
    lease_id: int
    ttl: int
    deadline: float  # local monotonic: start of the last grant/keepalive + granted TTL


class EtcdBackend:
    """Lock store on etcd v3: one lease per owner, one txn per acquire/release (per chunk above the
    server's txn limit)."""

    capabilities = Capabilities(server_expiry=True, cross_host=True, session_bound=False, blocking_wait=True)

    def __init__(self, url: str, **options: Any) -> None:
        self.url = redact_url(url)
        opts = {**url_options(url), **options}
        self.connect_timeout = float(option(opts, "connect_timeout", float, 2.0, url=url))
        self.timeout = float(option(opts, "timeout", float, 2.0, url=url))
        self.poll = float(option(opts, "poll", float, 0.05, url=url))
        self.page = max(1, int(option(opts, "page", int, 10000, url=url)))
        max_txn_ops = int(option(opts, "max_txn_ops", int, 0, url=url))  # 0: unknown until refused
        tls = bool(option(opts, "tls", bool, False, url=url))
        certs = {name: option(opts, name, str, None, url=url) for name in ("ca_cert", "cert_cert", "cert_key")}
        reject_unknown(opts, url)
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        self.endpoints = parse_endpoints(hosts, self.url)
        self.gateway = Gateway(self.endpoints, self.url, auth=(unquote(user), unquote(password)) if user else None,
                               connect_timeout=self.connect_timeout, timeout=self.timeout, tls=tls, **certs)
        self._post = self.gateway.post
        path = unquote(parts.path).strip("/") or "shardpreempt"
        self.prefix = f"/{path}/".encode()
        self.locks_end = self.prefix + b"\xff"  # every lock key sorts below it, the records above
        self.news = self.prefix + NEWS
        self.txns = Txns(self._post, self.url, max_txn_ops)
        self._sessions: dict[str, _Session] = {}  # owner -> its etcd lease
        self._limbo: dict[str, tuple[list[str], bytes]] = {}  # owner -> keys/value of an unsure acquire
        self._failed: dict[bytes, int] = {}  # etcd key -> store revision of the last acquire it failed
        self._watch: WatchStream | None = None
        self._host = socket.gethostname()

    def _raw_key(self, key: str) -> bytes:
        return self.prefix + key.encode("utf-8", "surrogatepass")

    def _key(self, key: str) -> str:
        return b64(self._raw_key(key))

    # -- sessions --------------------------------------------------------------------------------
    def _session(self, owner: str, ttl: float, start: float) -> _Session:
        """The owner's live lease, refreshed when more than half used, granted anew when dead."""
        session = self._sessions.get(owner)
        want = max(1, math.ceil(ttl))
        if session is not None and session.deadline - start > session.ttl / 2:
            return session
        if session is not None:
            granted = int(self._post("/lease/keepalive", {"ID": session.lease_id})["result"].get("TTL", -1))
            if granted > 0:
                session.deadline = start + granted
                return session
        reply = self._post("/lease/grant", {"TTL": want, "ID": 0})
        granted = int(reply["TTL"])
        session = _Session(int(reply["ID"]), granted, start + granted)
        self._sessions[owner] = session
        log.debug("owner %s: lease %x granted for %d s", owner, session.lease_id, granted)
        return session

    def _value(self, owner: str) -> bytes:
        return json.dumps({"owner": owner, "pid": os.getpid(), "host": self._host, "since": time.time(),
                           "nonce": uuid.uuid4().hex}, separators=(",", ":")).encode()

    def _clear_limbo(self, owner: str) -> None:
        """Delete the keys of an earlier acquire whose reply was lost, if it did take effect."""
        keys, value = self._limbo[owner]
        self.txns.delete_valued([self._raw_key(k) for k in keys], value)
        del self._limbo[owner]

    # -- the contract ----------------------------------------------------------------------------
    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key or none: one txn comparing create_revision == 0 and putting every key (one per
        chunk above the server's txn limit, the chunks taken deleted again if a later one fails)."""
        start = time.monotonic()
        keys = list(keys)
        if owner in self._limbo:
            self._clear_limbo(owner)
        for attempt in (1, 2):
            session = self._session(owner, ttl, start)
            value = self._value(owner)
            try:
                tokens = self._take(keys, owner, session.lease_id, value)
            except BackendProtocolError as exc:
                if "lease not found" not in str(exc) or attempt == 2:
                    raise
                self._sessions.pop(owner, None)  # expired under us (with any chunk taken): a new lease
                continue
            if tokens is None:
                return None
            for key in keys:
                self._failed.pop(self._raw_key(key), None)
            if self._watch is not None:  # we got what we waited for; reopen from a fresh revision later
                self._watch.close()
                self._watch = None
            return Lease(tuple(keys), owner, tokens, float(session.ttl), session.deadline, str(session.lease_id))
        raise AssertionError("unreachable")

    def _take(self, keys: list[str], owner: str, lease_id: int, value: bytes) -> dict[str, int] | None:
        """Put the keys chunk by chunk; on contention delete the chunks taken and return None."""
        tokens: dict[str, int] = {}

        def put(chunk: list[str]) -> bool:
            compare = [{"key": self._key(k), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
                       for k in chunk]
            success = [{"request_put": {"key": self._key(k), "value": b64(value), "lease": lease_id}}
                       for k in chunk]
            try:
                reply = self.txns.txn(compare, success, [])
            except BackendUnavailable:
                self._limbo[owner] = ([*tokens, *chunk], value)  # this chunk too may have been applied
                raise
            revision = int(reply["header"]["revision"])
            if not reply.get("succeeded"):
                self._failed.update((self._raw_key(k), revision) for k in keys[len(tokens):])
                return False
            tokens.update(dict.fromkeys(chunk, revision))
            return True

        try:
            if self.txns.in_chunks(keys, put):
                return tokens
        except (ConfigError, BackendProtocolError):  # refused (too large, lease gone): undo what was taken
            self._roll_back(owner, list(tokens), value)
            raise
        self._roll_back(owner, list(tokens), value)
        return None

    def _roll_back(self, owner: str, taken: list[str], value: bytes) -> None:
        """Delete the chunks an acquire took before it failed; a wait then ignores these deletes."""
        if not taken:
            return
        try:
            revision = self.txns.delete_valued([self._raw_key(k) for k in taken], value)
        except BackendUnavailable:
            self._limbo[owner] = (taken, value)  # the owner's next acquire deletes them
            raise
        self._failed.update((self._raw_key(k), revision) for k in taken)

    def renew(self, lease: Lease) -> Lease:
        """One LeaseKeepAlive for the owner's lease, then one txn checking that the lease's first key is
        still attached to that etcd lease with the lease's token (its create revision): two round trips,
        whatever the number of keys (a txn cannot refresh a lease, and a keepalive cannot compare a key).
        A lease without keys costs the keepalive alone."""
        start = time.monotonic()
        lease_id = int(lease.session)
        reply = self._post("/lease/keepalive", {"ID": lease_id})
        granted = int(reply.get("result", {}).get("TTL", -1))
        session = self._sessions.get(lease.owner)
        if granted <= 0:
            if session is not None and str(session.lease_id) == lease.session:
                del self._sessions[lease.owner]
            raise LeaseLost(f"etcd lease {lease_id:x} expired", lease.keys)
        if session is not None and str(session.lease_id) == lease.session:
            session.deadline = start + granted
        self._check_first_key(lease, lease_id)
        return lease.with_deadline(start + granted)

    def _check_first_key(self, lease: Lease, lease_id: int) -> None:
        """One txn: the lease's first key must carry ``lease_id`` (and the lease's token as its create
        revision); its failure branch reads the key back, so LeaseLost can say what happened to it."""
        check = renewal_check(lease)
        if check is None:
            return
        key, token = check
        target = self._key(key)
        compare = [{"key": target, "result": "EQUAL", "target": "LEASE", "lease": lease_id}]
        if token is not None:
            compare.append({"key": target, "result": "EQUAL", "target": "CREATE", "create_revision": token})
        reply = self.txns.txn(compare, [], [{"request_range": {"key": target}}])
        if reply.get("succeeded"):
            return
        kvs = [kv for r in reply.get("responses", []) for kv in r.get("response_range", {}).get("kvs", [])]
        if not kvs:
            raise superseded(lease, "was deleted (released, or its lease expired)")
        if int(kvs[0].get("lease", 0)) != lease_id:
            raise superseded(lease, f"is held under etcd lease {int(kvs[0].get('lease', 0)):x}")
        raise superseded(lease, f"was granted again (token {kvs[0].get('create_revision')}, ours {token})")

    def release(self, lease: Lease) -> None:
        """Delete the keys still attached to this lease's etcd lease (one txn per chunk; two if some were
        lost); each txn also puts the news key, which wakes waiters."""
        lease_id = int(lease.session)
        self.txns.delete_ours([self._raw_key(k) for k in lease.keys], {"target": "LEASE", "lease": lease_id},
                              lambda kv: int(kv.get("lease", 0)) == lease_id,
                              also=({"request_put": {"key": b64(self.news), "value": ""}},))

    def peek(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """:meth:`inspect` for the pool's looks: the keys read by txns of range reads, all at one revision,
        and no LeaseTimeToLive. Every member holds under a session of its own, so asking each holder's
        time left made a look of N members N round trips more (and N LeaseTimeToLive at the leader);
        a look needs only who holds what. A lease that expired but is not yet revoked (the leader
        revokes expired leases within about half a second) still shows as held: the next look sees it."""
        return self._peek(keys, 0)

    def peek_under(self, keys: Sequence[str], under: str) -> dict[str, Holder | None]:
        """:meth:`peek`, with the keys that start with ``under`` answered by one range read of every key
        under it (a pool's member slots: the range returns the members alone, where point reads asked
        every slot, about twice as many, at about 95 µs of the server's time each), the others by point
        reads at that range's revision."""
        start = self._raw_key(under)
        end = start[:-1] + bytes([start[-1] + 1])  # under's last character is ASCII (":")
        kvs, revision = etcd_read.scan(self._post, start, end, self.page, keys_only=False)
        out = self._peek([k for k in keys if not k.startswith(under)], revision)
        wanted = set(keys)
        out.update(dict.fromkeys(k for k in keys if k.startswith(under)))
        cut = len(self.prefix)
        for kv in kvs:
            key = unb64(kv["key"])[cut:].decode("utf-8", "surrogatepass")
            if key in wanted:
                out[key] = self._holder(key, kv)
        return out

    def _peek(self, keys: Sequence[str], revision: int) -> dict[str, Holder | None]:
        found = self.txns.read([self._raw_key(k) for k in keys], revision)
        out: dict[str, Holder | None] = dict.fromkeys(keys)
        for key in keys:
            kv = found.get(self._raw_key(key))
            if kv is not None:
                out[key] = self._holder(key, kv)
        return out

    def _holder(self, key: str, kv: dict[str, Any]) -> Holder | None:
        grant = (int(kv.get("lease", 0)), int(kv["create_revision"]))
        return etcd_read.holder(key, grant, kv.get("value", ""), None, self.url)

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Up to 64 keys: one txn reading them. More: the prefix scanned in pages of keys only, then the value of
        one key per grant in one txn at the scan's revision (``etcd_read``). Then one LeaseTimeToLive per
        holder session."""
        wanted = set(keys)
        if len(wanted) <= SMALL:
            found = self.txns.read([self._raw_key(k) for k in wanted])
            granted = etcd_read.grants(found.values(), self.prefix, wanted)
        else:
            scanned, revision = self._scan(list(map(self._raw_key, wanted)))
            granted = etcd_read.grants(scanned, self.prefix, wanted)
            found = self.txns.read([self._raw_key(held[0]) for held in granted.values()], revision)
        values = {grant: kv.get("value", "") for grant, held in granted.items()
                  if (kv := found.get(self._raw_key(held[0]))) is not None}  # one value per grant
        ttls: dict[int, int] = {}
        for lease_id in {lease for lease, _ in values} - {0}:
            # proto3 JSON omits a zero: a missing TTL means under a second left; -1 means expired
            ttls[lease_id] = int(self._post("/kv/lease/timetolive", {"ID": lease_id}).get("TTL", 0))
        out: dict[str, Holder | None] = dict.fromkeys(keys)
        for grant, held in granted.items():
            if (holder := etcd_read.holder(held[0], grant, values.get(grant), ttls, self.url)) is not None:
                out.update(dict.fromkeys(held, holder))
        return out

    def _scan(self, wanted: list[bytes]) -> tuple[list[dict[str, Any]], int]:
        """Every lock key without its value, at one revision: in ``SPLITS`` sub-ranges asked side by side (cut
        at quantiles of a sample of the wanted keys), else (that failed) page after page through ``_post``."""
        sample = sorted(wanted[::max(1, len(wanted) // 1000)])
        splits = sorted({sample[len(sample) * i // SPLITS] for i in range(1, SPLITS)} - {self.prefix})
        try:
            return etcd_read.scan_together(self._post, self.gateway.post_together, self.prefix, self.locks_end,
                                           self.page, splits)
        except BackendError as exc:
            log.debug("parallel scan of %s failed (%s); scanning page by page", self.url, exc)
            return etcd_read.scan(self._post, self.prefix, self.locks_end, self.page)

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Block on the etcd watch of the news key until a release after the earliest acquire of ``keys``
        that found one held (any release, as on Redis: a release writes the news key in its txn)."""
        deadline = time.monotonic() + timeout
        failed = [r for raw in map(self._raw_key, keys) if (r := self._failed.get(raw, 0))]
        need = min(failed, default=0) + 1  # report every release from here on
        try:
            if self._watch is not None and need > 1 and not self._watch.covers(need):
                self._watch.close()  # it may have passed a release we care about: reopen from there
                self._watch = None
            if self._watch is None:
                self._watch = self._open_watch(need if need > 1 else 0)
            self._watch.wait_for_event(need - 1, deadline)
        except (OSError, ValueError, BackendUnavailable) as exc:
            log.debug("watch on %s unusable (%s); polling", self.url, exc)
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            time.sleep(max(0.0, min(self.poll, deadline - time.monotonic())))

    def _open_watch(self, start: int) -> WatchStream:
        host, port, context, auth = self.gateway.watch_target()
        return WatchStream.open(host, port, self.news, start, timeout=self.connect_timeout, tls=context, auth=auth)

    # -- records ---------------------------------------------------------------------------------
    def _record_key(self, name: str) -> bytes:
        return self.prefix + RECORDS + name.encode("utf-8", "surrogatepass")

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """The records' values: one txn of range reads."""
        for name in names:
            check_record(name)
        found = self.txns.read([self._record_key(n) for n in dict.fromkeys(names)])
        return {n: None if (kv := found.get(self._record_key(n))) is None
                else unb64(kv.get("value", "")).decode("utf-8", "surrogatepass") for n in names}

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """One txn: compare the value (or ``create_revision == 0`` for absent), then put or delete."""
        check_record(name, value)
        key = b64(self._record_key(name))
        # etcd fails a VALUE compare on a missing key, so expecting "" never matches an absent record
        compare = ({"target": "CREATE", "create_revision": 0} if expected is None
                   else {"target": "VALUE", "value": b64(expected.encode("utf-8", "surrogatepass"))})
        change = ({"request_delete_range": {"key": key}} if value is None
                  else {"request_put": {"key": key, "value": b64(value.encode("utf-8", "surrogatepass"))}})
        return bool(self.txns.txn([{"key": key, "result": "EQUAL", **compare}], [change], []).get("succeeded"))

    def close(self) -> None:
        """Close the watch and the HTTP sessions; the owners' leases are left to expire by their TTL."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self.gateway.close()
