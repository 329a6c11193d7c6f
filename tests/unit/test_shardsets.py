"""[[shard_sets]] add many shards at once, in a defined order, with every rule of the format enforced."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardpreempt import ConfigError, Shard, load_settings, shardsets
from shardpreempt.config import settings_from_mapping

TEMPLATE = "mysql:host=db{n}.example;port=3306;dbname=app"


def write(directory: Path, text: str, name: str = "shards.toml") -> Path:
    """Write a config file into ``directory`` and return its path."""
    path = directory / name
    path.write_text(text)
    return path


def identities(path: Path) -> list[str]:
    """The identities of the shards a config file loads, in order."""
    return [s.identity for s in load_settings(path).shards]


def test_template_takes_every_value_of_the_inclusive_range(tmp_path: Path) -> None:
    """{n} takes first..last inclusive, in ascending order, and each member is named by its identity."""
    cfg = write(tmp_path, f'[[shard_sets]]\ntemplate = "{TEMPLATE}"\nrange = [1, 3]\n')
    shards = load_settings(cfg).shards
    assert [s.identity for s in shards] == [TEMPLATE.format(n=n) for n in (1, 2, 3)]
    assert all(s.name == s.identity for s in shards)


@pytest.mark.parametrize(("template", "first", "expected"), [
    ("db{n:03d}", 9, ["db009", "db010"]),
    ("{n}", 9, ["9", "10"]),
    ("s{n:x}-{n}", 9, ["s9-9", "sa-10"]),
    ("a{{b}}{n}", 9, ["a{b}9", "a{b}10"]),
    ("t{n:+d}", -1, ["t-1", "t+0"]),
])
def test_template_formats(tmp_path: Path, template: str, first: int, expected: list[str]) -> None:
    """Format specs, several {n} fields, doubled literal braces and negative numbers all work."""
    cfg = write(tmp_path, f'[[shard_sets]]\ntemplate = "{template}"\nrange = [{first}, {first + 1}]\n')
    assert identities(cfg) == expected


def test_members_of_a_set_share_one_read_only_settings_mapping(tmp_path: Path) -> None:
    """Every member holds the same read-only mapping, and its secrets never print."""
    cfg = write(tmp_path, '[[shard_sets]]\ntemplate = "t{n}"\nrange = [1, 3]\n'
                          'settings = { username = "app", password = "hunter2" }\n')
    shards = load_settings(cfg).shards
    assert all(s.settings is shards[0].settings for s in shards)
    assert dict(shards[2].settings) == {"username": "app", "password": "hunter2"}
    with pytest.raises(TypeError):
        shards[1].settings["password"] = "x"  # type: ignore[index]
    assert "hunter2" not in repr(shards) + repr([s.public() for s in shards])


def test_set_members_behave_like_constructed_shards(tmp_path: Path) -> None:
    """A member is a frozen Shard equal to, and hashed like, one built by the constructor."""
    cfg = write(tmp_path, '[[shard_sets]]\ntemplate = "t{n}"\nrange = [1, 2]\nsettings = { token = "t0k" }\n')
    member = load_settings(cfg).shards[1]
    built = Shard("t2", "t2", {"token": "t0k"})
    assert type(member) is Shard and member == built and hash(member) == hash(built) and {member} == {built}
    assert repr(member) == repr(built) and member.public() == built.public()
    with pytest.raises(dataclasses.FrozenInstanceError):
        member.name = "other"  # type: ignore[misc]
    assert dataclasses.replace(member, name="x").settings == member.settings


def test_tables_come_first_then_sets_in_order(tmp_path: Path) -> None:
    """[shards.NAME] tables come first in file order, then each set in order, wherever the sets are written."""
    cfg = write(tmp_path, '[[shard_sets]]\ntemplate = "b{n}"\nrange = [1, 2]\n'
                          '[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 1]\n'
                          '[shards.z]\n[shards.y]\n')
    assert identities(cfg) == ["z", "y", "b1", "b2", "a1"]


def test_text_file_one_identity_per_line(tmp_path: Path) -> None:
    """Blank lines and # comment lines are skipped; whitespace around an identity is dropped."""
    (tmp_path / "list.txt").write_text("# fleet\n\n  tenant-1  \ntenant#2\r\n\n# end\n")
    cfg = write(tmp_path, '[[shard_sets]]\nfile = "list.txt"\nsettings = { region = "eu" }\n')
    shards = load_settings(cfg).shards
    assert [s.identity for s in shards] == ["tenant-1", "tenant#2"]
    assert shards[1].settings["region"] == "eu"


