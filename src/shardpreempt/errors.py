"""The whole exception tree of shardpreempt.

::

    ShardPreemptError
    ├── ConfigError (ValueError)            bad input: config file, flag, URL, shard list
    │   └── MissingExtra (ImportError)      a backend's client library is not installed
    ├── BackendError
    │   ├── BackendUnavailable (ConnectionError)  transient: unreachable, timed out, refused
    │   └── BackendProtocolError             stored state we cannot interpret, unknown script code
    ├── LeaseLost                            a lease is no longer ours (reason given)
    ├── ClaimTimeout (TimeoutError)          ``claim(timeout=...)`` found no free slice in time
    └── SupervisorError
        └── CrashLoop                        a worker keeps dying; restarting stopped

    Shutdown (BaseException)                 raised into a job on a cold stop; not an Exception,
                                             so ``except Exception`` in user code cannot swallow it
"""

from __future__ import annotations


class ShardPreemptError(Exception):
    """Root of every error shardpreempt raises."""


class ConfigError(ShardPreemptError, ValueError):
    """Bad input: the message names the source (file or flag) and the key."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class MissingExtra(ConfigError, ImportError):
    """A backend's optional client library is not installed."""


class BackendError(ShardPreemptError):
    """A backend failed; the client library's error is chained as ``__cause__``."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend cannot be reached now (refused, timed out, dropped); retrying may help."""


class BackendProtocolError(BackendError):
    """The backend returned state shardpreempt cannot interpret."""


class LeaseLost(ShardPreemptError):
    """A lease is no longer held: expired, taken over, or past its local deadline."""

    def __init__(self, reason: str, keys: tuple[str, ...] = ()) -> None:
        self.reason = reason
        self.keys = keys
        super().__init__(reason)


class ClaimTimeout(ShardPreemptError, TimeoutError):
    """``claim()`` could not acquire a slice within its timeout."""


class SupervisorError(ShardPreemptError):
    """The local process pool cannot go on."""


class CrashLoop(SupervisorError):
    """A worker died too often in too short a time; the supervisor stopped restarting it."""


class Shutdown(BaseException):
    """Raised into a job on a cold stop; deliberately not an ``Exception``."""
