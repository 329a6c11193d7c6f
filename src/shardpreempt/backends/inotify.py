"""Linux inotify through ctypes: a descriptor that becomes readable when a file is written.

The file backend's bell (docs/pool.md) uses it so that members waiting for news sleep in ``poll`` and
wake within microseconds of a ring, with no polling. Where inotify is missing (not Linux), callers
fall back to reading the bell on a short period.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

IN_MODIFY = 0x00000002


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def watch_writes(path: str) -> int | None:
    """A non-blocking descriptor readable after each write to ``path``; None without inotify."""
    libc = _libc()
    if not hasattr(libc, "inotify_init1"):
        return None
    fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
        os.close(fd)
        return None
    return fd


def drain(fd: int) -> None:
    """Read every pending event (their content does not matter: only that something was written)."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 65536):
            pass
