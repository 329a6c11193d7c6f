"""A standalone ZooKeeper for tests: zoo.cfg and data dir in the temp dir, client port on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from .base import EphemeralServer, ServerUnavailable

JARS = tuple(f"/usr/share/java/{name}.jar" for name in (
    "zookeeper", "zookeeper-jute", "slf4j-api", "slf4j-simple", "netty-handler", "netty-transport",
    "netty-common", "netty-buffer", "netty-codec", "netty-resolver", "netty-transport-native-epoll",
    "netty-transport-native-unix-common"))


class ZooKeeperServer(EphemeralServer):
    """``ZooKeeperServerMain`` on a free loopback port; ``url(ns)`` is ``zookeeper://127.0.0.1:P/ns``.

    ``tickTime`` is 200 ms and the session bounds 0.4 to 60 s, so the contract suite's 1 s sessions and a
    test's 30 s ones are both granted as asked. Data (and so the zxid, our token) is kept across
    ``restart`` whatever ``lose_data`` says: ZooKeeper's state is durable by design.
    """

    name = "zookeeper"
    tick_ms = 200

    def __init__(self) -> None:
        self.java = shutil.which("java") or ""
        if not self.java:
            raise ServerUnavailable("java is not installed")
        if not Path(JARS[0]).exists():
            raise ServerUnavailable(f"zookeeper is not installed ({JARS[0]} missing)")
        super().__init__()

    def prepare(self) -> None:
        """Write zoo.cfg."""
        (self.tmp / "data").mkdir(exist_ok=True)
        (self.tmp / "zoo.cfg").write_text(
            f"tickTime={self.tick_ms}\ndataDir={self.tmp / 'data'}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=srvr,ruok\n"
            f"minSessionTimeout={2 * self.tick_ms}\nmaxSessionTimeout=60000\nmaxClientCnxns=0\n"
            "forceSync=no\nsnapCount=1000000\n"
        )

    def command(self) -> Sequence[str]:
        """Run the server in the foreground."""
        classpath = ":".join(jar for jar in JARS if Path(jar).exists())
        return [self.java, "-Xmx512m", "-Djute.maxbuffer=67108864", "-cp", classpath,
                "org.apache.zookeeper.server.ZooKeeperServerMain", str(self.tmp / "zoo.cfg")]

    def ready(self) -> bool:
        """The ``srvr`` four-letter word answers with a Mode line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"srvr")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        return b"Mode:" in reply

    def url(self, namespace: str) -> str:
        """A fresh chroot (the backend creates it on first use)."""
        return f"zookeeper://127.0.0.1:{self.port}/{namespace}"
