"""TOML file + environment + flags -> validated :class:`Settings`.

Precedence, highest first: a command-line flag, a ``SHARDPREEMPT_*`` environment variable
(``SHARDPREEMPT_BACKEND``, ``SHARDPREEMPT_TTL``, ``SHARDPREEMPT_STRATEGY``, ``SHARDPREEMPT_SLICES``,
``SHARDPREEMPT_WORKERS``), the file, the default. Every rejection is a :class:`ConfigError` naming the
file and the key; values of secret keys are never echoed.
"""

from __future__ import annotations

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

from .backends import redact_url
from .errors import ConfigError
from .model import SECRET_KEY, Shard

#: kind -> (identity template, required settings, defaults)
KINDS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "mysql": ("mysql:host={host};port={port};dbname={database}", ("host", "database"), {"port": 3306}),
    "postgresql": ("postgresql:host={host};port={port};dbname={database}", ("host", "database"), {"port": 5432}),
    "sqlite": ("sqlite:{path}", ("path",), {}),
}
MAX_IDENTITY = 4096
SECTIONS = {"backend": {"url": str, "ttl": (int, float)},
            "slicing": {"strategy": str, "slices": int},
            "run": {"workers": int},
            "shards": dict}


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, validated."""

    shards: tuple[Shard, ...]
    backend_url: str = "file://"
    ttl: float = 10.0
    strategy: str = "round-robin"
    slices: int | None = None  # None: the worker count
    workers: int | None = None
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


def load_shards(spec: str | os.PathLike[str] | Mapping[str, Any], *, kind: str | None = None) -> list[Shard]:
    """Shards from a TOML file path or a dict ``{name: settings}`` (the seed's shape)."""
    if isinstance(spec, Mapping):
        table = {name: ({"kind": kind, **s} if kind and isinstance(s, Mapping) else s) for name, s in spec.items()}
        return list(_shards(table, "<dict>"))
    return list(load_settings(spec).shards)


def _shards(table: Any, source: str) -> tuple[Shard, ...]:
    if not isinstance(table, Mapping) or not table:
        raise ConfigError("at least one shard is required ([shards.NAME] tables)", source=source, key="shards")
    shards = [make_shard(str(name), settings, source) for name, settings in table.items()]
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.identity in seen:
            raise ConfigError(f"duplicate identity {shard.identity!r} (also used by shards.{seen[shard.identity]})",
                              source=source, key=f"shards.{shard.name}")
        seen[shard.identity] = shard.name
    return tuple(shards)


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


def settings_from_mapping(data: Mapping[str, Any], source: str = "<dict>") -> Settings:
    """Validate a parsed config document."""
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
    settings = Settings(shards=_shards(data.get("shards"), source), source=source)
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
    return settings


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
    return settings_from_mapping(data, source)


def apply_overrides(settings: Settings, *, backend: str | None = None, ttl: float | None = None,
                    strategy: str | None = None, slices: int | None = None, workers: int | None = None,
                    environ: Mapping[str, str] = os.environ) -> Settings:
    """Apply ``SHARDPREEMPT_*`` variables, then flags (given as arguments, None = not given)."""
    env_values: list[tuple[str, str, Any]] = []
    for var, field_, conv in (("BACKEND", "backend_url", str), ("TTL", "ttl", float),
                              ("STRATEGY", "strategy", str), ("SLICES", "slices", int),
                              ("WORKERS", "workers", int)):
        raw = environ.get(f"SHARDPREEMPT_{var}")
        if raw:
            try:
                env_values.append((f"SHARDPREEMPT_{var}", field_, conv(raw)))
            except ValueError:
                shown = redact_url(raw) if var == "BACKEND" else raw
                raise ConfigError(f"expected {conv.__name__}, got {shown!r}", source="environment",
                                  key=f"SHARDPREEMPT_{var}") from None
    flags = [("--backend", "backend_url", backend), ("--ttl", "ttl", ttl), ("--strategy", "strategy", strategy),
             ("--slices", "slices", slices), ("--workers", "workers", workers)]
    for src, field_, value in [*env_values, *flags]:
        if value is None:
            continue
        source = "environment" if src.startswith("SHARDPREEMPT_") else "command line"
        checked: Any
        if field_ == "backend_url":
            checked = _check_url(value, source, src)
        elif field_ == "ttl":
            checked = _check_ttl(value, source, src)
        elif field_ == "strategy":
            checked = _check_strategy(value, source, src)
        else:
            checked = _positive(value, source, src)
        settings = replace(settings, **{field_: checked})
    return settings


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
