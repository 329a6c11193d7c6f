"""The supervisor's bookkeeping of what its workers report, without forking."""

from __future__ import annotations

import os

from shardpreempt.supervisor import RestartPolicy, Supervisor


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


def test_restart_policy_restarts_at_once_then_backs_off_then_stops_a_crash_loop() -> None:
    """A first quick death restarts at once; each further one in a row waits twice as long (capped, with
    jitter); the crash_limit-th quick death in a row is a crash loop; a death after a stable run resets."""
    policy = RestartPolicy(stable_after=2.0, crash_limit=5, backoff=0.1, backoff_max=0.3, jitter=lambda: 1.0)
    deaths, delays = 0, []
    for _ in range(4):
        deaths, delay = policy.after_death(deaths, started_at=100.0, now=100.5)
        delays.append(delay)
    assert delays == [0.0, 0.1, 0.2, 0.3]  # doubling, capped at backoff_max
    assert policy.after_death(deaths, started_at=100.0, now=100.5) == (5, None)  # a crash loop
    assert policy.after_death(deaths, started_at=100.0, now=103.0) == (0, 0.0)  # ran 3 s: not a crash
    jittered = RestartPolicy(backoff=0.1, jitter=lambda: 1.2)
    assert jittered.after_death(1, started_at=0.0, now=0.1) == (2, 0.1 * 1.2)
