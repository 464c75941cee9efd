"""Idle, bounded waits (sync.py): the poll loop, its backoff, progress and time limit. No MPI: requests are stand-ins with a Test method."""

from __future__ import annotations

import time

import pytest


def test_an_idle_wait_reports_about_once_a_second_while_it_lasts():
    from hpcshare import sync

    class Request:  # done after 2.5 s, like a barrier the other ranks reach late
        def __init__(self):
            self.done_at = time.monotonic() + 2.5

        def Test(self):  # noqa: N802 (MPI.Request.Test)
            return time.monotonic() >= self.done_at

    ticks: list[float] = []
    sync.wait(Request(), timeout=10, on_wait=ticks.append)  # type: ignore[arg-type]
    assert len(ticks) == 2 and 1.0 <= ticks[0] < 1.5 and 2.0 <= ticks[1] < 2.5, ticks


def test_a_poll_returns_what_became_ready_and_waits_idle():
    from hpcshare import sync

    ready_at = time.monotonic() + 0.5
    cpu = time.process_time()
    got = sync.poll(lambda: "message" if time.monotonic() >= ready_at else None, timeout=5)
    assert got == "message"
    assert time.process_time() - cpu < 0.1  # half a second of waiting, not half a second of CPU


def test_a_poll_gives_up_at_its_time_limit_naming_what_it_waited_for():
    from hpcshare import WaitTimeout, sync

    start = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waited 0\.3 s for node 2's leader and gave up"):
        sync.poll(lambda: None, timeout=0.3, what="node 2's leader")
    assert 0.3 <= time.monotonic() - start < 1.0


def test_the_backoff_grows_to_its_longest_sleep_and_starts_short_after_a_reset():
    from hpcshare.sync import Backoff

    b = Backoff()
    delays = []
    for _ in range(12):
        delays.append(b.delay)
        b.sleep()
    assert delays[0] == Backoff.FIRST and delays[-1] == Backoff.LONGEST
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    b.reset()
    assert b.delay == Backoff.FIRST
