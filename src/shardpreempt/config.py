"""TOML file + environment + flags -> validated :class:`Settings`.

Precedence, highest first: a command-line flag, a ``SHARDPREEMPT_*`` environment variable
(``SHARDPREEMPT_BACKEND``, ``SHARDPREEMPT_TTL``, ``SHARDPREEMPT_STRATEGY``, ``SHARDPREEMPT_SLICES``,
``SHARDPREEMPT_WORKERS``, ``SHARDPREEMPT_METRICS``, ``SHARDPREEMPT_LOG_FORMAT``), the file, the default.
Every rejection is a :class:`ConfigError` naming the file and the key (or the variable, or the flag);
values of secret keys are never echoed. The whole format is described in docs/config.md.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import ConfigError
from .model import Shard
from .redact import SECRET_KEY, redact_url
from .shardsets import MAX_IDENTITY, combine, read_sets

#: kind -> (identity template, required settings, defaults)
KINDS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "mysql": ("mysql:host={host};port={port};dbname={database}", ("host", "database"), {"port": 3306}),
    "postgresql": ("postgresql:host={host};port={port};dbname={database}", ("host", "database"), {"port": 5432}),
    "sqlite": ("sqlite:{path}", ("path",), {}),
}
#: kind -> the settings a shard of that kind may have; anything else for the driver goes in ``options``
#: (a table), so that a misspelt ``pasword`` or ``prot`` is an error rather than a setting nobody reads.
KIND_SETTINGS: dict[str, tuple[str, ...]] = {
    "mysql": ("host", "port", "database", "username", "user", "password", "options"),
    "postgresql": ("host", "port", "database", "username", "user", "password", "options"),
    "sqlite": ("path", "options"),
}
SECTIONS = {"backend": {"url": str, "ttl": (int, float)},
            "slicing": {"strategy": str, "slices": int},
            "run": {"workers": int, "metrics": str, "log_format": str},
            "shards": dict,
            "shard_sets": list}
__all__ = ["KINDS", "KIND_SETTINGS", "MAX_IDENTITY", "Settings", "apply_overrides", "load_settings", "load_shards",
           "make_shard", "settings_from_mapping", "shard_table", "to_toml"]


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, validated."""

    shards: tuple[Shard, ...]
    backend_url: str = "file://"
    ttl: float = 10.0
    strategy: str = "round-robin"
    slices: int | None = None  # None: the worker count
    workers: int | None = None
    metrics: str | None = None  # HOST:PORT to serve /metrics on; None: off
    log_format: str = "text"  # text | json
    source: str = "<dict>"

    def slice_count(self, workers: int) -> int:
        """Slices to cut: the configured count, else one per worker."""
        return self.slices if self.slices is not None else workers

    def redacted_url(self) -> str:
        """The backend URL, safe to print."""
        return redact_url(self.backend_url)


def _describe(key: str, value: Any) -> str:
    return "***" if SECRET_KEY.search(key) else repr(value)


def _typed(value: Any, kind: Any, source: str, key: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"expected {names}, got {type(value).__name__} {_describe(key, value)}",
                          source=source, key=key)
    return value


def make_shard(name: str, table: Mapping[str, Any], source: str = "<dict>") -> Shard:
    """Build one shard from its settings table (``kind``/``identity`` are special keys)."""
    where = f"shards.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"expected a table of settings, got {type(table).__name__}", source=source, key=where)
    settings = {k: v for k, v in table.items() if k not in ("kind", "identity")}
    kind = table.get("kind")
    identity = table.get("identity")
    if identity is not None:
        _typed(identity, str, source, f"{where}.identity")
    if kind is not None:
        _typed(kind, str, source, f"{where}.kind")
        if kind not in KINDS:
            raise ConfigError(f"unknown shard kind {kind!r} (known: {', '.join(KINDS)})",
                              source=source, key=f"{where}.kind")
        template, required, defaults = KINDS[kind]
        _check_kind_settings(kind, settings, source, where)
        for req in required:
            if req not in settings:
                raise ConfigError(f"a {kind} shard needs {req!r}", source=source, key=f"{where}.{req}")
        settings = {**defaults, **settings}
        if "port" in settings and (isinstance(settings["port"], bool) or not isinstance(settings["port"], (int, str))
                                   or not str(settings["port"]).isdigit()):
            raise ConfigError(f"expected a port number, got {settings['port']!r}", source=source, key=f"{where}.port")
        if identity is None:
            identity = template.format(**settings)
    if identity is None:
        identity = name
    if not identity or len(identity) > MAX_IDENTITY or "\0" in identity:
        raise ConfigError(f"identity must be 1..{MAX_IDENTITY} characters without NUL", source=source,
                          key=f"{where}.identity")
    return Shard(identity=identity, name=name, settings=settings)


