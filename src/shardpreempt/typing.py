"""Protocols a user may implement (Backend, Clock) and the backend capability record."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .model import Holder, Lease


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the claimer and the docs read these."""

    server_expiry: bool  # leases expire by the server's clock, so holders must renew
    cross_host: bool  # workers on several machines can share it
    session_bound: bool  # holds die with the holder's process or session, without waiting for a ttl
    blocking_wait: bool  # ``wait`` is woken by the backend's own notification, not by polling


@runtime_checkable
class Backend(Protocol):
    """The lock store contract, tested rule by rule by ``shardpreempt.testing.contract``
    (docs/testing.md). Methods never start threads."""

    url: str  # the URL with any password redacted: safe to print
    capabilities: Capabilities

    def try_acquire(self, keys: Sequence[str], owner: str, ttl: float) -> Lease | None:
        """Hold every key for ``owner`` or none of them; ``None`` when any key is held by another."""
        ...

    def renew(self, lease: Lease) -> Lease:
        """Extend the lease in one round trip; raise ``LeaseLost`` if it is no longer ours."""
        ...

    def release(self, lease: Lease) -> None:
        """Free what the lease still holds; idempotent; never frees another holder's key."""
        ...

    def inspect(self, keys: Sequence[str]) -> dict[str, Holder | None]:
        """The holder of every key (``None`` when free), in one or a few round trips."""
        ...

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Block until one of ``keys`` may have been freed, or ``timeout`` seconds passed."""
        ...

    def read_records(self, names: Sequence[str]) -> dict[str, str | None]:
        """The value of each named record (``None`` when absent), in one round trip.

        Records are small durable strings beside the locks (the pool's layout, ``--once`` progress),
        in their own namespace: a record never collides with a lock key of the same name.
        """
        ...

    def swap_record(self, name: str, expected: str | None, value: str | None) -> bool:
        """Set record ``name`` to ``value`` (``None``: delete it) if it now holds ``expected``
        (``None``: absent), atomically; ``True`` if it did."""
        ...

    def close(self) -> None:
        """Drop connections; held locks of session-bound backends are freed."""
        ...


class Clock(Protocol):
    """Where time comes from; tests inject a fake one so they never sleep."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def time(self) -> float:
        """Unix time in seconds."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def time(self) -> float:
        """``time.time()``."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """``time.sleep()``."""
        time.sleep(max(0.0, seconds))


SYSTEM_CLOCK = SystemClock()
