"""Secrets never printed: one place for what counts as a secret and how it is masked.

Shard settings whose name looks secret (:data:`SECRET_KEY`), the password and secret query options of
a backend URL, and anything shaped like them inside a log line are replaced by ``***`` before they
reach a log, ``status``, an event, an error message or a metrics label.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

#: A settings key whose name matches this is a secret: never printed, logged or put in an event.
SECRET_KEY = re.compile(r"pass|secret|token|key|credential|auth|private", re.IGNORECASE)
REDACTED = "***"


def redact_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``settings`` with every secret value replaced by ``***``."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if SECRET_KEY.search(name):
            out[name] = REDACTED
        elif isinstance(value, Mapping):
            out[name] = redact_settings(value)
        else:
            out[name] = value
    return out


#: ``user:password@`` in a string that is not a URL; greedy up to the last ``@`` on the line, so an ``@`` in
#: the password cannot end it early.
USERINFO = re.compile(r"([^:/@\s]*):(.*)@")
#: ``key=value`` pairs in a string that is not a URL (query strings, ``;``-separated DSNs).
KEY_VALUE = re.compile(r"([^?&;=\s]+)=([^&;\s]*)")
#: A URL scheme (RFC 3986): anything else before ``://`` means the string is not a URL.
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _redact_pairs(text: str, separator: str) -> str:
    """``k=v`` pairs joined by ``separator``, secret values masked, credentials inside other values redacted."""
    out = []
    for pair in text.split(separator):
        key, eq, value = pair.partition("=")
        if SECRET_KEY.search(unquote_plus(key)):
            value = "***" if eq else ""  # a bare flag has no value to hide
        elif "@" in unquote_plus(value):  # a value may itself be a URL with a password (a sentinel, a proxy)
            value = redact_url(unquote_plus(value))
        out.append(f"{key}{eq}{value}")
    return separator.join(out)


def _redact_text(text: str) -> str:
    """A string that is not a URL, with anything shaped like credentials or a secret option masked."""
    text = USERINFO.sub(r"\1:***@", text)
    return KEY_VALUE.sub(lambda m: f"{m[1]}=***" if SECRET_KEY.search(m[1]) else m[0], text)


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret query option) replaced by ``***``: safe to print."""
    scheme, sep, rest = url.partition("://")
    if not sep or not SCHEME.fullmatch(scheme):
        return _redact_text(url)
    # The authority is cut at the LAST "@" before any parsing: a raw "?", "/" or "#" in a password would
    # otherwise end the authority early (as urlsplit does) and show the rest of the password as host,
    # path or query. An "@" in the path or query then over-redacts, which is the safe side to err on.
    userinfo, at, rest = rest.rpartition("@")
    shown = ""
    if at:
        user, colon, _password = userinfo.partition(":")
        if any(c in user for c in "/?#"):  # no real user name has these raw: the "@" was in a path or query
            user = "***"
        shown = f"{user}:***@" if colon else f"{user}@"
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    hostport, tail = rest[:end], rest[end:]
    tail = tail.partition("#")[0]  # a fragment is never part of a backend URL: drop it rather than judge it
    path, question, query = tail.partition("?")
    if question:
        query = _redact_pairs(query, "&")
    return f"{scheme}://{shown}{hostport}{path}{question}{query}"


_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_PAIR = re.compile(r"\b([A-Za-z_][\w.-]*)=([^\s&;,'\"]+)")


def scrub(text: str) -> str:
    """``text`` with URL credentials and the values of secret-named ``key=value`` pairs masked."""
    text = _URL.sub(lambda m: redact_url(m[0]), text)
    return _PAIR.sub(lambda m: f"{m[1]}=***" if SECRET_KEY.search(m[1]) else m[0], text)
