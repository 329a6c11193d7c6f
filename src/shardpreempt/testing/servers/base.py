"""Ephemeral real servers for tests: a free loopback port, a temp dir, stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The server's binary is not installed (tests skip locally and fail under ``CI``)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str, *extra_dirs: str) -> str:
    """Path of ``name`` on PATH or in ``extra_dirs``; ServerUnavailable naming it otherwise."""
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServerUnavailable(f"{name} is not installed")
    return found


def unique(prefix: str = "t") -> str:
    """A fresh namespace name (key prefix, schema, database, chroot) for one test."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def wait_stopped(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until every thread of ``pids`` is stopped: SIGSTOP takes effect asynchronously."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone, or no /proc: nothing to wait for
        for task in tasks:
            while time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii", errors="replace") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X"):
                            break
                except OSError:
                    break
                time.sleep(0.001)


class EphemeralServer:
    """Base class: subclasses set ``name`` and implement ``command``, ``ready`` and ``url``."""

    name = "server"

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"shardpreempt-{self.name}-"))
        os.chmod(self.tmp, 0o755)  # some servers run as another user
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.tmp / "server.log"

    # -- to implement ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """One-time setup before the first start (initdb and the like)."""

    def command(self) -> Sequence[str]:
        """argv that runs the server in the foreground."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once a real client call succeeds."""
        raise NotImplementedError

    def url(self, namespace: str) -> str:
        """A backend URL for a fresh namespace on this server."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The server process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until ready."""
        if not (self.tmp / ".prepared").exists():
            self.prepare()
            (self.tmp / ".prepared").touch()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open for its lifetime
        self.proc = subprocess.Popen(list(self.command()), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp, start_new_session=True)
        log.close()
        self._wait(self.ready, timeout, "ready")

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except Exception:  # not up yet, whatever the client says
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not {what} within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop by pid (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        try:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server."""
        self.stop(signal.SIGKILL)

    def restart(self, *, lose_data: bool = False) -> None:
        """Stop (SIGKILL) and start again; ``lose_data`` wipes state where the server keeps any."""
        self.kill()
        if lose_data:
            self.wipe()
        self.start()

    def wipe(self) -> None:
        """Forget stored state (servers with persistence override)."""

    def pause(self) -> None:
        """SIGSTOP the server and return once it has really stopped."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            wait_stopped([self.proc.pid])

    def resume(self) -> None:
        """SIGCONT the server."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def snapshot(self, name: str) -> Path:
        """Copy the data directory of the stopped server (a snapshot, as a backup or a lagging replica has)."""
        assert self.proc is None or self.proc.poll() is not None, "stop the server before taking a snapshot"
        copy = self.tmp / "snapshots" / name
        shutil.copytree(self.tmp / "data", copy, symlinks=True)
        self._copied(copy)
        return copy

    def restore(self, snapshot: Path) -> None:
        """Replace the data directory of the stopped server by a copy of ``snapshot``: later writes are lost."""
        assert self.proc is None or self.proc.poll() is not None, "stop the server before restoring"
        shutil.rmtree(self.tmp / "data")
        shutil.copytree(snapshot, self.tmp / "data", symlinks=True)
        self._copied(self.tmp / "data")

    def _copied(self, top: Path) -> None:
        """Hook after a snapshot or restore copy (a server that runs as another user takes ownership)."""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop and delete the temp dir."""
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> EphemeralServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
