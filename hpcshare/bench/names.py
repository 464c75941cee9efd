"""The benchmark's names and defaults that the command line shows in its help.

Nothing here imports anything: ``hpcshare job`` builds the whole command
line on every rank, and must not load the benchmark to do so.
"""

from __future__ import annotations

__all__ = ["ALL_CONTENDERS", "CLUSTERS", "EMPTY", "LOCAL_CONTENDERS", "TINY_TASKS"]

ALL_CONTENDERS = (
    "hpcshare",
    "hpcshare-h5",
    "scatter",
    "submit",
    "memmap",
    "memmap-cold",
    "fork",
    "ray",
    "hpcshare-put",
    "ray-put",
    "unidist-put",
)
#: ``--cluster local``'s contenders: the seed pattern on a LocalCluster hpcshare did not start, and Ray
LOCAL_CONTENDERS = ("local-hpcshare", "local-submit", "local-scatter", "ray")
CLUSTERS = ("local",)  #: the clusters ``--cluster`` names (``local``: a LocalCluster of W processes)
EMPTY = ("hpcshare-empty", "local-empty")  #: the runs with a 1 MiB input: the processes alone, no data
#: --overhead: tasks of each kind, with TLS and without, unless ``--tiny-tasks`` says otherwise
TINY_TASKS = 100_000
