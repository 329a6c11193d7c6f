"""Config files, dicts, environment and flags become validated settings or one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardpreempt import ConfigError, load_settings, load_shards
from shardpreempt.config import apply_overrides

GOOD = """
[backend]
url = "file:///tmp/x"
ttl = 5

[slicing]
strategy = "rendezvous"
slices = 4

[shards.db1]
kind = "mysql"
host = "127.0.0.1"
port = 3306
username = "hello"
password = "world"
database = "db1"

[shards.tenant-42]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shards.toml"
    path.write_text(text)
    return path


def test_good_config_gives_identities_and_settings(tmp_path: Path) -> None:
    """A valid file yields the seed's mysql identity template and plain names otherwise."""
    s = load_settings(write(tmp_path, GOOD))
    assert [x.identity for x in s.shards] == ["mysql:host=127.0.0.1;port=3306;dbname=db1", "tenant-42"]
    assert (s.backend_url, s.ttl, s.strategy, s.slices) == ("file:///tmp/x", 5.0, "rendezvous", 4)
    assert "world" not in repr(s.shards[0]) and s.shards[0].settings["password"] == "world"


def test_seed_dict_shape_is_accepted() -> None:
    """The seed's PHP array shape, as a dict, gives mysql shards."""
    shards = load_shards({"db1": {"host": "127.0.0.1", "port": "3306", "username": "hello", "password": "world",
                                  "database": "db1"}}, kind="mysql")
    assert shards[0].identity == "mysql:host=127.0.0.1;port=3306;dbname=db1"


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("[shards.a]\n[backend]\nttl = -1\n", "backend.ttl", "positive"),
    ("[shards.a]\n[backend]\nttl = 'x'\n", "backend.ttl", "expected"),
    ("[shards.a]\n[backend]\nurl = 'nope'\n", "backend.url", "not a backend URL"),
    ("[shards.a]\n[backend]\nurl = 'ftp://x'\n", "backend.url", "not a backend URL"),
    ("[shards.a]\n[backend]\ncolour = 1\n", "backend.colour", "unknown key"),
    ("[shards.a]\n[extra]\n", "extra", "unknown section"),
    ("[backend]\nttl = 3\n", "shards", "at least one shard"),
    ("[shards]\n", "shards", "at least one shard"),
    ("[shards.a]\nidentity = 'x'\n[shards.b]\nidentity = 'x'\n", "shards.b", "duplicate identity"),
    ("[shards.a]\nkind = 'mysql'\nhost = 'h'\n", "shards.a.database", "needs"),
    ("[shards.a]\nkind = 'oracle'\n", "shards.a.kind", "unknown shard kind"),
    ("[shards.a]\n[slicing]\nslices = 0\n", "slicing.slices", "at least 1"),
    ("[shards.a]\n[slicing]\nstrategy = 'random'\n", "slicing.strategy", "unknown strategy"),
    ("[shards.a]\nkind = 'mysql'\nhost = 'h'\ndatabase = 'd'\nport = 'abc'\n", "shards.a.port", "port"),
])
def test_bad_input_names_the_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    """Each kind of bad input is a ConfigError naming the file and the key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.source == str(path) and info.value.key == key
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    """TOML syntax errors and missing files name the file."""
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_settings(write(tmp_path, "[shards.a\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml")


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    """A wrongly typed secret is reported without its value, and URL passwords are redacted."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[shards.a]\nidentity = 7\npassword = 'hunter2'\n"))
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[shards.a]\n[backend]\nurl = 'ftp://u:hunter2@h/'\n"))
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_environment_then_flags_override_the_file(tmp_path: Path) -> None:
    """SHARDPREEMPT_* variables override the file and flags override both."""
    s = load_settings(write(tmp_path, GOOD))
    env = {"SHARDPREEMPT_TTL": "7", "SHARDPREEMPT_BACKEND": "memory://x"}
    assert apply_overrides(s, environ=env).ttl == 7.0
    t = apply_overrides(s, ttl=9, environ=env)
    assert (t.ttl, t.backend_url) == (9.0, "memory://x")
    with pytest.raises(ConfigError, match="SHARDPREEMPT_TTL"):
        apply_overrides(s, environ={"SHARDPREEMPT_TTL": "soon"})
    with pytest.raises(ConfigError, match="--ttl"):
        apply_overrides(s, ttl=-2, environ={})
