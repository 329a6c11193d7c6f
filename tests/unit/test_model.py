"""Secrets stay out of reprs and URLs shown to people."""

from __future__ import annotations

from shardpreempt import Shard
from shardpreempt.redact import redact_settings, redact_url


def test_shard_repr_and_public_view_hide_secrets() -> None:
    """Password-like settings are replaced by *** in repr and in the public view."""
    shard = Shard("db1", settings={"password": "world", "api_token": "t0k", "host": "h", "nested": {"secret": "s"}})
    text = repr(shard) + repr(shard.public())
    assert "world" not in text and "t0k" not in text and "'s'" not in text and "'h'" in text


def test_redact_url_hides_password_and_secret_options() -> None:
    """A URL's password and secret query options are masked; the rest stays readable."""
    shown = redact_url("redis://user:pa55@host:6379/0?prefix=x&password=zz")
    assert "pa55" not in shown and "zz" not in shown and "user" in shown and "prefix=x" in shown
    assert redact_settings({"a": 1}) == {"a": 1}
