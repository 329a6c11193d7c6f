"""An ephemeral PostgreSQL 15 server: ``initdb`` once, then ``postgres`` as the ``postgres`` user.

PostgreSQL refuses to run as root, so the temp dir is handed to the ``postgres`` user; the server is
started through ``setpriv`` (which execs, unlike ``runuser``) so the process we hold IS the postmaster
and signals reach it. Kill and pause also signal the postmaster's children (each backend is its own
process group), because a SIGSTOPped postmaster alone would leave open connections served.

Authentication: the superuser ``postgres`` is trusted; any other role logs in over TCP with its
password (scram-sha-256), so tests can create a role with a password and try a wrong one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .base import EphemeralServer, ServerUnavailable, find_binary, wait_stopped

BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")

HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


class PostgresServer(EphemeralServer):
    """PostgreSQL on a free loopback port; ``url(ns)`` names schema ``ns`` of database ``postgres``."""

    name = "postgres"
    max_connections = 200  # bench/scale.py raises it before start: two connections per pool member

    def __init__(self) -> None:
        self.postgres = find_binary("postgres", *BIN_DIRS)
        self.initdb = find_binary("initdb", *BIN_DIRS)
        self.setpriv = find_binary("setpriv")
        try:
            self.user = pwd.getpwnam("postgres")
        except KeyError:
            raise ServerUnavailable("the postgres user does not exist (install postgresql)") from None
        super().__init__()
        os.chown(self.tmp, self.user.pw_uid, self.user.pw_gid)

    def _as_postgres(self) -> list[str]:
        if os.geteuid() != 0:
            return []  # already an unprivileged user: run as ourselves
        user = self.user
        return [self.setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]

    def prepare(self) -> None:
        """Create the cluster (``initdb``) and the authentication rules."""
        subprocess.run([*self._as_postgres(), self.initdb, "-D", str(self.tmp / "data"), "-A", "trust",
                        "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.tmp)
        hba = self.tmp / "data" / "pg_hba.conf"
        hba.write_text(HBA)
        os.chown(hba, self.user.pw_uid, self.user.pw_gid)

    def command(self) -> Sequence[str]:
        """The postmaster in the foreground; fsync off, yet commits reach the OS, so a SIGKILL loses none."""
        return [*self._as_postgres(), self.postgres, "-D", str(self.tmp / "data"), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.tmp), "-c", "fsync=off",
                "-c", "full_page_writes=off", "-c", f"max_connections={self.max_connections}"]

    def ready(self) -> bool:
        """A real connection answers a query."""
        import psycopg

        with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL for the superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, namespace: str) -> str:
        """A backend URL whose lease tables live in schema ``namespace`` (created on first use).

        ``restart_grace=0``: tests run on a server started moments ago and need no protection from grants
        it forgot (see ``shardpreempt.backends.grace``); the stress harness puts the ttl back.
        """
        return f"{self.dsn()}?schema={namespace}&restart_grace=0"

    def _copied(self, top: Path) -> None:
        """Hand a copied tree to the ``postgres`` user (copies made as root belong to root)."""
        if os.geteuid() != 0:
            return
        uid, gid = self.user.pw_uid, self.user.pw_gid
        os.chown(top, uid, gid)
        os.chown(top.parent, uid, gid)
        for root, dirs, files in os.walk(top):
            for entry in (*dirs, *files):
                os.chown(os.path.join(root, entry), uid, gid, follow_symlinks=False)

    def _children(self) -> list[int]:
        """The postmaster's children (backends call setsid(), so a process-group signal misses them)."""
        assert self.proc is not None
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == self.proc.pid:
                    out.append(int(entry))
        return out

    def _signal_all(self, sig: int) -> list[int]:
        """Signal the postmaster and its children (it is stopped first, so it forks no more)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        if sig in (signal.SIGSTOP, signal.SIGKILL):
            os.kill(self.proc.pid, signal.SIGSTOP)
        children = self._children()
        for pid in ([self.proc.pid, *children] if sig == signal.SIGCONT else [*children, self.proc.pid]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return children

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
        """Stop by pid: SIGINT is a fast shutdown (SIGTERM would wait for every client to leave)."""
        if sig == signal.SIGTERM:
            sig = signal.SIGINT
        if sig == signal.SIGKILL:
            # kill the backends too, or the next start finds the old shared memory still attached
            children = self._signal_all(signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()
            self._wait_gone(children)
            return
        super().stop(sig, timeout)

    @staticmethod
    def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for pid in pids:
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                try:
                    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break  # dead, waiting for a reaper
                except OSError:
                    break
                time.sleep(0.01)

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend, so open connections hang too."""
        children = self._signal_all(signal.SIGSTOP)
        if self.proc is not None:
            wait_stopped([self.proc.pid, *children])

    def resume(self) -> None:
        """SIGCONT the whole server."""
        self._signal_all(signal.SIGCONT)
