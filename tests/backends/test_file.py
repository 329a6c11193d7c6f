"""file:// specifics beyond the contract suite: what ``renew`` checks when there is nothing to extend."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

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
