"""Process plumbing shared by the supervisor, workers and runners: exit codes, parent-death signal."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal

EXIT_OK, EXIT_JOB_FAILED, EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_BACKEND = 0, 1, 2, 3, 4
EXIT_INTERNAL, EXIT_FENCED = 70, 75
PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; no-op elsewhere).

    If ``parent`` is given and is already gone (it died before the request took effect: the
    kernel would never signal us), die now.
    """
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
