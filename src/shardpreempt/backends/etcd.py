"""``etcd://HOST:PORT[,HOST2:PORT2...]/PREFIX`` — etcd v3 through its JSON gateway (etcd3gw).

URL grammar: ``etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/PREFIX][?OPTIONS]``, e.g.
``etcd://127.0.0.1:2379,127.0.0.1:22379/shardpreempt?timeout=2``. Keys live under ``/PREFIX/``
(default ``/shardpreempt/``). Endpoints are tried in order; a connection error moves on to the next.
With USER:PASSWORD the backend calls ``Authenticate`` and sends the token with every request
(re-authenticating once when the server says the token expired).

Options (query string or keywords), with defaults: ``connect_timeout`` (2 s), ``timeout`` (2 s, per
request), ``poll`` (0.05 s: how long ``wait`` sleeps when no watch can be opened), ``page`` (10000:
keys per range page in ``inspect``), ``tls`` (false: https), ``ca_cert``, ``cert_cert``,
``cert_key`` (TLS files, passed to the client).

Design: one etcd lease per owner (the session), TTL = ttl rounded UP to whole seconds; the server may
grant more (its minimum is about 2 s) and the granted TTL is what ``Lease.ttl`` and the deadline use.
``try_acquire`` is one txn: compare ``create_revision == 0`` for every key; on success put every key
with the lease and a JSON value (owner, pid, host, since). ``renew`` is one LeaseKeepAlive whatever
the number of keys. ``release`` is one txn: compare every key's lease with ours and delete them all;
if some key is no longer ours the failure branch reads the keys back and a second txn deletes the
ones still ours (etcd 3.4 has no nested txn, so that rare case costs a second round trip).
``inspect`` reads the keys (one txn for up to 64 keys, else the prefix in pages) plus one
LeaseTimeToLive per distinct holder session. ``wait`` opens an etcd watch (DELETE events on the
prefix) from the revision of the last failed acquire, read on a plain socket with ``select`` so no
thread is started, and kept open across calls until an acquire succeeds: a release between the failed
acquire and the wait is never missed.

Token source: the key's ``create_revision`` (the txn's revision), strictly increasing cluster-wide and
durable. Round trips: acquire 1 (plus one LeaseGrant/KeepAlive when the owner's session is new or more
than half used), renew 1, release 1. Capabilities: server expiry, cross-host, not session-bound,
blocking wait. Caveats: slices larger than the server's ``--max-txn-ops`` (default 128) are refused;
an acquire whose reply is lost may have taken effect: its keys are deleted before the owner's next
acquire (they carry a unique nonce).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import select
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from ..errors import BackendProtocolError, BackendUnavailable, ConfigError, LeaseLost
from ..model import Holder, Lease
from ..typing import Capabilities
from . import option, redact_url, reject_unknown, url_options

log = logging.getLogger("shardpreempt.backends.etcd")
SMALL = 64  # inspect reads up to this many keys in one txn, more by scanning the prefix


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _range_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])  # prefix ends with "/", so no overflow


@dataclass
class _Session:
    lease_id: int
    ttl: int
    deadline: float  # local monotonic: start of the last grant/keepalive + granted TTL


class _Watch:
    """An etcd watch stream read without threads: chunked HTTP on a socket, polled with ``select``."""

    def __init__(self, sock: socket.socket, start: int) -> None:
        self.sock = sock
        self.start = start  # first revision the stream reports (0 until the server says, if opened at "now")
        self.seen = 0  # highest revision of an event already consumed
        self.raw = b""
        self.data = b""
        self.headers_done = False

    def read(self, timeout: float) -> list[dict[str, Any]]:
        """Messages received within ``timeout``; raises OSError/ValueError when the stream broke."""
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
        if not pending and not select.select([self.sock], [], [], max(0.0, timeout))[0]:
            return []
        chunk = self.sock.recv(65536)
        if not chunk:
            raise OSError("watch stream closed by the server")
        self.raw += chunk
        if not self.headers_done:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return []
            if not head.startswith(b"HTTP/1.1 200"):
                raise ValueError(head.split(b"\r\n", 1)[0].decode("latin-1"))
            self.raw, self.headers_done = rest, True
        while True:  # de-chunk what is complete
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                raise OSError("watch stream ended")
            if len(rest) < size + 2:
                break
            self.data += rest[:size]
            self.raw = rest[size + 2:]
        messages = []
        while b"\n" in self.data:
            line, _, self.data = self.data.partition(b"\n")
            if line.strip():
                messages.append(json.loads(line))
        return messages

    def close(self) -> None:
        """Drop the stream (the server cancels the watch)."""
        with contextlib.suppress(OSError):
            self.sock.close()


class EtcdBackend:
    """Lock store on etcd v3: one lease per owner, one txn per acquire/release."""

    capabilities = Capabilities(server_expiry=True, cross_host=True, session_bound=False, blocking_wait=True)

    def __init__(self, url: str, **options: Any) -> None:
        self.url = redact_url(url)
        opts = {**url_options(url), **options}
        self.connect_timeout = float(option(opts, "connect_timeout", float, 2.0, url=url))
        self.timeout = float(option(opts, "timeout", float, 2.0, url=url))
        self.poll = float(option(opts, "poll", float, 0.05, url=url))
        self.page = max(1, int(option(opts, "page", int, 10000, url=url)))
        self.tls = bool(option(opts, "tls", bool, False, url=url))
        self.ca_cert = option(opts, "ca_cert", str, None, url=url)
        self.cert_cert = option(opts, "cert_cert", str, None, url=url)
        self.cert_key = option(opts, "cert_key", str, None, url=url)
        reject_unknown(opts, url)
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        self._auth = (unquote(user), unquote(password)) if user else None
        self.endpoints: list[tuple[str, int]] = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "2379")
            try:
                self.endpoints.append((host.strip("[]") or "127.0.0.1", int(port)))
            except ValueError:
                raise ConfigError(f"bad endpoint {item!r}", source=self.url) from None
        path = unquote(parts.path).strip("/") or "shardpreempt"
        self.prefix = f"/{path}/".encode()
        self._clients: dict[int, Etcd3Client] = {}
        self._current = 0
        self._sessions: dict[str, _Session] = {}  # owner -> its etcd lease
        self._limbo: dict[str, tuple[list[str], bytes]] = {}  # owner -> keys/value of an unsure acquire
        self._failed: dict[bytes, int] = {}  # etcd key -> store revision of the last acquire it failed
        self._watch: _Watch | None = None
        self._host = socket.gethostname()

    # -- transport -------------------------------------------------------------------------------
    def _client(self, index: int) -> Etcd3Client:
        if index not in self._clients:
            host, port = self.endpoints[index]
            client = Etcd3Client(host=host, port=port, protocol="https" if self.tls else "http",
                                    ca_cert=self.ca_cert, cert_key=self.cert_key, cert_cert=self.cert_cert,
                                    timeout=(self.connect_timeout, self.timeout),  # type: ignore[arg-type]
                                    api_path="/v3/")
            if self._auth is not None:
                self._authenticate(client)
            self._clients[index] = client
        return self._clients[index]

    def _authenticate(self, client: Etcd3Client) -> None:
        assert self._auth is not None
        client.session.headers.pop("Authorization", None)
        name, password = self._auth
        reply = client.post(client.get_url("/auth/authenticate"), json={"name": name, "password": password})
        client.session.headers["Authorization"] = str(reply["token"])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers; client errors translated here, once."""
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            index = self._current
            try:
                client = self._client(index)
                try:
                    reply: dict[str, Any] = client.post(client.get_url(path), json=body)
                except etcd_exc.Etcd3Exception as exc:
                    if self._auth is None or _code(exc) != 16:
                        raise
                    self._authenticate(client)  # the token expired: once more with a new one
                    reply = client.post(client.get_url(path), json=body)
                return reply
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                last = exc
                self._clients.pop(index, None)
                self._current = (index + 1) % len(self.endpoints)
                text = exc.detail_text or ""
                if "NewConnectionError" not in text and "ConnectTimeout" not in text:
                    break  # the request may have been applied: let the caller decide, do not resend
            except etcd_exc.Etcd3Exception as exc:
                raise self._translate(exc) from exc
        raise BackendUnavailable(f"etcd unreachable at {self.url}: {_message(last)}") from last

    def _translate(self, exc: etcd_exc.Etcd3Exception) -> Exception:
        code, text = _code(exc), _message(exc)
        if "too many operations" in text:
            return ConfigError(f"{text}: raise the server's --max-txn-ops or use smaller slices",
                               source=self.url)
        if code in (3, 7, 9, 16) or "authentication" in text:  # invalid argument, denied, auth
            return ConfigError(f"etcd refused the request: {text}", source=self.url)
        if code in (4, 13, 14) or isinstance(exc, etcd_exc.InternalServerError):
            return BackendUnavailable(f"etcd at {self.url}: {text}")
        return BackendProtocolError(f"etcd at {self.url}: {text}")

    def _txn(self, compare: list[Any], success: list[Any], failure: list[Any]) -> dict[str, Any]:
        reply = self._post("/kv/txn", {"compare": compare, "success": success, "failure": failure})
        return reply

    def _raw_key(self, key: str) -> bytes:
        return self.prefix + key.encode("utf-8", "surrogatepass")

    def _key(self, key: str) -> str:
        return _b64(self._raw_key(key))

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
        compare = [{"key": self._key(k), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}
                   for k in keys]
        self._txn(compare, [{"request_delete_range": {"key": self._key(k)}} for k in keys], [])
        del self._limbo[owner]

    # -- the contract ----------------------------------------------------------------------------
    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key or none: one txn comparing create_revision == 0 and putting every key."""
        start = time.monotonic()
        keys = list(keys)
        if owner in self._limbo:
            self._clear_limbo(owner)
        for attempt in (1, 2):
            session = self._session(owner, ttl, start)
            value = self._value(owner)
            compare = [{"key": self._key(k), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
                       for k in keys]
            success = [{"request_put": {"key": self._key(k), "value": _b64(value), "lease": session.lease_id}}
                       for k in keys]
            try:
                reply = self._txn(compare, success, [])
            except BackendUnavailable:
                self._limbo[owner] = (keys, value)
                raise
            except BackendProtocolError as exc:
                if "lease not found" not in str(exc) or attempt == 2:
                    raise
                self._sessions.pop(owner, None)  # expired under us: a new lease, never the dead one
                continue
            revision = int(reply["header"]["revision"])
            if not reply.get("succeeded"):
                for key in keys:
                    self._failed[self._raw_key(key)] = revision
                return None
            for key in keys:
                self._failed.pop(self._raw_key(key), None)
            if self._watch is not None:  # we got what we waited for; reopen from a fresh revision later
                self._watch.close()
                self._watch = None
            return Lease(tuple(keys), owner, dict.fromkeys(keys, revision), float(session.ttl),
                         session.deadline, str(session.lease_id))
        raise AssertionError("unreachable")

    def renew(self, lease: Lease) -> Lease:
        """One LeaseKeepAlive for the owner's lease, whatever the number of keys."""
        start = time.monotonic()
        reply = self._post("/lease/keepalive", {"ID": int(lease.session)})
        granted = int(reply.get("result", {}).get("TTL", -1))
        session = self._sessions.get(lease.owner)
        if granted <= 0:
            if session is not None and str(session.lease_id) == lease.session:
                del self._sessions[lease.owner]
            raise LeaseLost(f"etcd lease {int(lease.session):x} expired", lease.keys)
        if session is not None and str(session.lease_id) == lease.session:
            session.deadline = start + granted
        return lease.with_deadline(start + granted)

    def release(self, lease: Lease) -> None:
        """Delete the keys still attached to this lease's etcd lease (one txn; two if some were lost)."""
        keys, lease_id = list(lease.keys), int(lease.session)
        for _ in range(3):
            if not keys:
                return
            compare = [{"key": self._key(k), "result": "EQUAL", "target": "LEASE", "lease": lease_id}
                       for k in keys]
            reply = self._txn(compare, [{"request_delete_range": {"key": self._key(k)}} for k in keys],
                              [{"request_range": {"key": self._key(k), "keys_only": True}} for k in keys])
            if reply.get("succeeded"):
                return
            responses = reply.get("responses", [])
            keys = [k for k, r in zip(keys, responses, strict=True)
                    if any(int(kv.get("lease", 0)) == lease_id for kv in r["response_range"].get("kvs", []))]
        log.warning("release of %d keys kept failing its comparison; lease expiry will free them", len(keys))

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Read the keys (one txn, or the prefix in pages) and each holder lease's time to live."""
        kvs: dict[str, dict[str, Any]] = {}
        wanted = set(keys)
        if len(wanted) <= SMALL:
            reply = self._txn([], [{"request_range": {"key": self._key(k)}} for k in wanted], [])
            found = [kv for r in reply.get("responses", []) for kv in r["response_range"].get("kvs", [])]
        else:
            found, start, revision = [], self.prefix, 0
            while True:
                body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(_range_end(self.prefix)),
                                        "limit": self.page, "sort_order": 1, "sort_target": 0}
                if revision:
                    body["revision"] = revision  # every page from the same snapshot
                reply = self._post("/kv/range", body)
                revision = int(reply["header"]["revision"])
                found += reply.get("kvs", [])
                if not reply.get("more") or not reply.get("kvs"):
                    break
                start = _unb64(reply["kvs"][-1]["key"]) + b"\0"
        for kv in found:
            key = _unb64(kv["key"])[len(self.prefix):].decode("utf-8", "surrogatepass")
            if key in wanted:
                kvs[key] = kv
        ttls: dict[int, int] = {}
        for lease_id in {int(kv.get("lease", 0)) for kv in kvs.values()} - {0}:
            # proto3 JSON omits a zero: a missing TTL means under a second left; -1 means expired
            ttls[lease_id] = int(self._post("/kv/lease/timetolive", {"ID": lease_id}).get("TTL", 0))
        out: dict[str, Holder | None] = dict.fromkeys(keys)
        for key, kv in kvs.items():
            lease_id = int(kv.get("lease", 0))
            if lease_id and ttls.get(lease_id, -1) < 0:
                continue  # its lease just expired: the key is being deleted
            try:
                info = json.loads(_unb64(kv.get("value", "")))
                owner = str(info["owner"])
            except (ValueError, KeyError, TypeError) as exc:
                raise BackendProtocolError(f"etcd key {key!r} at {self.url} has an unreadable value") from exc
            out[key] = Holder(owner, int(kv["create_revision"]), float(ttls[lease_id]) if lease_id else None,
                              pid=info.get("pid"), host=info.get("host"), since=info.get("since"))
        return out

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Block on the etcd watch until one of ``keys`` is deleted after the acquire that found it held."""
        deadline = time.monotonic() + timeout
        wanted = {raw: self._failed.get(raw, 0) for raw in map(self._raw_key, keys)}
        need = min((r for r in wanted.values() if r), default=0) + 1  # report every delete from here on
        try:
            old = self._watch
            if old is not None and need > 1 and not (0 < old.start <= need and old.seen < need):
                old.close()  # it may have passed a delete we care about: reopen from there
                self._watch = None
            watch = self._watch or self._open_watch(need if need > 1 else 0)
            while (left := deadline - time.monotonic()) > 0:
                woken = False
                for message in watch.read(left):  # consume the whole batch, so ``seen`` stays exact
                    result = message.get("result", {})
                    if result.get("canceled") or "error" in message:
                        reason = result.get("cancel_reason") or message.get("error")
                        raise OSError(f"watch canceled: {reason}")
                    if result.get("created") and not watch.start:
                        watch.start = int(result.get("header", {}).get("revision", 0)) + 1
                    for event in result.get("events", []):
                        kv = event.get("kv", {})
                        key, revision = _unb64(kv.get("key", "")), int(kv.get("mod_revision", 0))
                        watch.seen = max(watch.seen, revision)
                        woken |= event.get("type") == "DELETE" and key in wanted and revision > wanted[key]
                if woken:
                    return
        except (OSError, ValueError, BackendUnavailable) as exc:
            log.debug("watch on %s unusable (%s); polling", self.url, exc)
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            time.sleep(max(0.0, min(self.poll, deadline - time.monotonic())))

    def _open_watch(self, start: int) -> _Watch:
        host, port = self.endpoints[self._current]
        sock: socket.socket = socket.create_connection((host, port), timeout=self.connect_timeout)
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_cert)
            if self.cert_cert and self.cert_key:
                context.load_cert_chain(self.cert_cert, self.cert_key)
            sock = context.wrap_socket(sock, server_hostname=host)
        create: dict[str, Any] = {"key": _b64(self.prefix), "range_end": _b64(_range_end(self.prefix)),
                                  "filters": ["NOPUT"]}
        if start:
            create["start_revision"] = start  # so no delete after a failed acquire is missed
        body = json.dumps({"create_request": create}).encode()
        auth = self._client(self._current).session.headers.get("Authorization")
        head = (f"POST /v3/watch HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + (f"Authorization: {auth!s}\r\n" if auth else "") + "\r\n")
        sock.sendall(head.encode() + body)
        self._watch = _Watch(sock, start)
        return self._watch

    def close(self) -> None:
        """Close the watch and the HTTP sessions; the owners' leases are left to expire by their TTL."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for client in self._clients.values():
            client.session.close()
        self._clients.clear()


def _code(exc: Exception) -> int | None:
    try:
        return int(json.loads(getattr(exc, "detail_text", None) or "{}").get("code"))
    except (ValueError, TypeError):
        return None


def _message(exc: Exception | None) -> str:
    text = getattr(exc, "detail_text", None) or str(exc)
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return str(text)[:200]