def test_relative_file_is_relative_to_the_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative file is found next to the config, whatever the working directory; an absolute one as given."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "list.txt").write_text("a\n")
    (tmp_path / "other.txt").write_text("b\n")
    cfg = write(tmp_path / "conf", f'[[shard_sets]]\nfile = "list.txt"\n[[shard_sets]]\nfile = '
                                   f'{json.dumps(str(tmp_path / "other.txt"))}\n')
    monkeypatch.chdir("/")
    assert identities(cfg) == ["a", "b"]


def test_mapping_without_a_file_takes_relative_files_from_base(tmp_path: Path) -> None:
    """settings_from_mapping resolves a relative file against the base it is given."""
    (tmp_path / "list.txt").write_text("a\n")
    settings = settings_from_mapping({"shard_sets": [{"file": "list.txt"}]}, base=tmp_path)
    assert [s.identity for s in settings.shards] == ["a"]


def test_json_list_of_identities(tmp_path: Path) -> None:
    """A .json file may hold a list of identities, which share the set's settings."""
    (tmp_path / "fleet.json").write_text('["x", "y"]')
    cfg = write(tmp_path, '[[shard_sets]]\nfile = "fleet.json"\nsettings = { port = 1 }\n')
    shards = load_settings(cfg).shards
    assert [s.identity for s in shards] == ["x", "y"] and shards[1].settings == {"port": 1}


def test_json_object_gives_each_member_its_own_settings_over_the_sets(tmp_path: Path) -> None:
    """In an {identity: settings} file each member's settings override the set's, key by key."""
    (tmp_path / "fleet.JSON").write_text(json.dumps({"x": {"port": 2}, "y": {"opts": {"a": 1}}}))
    cfg = write(tmp_path, '[[shard_sets]]\nfile = "fleet.JSON"\nsettings = { port = 1, user = "u" }\n')
    x, y = load_settings(cfg).shards
    assert dict(x.settings) == {"port": 2, "user": "u"} and dict(y.settings) == {"port": 1, "user": "u",
                                                                                  "opts": {"a": 1}}
    with pytest.raises(TypeError):
        x.settings["port"] = 3  # type: ignore[index]


def test_duplicate_between_a_file_and_a_table_names_both_places(tmp_path: Path) -> None:
    """A duplicate identity names the set member (file and line) and the table that has it first."""
    (tmp_path / "shards.txt").write_text("a\nb\n# c\n\nc\nd\ndb1\n")
    cfg = write(tmp_path, '[shards.db1]\n[[shard_sets]]\ntemplate = "t{n}"\nrange = [1, 2]\n'
                          '[[shard_sets]]\nfile = "shards.txt"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.key == "shard_sets[1] (file shards.txt line 7)"
    assert "duplicate identity 'db1'" in str(info.value) and "also used by shards.db1" in str(info.value)


@pytest.mark.parametrize(("text", "files", "key", "other"), [
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 5]\n[[shard_sets]]\ntemplate = "a{n:d}"\nrange = [5, 6]\n',
     {}, "shard_sets[1] (n=5)", "shard_sets[0] (n=5)"),
    ('[[shard_sets]]\nfile = "l.txt"\n', {"l.txt": "a\nb\n\na\n"}, "shard_sets[0] (file l.txt line 4)",
     "shard_sets[0] (file l.txt line 1)"),
    ('[[shard_sets]]\nfile = "l.json"\n', {"l.json": '["a", "b", "a"]'}, "shard_sets[0] (file l.json entry 3)",
     "shard_sets[0] (file l.json entry 1)"),
    ('[[shard_sets]]\nfile = "o.json"\n', {"o.json": '{"a": {}, "a": {}}'}, "shard_sets[0] (file o.json entry 2)",
     "shard_sets[0] (file o.json entry 1)"),
    ('[shards.x]\nidentity = "t1"\n[[shard_sets]]\ntemplate = "t{n}"\nrange = [0, 1]\n', {}, "shard_sets[0] (n=1)",
     "shards.x"),
    ('[[shard_sets]]\ntemplate = "{n:.0e}"\nrange = [10, 11]\n', {}, "shard_sets[0] (n=11)", "shard_sets[0] (n=10)"),
])
def test_duplicates_anywhere_name_both_places(tmp_path: Path, text: str, files: dict[str, str], key: str,
                                               other: str) -> None:
    """Duplicates within a set, between sets, in a JSON object or from a format name both occurrences."""
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert info.value.key == key and f"(also used by {other})" in str(info.value)


