"""The file backend's safety properties: private directory, no symlinks, hashed names, lasting tokens."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shardpreempt import ConfigError, open_backend
from shardpreempt.backends.file import lock_name
from shardpreempt.errors import BackendError


def test_default_directory_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a path the backend uses a per-user state directory created with mode 0700."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    b = open_backend("file://")
    assert b.directory == tmp_path / "state" / "shardpreempt" / "locks"  # type: ignore[attr-defined]
    assert stat.S_IMODE(os.stat(b.directory).st_mode) == 0o700  # type: ignore[attr-defined]


def test_world_writable_or_foreign_directory_is_refused(tmp_path: Path) -> None:
    """A lock directory writable by others, owned by another user, or a symlink is a config error."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        open_backend(f"file://{open_dir}")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="symlink"):
        open_backend(f"file://{link}")
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ConfigError, match="owned by uid 65534"):
            open_backend(f"file://{foreign}")


def test_symlink_planted_at_a_lock_path_is_refused(tmp_path: Path) -> None:
    """A symlink where a lock file should be is never followed, and its target is untouched."""
    d = tmp_path / "locks"
    b = open_backend(f"file://{d}")
    target = tmp_path / "precious"
    target.write_text("keep me")
    (d / lock_name("s1")).symlink_to(target)
    with pytest.raises(BackendError, match="symlink"):
        b.try_acquire(["s0", "s1"], "me", 10)
    assert target.read_text() == "keep me"
    assert b.inspect(["s0"])["s0"] is None  # the roll-back left nothing held


def test_hostile_identities_map_to_safe_names(tmp_path: Path) -> None:
    """Keys with path separators, NUL or huge length become hashed file names inside the directory."""
    d = tmp_path / "locks"
    b = open_backend(f"file://{d}")
    keys = ["../../etc/passwd", "a/b", "nul\0byte", "x" * 100_000]
    lease = b.try_acquire(keys, "me", 10)
    assert lease is not None
    names = sorted(os.listdir(d))
    assert len(names) == 4 and all(len(n) == 45 and n.endswith(".lock") for n in names)
    assert all(stat.S_IMODE(os.stat(d / n).st_mode) == 0o600 for n in names)
    b.release(lease)
    assert sorted(os.listdir(d)) == names  # never unlinked


def test_tokens_survive_a_new_backend_and_release(tmp_path: Path) -> None:
    """The token lives in the lock file, so a fresh backend object continues the sequence."""
    url = f"file://{tmp_path}/locks"
    first = open_backend(url)
    lease = first.try_acquire(["t"], "a", 10)
    assert lease is not None
    first.close()
    again = open_backend(url).try_acquire(["t"], "b", 10)
    assert again is not None and again.tokens["t"] == lease.tokens["t"] + 1


def test_a_swapped_parent_cannot_redirect_lock_files(tmp_path: Path) -> None:
    """Lock files are opened relative to the directory opened at start, so renaming a parent and putting
    a symlink to another directory in its place does not move where locks are taken."""
    parent = tmp_path / "state"
    (parent / "locks").mkdir(parents=True, mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "locks").mkdir(parents=True, mode=0o700)
    backend = open_backend(f"file://{parent}/locks")
    try:
        parent.rename(tmp_path / "moved")
        parent.symlink_to(elsewhere)
        lease = backend.try_acquire(["k"], "owner", 10)
        assert lease is not None
        assert (tmp_path / "moved" / "locks" / lock_name("k")).exists()
        assert not (elsewhere / "locks" / lock_name("k")).exists()
    finally:
        backend.close()
