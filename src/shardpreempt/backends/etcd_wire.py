"""What the etcd JSON gateway speaks: base64 keys, key ranges, and its gRPC status codes in one table."""

from __future__ import annotations

import base64
import enum
import json

from ..errors import BackendProtocolError, BackendUnavailable, ConfigError

#: etcd's default ``--max-txn-ops``: the chunk size tried first once a txn was refused as too large.
DEFAULT_MAX_TXN_OPS = 128


class Code(enum.IntEnum):
    """gRPC status codes (google.golang.org/grpc/codes), as the gateway reports them in ``"code"``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: The one table of what each status means to us; codes not listed are a BackendProtocolError.
ERRORS: dict[Code, type[Exception]] = {
    Code.INVALID_ARGUMENT: ConfigError,  # a malformed request: retrying cannot help
    Code.PERMISSION_DENIED: ConfigError,  # the user lacks a role on the prefix
    Code.FAILED_PRECONDITION: ConfigError,  # e.g. authentication is not enabled on the cluster
    Code.UNAUTHENTICATED: ConfigError,  # a wrong password (an expired token is renewed before this)
    Code.DEADLINE_EXCEEDED: BackendUnavailable,
    Code.INTERNAL: BackendUnavailable,  # raft trouble, leader changes: transient
    Code.UNAVAILABLE: BackendUnavailable,
}


class TxnTooLarge(ConfigError):
    """The server refused a txn for its number of operations or its size; smaller chunks may pass."""


#: Server messages that mean "the same work in smaller txns would be accepted".
TOO_LARGE = ("too many operations in txn request", "request is too large",  # the server's own checks
             "received message larger than max")  # gRPC's: --max-request-bytes plus 512 KiB


def b64(data: bytes) -> str:
    """``data`` as the gateway's base64 text."""
    return base64.b64encode(data).decode("ascii")


def unb64(data: str) -> bytes:
    """The bytes of the gateway's base64 text."""
    return base64.b64decode(data)


def range_end(prefix: bytes) -> bytes:
    """The smallest key above every key starting with ``prefix`` (which must not end in 0xff)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def code_of(exc: BaseException) -> Code | None:
    """The gRPC status code in an etcd3gw exception's JSON body, if there is one."""
    try:
        return Code(int(json.loads(getattr(exc, "detail_text", None) or "{}").get("code")))
    except (ValueError, TypeError, AttributeError):
        return None


def message_of(exc: BaseException | None) -> str:
    """The server's message in an etcd3gw exception (its JSON ``message``), else the exception's text."""
    text = getattr(exc, "detail_text", None) or str(exc)
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return str(text)[:200]


def translate(code: Code | None, text: str, source: str, *, server_error: bool = False) -> Exception:
    """The project's error for a gateway error with status ``code`` and message ``text`` (an HTTP 500
    without a known code, ``server_error``, counts as transient)."""
    if any(marker in text for marker in TOO_LARGE):
        return TxnTooLarge(f"{text}: raise the server's --max-txn-ops / --max-request-bytes", source=source)
    kind = ERRORS.get(code, BackendProtocolError) if code is not None else BackendProtocolError
    if "authentication" in text:
        kind = ConfigError
    elif server_error and kind is BackendProtocolError:
        kind = BackendUnavailable
    if kind is ConfigError:
        return ConfigError(f"etcd refused the request: {text}", source=source)
    return kind(f"etcd at {source}: {text}")
