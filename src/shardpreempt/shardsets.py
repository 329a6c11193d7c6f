"""``[[shard_sets]]``: many shards at once, from an identity template over a range of numbers or from a file.

A set member's identity is also its name. The members of one set share one read-only settings mapping
and are built without running :class:`~shardpreempt.model.Shard`'s constructor for each (which copies
its settings), so that a fleet of 100,000 shards loads in a fraction of a second.
"""

from __future__ import annotations

import bisect
import gc
import json
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError
from .model import Shard, clones

#: Longest identity accepted, in characters (lock files and keys are named after identities).
MAX_IDENTITY = 4096
#: Most shards one config may hold, over all its sets: a typo in a range should fail, not exhaust memory.
MAX_SHARDS = 10_000_000
#: The keys a ``[[shard_sets]]`` entry may have.
ENTRY_KEYS = ("template", "range", "file", "settings")
#: Settings keys with a meaning of their own in ``[shards.NAME]``; in a set the identity comes from the set.
RESERVED = ("kind", "identity")


@dataclass(frozen=True)
class ShardSet:
    """One expanded ``[[shard_sets]]`` entry: its identities in order, their settings, and their origins."""

    index: int
    identities: list[str]
    #: one mapping shared by every member, or one per member (a JSON object file)
    settings: Mapping[str, Any] | list[Mapping[str, Any]]
    #: member position -> where it came from, e.g. ``shard_sets[1] (file shards.txt line 7)``
    where: Callable[[int], str]

    def shards(self) -> list[Shard]:
        """The members as shards, named by their identities."""
        return _shards_of(self.identities, self.settings)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations, restoring its previous state."""
    # Allocating a few hundred thousand containers sets off many full collections that find nothing to
    # free (nothing here is cyclic); pausing the collector cuts the load time by about a third.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _shards_of(identities: Sequence[str], settings: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Shard]:
    """Shards named by their identities, sharing one settings mapping or each taking (not copying) its own."""
    if not identities:
        return []
    proto = Shard(identities[0], identities[0], settings if isinstance(settings, Mapping) else settings[0])
    # The real constructor ran once: validated, frozen, settings read-only. The other members reuse its
    # read-only mapping (shared) or wrap their own fresh dict, which nothing else holds, without a copy.
    rest = len(identities) - 1
    proxies: Iterable[Mapping[str, Any]] = (repeat(proto.settings, rest) if isinstance(settings, Mapping)
                                            else map(MappingProxyType, settings[1:]))
    if vars(Shard).get("__slots__") != ("identity", "name", "settings"):
        # Shard has grown a field this shortcut does not know about: build every member the slow way.
        return [proto, *(Shard(i, i, s) for i, s in zip(identities[1:], proxies, strict=True))]
    # A clone is a Shard whose slots are set directly: the same frozen dataclass, equal and hashed by
    # identity and name, its repr still redacting secrets. Only the settings copy and the checks of the
    # constructor are skipped, which are most of its cost. (Slots, not an instance dict: 100,000 shards
    # take about 20 MB less, in the supervisor and in every worker forked from it.)
    rest_ids = identities[1:]
    return [proto, *clones(rest_ids, rest_ids, proxies)]


def read_sets(value: Any, *, source: str, base: Path, taken: int = 0) -> list[ShardSet]:
    """Validate and expand the ``shard_sets`` array; ``taken`` shards already come from ``[shards.NAME]``."""
    if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
        raise ConfigError("expected an array of tables ([[shard_sets]] entries)", source=source, key="shard_sets")
    sets = []
    total = taken
    with collector_paused():
        for index, entry in enumerate(value):
            shard_set = _expand(entry, index, source=source, base=base, room=MAX_SHARDS - total)
            total += len(shard_set.identities)
            sets.append(shard_set)
    return sets


def combine(tables: Sequence[Shard], sets: Sequence[ShardSet], *, source: str) -> tuple[Shard, ...]:
    """Tables first in file order, then each set in order; a duplicate identity names both of its places."""
    seen: dict[str, int] = {}
    for position, shard in enumerate(tables):
        seen.setdefault(shard.identity, position)
    expected = len(tables)
    for shard_set in sets:
        seen.update(zip(shard_set.identities, range(expected, expected + len(shard_set.identities)), strict=True))
        expected += len(shard_set.identities)
    if len(seen) != expected:  # a duplicate somewhere: find the first, slowly, to name both places
        _raise_duplicate(tables, sets, source)
    shards = list(tables)
    with collector_paused():
        for shard_set in sets:
            shards.extend(shard_set.shards())
    return tuple(shards)


def _raise_duplicate(tables: Sequence[Shard], sets: Sequence[ShardSet], source: str) -> None:
    places: list[Callable[[int], str]] = [lambda k: f"shards.{tables[k].name}"]
    starts = [0]
    blocks: list[Sequence[str]] = [[s.identity for s in tables]]
    for shard_set in sets:
        starts.append(starts[-1] + len(blocks[-1]))
        places.append(shard_set.where)
        blocks.append(shard_set.identities)

    def where(position: int) -> str:
        block = bisect.bisect_right(starts, position) - 1
        return places[block](position - starts[block])

    seen: dict[str, int] = {}
    for start, identities in zip(starts, blocks, strict=True):
        for k, identity in enumerate(identities):
            first = seen.setdefault(identity, start + k)
            if first != start + k:
                raise ConfigError(f"duplicate identity {identity!r} (also used by {where(first)})",
                                  source=source, key=where(start + k))


def _expand(entry: Mapping[str, Any], index: int, *, source: str, base: Path, room: int) -> ShardSet:
    at = f"shard_sets[{index}]"
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"unknown key (known: {', '.join(ENTRY_KEYS)})", source=source, key=f"{at}.{key}")
    shared = _settings(entry.get("settings", {}), source, f"{at}.settings")
    if ("template" in entry) == ("file" in entry):
        raise ConfigError("give either template (with range) or file", source=source, key=at)
    if "template" in entry:
        if "range" not in entry:
            raise ConfigError("a template needs range = [first, last]", source=source, key=f"{at}.range")
        lo, hi = _range(entry["range"], source, f"{at}.range", room)
        identities = _from_template(entry["template"], lo, hi, source, f"{at}.template")
        shard_set = ShardSet(index, identities, shared, lambda k: f"{at} (n={lo + k})")
    else:
        if "range" in entry:
            raise ConfigError("range goes with template, not with file", source=source, key=f"{at}.range")
        shard_set = _from_file(entry["file"], index, shared, source=source, base=base)
        if len(shard_set.identities) > room:
            raise ConfigError(f"more than {MAX_SHARDS:,} shards in all", source=source, key=f"{at}.file")
    _check_identities(shard_set, source)
    return shard_set


def _settings(value: Any, source: str, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a table of settings, got {type(value).__name__}", source=source, key=key)
    for name in RESERVED:
        if name in value:
            raise ConfigError(f"{name!r} cannot be set for set members (the identity comes from the set)",
                              source=source, key=f"{key}.{name}")
    return MappingProxyType(dict(value))


def _range(value: Any, source: str, key: str, room: int) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"expected [first, last], two integers, got {value!r:.80}", source=source, key=key)
    lo, hi = value
    if lo > hi:
        raise ConfigError(f"first ({lo}) is greater than last ({hi})", source=source, key=key)
    if hi - lo + 1 > room:
        raise ConfigError(f"{hi - lo + 1:,} shards: more than {MAX_SHARDS:,} in all", source=source, key=key)
    return lo, hi


def _from_template(template: Any, lo: int, hi: int, source: str, key: str) -> list[str]:
    if not isinstance(template, str):
        raise ConfigError(f"expected str, got {type(template).__name__}", source=source, key=key)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone { or }
        raise ConfigError(f"bad template ({exc}; write {{{{ and }}}} for literal braces)", source=source,
                          key=key) from None
    fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    if not fields:
        raise ConfigError("the template must contain {n} (or a format such as {n:03d})", source=source, key=key)
    for name, spec, conv in fields:
        if name != "n" or conv or "{" in (spec or ""):
            raise ConfigError(f"only {{n}} or {{n:FORMAT}} may be replaced, not {{{name}{'!' + conv if conv else ''}"
                              f"{':' + spec if spec else ''}}}", source=source, key=key)
    try:
        if len(fields) == 1:
            # One field: concatenating around format(n, spec) is about three times faster than str.format.
            at = next(i for i, part in enumerate(parts) if part[1] is not None)
            before, after = "".join(p[0] for p in parts[:at + 1]), "".join(p[0] for p in parts[at + 1:])
            return [before + s + after for s in map(format, range(lo, hi + 1), repeat(fields[0][1] or ""))]
        return [template.format(n=n) for n in range(lo, hi + 1)]
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"cannot format the template: {exc}", source=source, key=key) from None


def _from_file(file: Any, index: int, shared: Mapping[str, Any], *, source: str, base: Path) -> ShardSet:
    at = f"shard_sets[{index}]"
    key = f"{at}.file"
    if not isinstance(file, str) or not file:
        raise ConfigError(f"expected a file path, got {file!r:.80}", source=source, key=key)
    path = base / file  # an absolute file stays as it is
    shown = file if str(path) == file else f"{file} ({path})"
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte order mark from a Windows editor is fine
    except FileNotFoundError:
        raise ConfigError(f"file not found: {shown}", source=source, key=key) from None
    except IsADirectoryError:
        raise ConfigError(f"is a directory, not a file: {shown}", source=source, key=key) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror}", source=source, key=key) from None
    except UnicodeDecodeError:
        raise ConfigError(f"not UTF-8 text: {shown}", source=source, key=key) from None
    if path.suffix.lower() == ".json":
        return _from_json(text, index, file, shared, source)
    identities = [line for line in map(str.strip, text.split("\n")) if line and not line.startswith("#")]
    if not identities:
        raise ConfigError(f"no identities in {shown} (one per line)", source=source, key=key)

    def where(k: int) -> str:  # line numbers are found again only when an error needs one
        lines = (n for n, line in enumerate(text.split("\n"), 1) if line.strip() and not line.strip().startswith("#"))
        return f"{at} (file {file} line {next(n for i, n in enumerate(lines) if i == k)})"

    return ShardSet(index, identities, shared, where)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in order, so that a repeated key is seen, not silently dropped."""


