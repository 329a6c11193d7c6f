"""file:// specifics beyond the contract suite: what ``renew`` checks when there is nothing to extend, and
how ``inspect`` tells held keys from records a dead holder left behind."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from shardpreempt.backends import file as file_backend
from shardpreempt.backends import file_claims
from shardpreempt.backends.file import FileBackend, lock_name
from shardpreempt.errors import LeaseLost
from shardpreempt.model import Lease


@pytest.fixture(scope="module")
def backend_name() -> str:
    """This module's backend: ``open_`` (a private lock directory per test) comes from the plugin."""
    return "file"


def test_renew_of_a_released_lease_is_lease_lost(open_: Callable[[], FileBackend]) -> None:
    """A lease its backend object released cannot be renewed, whoever holds its keys now."""
    a = open_()
    lease = a.try_acquire(["k1", "k2"], "a", 30)
    assert lease is not None
    assert a.renew(lease) == lease
    a.release(lease)
    with pytest.raises(LeaseLost, match="released"):
        a.renew(lease)


def test_renew_sees_a_lock_file_removed_or_replaced(open_: Callable[[], FileBackend]) -> None:
    """Lock files are never unlinked by shardpreempt; if one is (a cleanup job), the lock we hold no longer
    excludes anybody, and renew says so: LeaseLost "superseded" while another process may hold the new file."""
    a, b = open_(), open_()
    lease = a.try_acquire(["k2", "k1"], "a", 30)  # k1 is the first lock taken (sorted order)
    assert lease is not None
    path = a.directory / lock_name("k1")
    os.unlink(path)
    with pytest.raises(LeaseLost, match=r"superseded.*lock file"):
        a.renew(lease)
    taken = b.try_acquire(["k1"], "b", 30)  # a new file: nothing stops another holder now
    assert taken is not None
    with pytest.raises(LeaseLost, match=r"superseded.*new lock file"):
        a.renew(lease)
    a.renew(Lease((), "a", {}, 30, session=lease.session))  # no keys: whether this object holds it


