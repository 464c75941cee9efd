"""Placement's clock and its lines on world rank 0: progress, waiting, the summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dask.utils import format_bytes, format_time

from ..loaders import ArrayMeta, Source
from ..log import logger
from .results import PlacementStats

__all__ = ["PROGRESS_EVERY", "Clock", "Progress", "log_summary", "waiting_lines"]

PROGRESS_EVERY = 1.0  #: seconds between progress lines, at least


class Progress:
    """Progress lines for one rank's share of a long read or broadcast, at most one per second."""

    def __init__(self, what: str, total: int, enabled: bool, whose: str = "of this rank's") -> None:
        self.what, self.total, self.enabled, self.whose = what, total, enabled, whose
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and self.total and now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info(
                f"{self.what}: {format_bytes(self.done)} {self.whose} {format_bytes(self.total)} "
                f"({100 * self.done / self.total:.0f}%, {format_bytes(int(rate))}/s)"
            )


class Clock:
    """Seconds per step (world rank 0's figures are the ones reported) and this rank's own work."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.steps: dict[str, float] = {}
        self.own = 0.0  # seconds of this rank's own reading, filling and sending
        self.cpu = time.process_time()
        self.file_bytes = 0  # bytes of file inputs this rank read (what its reads asked for)
        self.rchar = 0  # bytes this process read while filling, by /proc/self/io
        self.broadcast_bytes = 0  # bytes this rank received from other nodes' leaders

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = now - self.mark
        self.mark = now

    def own_done(self) -> None:
        """This rank finished its own part of the current step; the rest is waiting."""
        self.own += time.perf_counter() - self.mark

    def restart_cpu(self) -> None:
        self.cpu = time.process_time()

    def cpu_used(self) -> float:
        return time.process_time() - self.cpu


def waiting_lines(chatty: bool, state: Callable[[], str]) -> Callable[[float], None] | None:
    """If ``chatty``, a line for ``sync``'s ``on_wait``, about once a second while waiting (local)."""
    if not chatty:
        return None
    return lambda seconds: logger.info(f"placing: {state()} ({seconds:.0f} s)")


def log_summary(stats: PlacementStats, sources: Sequence[Source], metas: Sequence[ArrayMeta]) -> None:
    """Log placement's one-line summary: time per step, bytes broadcast and read (local)."""
    rate = stats.nbytes / max(stats.read, 1e-9)
    all_files = all(s.parallel for s in sources)
    verb = "read" if all_files else "read/written"
    parts = [
        f"allocate {format_time(stats.allocate)}",
        f"{verb} {format_time(stats.read)} at {format_bytes(int(rate))}/s",
    ]
    if stats.broadcast_bytes:
        parts.append(
            f"broadcast {format_time(stats.broadcast)}, {format_bytes(stats.broadcast_bytes)} between nodes"
        )
    files = sum(m.nbytes for src, m in zip(sources, metas, strict=True) if src.parallel)
    if files:
        parts.append(
            f"{stats.read_mode} reading: {format_bytes(stats.file_bytes)} read from files, "
            f"{stats.file_bytes / files:.2f}x the file inputs"
        )
    logger.info(
        f"placed {stats.n_inputs} input(s), {format_bytes(stats.nbytes)} per node on {stats.n_nodes} "
        f"node(s), in {format_time(stats.total)} ({'; '.join(parts)})"
    )