def _check_kind_settings(kind: str, settings: Mapping[str, Any], source: str, where: str) -> None:
    known = KIND_SETTINGS[kind]
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown setting for a {kind} shard ({hint}known: {', '.join(known)}; "
                              f"anything else for the driver goes in an options table)", source=source,
                              key=f"{where}.{key}")
    if "options" in settings and not isinstance(settings["options"], Mapping):
        raise ConfigError(f"expected a table of driver options, got {type(settings['options']).__name__}",
                          source=source, key=f"{where}.options")
    if "username" in settings and "user" in settings:
        raise ConfigError("give username or user, not both", source=source, key=f"{where}.user")


def load_shards(spec: str | os.PathLike[str] | Mapping[str, Any], *, kind: str | None = None) -> list[Shard]:
    """Shards from a TOML file path or a dict ``{name: settings}`` (the seed's shape)."""
    if isinstance(spec, Mapping):
        table = {name: ({"kind": kind, **s} if kind and isinstance(s, Mapping) else s) for name, s in spec.items()}
        return list(_shards(table, "<dict>"))
    return list(load_settings(spec).shards)


def _shards(table: Any, source: str, sets: Any = None, base: Path | None = None) -> tuple[Shard, ...]:
    """``[shards.NAME]`` tables first in file order, then the ``[[shard_sets]]`` members in order."""
    if table is not None and not isinstance(table, Mapping):
        raise ConfigError(f"expected [shards.NAME] tables, got {type(table).__name__}", source=source, key="shards")
    tables = [make_shard(str(name), settings, source) for name, settings in (table or {}).items()]
    expanded = [] if sets is None else read_sets(sets, source=source, base=base or Path(), taken=len(tables))
    if not tables and not any(s.identities for s in expanded):
        raise ConfigError("at least one shard is required ([shards.NAME] tables or [[shard_sets]])", source=source,
                          key="shards")
    return combine(tables, expanded, source=source)


def _check_ttl(ttl: Any, source: str, key: str) -> float:
    ttl = _typed(ttl, (int, float), source, key)
    if not math.isfinite(ttl) or ttl <= 0:
        raise ConfigError(f"ttl must be a positive number of seconds, got {ttl!r}", source=source, key=key)
    return float(ttl)


def _check_url(url: Any, source: str, key: str) -> str:
    _typed(url, str, source, key)
    from .backends import REGISTRY

    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in REGISTRY:
        raise ConfigError(f"not a backend URL (scheme://..., schemes: {', '.join(sorted(REGISTRY))}): "
                          f"{redact_url(url)!r}", source=source, key=key)
    return str(url)


def _positive(value: Any, source: str, key: str) -> int:
    value = _typed(value, int, source, key)
    if value < 1:
        raise ConfigError(f"must be at least 1, got {value!r}", source=source, key=key)
    return int(value)


def settings_from_mapping(data: Mapping[str, Any], source: str = "<dict>", *, base: Path | None = None) -> Settings:
    """Validate a parsed config document; a relative shard set ``file`` is taken from ``base`` (default: cwd)."""
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section (known: {', '.join(SECTIONS)})", source=source, key=section)
        spec = SECTIONS[section]
        if isinstance(spec, dict):
            if not isinstance(value, Mapping):
                raise ConfigError("expected a table", source=source, key=section)
            for k in value:
                if k not in spec:
                    raise ConfigError(f"unknown key (known: {', '.join(spec)})", source=source, key=f"{section}.{k}")
    backend, slicing, run = data.get("backend", {}), data.get("slicing", {}), data.get("run", {})
    settings = Settings(shards=_shards(data.get("shards"), source, data.get("shard_sets"), base), source=source)
    if "url" in backend:
        settings = replace(settings, backend_url=_check_url(backend["url"], source, "backend.url"))
    if "ttl" in backend:
        settings = replace(settings, ttl=_check_ttl(backend["ttl"], source, "backend.ttl"))
    if "strategy" in slicing:
        settings = replace(settings, strategy=_check_strategy(slicing["strategy"], source, "slicing.strategy"))
    if "slices" in slicing:
        settings = replace(settings, slices=_positive(slicing["slices"], source, "slicing.slices"))
    if "workers" in run:
        settings = replace(settings, workers=_positive(run["workers"], source, "run.workers"))
    if "metrics" in run:
        settings = replace(settings, metrics=_check_metrics(run["metrics"], source, "run.metrics"))
    if "log_format" in run:
        settings = replace(settings, log_format=_check_log_format(run["log_format"], source, "run.log_format"))
    return settings


