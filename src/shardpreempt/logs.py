"""What the console script writes to stderr: text or JSON lines, a few lines by default, repeats limited.

* ``--log-format json``: one JSON object per line with ``time`` (UTC, ISO 8601), ``level``, ``worker``
  (the worker's index, ``null`` for the supervisor), ``slice``, ``event`` and ``message``; a traceback
  goes in ``exc``. ``text`` (the default) is ``TIME LEVEL LOGGER: MESSAGE``.
* Without ``-v`` a run shows warnings and errors, plus its start line (logger ``shardpreempt.run``)
  and one line per ownership change (logger ``shardpreempt.ownership``).
* A warning or error that repeats (same logger, same message template, same worker) is written at
  most once per ``interval`` seconds; the next one that is written says ``(repeated K times)``.
* Every message passes through :func:`scrub`: URL passwords and secret ``key=value`` pairs are masked,
  on top of the redaction the messages' authors already do.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .redact import redact_url, scrub

RUN = "shardpreempt.run"
OWNERSHIP = "shardpreempt.ownership"
FORMATS = ("text", "json")
#: seconds between two lines with the same key (see :class:`RateLimit`)
REPEAT_INTERVAL = 10.0

_state: dict[str, Any] = {"worker": None, "json": False}


def set_worker(index: int | None) -> None:
    """Name this process's worker index in every line it logs (called in a freshly forked worker)."""
    _state["worker"] = index


def json_active() -> bool:
    """Whether stderr carries JSON lines (so a fatal error should be one too)."""
    return bool(_state["json"])


def _fields(record: logging.LogRecord) -> tuple[Any, Any, str]:
    worker = getattr(record, "worker", _state["worker"])
    event = getattr(record, "event", None) or record.name.removeprefix("shardpreempt.")
    return worker, getattr(record, "slice", None), event


def _message(record: logging.LogRecord) -> str:
    message = scrub(record.getMessage())
    repeated = getattr(record, "repeated", 0)
    return f"{message} (repeated {repeated} times)" if repeated else message


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """``time``, ``level``, ``worker``, ``slice``, ``event``, ``message`` (and ``exc``)."""
        worker, slice_id, event = _fields(record)
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"time": stamp.replace("+00:00", "Z"), "level": record.levelname.lower(),
                               "worker": worker, "slice": slice_id, "event": event, "message": _message(record)}
        if getattr(record, "repeated", 0):
            out["repeated"] = record.__dict__["repeated"]
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, the message scrubbed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, with the scrubbed message and any repeat count."""
        record.message = _message(record)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        """The traceback, scrubbed."""
        return scrub(super().formatException(ei))


class RateLimit(logging.Filter):
    """Let a warning or error through at most once per ``interval`` seconds per key; count the rest.

    The key is the logger, the message template (not its arguments: "renewal of slice %s failed" is
    one key whatever the slice) and the record's ``worker``. The first line of a key after a quiet
    spell carries ``repeated`` = how many were held back since the last one written.
    """

    def __init__(self, interval: float = REPEAT_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str, Any], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat inside the interval."""
        if record.levelno not in (logging.WARNING, logging.ERROR):
            return True
        key = (record.name, str(record.msg), getattr(record, "worker", None))
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval:
                self._last[key] = (last[0], last[1] + 1)
                return False
            if len(self._last) > 10_000:  # keys are templates, so few; never grow without bound
                self._last.clear()
            self._last[key] = (now, 0)
        record.repeated = last[1] if last is not None else 0
        return True


def setup(verbose: int = 0, fmt: str = "text", *, run: bool = False, interval: float = REPEAT_INTERVAL) -> None:
    """Log to stderr: ``-v`` info, ``-vv`` debug; with ``run``, the start and ownership lines always."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RateLimit(interval))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in (RUN, OWNERSHIP):
        logging.getLogger(name).setLevel(min(level, logging.INFO) if run else logging.NOTSET)
    _state["json"] = fmt == "json"
    logging.captureWarnings(fmt == "json")  # a Python warning is a log line too, not free text


def start_line(*, layout: object, url: str, workers: int, events: object, metrics: str | None) -> None:
    """The run's one start line: layout, backend (password masked), workers, events file, metrics address."""
    logging.getLogger(RUN).info("started: %s on %s, %d worker%s, events %s, metrics %s", layout, redact_url(url),
                                workers, "" if workers == 1 else "s", events or "off",
                                f"http://{metrics}/metrics" if metrics else "off", extra={"event": "start"})


def ownership(kind: str, *, worker: int, slice_id: str, shards: int, reason: str | None = None) -> None:
    """One line per ownership change: ``kind`` is ``acquired``, ``released`` or ``lost``."""
    how = f"{shards} shard{'' if shards == 1 else 's'}" + (f", {reason}" if reason else "")
    logging.getLogger(OWNERSHIP).info("worker %d %s slice %s (%s)", worker, kind, slice_id, how,
                                      extra={"event": kind, "slice": slice_id, "worker": worker})


def fatal(message: str) -> None:
    """A fatal error as one JSON line (``event`` ``fatal``), for when stderr carries JSON lines."""
    logging.getLogger("shardpreempt").critical("%s", message, extra={"event": "fatal"})