BAD = [
    ('shard_sets = 5\n', "shard_sets", "array of tables"),
    ('[shard_sets]\ntemplate = "a{n}"\n', "shard_sets", "array of tables"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2]\ncolour = 1\n', "shard_sets[0].colour", "unknown key"),
    ('[[shard_sets]]\nsettings = {}\n', "shard_sets[0]", "either template"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2]\nfile = "x"\n', "shard_sets[0]", "either template"),
    ('[[shard_sets]]\ntemplate = "a{n}"\n', "shard_sets[0].range", "needs range"),
    ('[[shard_sets]]\nfile = "l.txt"\nrange = [1, 2]\n', "shard_sets[0].range", "goes with template"),
    ('[[shard_sets]]\ntemplate = "db"\nrange = [1, 2]\n', "shard_sets[0].template", "must contain {n}"),
    ('[[shard_sets]]\ntemplate = "{host}{n}"\nrange = [1, 2]\n', "shard_sets[0].template", "not {host}"),
    ('[[shard_sets]]\ntemplate = "{n!r}"\nrange = [1, 2]\n', "shard_sets[0].template", "not {n!r}"),
    ('[[shard_sets]]\ntemplate = "{n.real}"\nrange = [1, 2]\n', "shard_sets[0].template", "not {n.real}"),
    ('[[shard_sets]]\ntemplate = "{n:{w}}"\nrange = [1, 2]\n', "shard_sets[0].template", "only {n}"),
    ('[[shard_sets]]\ntemplate = "a{n"\nrange = [1, 2]\n', "shard_sets[0].template", "bad template"),
    ('[[shard_sets]]\ntemplate = "a}{n}"\nrange = [1, 2]\n', "shard_sets[0].template", "bad template"),
    ('[[shard_sets]]\ntemplate = "a{n:q}"\nrange = [1, 2]\n', "shard_sets[0].template", "cannot format"),
    ('[[shard_sets]]\ntemplate = 5\nrange = [1, 2]\n', "shard_sets[0].template", "expected str"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1]\n', "shard_sets[0].range", "two integers"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2, 3]\n', "shard_sets[0].range", "two integers"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2.5]\n', "shard_sets[0].range", "two integers"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [true, 2]\n', "shard_sets[0].range", "two integers"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = "1-2"\n', "shard_sets[0].range", "two integers"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [2, 1]\n', "shard_sets[0].range", "greater than last"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 10000001]\n', "shard_sets[0].range", "more than 10,000,000"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2]\nsettings = "x"\n', "shard_sets[0].settings", "table"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2]\nsettings = { kind = "mysql" }\n',
     "shard_sets[0].settings.kind", "cannot be set"),
    ('[[shard_sets]]\ntemplate = "a{n}"\nrange = [1, 2]\nsettings = { identity = "x" }\n',
     "shard_sets[0].settings.identity", "cannot be set"),
    (f'[[shard_sets]]\ntemplate = "{"x" * 4096}{{n}}"\nrange = [1, 2]\n', "shard_sets[0] (n=1)", "1..4096"),
    ('[[shard_sets]]\ntemplate = "a\\u0000{n}"\nrange = [1, 2]\n', "shard_sets[0] (n=1)", "without NUL"),
    ('[[shard_sets]]\nfile = 5\n', "shard_sets[0].file", "expected a file path"),
    ('[[shard_sets]]\nfile = ""\n', "shard_sets[0].file", "expected a file path"),
    ('[[shard_sets]]\nfile = "missing.txt"\n', "shard_sets[0].file", "file not found: missing.txt ("),
    ('[[shard_sets]]\nfile = "."\n', "shard_sets[0].file", "is a directory"),
    ('[[shard_sets]]\nfile = "latin1.txt"\n', "shard_sets[0].file", "not UTF-8 text: latin1.txt"),
    ('[[shard_sets]]\nfile = "empty.txt"\n', "shard_sets[0].file", "no identities in empty.txt"),
    ('[[shard_sets]]\nfile = "long.txt"\n', "shard_sets[0] (file long.txt line 2)", "1..4096"),
    ('[[shard_sets]]\nfile = "syntax.json"\n', "shard_sets[0].file", "JSON syntax error in syntax.json"),
    ('[[shard_sets]]\nfile = "scalar.json"\n', "shard_sets[0].file", "list of identities or an object"),
    ('[[shard_sets]]\nfile = "empty.json"\n', "shard_sets[0].file", "no identities in empty.json"),
    ('[[shard_sets]]\nfile = "numbers.json"\n', "shard_sets[0] (file numbers.json entry 2)", "identity string"),
    ('[[shard_sets]]\nfile = "nul.json"\n', "shard_sets[0] (file nul.json entry 1)", "without NUL"),
    ('[[shard_sets]]\nfile = "blank.json"\n', "shard_sets[0] (file blank.json entry 1)", "1..4096"),
    ('[[shard_sets]]\nfile = "flat.json"\n', "shard_sets[0] (file flat.json entry 1)", "object of settings"),
    ('[[shard_sets]]\nfile = "kind.json"\n', "shard_sets[0] (file kind.json entry 1)", "cannot be set"),
    ('[[shard_sets]]\nfile = "twice.json"\n', "shard_sets[0] (file twice.json entry 1)", "'p' appears twice"),
    ("[[shard_sets]]\nfile = 'empty.json'\n[shards]\n", "shard_sets[0].file", "no identities"),
    ("shard_sets = []\n", "shards", "at least one shard"),
]
FILES = {"l.txt": "a\n", "empty.txt": "# nothing\n\n", "long.txt": "ok\n" + "x" * 4097 + "\n",
         "syntax.json": "[1,", "scalar.json": "7", "empty.json": "[]", "numbers.json": '["a", 2]',
         "nul.json": '["a\\u0000"]', "blank.json": '[""]', "flat.json": '{"a": 1}',
         "kind.json": '{"a": {"kind": "mysql"}}', "twice.json": '{"a": {"p": 1, "p": 2}}'}


