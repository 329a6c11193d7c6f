"""Real servers started for tests, one module each, looked up by backend name."""

from __future__ import annotations

import importlib

from .base import EphemeralServer, ServerUnavailable, free_port, unique

#: backend name -> (module, class)
SERVERS = {
    "redis": ("redis", "RedisServer"),
    "postgresql": ("postgres", "PostgresServer"),
    "mysql": ("mariadb", "MariaDBServer"),
    "etcd": ("etcd", "EtcdServer"),
    "zookeeper": ("zookeeper", "ZooKeeperServer"),
}


def server_for(backend: str) -> EphemeralServer:
    """A new (not yet started) server for ``backend``; ServerUnavailable if its binary is missing."""
    module, cls = SERVERS[backend]
    server: EphemeralServer = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return server


__all__ = ["SERVERS", "EphemeralServer", "ServerUnavailable", "free_port", "server_for", "unique"]
