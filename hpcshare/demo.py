"""The built-in demo job: the seed pattern on one node-shared input.

Many CPU-bound tasks each read the whole shared array (here: a moment
``sum(x**k)`` for each task's k); the client checks every answer against
plain NumPy on its own view of the data.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DEMO_SIZE, DEMO_TASKS
from .loaders import Fill

if TYPE_CHECKING:
    from distributed import Client

    from .handles import ArrayHandle
    from .importing import MainFunction

__all__ = ["DEFAULT_SIZE", "DEFAULT_TASKS", "INPUT_NAME", "demo_input", "demo_job", "demo_main", "moment"]

DEFAULT_SIZE = DEMO_SIZE
DEFAULT_TASKS = DEMO_TASKS
INPUT_NAME = "data"
_BLOCK = 1 << 20  # elements per block: tasks never hold a private copy of the input


def demo_input(nbytes: int = DEFAULT_SIZE, seed: int = 0) -> Fill:
    """Uniform random float64 numbers, ``nbytes`` in all, written straight into shared memory."""
    n = max(nbytes // 8, 1)
    return Fill((n,), np.float64, lambda out: np.random.default_rng(seed).random(out=out))


def moment(handle: ArrayHandle, k: int) -> float:
    """``sum(x**k)`` over the whole shared input, block by block (runs in a task)."""
    x = handle.resolve().reshape(-1)
    total = 0.0
    for a in range(0, x.size, _BLOCK):
        total += float(np.sum(x[a : a + _BLOCK] ** k))
    return total


def demo_main(
    client: Client, inputs: Mapping[str, ArrayHandle], tasks: int = DEFAULT_TASKS
) -> dict[int, float]:
    """Run ``tasks`` moment tasks on the input named ``data`` and check them (client rank)."""
    if INPUT_NAME not in inputs:
        raise KeyError(f"the demo job needs an input named {INPUT_NAME!r}; got {sorted(inputs)}")
    handle = inputs[INPUT_NAME]
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    print(
        f"demo: {tasks} tasks on {workers} worker{'s' if workers != 1 else ''}, each reading all of {INPUT_NAME!r} "
        f"({handle.nbytes / 2**20:.0f} MiB, {handle.dtype}, shape {handle.shape})",
        flush=True,
    )
    ks = [1 + i % 4 for i in range(tasks)]
    t = time.perf_counter()
    futures = client.map(moment, [handle] * tasks, ks, pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - t
    view = handle.resolve()  # the client rank is on node 0 and sees the same copy
    flat = view.reshape(-1)
    step = 1 << 23  # plain NumPy, in 64 MiB blocks so the check holds no second copy
    expected = {
        k: sum(float(np.sum(flat[a : a + step] ** k)) for a in range(0, flat.size, step))
        for k in sorted(set(ks))
    }
    bad = [
        (k, got) for k, got in zip(ks, results, strict=False) if not np.isclose(got, expected[k], rtol=1e-9)
    ]
    if bad:
        k, got = bad[0]
        raise AssertionError(
            f"demo: {len(bad)} task result(s) differ from plain NumPy, e.g. sum(x**{k}) = {got}, "
            f"NumPy says {expected[k]}"
        )
    n = view.size
    for k in sorted(expected):
        print(
            f"demo: mean of x**{k} = {expected[k] / n:.6f} (uniform [0, 1) gives {1 / (k + 1):.6f})",
            flush=True,
        )
    print(f"demo: {tasks} tasks OK, all match plain NumPy; task phase {elapsed:.2f} s", flush=True)
    return {k: expected[k] for k in sorted(expected)}


def demo_job(
    inputs: Mapping[str, Any] | None, size: int = DEFAULT_SIZE, tasks: int = DEFAULT_TASKS
) -> tuple[MainFunction, dict[str, Any]]:
    """The demo's ``main`` and inputs: ``inputs`` plus, unless it names one, ``data`` of ``size`` bytes."""
    main = functools.partial(demo_main, tasks=tasks)
    return main, {INPUT_NAME: functools.partial(demo_input, size), **(inputs or {})}
