"""Config files, dicts, environment and flags become validated settings or one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardpreempt import ConfigError, load_settings, load_shards
from shardpreempt.config import KIND_SETTINGS, Settings, apply_overrides
from shardpreempt.model import Shard

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
    ("[shards.a]\nkind = 'mysql'\nhost = 'h'\ndatabase = 'd'\nprot = 1\n", "shards.a.prot", "unknown setting"),
    ("shards = 3\n", "shards", "expected [shards.NAME] tables"),
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


@pytest.mark.parametrize(("kind", "table", "key", "hint"), [
    ("mysql", "host = 'h'\ndatabase = 'd'\nprot = 3306\n", "prot", "did you mean 'port'?"),
    ("mysql", "host = 'h'\ndatabase = 'd'\npasword = 'hunter2'\n", "pasword", "did you mean 'password'?"),
    ("postgresql", "host = 'h'\ndatabase = 'd'\nsslmode = 'require'\n", "sslmode", ""),
    ("postgresql", "host = 'h'\ndatabse = 'd'\n", "databse", "did you mean 'database'?"),
    ("sqlite", "path = '/x.db'\nhost = 'h'\n", "host", ""),
])
def test_unknown_setting_of_a_kind_names_the_key_and_the_known_ones(tmp_path: Path, kind: str, table: str, key: str,
                                                                    hint: str) -> None:
    """A typo in a kinded shard's settings is rejected naming the key, the known settings and never a value."""
    path = write(tmp_path, f"[shards.a]\nkind = '{kind}'\n{table}")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert info.value.key == f"shards.a.{key}" and f"unknown setting for a {kind} shard" in message
    assert f"known: {', '.join(KIND_SETTINGS[kind])}" in message and hint in message and "options" in message
    assert "hunter2" not in message and "\n" not in message


def test_options_table_carries_driver_extras(tmp_path: Path) -> None:
    """Driver extras go in an options table, kept as written and left out of the identity."""
    path = write(tmp_path, "[shards.a]\nkind = 'mysql'\nhost = 'h'\ndatabase = 'd'\nuser = 'u'\n"
                           "[shards.a.options]\ncharset = 'utf8mb4'\nssl_password = 'hunter2'\n")
    shard = load_settings(path).shards[0]
    assert shard.identity == "mysql:host=h;port=3306;dbname=d"
    assert shard.settings["options"] == {"charset": "utf8mb4", "ssl_password": "hunter2"}
    assert "hunter2" not in repr(shard)


@pytest.mark.parametrize(("table", "key", "fragment"), [
    ("options = 'charset=utf8'\n", "shards.a.options", "expected a table of driver options"),
    ("username = 'u'\nuser = 'v'\n", "shards.a.user", "username or user, not both"),
])
def test_options_must_be_a_table_and_user_given_once(tmp_path: Path, table: str, key: str, fragment: str) -> None:
    """A non-table options and both username and user are each rejected naming the key."""
    path = write(tmp_path, f"[shards.a]\nkind = 'postgresql'\nhost = 'h'\ndatabase = 'd'\n{table}")
    with pytest.raises(ConfigError, match=fragment) as info:
        load_settings(path)
    assert info.value.key == key


def test_every_kind_has_its_known_settings() -> None:
    """Each shard kind declares which settings it accepts, its required ones among them."""
    from shardpreempt.config import KINDS

    assert set(KIND_SETTINGS) == set(KINDS)
    for kind, (_, required, defaults) in KINDS.items():
        assert set(required) | set(defaults) <= set(KIND_SETTINGS[kind]) and "options" in KIND_SETTINGS[kind]


BASE = Settings(shards=(Shard("a"),))


@pytest.mark.parametrize(("var", "value", "fragment"), [
    ("SHARDPREEMPT_BACKEND", "nonsense", "not a backend URL"),
    ("SHARDPREEMPT_BACKEND", "ftp://h/", "not a backend URL"),
    ("SHARDPREEMPT_TTL", "-1", "positive"),
    ("SHARDPREEMPT_TTL", "0", "positive"),
    ("SHARDPREEMPT_TTL", "nan", "positive"),
    ("SHARDPREEMPT_TTL", "inf", "positive"),
    ("SHARDPREEMPT_TTL", "soon", "expected a number of seconds, got 'soon'"),
    ("SHARDPREEMPT_STRATEGY", "random", "unknown strategy"),
    ("SHARDPREEMPT_SLICES", "0", "at least 1"),
    ("SHARDPREEMPT_SLICES", "1.5", "expected a whole number, got '1.5'"),
    ("SHARDPREEMPT_WORKERS", "-2", "at least 1"),
    ("SHARDPREEMPT_WORKERS", "many", "expected a whole number"),
])
def test_bad_environment_value_names_the_variable(var: str, value: str, fragment: str) -> None:
    """Every SHARDPREEMPT_* variable, when bad, is one ConfigError naming that variable."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, environ={var: value})
    assert (info.value.source, info.value.key) == ("environment", var)
    assert str(info.value).startswith(f"environment: {var}: ") and fragment in str(info.value)


@pytest.mark.parametrize(("var", "value"), [
    ("SHARDPREEMPT_BACKEND", "ftp://u:hunter2@h/"),
    ("SHARDPREEMPT_BACKEND", "mysql//u:hun?ter2@h/"),
    ("SHARDPREEMPT_BACKEND", "ftp://u:hun/ter2@h:1/0?x"),
    ("SHARDPREEMPT_BACKEND", "nonsense?password=hunter2"),
    ("SHARDPREEMPT_TTL", "u:hunter2@h"),
    ("SHARDPREEMPT_SLICES", "password=hunter2"),
])
def test_bad_environment_value_never_echoes_a_password(var: str, value: str) -> None:
    """Whatever variable holds it, a credential in a rejected value is masked in the error."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, environ={var: value})
    assert "hunter2" not in str(info.value) and "ter2" not in str(info.value)


def test_empty_environment_variable_counts_as_unset() -> None:
    """An exported but empty SHARDPREEMPT_* variable leaves the file's value alone."""
    assert apply_overrides(BASE, environ={"SHARDPREEMPT_TTL": "", "SHARDPREEMPT_BACKEND": ""}) == BASE


def test_bad_environment_value_is_reported_even_under_a_good_flag() -> None:
    """A bad variable is an error even when a flag overrides it, so the next run without the flag is not surprised."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, ttl=5, environ={"SHARDPREEMPT_TTL": "-1"})
    assert info.value.key == "SHARDPREEMPT_TTL"


@pytest.mark.parametrize(("flag", "bad"), [
    ("--backend", {"backend": "nonsense"}),
    ("--ttl", {"ttl": 0}),
    ("--strategy", {"strategy": "random"}),
    ("--slices", {"slices": 0}),
    ("--workers", {"workers": 0}),
])
def test_flag_error_names_the_one_flag_that_is_wrong(flag: str, bad: dict[str, object]) -> None:
    """With every other flag and variable good, the error names exactly the bad flag."""
    good: dict[str, object] = {"backend": "memory://x", "ttl": 5.0, "strategy": "contiguous", "slices": 2,
                               "workers": 3}
    env = {"SHARDPREEMPT_TTL": "7", "SHARDPREEMPT_SLICES": "4"}
    with pytest.raises(ConfigError) as info:
        apply_overrides(BASE, environ=env, **{**good, **bad})  # type: ignore[arg-type]
    assert (info.value.source, info.value.key) == ("command line", flag)
    others = [f for f in ("--backend", "--ttl", "--strategy", "--slices", "--workers", "SHARDPREEMPT") if f != flag]
    assert not any(other in str(info.value) for other in others)
