"""Placement: every input read once per node into a shared window, before Dask starts.

One module per concern; only the names below are used outside this package:

- ``steps``: :func:`place_inputs` and its six named steps (collective on world);
- ``plan``: the read plan, pure (which node reads which share, which reader which pieces);
- ``reading``: this rank's reads into the window, a function source's write;
- ``broadcast``: the broadcast of shares between node leaders;
- ``progress``: the clock, the progress, waiting and summary lines;
- ``results``: :class:`Placement`, :class:`PlacementStats` and the other results.
"""

from __future__ import annotations

from .results import PlacedInput, Placement, PlacementStats, RankStats
from .steps import place_inputs

__all__ = ["PlacedInput", "Placement", "PlacementStats", "RankStats", "place_inputs"]
