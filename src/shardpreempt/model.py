"""Frozen value types: Shard, Slice, Lease, Holder."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from .redact import redact_settings


@dataclass(frozen=True, slots=True)
class Shard:
    """One unit of work with a stable identity; ``settings`` may hold secrets and never print."""

    identity: str
    name: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        if not self.name:
            object.__setattr__(self, "name", self.identity)

    def __repr__(self) -> str:
        return f"Shard(identity={self.identity!r}, name={self.name!r}, settings={redact_settings(self.settings)!r})"

    def public(self) -> dict[str, Any]:
        """Identity, name and redacted settings, safe for status and logs."""
        return {"identity": self.identity, "name": self.name, "settings": redact_settings(self.settings)}


def clones(identities: Sequence[str], names: Iterable[str], settings: Iterable[Mapping[str, Any]]) -> list[Shard]:
    """Shards made from values already checked, without the constructor's checks and settings copy.

    For many shards at once (a shard set's members, a packed slice's copies): ``settings`` must be
    read-only mappings (``MappingProxyType``), each shared or owned by its shard alone.
    """
    if vars(Shard).get("__slots__") != ("identity", "name", "settings"):  # a field this shortcut does not know
        return [Shard(i, n, s) for i, n, s in zip(identities, names, settings, strict=True)]
    out = list(map(object.__new__, [Shard] * len(identities)))
    list(map(_set_identity, out, identities))
    list(map(_set_name, out, names))
    list(map(_set_settings, out, settings))
    return out


# the slots' own descriptors: setting through them skips the frozen dataclass's __setattr__
_set_identity = vars(Shard)["identity"].__set__
_set_name = vars(Shard)["name"].__set__
_set_settings = vars(Shard)["settings"].__set__


@dataclass(frozen=True)
class Slice:
    """An ordered group of shards; its ``id`` is a stable hash of its digest."""

    index: int
    shards: tuple[Shard, ...]

    @property
    def digest(self) -> list[str]:
        """The identities of the slice's shards, in order."""
        return list(self.keys)

    @cached_property
    def id(self) -> str:
        """Stable across runs and machines: the same shards in the same order give the same id."""
        blob = json.dumps(self.digest, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """The lock keys of the slice (the shard identities)."""
        return tuple(s.identity for s in self.shards)

    @cached_property
    def first_key(self) -> str:
        """The key whose holder is the slice's holder (a slice's keys are granted and freed together)."""
        return self.keys[0]


@dataclass(frozen=True)
class Lease:
    """What a successful acquire returns.

    ``tokens`` maps each key to its fencing token (strictly increasing per key across all holders).
    ``deadline`` is a local monotonic time: the start of the request that granted or renewed the lease
    plus ``ttl`` (``math.inf`` for backends whose locks die with the process, such as ``file://``).
    The claimer treats the lease as lost a safety margin *before* it, whatever the server says.
    ``session`` is the backend's handle for the holder's liveness session (opaque to callers).
    """

    keys: tuple[str, ...]
    owner: str
    tokens: Mapping[str, int]
    ttl: float
    deadline: float = math.inf
    session: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", MappingProxyType(dict(self.tokens)))

    def with_deadline(self, deadline: float) -> Lease:
        """The same lease with a new local deadline (after a renewal)."""
        return Lease(self.keys, self.owner, self.tokens, self.ttl, deadline, self.session)


@dataclass(frozen=True)
class Holder:
    """Who holds a key, for status: owner id, token, and what the backend knows about expiry."""

    owner: str
    token: int
    expires_in: float | None = None  # seconds left by the server's clock; None: held until the holder dies
    pid: int | None = None
    host: str | None = None
    since: float | None = None  # unix time the hold began, where the backend records it

    def public(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "owner": self.owner,
            "token": self.token,
            "expires_in": self.expires_in,
            "pid": self.pid,
            "host": self.host,
            "since": self.since,
        }