@pytest.mark.parametrize(("text", "key", "fragment"), BAD)
def test_every_rule_is_one_error_naming_the_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    """Each broken rule is a ConfigError naming the config file, the entry's key and what is wrong."""
    for name, body in FILES.items():
        (tmp_path / name).write_text(body)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    path = write(tmp_path, text, "c.toml")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.source == str(path) and info.value.key == key, str(info.value)
    assert fragment in str(info.value)


def test_limit_counts_shards_over_all_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard limit applies to tables and sets together, before a set is expanded."""
    monkeypatch.setattr(shardsets, "MAX_SHARDS", 5)
    (tmp_path / "l.txt").write_text("x\ny\n")
    cfg = write(tmp_path, '[shards.a]\n[[shard_sets]]\ntemplate = "t{n}"\nrange = [1, 3]\n'
                          '[[shard_sets]]\ntemplate = "u{n}"\nrange = [1, 2]\n')
    with pytest.raises(ConfigError, match="more than 5 in all") as info:
        load_settings(cfg)
    assert info.value.key == "shard_sets[1].range"
    cfg = write(tmp_path, '[shards.a]\n[[shard_sets]]\ntemplate = "t{n}"\nrange = [1, 3]\n'
                          '[[shard_sets]]\nfile = "l.txt"\n')
    with pytest.raises(ConfigError, match="more than 5 shards in all") as info:
        load_settings(cfg)
    assert info.value.key == "shard_sets[1].file"


def test_errors_never_echo_secrets(tmp_path: Path) -> None:
    """A rejected set whose settings hold a password does not show the password."""
    cfg = write(tmp_path, '[[shard_sets]]\ntemplate = "t{n}"\nrange = [2, 1]\nsettings = { password = "hunter2" }\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "hunter2" not in str(info.value)


def test_duplicate_is_exit_status_2_on_the_command_line(tmp_path: Path) -> None:
    """shardpreempt plan on a config with a duplicate identity prints one line naming both places and exits 2."""
    cfg = write(tmp_path, '[shards.db1]\nidentity = "t1"\n[[shard_sets]]\ntemplate = "t{n}"\nrange = [1, 2]\n')
    result = subprocess.run([sys.executable, "-m", "shardpreempt", "plan", str(cfg)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "shard_sets[0] (n=1)" in result.stderr
    assert "shards.db1" in result.stderr and "Traceback" not in result.stderr


def test_a_hundred_thousand_shards_share_one_constructed_prototype(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A set's members are clones of one constructed Shard: no per-shard constructor or settings copy.

    (That is what loads 100,000 shards in about 0.06 s and 16 MB on the 2-core development machine;
    see docs/benchmarks.md. A slide back to per-shard construction runs the constructor 100,000 times.)
    """
    built = []
    original = Shard.__post_init__
    monkeypatch.setattr(Shard, "__post_init__", lambda self: (built.append(1), original(self))[1])
    cfg = write(tmp_path, f'[[shard_sets]]\ntemplate = "{TEMPLATE}"\nrange = [1, 100000]\n'
                          'settings = { username = "app", password = "x" }\n')
    shards = load_settings(cfg).shards
    assert len(shards) == 100_000 and shards[-1].identity == TEMPLATE.format(n=100_000)
    assert len(built) == 1
    assert all(type(s) is Shard for s in shards) and shards[-1].settings is shards[0].settings
    assert not hasattr(shards[-1], "__dict__")  # slots: 56 bytes a shard, not a dict each
    assert shards[-1] == Shard(TEMPLATE.format(n=100_000)) and "'x'" not in repr(shards[-1])


def test_members_are_built_the_slow_way_if_shard_changes_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should Shard gain a field the shortcut does not know, every member still comes from the constructor."""

    @dataclasses.dataclass(frozen=True)
    class Wider(Shard):
        """A Shard with one more field."""

        extra: int = 7

    monkeypatch.setattr(shardsets, "Shard", Wider)
    shards = shardsets.ShardSet(0, ["a", "b"], {"password": "x"}, str).shards()
    assert [type(s) for s in shards] == [Wider, Wider] and [s.extra for s in shards] == [7, 7]
    assert shards[1].settings == {"password": "x"}