def _plain(value: Any, where: str, source: str) -> Any:
    """A parsed JSON value with every object turned into a dict; a repeated key is an error."""
    if isinstance(value, _Pairs):
        out = {k: _plain(v, where, source) for k, v in value}
        if len(out) != len(value):
            repeated = next(k for i, (k, _) in enumerate(value) if any(k == j for j, _ in value[:i]))
            raise ConfigError(f"key {repeated!r} appears twice in one object", source=source, key=where)
        return out
    if isinstance(value, list):
        return [_plain(v, where, source) for v in value]
    return value


def _from_json(text: str, index: int, file: str, shared: Mapping[str, Any], source: str) -> ShardSet:
    at = f"shard_sets[{index}]"

    def where(k: int) -> str:
        return f"{at} (file {file} entry {k + 1})"

    try:
        data = json.loads(text, object_pairs_hook=_Pairs)
    except ValueError as exc:  # the message gives line and column, never the document's text
        raise ConfigError(f"JSON syntax error in {file}: {exc}", source=source, key=f"{at}.file") from None
    if isinstance(data, _Pairs):
        identities = [k for k, _ in data]
        settings: list[Mapping[str, Any]] = []
        for k, (_, own) in enumerate(data):
            if not isinstance(own, _Pairs):
                raise ConfigError(f"expected an object of settings, got {type(own).__name__}", source=source,
                                  key=where(k))
            own = _plain(own, where(k), source)
            for name in RESERVED:
                if name in own:
                    raise ConfigError(f"{name!r} cannot be set for set members (the identity is the key)",
                                      source=source, key=where(k))
            settings.append({**shared, **own})  # the set's settings, then the member's own on top
        if not identities:
            raise ConfigError(f"no identities in {file}", source=source, key=f"{at}.file")
        return ShardSet(index, identities, settings, where)
    if not isinstance(data, list):
        raise ConfigError(f"{file}: expected a list of identities or an object {{identity: settings}}",
                          source=source, key=f"{at}.file")
    for k, identity in enumerate(data):
        if not isinstance(identity, str):
            raise ConfigError(f"expected an identity string, got {type(identity).__name__}", source=source,
                              key=where(k))
    if not data:
        raise ConfigError(f"no identities in {file}", source=source, key=f"{at}.file")
    return ShardSet(index, data, shared, where)


def _check_identities(shard_set: ShardSet, source: str) -> None:
    ids = shard_set.identities
    # Whole-list checks run in C; only a failure walks the list in Python to say which member.
    if min(map(len, ids)) >= 1 and max(map(len, ids)) <= MAX_IDENTITY and not any(map(str.__contains__, ids,
                                                                                       repeat("\0"))):
        return
    for k, identity in enumerate(ids):
        if not identity or len(identity) > MAX_IDENTITY or "\0" in identity:
            raise ConfigError(f"identity must be 1..{MAX_IDENTITY} characters without NUL", source=source,
                              key=shard_set.where(k))
