"""An ephemeral MariaDB server: ``mariadb-install-db`` once, then ``mariadbd`` in the foreground.

It runs as root here (``--user=root``), so the process we start is the server itself and stop, kill
and pause reach it directly. Root has no password; ``url(ns)`` creates database ``ns`` first.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from .base import EphemeralServer, find_binary


class MariaDBServer(EphemeralServer):
    """MariaDB on a free loopback port; ``url(ns)`` names a fresh database ``ns``."""

    name = "mariadb"

    def __init__(self) -> None:
        self.mariadbd = find_binary("mariadbd", "/usr/sbin")
        self.install_db = find_binary("mariadb-install-db")
        super().__init__()

    def prepare(self) -> None:
        """Create the system tables (no test database, root without a password)."""
        subprocess.run([self.install_db, "--no-defaults", f"--datadir={self.tmp / 'data'}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.tmp)

    def command(self) -> Sequence[str]:
        """mariadbd in the foreground, tuned for tests.

        Durability is relaxed only as far as a process crash allows: committed transactions reach the
        OS at commit (``flush-log-at-trx-commit=2``), so a SIGKILL loses none and tokens never go back.
        """
        return [self.mariadbd, "--no-defaults", f"--datadir={self.tmp / 'data'}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--socket={self.tmp / 'sock'}", "--user=root", "--skip-log-bin",
                f"--pid-file={self.tmp / 'pid'}", "--innodb-flush-log-at-trx-commit=2",
                "--innodb-doublewrite=0",
                "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=32M", "--skip-name-resolve",
                "--max-connections=300", "--performance-schema=0",
                f"--tmpdir={self.tmp}"]  # not /tmp: its temp files are the server's own business

    def connect(self, database: str | None = None) -> object:
        """A PyMySQL connection as root (for test set-up)."""
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", database=database,
                               connect_timeout=2, read_timeout=10, autocommit=True)

    def ready(self) -> bool:
        """A real connection answers a query."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:  # type: ignore[attr-defined]
                cur.execute("SELECT 1")
                return bool(cur.fetchone() == (1,))
        finally:
            conn.close()  # type: ignore[attr-defined]

    def url(self, namespace: str) -> str:
        """A backend URL for database ``namespace``, created here if missing.

        ``restart_grace=0``: tests run on a server started moments ago and need no protection from grants
        it forgot (see ``shardpreempt.backends.grace``); the stress harness puts the ttl back.
        """
        conn = self.connect()
        try:
            with conn.cursor() as cur:  # type: ignore[attr-defined]
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{namespace}` CHARACTER SET utf8mb4")
        finally:
            conn.close()  # type: ignore[attr-defined]
        return f"mysql://root@127.0.0.1:{self.port}/{namespace}?restart_grace=0"
