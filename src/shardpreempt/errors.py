"""The whole exception tree of shardpreempt.

::

    ShardPreemptError
    ├── ConfigError (ValueError)            bad input: config file, flag, URL, shard list
    │   └── MissingExtra (ImportError)      a backend's client library is not installed
    ├── BackendError
    │   ├── BackendUnavailable (ConnectionError)  transient: unreachable, timed out, refused
    │   └── BackendProtocolError             stored state we cannot interpret, unknown script code
    ├── LeaseLost                            a lease is no longer ours: ``reason`` (a LossReason), ``detail``
    ├── ClaimTimeout (TimeoutError)          ``claim(timeout=...)`` found no free slice in time
    └── SupervisorError
        └── CrashLoop                        a worker keeps dying; restarting stopped (which, how often)

    Shutdown (BaseException)                 raised into a job on a cold stop; not an Exception,
                                             so ``except Exception`` in user code cannot swallow it

Every error survives a pickle round trip with its fields (errors cross process boundaries).
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ShardPreemptError(Exception):
    """Root of every error shardpreempt raises."""


class ConfigError(ShardPreemptError, ValueError):
    """Bad input: the message names the source (file or flag) and the key."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.message = message
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), (self.message,), {"source": self.source, "key": self.key}))


class MissingExtra(ConfigError, ImportError):
    """A backend's optional client library is not installed."""


class BackendError(ShardPreemptError):
    """A backend failed; the client library's error is chained as ``__cause__``."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend cannot be reached now (refused, timed out, dropped); retrying may help."""


class BackendProtocolError(BackendError):
    """The backend returned state shardpreempt cannot interpret."""


class LossReason(str, Enum):
    """Why a lease was lost: a fixed set, so code branches on the reason and never on message text."""

    EXPIRED = "expired"  # the server let the lease's session expire
    SUPERSEDED = "superseded"  # its keys were released by another or granted to another session or grant
    RELEASED = "released"  # this holder had released it already (a stale lease object)
    SELF_FENCED = "self-fenced"  # no renewal before the local deadline: the holder stopped itself

    @classmethod
    def of_text(cls, text: str) -> LossReason:
        """The reason of a loss given as text only (``LeaseLost("session expired", keys)``): the words
        the backends use — ``superseded: ...`` from ``backends.superseded``, ``lease was released``,
        anything else is an expiry."""
        if text.startswith("superseded"):
            return cls.SUPERSEDED
        if text == "lease was released":
            return cls.RELEASED
        return cls.EXPIRED


class LeaseLost(ShardPreemptError):
    """A lease is no longer held: ``reason`` says why (:class:`LossReason`), ``detail`` says it for humans.

    ``LeaseLost(LossReason.EXPIRED, keys, "etcd lease 7 expired")``; the older form with text only,
    ``LeaseLost("session expired", keys)``, takes the text as the detail and the reason from it.
    """

    def __init__(self, reason: LossReason | str, keys: tuple[str, ...] = (), detail: str | None = None) -> None:
        if not isinstance(reason, LossReason):
            reason, detail = LossReason.of_text(reason), reason if detail is None else detail
        self.reason = reason
        self.keys = tuple(keys)
        self.detail = detail if detail is not None else reason.value
        super().__init__(self.detail)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.keys, self.detail))


class ClaimTimeout(ShardPreemptError, TimeoutError):
    """``claim()`` could not acquire a slice within its timeout."""


class SupervisorError(ShardPreemptError):
    """The local process pool cannot go on."""


class CrashLoop(SupervisorError):
    """A worker died too often in too short a time; the supervisor stopped restarting it."""

    def __init__(self, worker: int, deaths: int, within: float, last: str) -> None:
        self.worker = worker  # its slot index
        self.deaths = deaths  # quick deaths in a row
        self.within = within  # seconds after its start a death counts as quick
        self.last = last  # how the last one died: "exit status 1", "signal 9"
        super().__init__(f"worker {worker} died {deaths} times in a row within {within:g} s of starting "
                         f"(last: {last}); stopped restarting (crash loop)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker, self.deaths, self.within, self.last))


class Shutdown(BaseException):
    """Raised into a job on a cold stop; deliberately not an ``Exception``."""


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseException:
    """Unpickle an error whose constructor takes keyword arguments."""
    return cls(*args, **kwargs)
