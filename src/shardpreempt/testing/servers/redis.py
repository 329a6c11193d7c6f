"""An ephemeral ``redis-server`` for tests: loopback port, temp dir, no persistence unless asked."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from .base import EphemeralServer, find_binary


class RedisServer(EphemeralServer):
    """``redis-server`` without persistence, so a restart loses every key (as ``lose_data`` expects).

    With ``persist`` (set before a stop) a clean ``stop`` writes an RDB file, as a Redis with RDB
    persistence does, which :meth:`snapshot` keeps and :meth:`restore` puts back: the next start loads
    it, and every write made after it was taken is lost. A SIGKILL (``kill``, ``restart``) writes none.
    """

    name = "redis"

    def __init__(self, password: str | None = None, *, persist: bool = False) -> None:
        self.binary = find_binary("redis-server")
        super().__init__()
        self.password = password
        self.persist = persist

    @property
    def rdb(self) -> Path:
        """The RDB file Redis writes on a clean stop (``persist``) and loads at start."""
        return self.tmp / "dump.rdb"

    def command(self) -> Sequence[str]:
        """Foreground server on 127.0.0.1 only, AOF off; RDB only on a clean stop, with ``persist``."""
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.tmp),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--dbfilename", self.rdb.name,
                "--shutdown-on-sigterm", "save" if self.persist else "nosave"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    def start(self, timeout: float = 60.0) -> None:
        """Start (loading the RDB file if there is one); without ``persist`` the file is used up."""
        super().start(timeout)
        if not self.persist:
            self.rdb.unlink(missing_ok=True)

    def wipe(self) -> None:
        """Forget the RDB file."""
        self.rdb.unlink(missing_ok=True)

    def snapshot(self, name: str) -> Path:
        """Copy the RDB file the stopped server wrote at its clean stop (``persist`` must be on)."""
        assert self.proc is None or self.proc.poll() is not None, "stop the server before taking a snapshot"
        if not self.rdb.exists():
            raise RuntimeError("no RDB file: set persist before stopping the server with stop()")
        copy = self.tmp / "snapshots" / f"{name}.rdb"
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(self.rdb, copy)
        return copy

    def restore(self, snapshot: Path) -> None:
        """Make ``snapshot`` the RDB file the next start loads: later writes are lost."""
        assert self.proc is None or self.proc.poll() is not None, "stop the server before restoring"
        shutil.copyfile(snapshot, self.rdb)

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
        grace that protects holders after a restart (see ``shardpreempt.backends.grace``); the stress
        harness puts the ttl back.
        """
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0?prefix={namespace}:&restart_grace=0"
