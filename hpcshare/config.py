"""Configuration: defaults in ``hpcshare.yaml``, overridable by Dask config,
``DASK_HPCSHARE__*`` environment variables, and keyword options / CLI flags.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes

from .errors import ConfigError

__all__ = ["JobConfig"]

_fn = os.path.join(os.path.dirname(__file__), "hpcshare.yaml")
with open(_fn) as _f:
    _defaults = yaml.safe_load(_f)
dask.config.update_defaults(_defaults)

# option name -> dask config key
_KEYS = {
    "ranks_per_node": "hpcshare.ranks-per-node",
    "readers": "hpcshare.readers",
    "shm_dir": "hpcshare.shm-dir",
    "shm_headroom": "hpcshare.shm-headroom",
    "quiet": "hpcshare.quiet",
    "timeout": "hpcshare.timeout",
    "nthreads": "hpcshare.worker.nthreads",
    "memory_limit": "hpcshare.worker.memory-limit",
    "dashboard_address": "hpcshare.dashboard-address",
    "dask_log_level": "hpcshare.dask-log-level",
}


def _positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = 0
    if out < 1 or isinstance(value, bool) or (isinstance(value, float) and value != out):
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    return out


def _bytes(name: str, value: Any) -> int:
    try:
        return int(parse_bytes(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a size like '64 MiB', got {value!r}") from exc


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Every setting of one job, validated. Build it with :meth:`from_options`."""

    ranks_per_node: int | None = None
    readers: int | None = None  # None: auto
    shm_dir: str = "/dev/shm"
    shm_headroom: int = 64 * 2**20
    quiet: bool = False
    timeout: float = 120.0
    nthreads: int = 1
    memory_limit: int | None = None  # None: auto
    dashboard_address: str = ":8787"
    dask_log_level: str = "warning"

    @classmethod
    def from_options(cls, **options: Any) -> JobConfig:
        """Merge keyword options over the Dask config (local).

        An option given as ``None`` falls back to the config value.
        """
        unknown = sorted(set(options) - set(_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(_KEYS))}"
            )
        raw: dict[str, Any] = {}
        for opt, key in _KEYS.items():
            value = options.get(opt)
            raw[opt] = dask.config.get(key) if value is None else value
        return cls._validate(raw)

    @classmethod
    def _validate(cls, raw: Mapping[str, Any]) -> JobConfig:
        readers = raw["readers"]
        memory_limit = raw["memory_limit"]
        level = str(raw["dask_log_level"]).lower()
        if level not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(
                f"dask_log_level must be debug, info, warning, error or critical, got {level!r}"
            )
        try:
            timeout = float(raw["timeout"])
        except (TypeError, ValueError):
            timeout = -1.0
        if timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {raw['timeout']!r}")
        quiet = raw["quiet"]
        if isinstance(quiet, str):
            quiet = quiet.strip().lower() in ("1", "true", "yes", "on")
        return cls(
            ranks_per_node=_positive_int("ranks_per_node", raw["ranks_per_node"], allow_none=True),
            readers=None if readers in (None, "auto") else _positive_int("readers", readers),
            shm_dir=str(raw["shm_dir"]),
            shm_headroom=_bytes("shm_headroom", raw["shm_headroom"]),
            quiet=bool(quiet),
            timeout=timeout,
            nthreads=int(_positive_int("nthreads", raw["nthreads"]) or 0),
            memory_limit=None if memory_limit in (None, "auto") else _bytes("memory_limit", memory_limit),
            dashboard_address=str(raw["dashboard_address"]),
            dask_log_level=level,
        )
