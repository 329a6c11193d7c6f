"""A single-node etcd for tests: data dir in the temp dir, client and peer ports on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence

from .base import EphemeralServer, find_binary, free_port


class EtcdServer(EphemeralServer):
    """``etcd`` on a free loopback port; ``url(ns)`` is ``etcd://127.0.0.1:P/ns`` (a fresh key prefix).

    ``--max-txn-ops`` is raised so one transaction can hold a 1,000-key slice (the default is 128), and
    data is kept across ``restart`` whatever ``lose_data`` says: etcd keeps no volatile state, its
    revisions (our tokens) are durable by design.
    """

    name = "etcd"
    max_txn_ops = 10000

    def __init__(self) -> None:
        self.binary = find_binary("etcd")
        super().__init__()
        self.peer_port = free_port()

    def command(self) -> Sequence[str]:
        """Run etcd in the foreground."""
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary, "--name", "n1", "--data-dir", str(self.tmp / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"n1={peer}", "--max-txn-ops", str(self.max_txn_ops),
            "--max-request-bytes", str(32 * 1024 * 1024), "--log-level", "warn",
        ]

    def ready(self) -> bool:
        """``GET /health`` says healthy."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")

    def url(self, namespace: str) -> str:
        """A fresh key prefix (etcd needs nothing created)."""
        return f"etcd://127.0.0.1:{self.port}/{namespace}"
