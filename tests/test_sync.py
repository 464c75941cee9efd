"""Idle, bounded waits (sync.py): the poll loop, its backoff, progress and time limit. No MPI: requests are stand-ins with a Test method."""

from __future__ import annotations

import itertools
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


def test_the_backoff_polls_often_in_a_short_wait_then_less_and_starts_short_after_a_reset(monkeypatch):
    from hpcshare import sync
    from hpcshare.sync import Backoff

    clock = [100.0]  # the sleeps advance a fake clock: the test takes no time
    monkeypatch.setattr(sync.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sync.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    b = Backoff()
    delays = []
    while clock[0] - 100.0 < 3.0:
        delays.append(b.delay)
        b.sleep()
    short = [d for d, t in zip(delays, itertools.accumulate(delays)) if t <= Backoff.PATIENCE]
    assert delays[0] == Backoff.FIRST and max(short) == Backoff.SHORT == 1e-3  # a short wait: every 1 ms
    assert delays[-1] == Backoff.LONGEST == 5e-3  # a long one: every 5 ms
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    b.reset()
    assert b.delay == Backoff.FIRST
    b.sleep()
    assert b.delay == 2 * Backoff.FIRST
