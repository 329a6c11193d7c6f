"""Network namespaces for partition tests: a host cut off from the backend, or a slow link to it.

A :class:`NetHost` is a network namespace joined to the root namespace by a veth pair with two
addresses of a private ``10.213.X.Y/30`` (chosen at random, checked unused; traffic goes only
between those two addresses). Processes run inside with :meth:`NetHost.argv`. Test servers listen
on 127.0.0.1 in the root namespace, which a namespace cannot reach, so :meth:`NetHost.forward` runs
a small TCP relay on the root side of the link (``10.213.X.Y+1:P`` -> ``127.0.0.1:PORT``) and
:meth:`NetHost.rewrite` points a backend URL at it.

How a cut works, and why: :meth:`NetHost.cut` sets the root-side veth administratively down. The
namespace side loses its carrier but keeps its route (and a permanent neighbour entry, so no ARP
is needed), so its packets are silently dropped by the veth: open TCP connections stall and new
``connect`` calls time out — what a real partition looks like — rather than failing at once with
"network unreachable". A ``blackhole`` route for the /30 in the root namespace stands in while the
link is down, so nothing addressed to the namespace ever leaves by the default route.
:meth:`NetHost.heal` sets the link up again; stalled connections resume at their next TCP
retransmission.

:meth:`NetHost.delay` adds latency in each direction (a round trip grows by twice that): with
``tc ... netem delay`` on both veths where the kernel has netem, otherwise (kernels built without
``CONFIG_NET_SCH_NETEM``) in the relay, which holds every chunk for that long before passing it on.
:attr:`NetHost.delay_by` says which.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("shardpreempt.testing.netns")

METRIC = 4242  # the blackhole route's metric: below it only the link's own route


class NetError(RuntimeError):
    """An ``ip`` or ``tc`` command failed."""


def _run(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc.stdout


def available() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2's ip is not installed"
    try:
        with NetHost():
            pass
    except (NetError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return None


class Relay:
    """A TCP relay from ``listen`` (any port) to ``target``; every chunk is held for :attr:`delay` seconds."""

    def __init__(self, listen: str, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.sock = socket.socket()
        self.sock.bind((listen, 0))
        self.sock.listen(128)
        self.address: tuple[str, int] = self.sock.getsockname()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._accept_loop, daemon=True, name="relay-accept").start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(down,), daemon=True, name="relay-conn").start()

    def _serve(self, down: socket.socket) -> None:
        try:
            up = socket.create_connection(self.target, timeout=5)
            up.settimeout(None)
        except OSError:
            self._abort(down)
            return
        with self._lock:
            if self._closed.is_set():
                self._abort(down)
                self._abort(up)
                return
            self._conns |= {down, up}
        left = [2]  # directions still open; the last one to end resets both sockets
        for src, dst in ((down, up), (up, down)):
            chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
            threading.Thread(target=self._read, args=(src, chunks), daemon=True, name="relay-read").start()
            threading.Thread(target=self._write, args=(dst, chunks, (down, up), left), daemon=True,
                             name="relay-write").start()

    def _read(self, src: socket.socket, chunks: queue.Queue[tuple[float, bytes] | None]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                chunks.put(None)
                return
            chunks.put((time.monotonic() + self.delay, data))

    def _write(self, dst: socket.socket, chunks: queue.Queue[tuple[float, bytes] | None],
               pair: tuple[socket.socket, socket.socket], left: list[int]) -> None:
        try:
            while (item := chunks.get()) is not None:
                due, data = item
                if self._closed.wait(max(0.0, due - time.monotonic())):
                    return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
        except OSError:  # the other side is gone: end both directions
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
                if last:
                    self._conns.difference_update(pair)
            if last:
                for sock in pair:
                    self._abort(sock)

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        # close with a reset: no FIN_WAIT socket is left to retransmit once the link is gone
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        sock.close()

    def connections(self) -> int:
        """How many connections it relays now (each counts its two sockets once)."""
        with self._lock:
            return len(self._conns) // 2

    def drop(self) -> None:
        """Reset every relayed connection, and go on accepting new ones."""
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for sock in conns:
            self._abort(sock)

    def close(self) -> None:
        """Stop accepting and reset every relayed connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        self.sock.close()
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for sock in conns:
            self._abort(sock)


