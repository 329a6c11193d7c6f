"""The supervisor's bookkeeping of what its workers report, without forking."""

from __future__ import annotations

import os

from shardpreempt.supervisor import Supervisor


def test_the_watchdog_follows_the_ttl_a_worker_was_granted() -> None:
    """A worker that reports a granted ttl (ZooKeeper negotiates) gets a hang timeout derived from it;
    command groups reported come and go."""
    sup = Supervisor(1, lambda index, fd, parent: 0, hang_timeout=3.5, hang_from_ttl=lambda ttl: ttl * 0.35)
    slot = sup.slots[0]
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        slot.pipe = read_fd
        os.write(write_fd, b"h\nt 4.0\nc 123\nc 456\nx 123\n")
        sup._read_pipe(slot)
        assert slot.hang_timeout is not None and abs(slot.hang_timeout - 1.4) < 1e-9
        assert slot.command_pgids == {456}
    finally:
        os.close(read_fd)
        os.close(write_fd)
