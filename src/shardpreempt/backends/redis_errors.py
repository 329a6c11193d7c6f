"""How the ``redis://`` backend turns redis-py's errors into the project's: once, at the edge of each call.

Authentication and a missing database are a ``ConfigError``; server errors that mean "not now" (``TRANSIENT``),
a dropped or refused connection and timeouts are ``BackendUnavailable``; other server errors are a
``BackendProtocolError``. A message never shows the password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions

from ..errors import BackendError, BackendProtocolError, BackendUnavailable, ConfigError

# Server errors that mean "not now" rather than "never": retrying later may succeed. redis-py strips
# the code from the message of the errors it knows (keeping it as ``status_code``), not of the others.
TRANSIENT = frozenset({"LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM", "MISCONF",
                       "NOREPLICAS"})


@contextmanager
def translated(operation: str, url: str, password: str | None) -> Iterator[None]:
    """Translate redis-py errors raised inside into the project's exceptions; ``url`` is already redacted."""
    try:
        yield
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
            redis.exceptions.NoPermissionError) as exc:
        raise ConfigError(f"{operation}: authentication failed: {scrub(exc, password)}", source=url) from exc
    except redis.exceptions.ResponseError as exc:
        text = scrub(exc, password)
        if "DB index" in text or "invalid DB" in text:
            raise ConfigError(f"{operation}: no such database: {text}", source=url) from exc
        if error_code(exc, text) in TRANSIENT:
            raise BackendUnavailable(f"{url}: {operation}: server busy: {text}") from exc
        raise BackendProtocolError(f"{url}: {operation}: {text}") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise BackendUnavailable(f"{url}: {operation}: {scrub(exc, password)}") from exc
    except redis.exceptions.RedisError as exc:
        raise BackendError(f"{url}: {operation}: {scrub(exc, password)}") from exc
    except UnicodeEncodeError as exc:  # a lone surrogate in a key: nothing was sent
        raise ConfigError(f"{operation}: keys and records must be valid UTF-8: {exc.reason}", source=url) from exc
    except UnicodeDecodeError as exc:  # somebody else wrote bytes under our prefix
        raise BackendProtocolError(f"{url}: {operation}: a stored value is not UTF-8") from exc


def error_code(exc: redis.exceptions.ResponseError, text: str) -> str:
    """The server's error code: redis-py keeps known ones aside and leaves others in the message, which a
    pipeline prefixes with the failing command."""
    code = getattr(exc, "status_code", None)
    if code:
        return str(code)
    if text.startswith("Command # ") and " caused error: " in text:
        text = text.split(" caused error: ", 1)[1]
    return text.split(" ", 1)[0]


def scrub(exc: BaseException, password: str | None) -> str:
    """The exception's message without the password (redis-py does not echo it, but this is cheap to make
    certain of)."""
    text = str(exc) or type(exc).__name__
    return text.replace(password, "***") if password else text
