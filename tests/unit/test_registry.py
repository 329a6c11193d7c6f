"""The backend registry picks a backend by scheme and fails clearly."""

from __future__ import annotations

import pytest

from shardpreempt import ConfigError, open_backend
from shardpreempt.backends import EXTRA_MODULES
from shardpreempt.errors import MissingExtra


def test_unknown_scheme_and_non_url_are_config_errors() -> None:
    """An unknown scheme names the known ones; a non-URL is rejected."""
    with pytest.raises(ConfigError, match="known"):
        open_backend("ftp://x")
    with pytest.raises(ConfigError):
        open_backend("no-scheme")


def test_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheme whose client library is missing tells which extra to install."""
    monkeypatch.setitem(EXTRA_MODULES, "redis", "definitely_not_installed_module")
    with pytest.raises(MissingExtra, match=r"shardpreempt\[redis\]"):
        open_backend("redis://127.0.0.1:1/0")


def test_bad_and_unknown_options_are_rejected(tmp_path: object) -> None:
    """Option values of the wrong type and unknown options name the option."""
    with pytest.raises(ConfigError, match="poll"):
        open_backend("file:///tmp/x?poll=fast")
    with pytest.raises(ConfigError, match="colour"):
        open_backend("file:///tmp/x?colour=red")
    with pytest.raises(ConfigError, match="negative"):
        open_backend("file:///tmp/x?poll=-1")
