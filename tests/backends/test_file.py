"""file:// specifics beyond the contract suite: what ``renew`` checks when there is nothing to extend, and
how ``inspect`` tells held keys from records a dead holder left behind."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from shardpreempt.backends import file as file_backend
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
    monkeypatch.setattr(file_backend.fcntl, "flock", lambda fd, op: (probes.append(op), real(fd, op))[1])
    seen = c.inspect([f"k{i}" for i in range(100)] + ["x1", "x2", "never"])
    assert len(probes) == 2  # one per acquire seen (a's slice, b's second acquire), nothing taken
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