class NetHost:
    """A network namespace linked to the root namespace; see the module docstring."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name = f"sp-{tag}"
        self.host_if, self.ns_if = f"sp{tag}h", f"sp{tag}n"  # at most 15 characters
        self.subnet = self._free_subnet()
        self.host_addr, self.ns_addr = (str(a) for a in list(self.subnet.hosts())[:2])
        self.relays: list[Relay] = []
        self.delay_by: str | None = None  # "netem" or "relay", once delay() was called
        self._delay = 0.0
        self._undo: list[tuple[str, ...]] = []  # commands that remove what was made, newest first
        self.is_cut = False

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        taken = [ipaddress.IPv4Network(r["dst"], strict=False)
                 for r in json.loads(_run("ip", "-4", "-j", "route", "show", "table", "all"))
                 if r.get("dst", "default") != "default"]
        taken += [ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
                  for link in json.loads(_run("ip", "-4", "-j", "addr")) for a in link.get("addr_info", [])]
        for _ in range(100):
            net = ipaddress.IPv4Network(f"10.213.{random.randrange(256)}.{4 * random.randrange(64)}/30")
            if not any(net.overlaps(t) for t in taken):
                return net
        raise NetError("no free 10.213.x.y/30 subnet")

    def start(self) -> NetHost:
        """Create the namespace, the veth pair, the addresses and the routes (undone on failure)."""
        try:
            self._make(("ip", "netns", "add", self.name), ("ip", "netns", "del", self.name))
            self._make(("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                        "netns", self.name), ("ip", "link", "del", self.host_if))
            self._make(("ip", "route", "add", "blackhole", str(self.subnet), "metric", str(METRIC)),
                       ("ip", "route", "del", "blackhole", str(self.subnet), "metric", str(METRIC)))
            _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            inside = ("ip", "-n", self.name)
            _run(*inside, "link", "set", "lo", "up")
            _run(*inside, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
            _run(*inside, "link", "set", self.ns_if, "up")
            mac = json.loads(_run("ip", "-j", "link", "show", "dev", self.host_if))[0]["address"]
            _run(*inside, "neigh", "replace", self.host_addr, "lladdr", mac, "dev", self.ns_if,
                 "nud", "permanent")
        except BaseException:
            self.close()
            raise
        log.info("network namespace %s: %s (inside) <-> %s", self.name, self.ns_addr, self.host_addr)
        return self

    def _make(self, cmd: Sequence[str], undo: Sequence[str]) -> None:
        _run(*cmd)
        self._undo.insert(0, tuple(undo))

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace (``ip netns exec`` execs, so the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def forward(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Relay ``(root-side address, new port)`` -> ``host:port``; returns the address to use inside."""
        relay = Relay(self.host_addr, (host, port))
        relay.delay = self._delay if self.delay_by == "relay" else 0.0
        self.relays.append(relay)
        return relay.address

    def rewrite(self, url: str) -> str:
        """``url`` with its loopback ``host:port`` replaced by a relay reachable from inside."""
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None or "," in parts.netloc:
            raise ValueError("only single-endpoint URLs of a loopback host:port can be relayed")
        addr, port = self.forward(parts.port)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{addr}:{port}" if userinfo else f"{addr}:{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def cut(self) -> None:
        """Partition the namespace: its packets are dropped from now on, nothing fails fast."""
        _run("ip", "link", "set", self.host_if, "down")
        self.is_cut = True

    def heal(self) -> None:
        """End the partition."""
        _run("ip", "link", "set", self.host_if, "up")
        self.is_cut = False

    def delay(self, ms: float) -> None:
        """Add ``ms`` milliseconds of latency in each direction (netem where available, else the relays)."""
        self._delay = ms / 1000.0
        if self.delay_by is None:
            try:
                self._netem("replace", "delay", f"{ms:g}ms")
                self.delay_by = "netem"
            except NetError as exc:
                log.info("netem unavailable (%s): delaying in the relays", exc)
                self.delay_by = "relay"
        elif self.delay_by == "netem":
            self._netem("replace", "delay", f"{ms:g}ms")
        for relay in self.relays:
            relay.delay = self._delay if self.delay_by == "relay" else 0.0

    def undelay(self) -> None:
        """Remove the added latency."""
        if self.delay_by == "netem" and self._delay:
            self._netem("del")
        self._delay = 0.0
        for relay in self.relays:
            relay.delay = 0.0

    def _netem(self, op: str, *args: str) -> None:
        netem = ("netem", *args) if args else ()
        _run("tc", "qdisc", op, "dev", self.host_if, "root", *netem)
        try:
            _run("tc", "-n", self.name, "qdisc", op, "dev", self.ns_if, "root", *netem)
        except NetError:
            if op != "del":  # keep both directions alike
                with contextlib.suppress(NetError):
                    _run("tc", "qdisc", "del", "dev", self.host_if, "root")
            raise

    def close(self) -> None:
        """Stop the relays and remove every link, route and namespace made (idempotent)."""
        for relay in self.relays:
            relay.close()
        self.relays.clear()
        with contextlib.suppress(NetError):
            pids = _run("ip", "netns", "pids", self.name).split() if self._undo else []
            if pids:
                log.warning("namespace %s still has processes %s", self.name, " ".join(pids))
        undo, self._undo = self._undo, []
        # the link goes before the blackhole route (nothing leaves by the default route meanwhile)
        # and the namespace last; link deletion also removes any netem qdiscs
        undo.sort(key=lambda cmd: {"link": 0, "route": 1}.get(cmd[1], 2))
        for cmd in undo:
            try:
                _run(*cmd)
            except NetError as exc:
                log.warning("cleaning up %s: %s", self.name, exc)

    def __enter__(self) -> NetHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
