"""``file://[PATH]`` — the embedded default: one ``flock`` per shard in a private directory.

URL grammar: ``file:///abs/path`` or ``file://`` for the default, a private per-user directory
(``$XDG_STATE_HOME/shardpreempt/locks``, else ``~/.local/state/shardpreempt/locks``). Options (query
string or keywords): ``durable`` (bool, default false: fsync the token after each bump, so a power
loss cannot roll a token back), ``poll`` (seconds a waiting worker sleeps between attempts, default
0.01).

The directory is created 0700 and refused if it is a symlink, owned by another user, or writable by
group or others. Each shard key maps to ``sha256(key)[:40].lock``, opened with ``O_NOFOLLOW`` and
never unlinked (unlinking a lock file lets two holders lock two different inodes). Acquisition takes
the keys in sorted order with non-blocking ``flock`` and rolls back every lock taken if one is busy.
``renew`` extends nothing (no ttl) but checks the lease: ``LeaseLost`` if this backend object released it,
or if its first lock file is no longer the file it holds locked (removed or replaced behind its back).
An acquire of 16 keys or more also writes a claim (``claims/``: its keys and tokens), removed when it
releases, so that ``inspect`` reads a big pool per acquire rather than per key (``file_claims``).

Token source: a counter in the first bytes of the lock file, read and bumped while the lock is held,
so it increases across holders, process crashes and restarts. Caveats: ``flock`` is local to one
kernel; it does not coordinate machines and is unreliable on NFS. Locks die with the process, so
failover needs no ttl (capabilities: session-bound, not server expiry, not cross-host; waiting is a
short poll).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BackendError, BackendProtocolError, ConfigError, LeaseLost
from ..model import Holder, Lease
from ..typing import Capabilities
from . import check_record, file_claims, option, reject_unknown, superseded, url_options
from .file_layout import (
    RECORD_SIZE,
    default_directory,
    directory_of,
    ensure_fd_room,
    lock_name,
    parse_record,
    read_record,
    record_name,
    secure_directory,
    write_record,
)
from .inotify import watch_writes

__all__ = ["RECORD_SIZE", "FileBackend", "default_directory", "directory_of", "lock_name", "record_name"]

PROBE_WAIT = 0.002  # seconds an acquire waits out other members' inspect probes (shared locks, microseconds)


def _lock(fd: int) -> bool:
    """Take the exclusive lock without blocking on a holder. A free file may be under another member's
    ``inspect`` probe for a few microseconds (a shared lock): then try again, for ``PROBE_WAIT`` at most,
    rather than report busy and make the whole acquire wait for the next round."""
    deadline = time.monotonic() + PROBE_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only while nobody holds it exclusively
        except BlockingIOError:
            return False  # a holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0001)


class FileBackend:
    """Per-shard ``flock`` in a private directory (one machine)."""

    capabilities = Capabilities(server_expiry=False, cross_host=False, session_bound=True, blocking_wait=False)

    def __init__(self, url: str = "file://", **options: Any) -> None:
        opts = {**url_options(url), **options}
        self.durable = option(opts, "durable", bool, False, url=url)
        self.poll = option(opts, "poll", float, 0.01, url=url)
        reject_unknown(opts, url)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError("file:// URLs name a local directory: file:///abs/path", source=url)
        raw = unquote(parts.path)
        self.directory, self._dir_fd = secure_directory(Path(raw) if raw else default_directory(), url)
        self.url = f"file://{self.directory}"
        self._held: dict[str, list[int]] = {}  # session -> fds holding the locks
        self._claimed: dict[str, str] = {}  # session -> its claim file (``file_claims``)
        self._claims_fd: int | None = None
        self._peek_fds: dict[str, int] = {}  # key -> read-only descriptor kept for peek()
        self._peek_names: dict[str, str] = {}  # key -> lock file name, for keys peeked while missing
        self._peek_seen: dict[int, tuple[bytes, Holder]] = {}  # peek descriptor -> last record read, parsed
        self._bell_fd: int | None = None
        self._host = socket.gethostname()

    def _open(self, key: str) -> int:
        name = lock_name(key)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                # Without O_CREAT first: an open that may create takes the directory's lock exclusively
                # even when the file exists, and a hundred workers acquiring at once queued on it.
                fd = os.open(name, flags, dir_fd=self._dir_fd)
            except FileNotFoundError:
                fd = os.open(name, flags | os.O_CREAT, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            path = self.directory / name
            if exc.errno == errno.ELOOP:
                raise BackendError(f"refusing lock file {str(path)!r}: it is a symlink") from exc
            raise BackendError(f"cannot open lock file {str(path)!r}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise BackendError(f"refusing lock file {str(self.directory / name)!r}: not a regular file of ours")
        return fd

    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Lock every key (sorted, non-blocking) or roll back and return None."""
        ordered = sorted(set(keys))
        ensure_fd_room(len(ordered) + sum(len(v) for v in self._held.values()) + len(self._peek_fds))
        fds: list[int] = []
        try:
            for key in ordered:
                fd = self._open(key)
                fds.append(fd)
                if not _lock(fd):
                    self._close_all(fds)
                    return None
            holder = {"owner": owner, "pid": os.getpid(), "host": self._host, "since": time.time()}
            tokens = {}
            for key, fd in zip(ordered, fds, strict=True):
                token = read_record(fd)[0] + 1
                write_record(fd, token, holder, self.durable)
                tokens[key] = token
            claim = None
            if len(ordered) >= file_claims.CLAIM_MIN:  # so that inspect reads this acquire in one go
                claim = file_claims.write(self._claims(), json.dumps(holder, separators=(",", ":")), ordered,
                                          [tokens[k] for k in ordered])
        except BaseException:
            self._close_all(fds)
            raise
        session = uuid.uuid4().hex
        self._held[session] = fds
        if claim is not None:
            self._claimed[session] = claim
        return Lease(tuple(keys), owner, tokens, ttl, session=session)

    @staticmethod
    def _close_all(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)  # closing the only descriptor of the open file drops its flock

    def renew(self, lease: Lease) -> Lease:
        """Nothing to extend: the kernel holds the locks while we live. LeaseLost if this object released
        the lease (a stale lease object), or if the lock file of its first key in lock order (slices are
        all or nothing: any key tells) is no longer the file we hold locked (removed or replaced, so
        another process could lock the new one): one ``fstat`` and one ``stat``, whatever the key count."""
        fds = self._held.get(lease.session)
        if fds is None:
            raise LeaseLost("lease was released", lease.keys)
        if fds and lease.keys:
            key = min(lease.keys)  # the first lock taken: fds[0]
            held = os.fstat(fds[0])
            try:
                now = os.stat(lock_name(key), dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise superseded(lease, "lost its lock file (removed from the lock directory)") from None
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise superseded(lease, "has a new lock file: another process may hold it")
        return lease

    def release(self, lease: Lease) -> None:
        """Clear the holder record (the token stays) and unlock; idempotent."""
        fds = self._held.pop(lease.session, None)
        if fds is None:
            return
        try:
            if (claim := self._claimed.pop(lease.session, None)) is not None:
                file_claims.remove(self._claims(), claim)  # before unlocking: nobody else writes it meanwhile
            for fd in fds:
                token, _ = read_record(fd)
                write_record(fd, token, {}, self.durable)
        finally:
            self._close_all(fds)

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """The holder of every key: per acquire from the claims big acquires write, then one ``open``,
        ``pread`` and ``close`` per other key, with one probe per holder record (``file_claims``)."""
        return file_claims.inspect(self._dir_fd, keys)

    def _claims(self) -> int:
        if self._claims_fd is None:
            self._claims_fd = file_claims.open_claims(self._dir_fd, create=True)
        assert self._claims_fd is not None
        return self._claims_fd

    def lease_fds(self, lease: Lease) -> list[int]:
        """The descriptors holding ``lease``'s locks: a process that inherits them keeps the locks
        held until it (and every process that inherited them from it) has ended."""
        return list(self._held.get(lease.session, ()))

    def peek(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """Like :meth:`inspect`, by probing kept read-only descriptors: no /proc/locks, no opens.

        For the pool's frequent observations. A probe takes a shared lock for an instant, so an
        acquire racing with it may fail once (it is retried); it never makes two holders.
        """
        if len(self._peek_fds) > 8192:
            self._close_peeks()
        out: dict[str, Holder | None] = {}
        for key in keys:
            fd = self._peek_fds.get(key)
            if fd is None:
                name = self._peek_names.get(key)
                if name is None:  # the pool peeks at free member slots every look: hash each name once
                    name = self._peek_names[key] = lock_name(key)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    out[key] = None
                    continue
                except OSError as exc:
                    raise BackendError(f"cannot open lock file for {key!r}: {exc.strerror}") from exc
                self._peek_fds[key] = fd
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, RECORD_SIZE, 0)
                seen = self._peek_seen.get(fd)
                if seen is None or seen[0] != raw:  # parse a record once, not at every look
                    token, rec = parse_record(raw)
                    owner = rec.get("owner")
                    holder = Holder(owner, token, None, rec.get("pid"), rec.get("host"), rec.get("since")) \
                        if owner else Holder("", token)  # locked, record not written yet
                    seen = self._peek_seen[fd] = (raw, holder)
                out[key] = seen[1]
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            out[key] = None
        return out

    def held(self, key: str) -> bool:
        """Whether anyone holds ``key`` now (one probe of a kept descriptor)."""
        return self.peek([key])[key] is not None

    def _bell(self) -> int:
        if self._bell_fd is None:
            fd = os.open("pool.bell", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._dir_fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise BackendError("refusing pool.bell: not a regular file")
            self._bell_fd = fd
        return self._bell_fd

    def ring(self) -> None:
        """Tell the pool's members on this machine that something changed (a join or a release)."""
        os.pwrite(self._bell(), os.urandom(8), 0)

    def ringer(self) -> Callable[[], None]:
        """A way to ring that needs nothing more from this backend (its own descriptor of the bell): the
        guard of a worker's commands rings with it once they are gone, with no backend to open then."""
        fd = os.dup(self._bell())  # not inheritable (PEP 446): commands never get it

        def ring() -> None:
            os.pwrite(fd, os.urandom(8), 0)
        return ring

    def bell(self) -> bytes:
        """The bell's current value: it differs from an earlier one after a ring (one ``pread``)."""
        return os.pread(self._bell(), 8, 0)

    def bell_watch(self) -> int | None:
        """A descriptor (the caller closes it) readable after every ring, or None where the kernel has
        no inotify (then read :meth:`bell` on a short period)."""
        self._bell()
        return watch_writes(str(self.directory / "pool.bell"))

    def _close_peeks(self) -> None:
        fds, self._peek_fds = self._peek_fds, {}
        self._peek_names, self._peek_seen = {}, {}
        for fd in fds.values():
            os.close(fd)

    def _open_record(self, name: str, create: bool) -> int | None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        path = self.directory / record_name(name)
        try:
            fd = os.open(record_name(name), flags, 0o600, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendError(f"cannot open record file {str(path)!r}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise BackendError(f"refusing record file {str(path)!r}: not a regular file of ours")
        return fd

    @staticmethod
    def _read_value(fd: int) -> str | None:
        raw = os.pread(fd, 1 << 16, 0)
        if not raw:
            return None
        if raw[:1] != b"=":
            raise BackendProtocolError(f"unreadable record ({raw[:40]!r})")
        return raw[1:].decode("utf-8", "surrogatepass")

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """Each record's file, read under a shared ``flock`` (absent file or empty: no record)."""
        out: dict[str, str | None] = {}
        for name in names:
            check_record(name)
            fd = self._open_record(name, create=False)
            if fd is None:
                out[name] = None
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                out[name] = self._read_value(fd)
            finally:
                os.close(fd)
        return out

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """Compare and set under an exclusive ``flock`` of the record's file (deleting empties it)."""
        check_record(name, value)
        fd = self._open_record(name, create=True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._read_value(fd) != expected:
                return False
            body = b"" if value is None else b"=" + value.encode("utf-8", "surrogatepass")
            os.pwrite(fd, body, 0)
            os.ftruncate(fd, len(body))
            if self.durable:
                os.fsync(fd)
            return True
        finally:
            os.close(fd)

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """flock has no notification across files: sleep one poll interval (at most ``timeout``)."""
        time.sleep(max(0.0, min(timeout, self.poll)))

    def close(self) -> None:
        """Release everything still held."""
        for session in list(self._held):
            self.release(Lease((), "", {}, 0.0, session=session))
        self._close_peeks()
        if self._bell_fd is not None:
            os.close(self._bell_fd)
            self._bell_fd = None
        if self._claims_fd is not None:
            os.close(self._claims_fd)
            self._claims_fd = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
