"""The ``--events`` audit trail: one JSON object per line, appended atomically by every process.

Fields (the README's ``--events``): ``t`` (unix seconds), ``event`` (``acquired`` | ``released`` | ``lost``
from workers; ``started`` | ``exited`` | ``killed`` from the supervisor), ``shard``, ``owner``, ``token``, ``worker``,
plus ``pid`` and ``host`` so the history checker can end the holds of a process that died.
Renewals are not logged. Secrets never appear: only identities, owner ids and tokens are written.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

HOST = socket.gethostname()


class EventLog:
    """Appends events to a file opened with ``O_APPEND`` (one ``write`` per batch, so lines never interleave)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # reopen after fork: each process its own fd
            assert self.path is not None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def check(self) -> None:
        """Open the file now, so a bad path is one clear error before anything starts."""
        if self.path is None:
            return
        try:
            self._open()
        except OSError as exc:
            from .errors import ConfigError

            raise ConfigError(f"cannot open {str(self.path)!r} for appending: {exc.strerror}",
                              key="--events") from None

    def emit(self, event: str, **fields: Any) -> None:
        """Append one event."""
        self.emit_many(event, [fields])

    def emit_many(self, event: str, rows: Iterable[dict[str, Any]], **common: Any) -> None:
        """Append one event per row (e.g. one per shard of a slice), all with the same time."""
        if self.path is None:
            return
        t = time.time()
        base = {"t": t, "event": event, **common, "pid": os.getpid(), "host": HOST}
        data = "".join(json.dumps({**base, **row}, separators=(",", ":")) + "\n" for row in rows).encode()
        if not data:
            return
        with self._lock:
            os.write(self._open(), data)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    _pid = -1
