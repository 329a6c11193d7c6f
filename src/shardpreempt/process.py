"""Process plumbing shared by the supervisor, workers and runners: exit codes, parent-death signal."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Every exit status shardpreempt's processes use, in one place."""

    OK = 0
    JOB_FAILED = 1  # --once: a slice kept failing
    CONFIG = 2  # bad input
    CRASH_LOOP = 3
    BACKEND = 4  # the backend unreachable at start
    INTERNAL = 70  # a worker's unexpected error (EX_SOFTWARE)
    FENCED = 75  # a worker ended because a job ignored its lost lease
    INTERRUPTED = 128 + signal.SIGTERM  # a --once pass left unfinished


EXIT_OK, EXIT_JOB_FAILED, EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_BACKEND = (
    ExitCode.OK, ExitCode.JOB_FAILED, ExitCode.CONFIG, ExitCode.CRASH_LOOP, ExitCode.BACKEND)
EXIT_INTERNAL, EXIT_FENCED, EXIT_INTERRUPTED = ExitCode.INTERNAL, ExitCode.FENCED, ExitCode.INTERRUPTED
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


GUARD_VARIABLE = "SHARDPREEMPT_GUARD"  # in every command's environment: the guard's pid


def start_guard(ended: Callable[[], None] | None = None) -> tuple[int, int]:
    """Fork a guard for this worker's commands; return its pid and the pipe to tell it about them.

    Write ``+PGID`` when a command's process group starts and ``-PGID`` when it is gone. When this
    process dies — however it dies — the kernel closes the pipe, and the guard kills every process
    group it still knows with SIGKILL, and every process whose environment carries
    ``SHARDPREEMPT_GUARD=<its pid>`` (so a command started just before the worker died, before it
    could be reported, and a process that left its group, are found too), then exits. Only a process
    that both left its group and cleared that variable escapes; on ``file://`` it still holds the
    slice's locks through the descriptors it inherited. Call it before starting any thread.

    ``ended`` runs in the guard once the known groups' leaders have exited (their inherited locks are
    free), and again if the sweep for marked processes found any: the file backend rings its bell
    there, so the pool takes the slices over at once.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid != 0:
        os.close(read_fd)
        return pid, write_fd
    code = 0
    try:
        os.close(write_fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        groups: set[int] = set()
        buffer = b""
        while data := os.read(read_fd, 4096):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line[:1] == b"+":
                    groups.add(int(line[1:]))
                elif line[:1] == b"-":
                    groups.discard(int(line[1:]))
        leaders = []
        for pgid in groups:
            with contextlib.suppress(OSError, AttributeError):
                leaders.append(os.pidfd_open(pgid))  # the group's leader: the command itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        marker = f"{GUARD_VARIABLE}={os.getpid()}".encode()
        if _wait_exited(leaders, 0.02):  # a leader slow to die: what left its group must not live on meanwhile
            _kill_marked(marker)
            _wait_exited(leaders, 1.0)
        for fd in leaders:
            os.close(fd)
        if ended is not None:
            _quietly(ended)
        if _sweep(marker) and ended is not None:
            _quietly(ended)
    except BaseException:  # never let the guard run the worker's code
        code = 1
    finally:
        os._exit(code)


#: How long the guard keeps looking after its last find. A command the worker forked just before it
#: died shows the mark only once it has called exec (until then /proc shows the worker's environment),
#: so one look could miss it; it would then keep its slice's lock descriptors for ever.
SWEEP_QUIET = 0.5
SWEEP_EVERY = 0.005
SWEEP_MOST_EVERY = 0.08


def _sweep(marker: bytes, quiet: float = SWEEP_QUIET, every: float = SWEEP_EVERY, most: float = 10.0) -> int:
    """Kill marked processes until none has been seen for ``quiet`` seconds (``most`` seconds at most:
    a process stuck in the kernel cannot keep the guard for ever); return how many were found.

    Each sweep reads the environment of every process on the machine, and it runs while the pool takes
    the dead worker's slices over: the pause between sweeps doubles from ``every`` (a command between
    fork and exec shows its mark within microseconds to a few milliseconds) up to 80 ms, and starts
    again from ``every`` after each find — about 10 sweeps in the half second instead of 50."""
    start = last = time.monotonic()
    found = 0
    pause = every
    while time.monotonic() - last < quiet and time.monotonic() - start < most:
        if n := _kill_marked(marker):
            found += n
            last = time.monotonic()
            pause = every
        time.sleep(pause)
        pause = min(SWEEP_MOST_EVERY, pause * 2)
    return found


def _wait_exited(pidfds: list[int], timeout: float) -> list[int]:
    """Wait (``timeout`` at most) until every process behind ``pidfds`` has exited; return the pidfds
    of those still running (the caller closes them all)."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    waiting = set(pidfds)
    while waiting and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(int(left * 1000) + 1):
            poller.unregister(fd)
            waiting.discard(fd)
    return [fd for fd in pidfds if fd in waiting]


def _quietly(call: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        call()


def _kill_marked(marker: bytes) -> int:
    """SIGKILL every process whose environment holds ``marker`` (and its process group); return how many."""
    found = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            pid = int(entry)
            found += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue
    return found


def runtime_base() -> Path:
    """The private per-user directory for run files: ``$XDG_RUNTIME_DIR/shardpreempt``, else
    ``$TMPDIR/shardpreempt-UID``; created 0700 and refused if a symlink or not ours."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "shardpreempt" if xdg else Path(tempfile.gettempdir()) / f"shardpreempt-{os.geteuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(base)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        from .errors import ConfigError

        raise ConfigError(f"runtime directory {str(base)!r} is not a private directory of ours (mode 0700)")
    return base


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_run_dir() -> Path:
    """A private directory for this supervisor's slice files (they hold secrets), after removing the
    directories of supervisors that are gone (killed before they could clean up)."""
    base = runtime_base()
    for old in base.iterdir():
        if old.name.isdigit() and int(old.name) != os.getpid() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    run = base / str(os.getpid())
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(mode=0o700)
    return run