def _acquire_in_a_process_that_dies(directory: str, keys: list[str]) -> None:
    """A holder that takes ``keys`` and ends without releasing them: its records stay, its locks go."""
    code = ("import os, sys; from shardpreempt.backends.file import FileBackend; "
            f"b = FileBackend('file://{directory}'); assert b.try_acquire({keys!r}, 'dead', 30); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_inspect_probes_once_per_acquire(open_: Callable[[], FileBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys taken by one acquire share one holder record: inspect reads every record but probes one lock per
    distinct record, and a held file's probe takes no lock; each key keeps its own token."""
    a, b, c = open_(), open_(), open_()
    first = a.try_acquire([f"k{i}" for i in range(100)], "a", 30)
    other = b.try_acquire(["x1", "x2"], "b", 30)
    assert first is not None and other is not None
    b.release(other)  # cleared records: free without a probe
    again = b.try_acquire(["x1"], "b", 30)
    assert again is not None and again.tokens["x1"] == 2
    probes: list[Any] = []
    real = fcntl.flock
    monkeypatch.setattr(file_claims.fcntl, "flock", lambda fd, op: (probes.append(op), real(fd, op))[1])
    seen = c.inspect([f"k{i}" for i in range(100)] + ["x1", "x2", "never"])
    assert len(probes) == 2  # one per acquire seen (a's slice by its claim, b's second acquire by its record)
    assert {seen[f"k{i}"].owner for i in range(100)} == {"a"}  # type: ignore[union-attr]
    assert [seen[f"k{i}"].token for i in range(3)] == [1, 1, 1]  # type: ignore[union-attr]
    assert seen["x1"] is not None and seen["x1"].token == 2 and seen["x1"].pid == os.getpid()
    assert seen["x2"] is None and seen["never"] is None


def test_inspect_ignores_the_records_of_a_dead_holder(open_: Callable[[], FileBackend]) -> None:
    """A holder that died left its records behind, but not its locks: inspect calls those keys free, and
    a live holder of some of them (a new record) is seen as itself."""
    a = open_()
    _acquire_in_a_process_that_dies(str(a.directory), ["d1", "d2", "d3"])
    assert a.inspect(["d1", "d2", "d3"]) == {"d1": None, "d2": None, "d3": None}
    lease = a.try_acquire(["d2"], "alive", 30)
    assert lease is not None
    seen = open_().inspect(["d1", "d2", "d3"])
    assert seen["d1"] is None and seen["d3"] is None
    assert seen["d2"] is not None and seen["d2"].owner == "alive" and seen["d2"].token == 2


def test_inspect_reads_a_big_acquire_from_its_claim(open_: Callable[[], FileBackend],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An acquire of many keys writes a claim (its keys and tokens): inspect opens its first key's lock file
    and no other, and the keys it does not cover are read one by one. Release removes the claim."""
    a, viewer = open_(), open_()
    keys = [f"c{i:03d}" for i in range(200)]
    first = a.try_acquire(keys[:100], "a", 30)
    small = a.try_acquire(keys[100:103], "a", 30)  # below CLAIM_MIN: no claim
    assert first is not None and small is not None and len(os.listdir(a.directory / "claims")) == 1
    opened: list[Any] = []
    real = os.open
    monkeypatch.setattr(file_claims.os, "open", lambda *args, **kw: (opened.append(args[0]), real(*args, **kw))[1])
    seen = viewer.inspect(keys)
    lock_files = [name for name in opened if str(name).endswith(".lock")]
    assert len(lock_files) == 1 + 100  # the claim's first key, then the 100 keys no claim covers
    assert all(seen[k] is not None and seen[k].token == first.tokens[k] for k in keys[:100])  # type: ignore[union-attr]
    assert all(seen[k] is not None and seen[k].owner == "a" for k in keys[100:103])  # type: ignore[union-attr]
    assert all(seen[k] is None for k in keys[103:])
    a.release(first)
    assert os.listdir(a.directory / "claims") == []
    assert all(h is None for h in viewer.inspect(keys[:100]).values())


def test_a_claim_left_by_a_dead_holder_does_not_stand(open_: Callable[[], FileBackend]) -> None:
    """A holder that died leaves its claim: the claim's first key is not locked, so inspect reads the keys
    one by one; a new acquire of the same first key replaces the claim, and one of other keys is seen too."""
    a = open_()
    keys = [f"d{i:03d}" for i in range(40)]
    _acquire_in_a_process_that_dies(str(a.directory), keys)
    assert os.listdir(a.directory / "claims") == [file_claims.claim_name(keys[0])]
    assert all(h is None for h in a.inspect(keys).values())
    other = a.try_acquire(keys[10:30], "b", 30)
    assert other is not None
    seen = open_().inspect(keys)
    assert [k for k in keys if seen[k] is not None] == keys[10:30]
    assert all(seen[k].token == 2 for k in keys[10:30])  # type: ignore[union-attr]
    again = a.try_acquire(keys[:10], "c", 30)  # below CLAIM_MIN, but the dead claim's first key
    assert again is not None
    seen = open_().inspect(keys)
    assert [k for k in keys if seen[k] is not None] == keys[:30]
    (a.directory / "claims" / file_claims.claim_name(keys[10])).write_text("{not json")  # a claim being written
    assert [k for k in keys if (h := open_().inspect(keys)[k]) is not None and h.owner == "b"] == keys[10:30]


def test_an_acquire_waits_out_a_probe_but_not_a_holder(open_: Callable[[], FileBackend],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another member's inspect probe (a shared lock held for an instant) does not make an acquire of a free
    key report busy; a real holder does, at once."""
    monkeypatch.setattr(file_backend, "PROBE_WAIT", 10.0)  # room for a loaded machine; a holder never waits
    a = open_()
    first = a.try_acquire(["p"], "a", 30)
    assert first is not None
    a.release(first)
    probe = os.open(a.directory / lock_name("p"), os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe, caught in the middle
        timer = threading.Timer(0.05, fcntl.flock, (probe, fcntl.LOCK_UN))
        timer.start()
        lease = open_().try_acquire(["p"], "b", 30)
        timer.join()
        assert lease is not None and lease.tokens["p"] == 2
        start = time.monotonic()
        assert open_().try_acquire(["p"], "c", 30) is None  # held: busy at once
        assert time.monotonic() - start < 5.0
    finally:
        os.close(probe)
