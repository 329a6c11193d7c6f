"""An ephemeral ``redis-server`` for tests: loopback port, temp dir, no persistence."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from .base import EphemeralServer, find_binary


class RedisServer(EphemeralServer):
    """``redis-server`` without persistence, so a restart loses every key (as ``lose_data`` expects)."""

    name = "redis"

    def __init__(self, password: str | None = None) -> None:
        self.binary = find_binary("redis-server")
        super().__init__()
        self.password = password

    def command(self) -> Sequence[str]:
        """Foreground server on 127.0.0.1 only, RDB and AOF off."""
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.tmp),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    def ready(self) -> bool:
        """A raw ``PING`` (after ``AUTH`` when a password is set) answers ``+PONG``."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            request = b"PING\r\n"
            if self.password is not None:
                request = b"AUTH %s\r\n" % self.password.encode() + request
            sock.sendall(request)
            data = b""
            while b"PONG" not in data and b"-" not in data:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                data += chunk
            return b"+PONG" in data

    def url(self, namespace: str) -> str:
        """Database 0 with the key prefix ``namespace:`` (fresh because nobody used that prefix yet).

        ``restart_grace=0``: a test's namespace is new, so the first acquire need not wait out the
        grace that protects holders after a restart lost the data (see the backend's docstring).
        """
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0?prefix={namespace}:&restart_grace=0"