def _check_metrics(value: Any, source: str, key: str) -> str:
    from .metrics import parse_address

    _typed(value, str, source, key)
    parse_address(value, source=source, key=key)
    return str(value)


def _check_log_format(value: Any, source: str, key: str) -> str:
    from .logs import FORMATS

    _typed(value, str, source, key)
    if value not in FORMATS:
        raise ConfigError(f"unknown log format {value!r} (choose from {', '.join(FORMATS)})", source=source, key=key)
    return str(value)


def _check_strategy(value: Any, source: str, key: str) -> str:
    from .slicing import STRATEGIES

    _typed(value, str, source, key)
    if value not in STRATEGIES:
        raise ConfigError(f"unknown strategy {value!r} (choose from {', '.join(STRATEGIES)})", source=source, key=key)
    return str(value)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a TOML config file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", source=source) from None
    return settings_from_mapping(data, source, base=Path(path).parent)


#: variable suffix -> (Settings field, flag, parse the text, what a good value looks like)
ENVIRONMENT: dict[str, tuple[str, str, type, str]] = {
    "BACKEND": ("backend_url", "--backend", str, "a backend URL"),
    "TTL": ("ttl", "--ttl", float, "a number of seconds"),
    "STRATEGY": ("strategy", "--strategy", str, "a strategy name"),
    "SLICES": ("slices", "--slices", int, "a whole number"),
    "WORKERS": ("workers", "--workers", int, "a whole number"),
    "METRICS": ("metrics", "--metrics", str, "HOST:PORT"),
    "LOG_FORMAT": ("log_format", "--log-format", str, "text or json"),
}


def _shown(raw: str) -> str:
    """An environment value fit for an error message: credentials masked, cut to a sane length."""
    shown = redact_url(raw)
    return repr(shown if len(shown) <= 100 else shown[:100] + "...")


def _check_field(field_: str, value: Any, source: str, key: str) -> Any:
    if field_ == "backend_url":
        return _check_url(value, source, key)
    if field_ == "ttl":
        return _check_ttl(value, source, key)
    if field_ == "strategy":
        return _check_strategy(value, source, key)
    if field_ == "metrics":
        return _check_metrics(value, source, key)
    if field_ == "log_format":
        return _check_log_format(value, source, key)
    return _positive(value, source, key)


def apply_overrides(settings: Settings, *, backend: str | None = None, ttl: float | None = None,
                    strategy: str | None = None, slices: int | None = None, workers: int | None = None,
                    metrics: str | None = None, log_format: str | None = None,
                    environ: Mapping[str, str] = os.environ) -> Settings:
    """Apply ``SHARDPREEMPT_*`` variables, then flags (given as arguments, None = not given)."""
    changes: dict[str, Any] = {}
    # Every variable set is checked, even one a flag overrides: it would break the next run without the flag.
    # An empty variable counts as unset, as shells make it easy to export one by accident.
    for suffix, (field_, _flag, parse, looks) in ENVIRONMENT.items():
        var = f"SHARDPREEMPT_{suffix}"
        raw = environ.get(var)
        if not raw:
            continue
        try:
            value = parse(raw)
        except ValueError:
            raise ConfigError(f"expected {looks}, got {_shown(raw)}", source="environment", key=var) from None
        changes[field_] = _check_field(field_, value, "environment", var)
    given = {"BACKEND": backend, "TTL": ttl, "STRATEGY": strategy, "SLICES": slices, "WORKERS": workers,
             "METRICS": metrics, "LOG_FORMAT": log_format}
    for suffix, value in given.items():
        if value is not None:
            field_, flag, _, _ = ENVIRONMENT[suffix]
            changes[field_] = _check_field(field_, value, "command line", flag)
    return replace(settings, **changes)


def to_toml(document: Mapping[str, Mapping[str, Any]]) -> str:
    """A two-level document (``{section: {key: value}}`` or ``{"shards": {name: {key: value}}}``) as TOML."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    out = []
    for section, body in document.items():
        flat = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        if flat:
            out.append(f"[{section}]\n" + "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in flat.items()))
        for name, table in body.items():
            if isinstance(table, Mapping):
                out.append(f"[{section}.{json.dumps(name)}]\n"
                           + "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in table.items()))
    return "\n".join(out)


def shard_table(shards: Sequence[Shard]) -> dict[str, dict[str, Any]]:
    """Shards as ``{identity: {name, settings}}`` with secrets included: only for the 0600 slice file."""
    return {s.identity: {"name": s.name, "settings": dict(s.settings)} for s in shards}
