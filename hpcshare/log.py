"""hpcshare's logger: progress and diagnostics go to ``logging.getLogger("hpcshare")``.

The library only logs. Whoever runs the job decides where the lines go: the
command line installs :func:`install_handler` (stderr, ``hpcshare: ...``), and
:func:`~hpcshare.run` installs it too when the program has configured no
logging at all, so a batch script sees the same lines as the command line.
Results and the memory report are not log lines: they go to stdout.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["install_handler", "logger"]

logger = logging.getLogger("hpcshare")


class _Handler(logging.StreamHandler):
    """stderr at the time of each line (tests and launchers may swap sys.stderr)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("hpcshare: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def install_handler(level: int = logging.INFO, *, only_if_unconfigured: bool = False) -> None:
    """Print hpcshare's log lines on stderr as ``hpcshare: message`` (local, idempotent).

    With ``only_if_unconfigured``, do nothing when the program has set up
    logging itself (a handler on the root or the ``hpcshare`` logger).
    """
    if any(isinstance(h, _Handler) for h in logger.handlers):
        return
    if only_if_unconfigured and (logger.handlers or logging.getLogger().handlers):
        return
    logger.addHandler(_Handler())
    logger.setLevel(level)
    logger.propagate = False
