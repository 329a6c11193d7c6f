"""redact_url never shows a password, whatever characters it holds, and keeps the rest of a URL readable."""

from __future__ import annotations

import pytest

from shardpreempt.redact import redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("mysql://u:p?w@db/app", "mysql://u:***@db/app"),
    ("redis://:s3cr/et@h/0", "redis://:***@h/0"),
    ("postgresql://u:p#w@h/db", "postgresql://u:***@h/db"),
    ("mysql://u:p@ss@h:3306/db", "mysql://u:***@h:3306/db"),
    ("mysql://u:a?b/c#d@e@db:3306/app?charset=utf8", "mysql://u:***@db:3306/app?charset=utf8"),
])
def test_special_characters_in_a_password_never_end_the_authority_early(url: str, shown: str) -> None:
    """A raw ?, /, # or @ in a password is redacted whole, up to the last @, and the host stays visible."""
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", [
    "file:///var/lib/shardpreempt",
    "file://",
    "memory://x",
    "redis://h:6379/0",
    "rediss://h:6380/2?ssl_cert_reqs=required",
    "etcd://h1:2379,h2:2379/prefix",
    "zookeeper://h1:2181,h2:2181/chroot",
    "postgresql://h/db?sslmode=require&connect_timeout=5",
])
def test_urls_without_secrets_are_unchanged(url: str) -> None:
    """A URL with no password and no secret option is shown exactly as written."""
    assert redact_url(url) == url


def test_ordinary_password_is_masked_and_user_kept() -> None:
    """An ordinary user:password@ shows the user and *** for the password."""
    assert redact_url("postgresql://app:hunter2@db.example:5432/app") == "postgresql://app:***@db.example:5432/app"


def test_user_without_password_is_shown() -> None:
    """A user name alone is not a secret and is shown as written."""
    assert redact_url("redis://alice@h:6379/0") == "redis://alice@h:6379/0"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pw@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
    ("redis://[fe80::1%25eth0]:6379/0", "redis://[fe80::1%25eth0]:6379/0"),
    ("mysql://u:p?w@[2001:db8::7]/app", "mysql://u:***@[2001:db8::7]/app"),
])
def test_ipv6_hosts_stay_readable(url: str, shown: str) -> None:
    """Bracketed IPv6 hosts (with ports and zone ids) are kept; only the password goes."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://h/0?prefix=x&password=zz", "redis://h/0?prefix=x&password=***"),
    ("postgresql://h/db?sslpassword=zz&sslmode=require", "postgresql://h/db?sslpassword=***&sslmode=require"),
    ("etcd://h:2379/p?token=zz&api_key=zz&auth=zz", "etcd://h:2379/p?token=***&api_key=***&auth=***"),
    ("redis://h/0?pass%77ord=zz", "redis://h/0?pass%77ord=***"),
    ("redis://h/0?secret=&x=1", "redis://h/0?secret=***&x=1"),
])
def test_secret_query_options_are_masked(url: str, shown: str) -> None:
    """Query options named like a secret (even percent-encoded) have their values replaced by ***."""
    assert redact_url(url) == shown


def test_credentials_inside_a_query_value_are_redacted() -> None:
    """A query value that is itself a URL with a password (encoded or not) has that password masked."""
    shown = redact_url("redis://h/0?sentinel=redis%3A%2F%2Fu%3Azz%40s1&x=1")
    assert "zz" not in shown and "redis://u:***@s1" in shown and shown.endswith("&x=1")


def test_fragment_is_dropped() -> None:
    """A fragment never belongs to a backend URL and is not shown."""
    assert redact_url("redis://u:pw@h/0#zz") == "redis://u:***@h/0"


def test_at_sign_in_a_query_errs_on_the_side_of_hiding() -> None:
    """An @ in the path or query is read as the end of credentials: more is hidden, nothing secret is shown."""
    assert redact_url("redis://h/0?password=zz@x") == "redis://***@x"
    assert "zz" not in redact_url("redis://h:6379/0?password=zz@x&y=1")


@pytest.mark.parametrize(("text", "shown"), [
    ("nonsense", "nonsense"),
    ("u:zz@h", "u:***@h"),
    ("u:z@z@h", "u:***@h"),
    ("redis:/h?password=zz", "redis:/h?password=***"),
    ("mysql:host=h;password=zz;dbname=d", "mysql:host=h;password=***;dbname=d"),
    ("bad scheme u:zz@h://x", "bad scheme u:***@h://x"),
])
def test_strings_that_are_not_urls_still_hide_credentials(text: str, shown: str) -> None:
    """Mistyped URLs and DSN-like strings are shown with anything credential-shaped masked."""
    assert redact_url(text) == shown


@pytest.mark.parametrize("url", [
    "mysql://u:zz?@db/app", "mysql://u:?zz@db/app", "redis://:/zz@h/0", "postgresql://u:#zz#@h/db",
    "redis://u:zz@h/0?password=zz", "mysql://u:z%40z@h/d", "redis://u:zz@", "redis://u:zz@/0", "ftp://u:zz@h/",
    "mysql://u:zz @ h/app", "zz://u:zz@h",
])
def test_password_never_appears(url: str) -> None:
    """Whatever the shape of the URL, the password characters never reach the output."""
    shown = redact_url(url)
    assert "zz" not in shown.removeprefix("zz://"), shown
