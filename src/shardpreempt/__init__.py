"""shardpreempt: split shards into slices and let workers preempt them, one owner per shard.

See the README for the concepts; the public API is what ``__all__`` lists.
"""

from __future__ import annotations

from .backends import open_backend
from .claims import Ownership, claim
from .config import Settings, load_settings, load_shards
from .errors import (
    BackendUnavailable,
    ClaimTimeout,
    ConfigError,
    CrashLoop,
    LeaseLost,
    LossReason,
    ShardPreemptError,
    Shutdown,
)
from .model import Holder, Lease, Shard, Slice
from .poller import Poller
from .slicing import make_slices

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "ClaimTimeout",
    "ConfigError",
    "CrashLoop",
    "Holder",
    "Lease",
    "LeaseLost",
    "LossReason",
    "Ownership",
    "Poller",
    "Settings",
    "Shard",
    "ShardPreemptError",
    "Shutdown",
    "Slice",
    "__version__",
    "claim",
    "load_settings",
    "load_shards",
    "make_slices",
    "open_backend",
]
