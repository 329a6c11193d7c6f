"""The etcd watch stream, read without threads: chunked HTTP on a plain socket, polled with ``select``.

etcd3gw's own watcher starts a thread pool, which a backend must not do; this reader is driven by the
caller's ``wait`` instead. It raises ``OSError`` or ``ValueError`` when the stream breaks, and the backend
turns that into a poll.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import time
from typing import Any

from .etcd_wire import b64


class WatchStream:
    """One watch (PUT events of one key) on its own connection, reported from revision ``start``."""

    def __init__(self, sock: socket.socket, start: int) -> None:
        self.sock = sock
        self.start = start  # first revision the stream reports (0 until the server says, if opened at "now")
        self.seen = 0  # highest revision of an event already consumed
        self.raw = b""
        self.data = b""
        self.headers_done = False

    @classmethod
    def open(cls, host: str, port: int, key: bytes, start: int, *, timeout: float,
             tls: ssl.SSLContext | None = None, auth: str | None = None) -> WatchStream:
        """Connect and ask for the PUT events of ``key`` from revision ``start`` (0: from now)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        create: dict[str, Any] = {"key": b64(key), "filters": ["NODELETE"]}
        if start:
            create["start_revision"] = start  # so no release after a failed acquire is missed
        body = json.dumps({"create_request": create}).encode()
        head = (f"POST /v3/watch HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n" + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n")
        sock.sendall(head.encode() + body)
        return cls(sock, start)

    def covers(self, need: int) -> bool:
        """Whether every event from revision ``need`` on is still to come on this stream."""
        return 0 < self.start <= need and self.seen < need

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

    def wait_for_event(self, after: int, deadline: float) -> bool:
        """Consume events until one from after revision ``after`` (True) or ``deadline``."""
        while (left := deadline - time.monotonic()) > 0:
            woken = False
            for message in self.read(left):  # consume the whole batch, so ``seen`` stays exact
                result = message.get("result", {})
                if result.get("canceled") or "error" in message:
                    raise OSError(f"watch canceled: {result.get('cancel_reason') or message.get('error')}")
                if result.get("created") and not self.start:
                    self.start = int(result.get("header", {}).get("revision", 0)) + 1
                for event in result.get("events", []):
                    revision = int(event.get("kv", {}).get("mod_revision", 0))
                    self.seen = max(self.seen, revision)
                    woken |= revision > after
            if woken:
                return True
        return False

    def close(self) -> None:
        """Drop the stream (the server cancels the watch)."""
        with contextlib.suppress(OSError):
            self.sock.close()
