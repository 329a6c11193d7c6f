"""Who holds ``file://`` keys, read per acquire rather than per key where the holders wrote claims.

An acquire of at least ``CLAIM_MIN`` keys writes, after its lock records and while it holds every lock, one
claim file ``claims/<sha256(first key)[:40]>.claim`` (its first key in lock order) with its holder record and
every key with its token; its release removes the claim before unlocking, and the next acquire of the same
first key overwrites one that a holder which died left behind. A claim stands while the lock file of its
first key is locked and holds the same holder record: the acquire holds all its keys or none (locked all or
none, released together, closed together when the holder and whatever inherited its descriptors end).

``inspect`` lists the claims and checks each with one probe and one read of its first key's lock file. The
keys no standing claim covers (small acquires, holders of an older version, claims being rewritten) are read
one by one: one ``open``, ``pread`` and ``close`` each, and one probe per distinct holder record (the keys
of one acquire share it). A probe is a non-blocking shared ``flock``: on a held file it takes nothing; only
on the first key of a record or claim that a dead holder left does it take a shared lock for an instant (an
acquire racing with it may fail once, and is retried).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from typing import Any

from ..errors import BackendError, BackendProtocolError
from ..model import Holder
from .file_layout import RECORD_SIZE, lock_name

CLAIM_MIN = 16  # acquires of fewer keys write no claim: reading their keys one by one is cheap
CLAIMS = "claims"  # the claims' directory, inside the lock directory
READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_claims(dir_fd: int, *, create: bool) -> int | None:
    """A descriptor of the claims directory (created 0700 with ``create``), or None where there is none;
    BackendError for one that is a symlink, not ours or shared (its claims would not be trusted)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(CLAIMS, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(CLAIMS, READ | os.O_DIRECTORY, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BackendError(f"cannot open the claims directory: {exc.strerror}") from exc
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise BackendError("refusing the claims directory: not a private directory of ours")
    return fd


def claim_name(first: str) -> str:
    """The claim file of the acquire whose first key in lock order is ``first``."""
    return lock_name(first)[:-5] + ".claim"


def write(claims_fd: int, holder: str, keys: Sequence[str], tokens: Sequence[int]) -> str:
    """Write the claim of an acquire (``keys`` in lock order, holding all of them now); its file name."""
    name = claim_name(keys[0])
    body = json.dumps({"holder": holder, "keys": list(keys), "tokens": list(tokens)}, separators=(",", ":"))
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=claims_fd)
    try:
        view = memoryview(body.encode("ascii"))
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return name


def remove(claims_fd: int, name: str) -> None:
    """Remove a claim (before its acquire unlocks: nobody else can write that name meanwhile)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=claims_fd)


def inspect(dir_fd: int, keys: Sequence[str]) -> dict[str, Holder | None]:
    """The holder of every key: from the standing claims, then key by key for the rest."""
    out: dict[str, Holder | None] = dict.fromkeys(keys)
    covered: set[str] = set()
    for holder, claimed, tokens in _standing(dir_fd):
        info = json.loads(holder)
        shared: dict[int, Holder] = {}  # token -> Holder: keys taken as often share a token
        for key, token in zip(claimed, tokens, strict=True):
            if key in out:
                if (h := shared.get(token)) is None:
                    h = shared[token] = Holder(info["owner"], int(token), None, info.get("pid"), info.get("host"),
                                               info.get("since"))
                out[key] = h
                covered.add(key)
    _read_each(dir_fd, [k for k in out if k not in covered] if covered else list(out), out)
    return out


def _standing(dir_fd: int) -> list[tuple[str, list[str], list[int]]]:
    """(holder record, keys, tokens) of every claim whose acquire still holds its keys."""
    try:
        claims_fd = open_claims(dir_fd, create=False)
    except BackendError:
        return []  # not trusted: every key is read one by one
    if claims_fd is None:
        return []
    out = []
    try:
        for entry in os.scandir(claims_fd):
            if not entry.name.endswith(".claim"):
                continue
            try:
                fd = os.open(entry.name, READ, dir_fd=claims_fd)
            except FileNotFoundError:
                continue  # released meanwhile
            try:
                claim = json.loads(_read_all(fd))
                holder, keys, tokens = str(claim["holder"]), list(claim["keys"]), list(claim["tokens"])
            except (ValueError, KeyError, TypeError):
                continue  # being written: its keys are read one by one
            finally:
                os.close(fd)
            if keys and len(keys) == len(tokens) and _stands(dir_fd, keys[0], holder):
                out.append((holder, keys, tokens))
    finally:
        os.close(claims_fd)
    return out


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _stands(dir_fd: int, first: str, holder: str) -> bool:
    """Whether the lock file of ``first`` is locked and holds ``holder`` as its record."""
    try:
        fd = os.open(lock_name(first), READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        rest = os.pread(fd, RECORD_SIZE, 0).partition(b"\n")[2].rstrip()
        return rest == holder.encode("utf-8", "surrogatepass") and _locked(fd)
    finally:
        os.close(fd)


def _locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _read_each(dir_fd: int, keys: list[str], out: dict[str, Holder | None]) -> None:
    """The holders of ``keys`` from their own lock records, one probe per distinct holder record."""
    verdicts: dict[bytes, dict[str, Any] | None] = {}  # holder record -> its fields while held, else None
    sha256 = hashlib.sha256
    for key in keys:
        try:
            fd = os.open(sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".lock", READ,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        try:
            raw = os.pread(fd, RECORD_SIZE, 0)
            first, _, rest = raw.partition(b"\n")
            rest = rest.rstrip()
            if not rest or rest == b"{}":
                continue  # free, or being acquired: its holder has not written it yet
            if rest in verdicts:
                info = verdicts[rest]
            else:
                info = verdicts[rest] = _probe(fd, rest)
            if info is not None:
                out[key] = Holder(info["owner"], int(first), None, info.get("pid"), info.get("host"),
                                  info.get("since"))
        except ValueError as exc:
            raise BackendProtocolError(f"unreadable lock record ({raw[:40]!r})") from exc
        finally:
            os.close(fd)


def _probe(fd: int, record: bytes) -> dict[str, Any] | None:
    """The holder record's fields if its file is locked, else None; ValueError for one that is not JSON."""
    info = json.loads(record)
    if not isinstance(info, dict) or not info.get("owner"):
        return None
    return info if _locked(fd) else None
