"""Backend registry: URL scheme -> backend class, imported only when its scheme is used.

Every backend takes ``(url, **options)``; options may also come from the URL's query string. A
backend's client library is an optional extra (``pip install 'shardpreempt[redis]'``); a missing one
is a :class:`~shardpreempt.errors.MissingExtra` naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigError, LeaseLost, MissingExtra
from ..model import Lease
from ..redact import redact_url
from ..typing import Backend

#: scheme -> (module, class, extra that provides its client library or None)
REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "memory": ("memory", "MemoryBackend", None),
    "file": ("file", "FileBackend", None),
    "redis": ("redis", "RedisBackend", "redis"),
    "rediss": ("redis", "RedisBackend", "redis"),
    "postgresql": ("postgres", "PostgresBackend", "postgresql"),
    "postgres": ("postgres", "PostgresBackend", "postgresql"),
    "mysql": ("mysql", "MySQLBackend", "mysql"),
    "mariadb": ("mysql", "MySQLBackend", "mysql"),
    "etcd": ("etcd", "EtcdBackend", "etcd"),
    "zookeeper": ("zookeeper", "ZooKeeperBackend", "zookeeper"),
}

#: The client library each extra provides (the top-level module imported by its backend).
EXTRA_MODULES = {"redis": "redis", "postgresql": "psycopg", "mysql": "pymysql", "etcd": "etcd3gw",
                 "zookeeper": "kazoo"}


def url_options(url: str) -> dict[str, str]:
    """The query-string options of ``url``."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def option(options: dict[str, Any], name: str, kind: type, default: Any, *, url: str) -> Any:
    """Read and convert one backend option, with a clear error naming the URL and the option."""
    raw = options.pop(name, default)
    if raw is None or (isinstance(raw, kind) and not (kind is int and isinstance(raw, bool))):
        return raw
    try:
        if kind is bool:
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} must be {kind.__name__}, got {raw!r}", source=redact_url(url)) from None
    if isinstance(value, (int, float)) and value < 0:
        raise ConfigError(f"option {name!r} must not be negative, got {raw!r}", source=redact_url(url))
    return value


def reject_unknown(options: dict[str, Any], url: str) -> None:
    """Fail on options a backend did not consume."""
    if options:
        names = ", ".join(sorted(options))
        raise ConfigError(f"unknown backend option(s): {names}", source=redact_url(url))


#: Limits every backend applies to records (``read_records`` / ``swap_record``).
MAX_RECORD_NAME, MAX_RECORD_VALUE = 200, 8192


def check_record(name: str, value: str | None = None) -> None:
    """ConfigError for a record name or value no backend stores: names 1..200 characters without
    NUL or ``/`` at the ends, values at most 8,192 bytes of UTF-8 without NUL."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_RECORD_NAME or "\0" in name:
        raise ConfigError(f"record name must be 1..{MAX_RECORD_NAME} characters without NUL, got {name!r:.80}")
    if value is not None and (not isinstance(value, str) or "\0" in value
                              or len(value.encode("utf-8", "surrogatepass")) > MAX_RECORD_VALUE):
        raise ConfigError(f"record {name!r}: value must be a string of at most {MAX_RECORD_VALUE} bytes without NUL")


def renewal_check(lease: Lease) -> tuple[str, int | None] | None:
    """What ``renew`` checks besides the session: the lease's first key and its token (``None`` when the
    lease does not know it), or ``None`` for a lease without keys (a session anchor: the session alone).

    Slices are acquired all or nothing and released all at once, so the first key tells whether the
    grant still stands: one key read per renewal, whatever the number of keys. The token tells a stale
    lease object from a newer grant of the same key to the same session."""
    if not lease.keys:
        return None
    key = lease.keys[0]
    token = lease.tokens.get(key)
    return key, None if token is None else int(token)


def superseded(lease: Lease, detail: str) -> LeaseLost:
    """The ``LeaseLost`` a renewal raises when the lease's session lives but its first key is no longer
    this grant's: ``detail`` says what the key shows now."""
    return LeaseLost(f"superseded: key {lease.keys[0]!r:.80} {detail}", lease.keys)


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend named by ``url``'s scheme, e.g. ``file:///var/lib/shardpreempt``."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"backend URL must look like scheme://..., got {redact_url(str(url))!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown backend scheme {scheme!r} (known: {known})", source=redact_url(url))
    module_name, class_name, extra = REGISTRY[scheme]
    if extra is not None:
        try:
            importlib.import_module(EXTRA_MODULES[extra])
        except ImportError as exc:
            raise MissingExtra(
                f"the {scheme}:// backend needs its client library: pip install 'shardpreempt[{extra}]'"
            ) from exc
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls = getattr(module, class_name)
    backend: Backend = cls(url, **options)
    return backend


__all__ = ["REGISTRY", "check_record", "open_backend", "redact_url"]
