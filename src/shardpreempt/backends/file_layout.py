"""Where the ``file://`` backend keeps things and in which format: the private lock directory, the file
names of keys and records (hashes, so any identity is a safe name), and the lock record written into each
lock file (token line and holder JSON in one ``pwrite``). The locking itself is in
:mod:`shardpreempt.backends.file`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BackendProtocolError, ConfigError

RECORD_SIZE = 512  # token line + holder JSON, written with one pwrite


def default_directory() -> Path:
    """The private per-user lock directory used when the URL names none."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "shardpreempt" / "locks"


def lock_name(key: str) -> str:
    """File name for a key: a hash, so any identity (slashes, NUL, 1 MB long) is a safe name."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".lock"


def record_name(name: str) -> str:
    """File name for a record (``.rec``: never the same file as a lock key of the same name)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".rec"


def directory_of(url: str) -> Path:
    """The lock directory a ``file://`` URL names (without creating or checking it)."""
    raw = unquote(urlsplit(url).path)
    return Path(raw) if raw else default_directory()


def secure_directory(path: Path, url: str) -> tuple[Path, int]:
    """Create (0700) and open the lock directory; refuse a symlink, another user's, or a shared one.

    Returns the path and a descriptor of the directory: every lock file is opened relative to that
    descriptor, so swapping a parent directory later cannot redirect lock files elsewhere.
    """
    if not path.is_absolute():
        raise ConfigError(f"lock directory must be an absolute path, got {str(path)!r}", source=url)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(f"lock directory {str(path)!r} is a symlink or not a directory", source=url) from exc
        raise ConfigError(f"cannot open lock directory {str(path)!r}: {exc.strerror}", source=url) from exc
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"lock directory {str(path)!r} is owned by uid {st.st_uid}, not by us"
    elif st.st_mode & 0o022:
        problem = (f"lock directory {str(path)!r} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                   "use a private one (chmod 700)")
    if problem:
        os.close(fd)
        raise ConfigError(problem, source=url)
    return path, fd


def read_record(fd: int) -> tuple[int, dict[str, Any]]:
    return parse_record(os.pread(fd, RECORD_SIZE, 0))


def parse_record(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The token and holder of a lock record's bytes."""
    if not raw.strip():
        return 0, {}
    first, _, rest = raw.partition(b"\n")
    try:
        token = int(first)
        holder = json.loads(rest) if rest.strip() else {}
    except ValueError as exc:
        raise BackendProtocolError(f"unreadable lock record ({raw[:40]!r})") from exc
    return token, holder


def write_record(fd: int, token: int, holder: dict[str, Any], durable: bool) -> None:
    body = b"%d\n%s" % (token, json.dumps(holder, separators=(",", ":")).encode())
    if len(body) > RECORD_SIZE:  # an owner id this long is refused rather than truncated
        raise ConfigError(f"owner id too long for a lock record ({len(body)} bytes)")
    os.pwrite(fd, body.ljust(RECORD_SIZE), 0)
    if durable:
        os.fsync(fd)


def ensure_fd_room(extra: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = extra + 256
    if want > soft and soft != resource.RLIM_INFINITY:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
