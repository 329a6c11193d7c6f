"""The restart grace of the server backends (``redis://``, ``postgresql://``, ``mysql://``).

A server that comes back from a restart may have forgotten grants it made before it went down: an
older snapshot restored, a Redis without persistence, a crash that lost the last commits, a failover
to a replica that lagged. The holders of those grants do not know yet: each is still working until
its local deadline, at most a ttl after its last successful renewal, which was before the server went
down. So for ``restart_grace`` seconds (the option; default: the ttl of the acquire) after the server
(re)started, nothing is granted; renewals go on, and fail for every lease the server no longer
knows, so its holder fences itself. Once the grace is over, every holder the server forgot has
passed its deadline. How each backend learns of a restart is in its docstring and in
``docs/faults.md`` (restore-backend); ``docs/decisions.md`` says why.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..errors import ConfigError
from ..redact import redact_url
from . import option

log = logging.getLogger("shardpreempt.backends.grace")


class RestartGrace:
    """The ``restart_grace`` option, and a log line once per server start that it holds grants back."""

    def __init__(self, options: dict[str, Any], url: str) -> None:
        self.url = redact_url(url)
        self.seconds: float | None = option(options, "restart_grace", float, None, url=url)
        if self.seconds is not None and math.isinf(self.seconds):
            raise ConfigError("option 'restart_grace' must be a finite number of seconds", source=self.url)
        self._told: object = None

    def for_ttl(self, ttl: float) -> float:
        """The grace for an acquire of ``ttl`` seconds: the option, or the ttl itself."""
        return ttl if self.seconds is None else self.seconds

    def holding_back(self, start: object, left: float) -> None:
        """Note that a grant was held back, ``left`` seconds before the grace of server start ``start`` ends
        (logged once per ``start``: the first run on a fresh server waits this long too)."""
        if start != self._told:
            self._told = start
            log.warning("%s: the server (re)started recently, or the namespace is new; nothing is granted for "
                        "%.1f s more, until holders of leases it may have forgotten have fenced themselves (option "
                        "restart_grace; 'shardpreempt init' marks a new Redis namespace as new)",
                        self.url, max(0.0, left))
