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
from dask.utils import parse_bytes, parse_timedelta

from .errors import ConfigError

__all__ = [
    "DEMO_SIZE",
    "DEMO_TASKS",
    "READ_MODES",
    "JobConfig",
    "default_timeout",
    "parse_flag",
    "positive_int",
    "seconds",
    "size_in_bytes",
]

_fn = os.path.join(os.path.dirname(__file__), "hpcshare.yaml")
with open(_fn) as _f:
    # libyaml's loader where PyYAML has it: the pure-Python one costs every rank ~20 ms at start-up
    _defaults = yaml.load(_f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
dask.config.update_defaults(_defaults)

READ_MODES = ("collective", "per-node")  # hpcshare.read
# the built-in demo job's input size and tasks (here, not in demo.py: the command line reads them before numpy loads)
DEMO_SIZE = 256 * 2**20
DEMO_TASKS = 16

# option name -> dask config key
_KEYS = {
    "ranks_per_node": "hpcshare.ranks-per-node",
    "readers": "hpcshare.readers",
    "read": "hpcshare.read",
    "shm_dir": "hpcshare.shm-dir",
    "shm_headroom": "hpcshare.shm-headroom",
    "quiet": "hpcshare.quiet",
    "timeout": "hpcshare.timeout",
    "placement_timeout": "hpcshare.placement-timeout",
    "host_timeout": "hpcshare.host-timeout",
    "nthreads": "hpcshare.worker.nthreads",
    "memory_limit": "hpcshare.worker.memory-limit",
    "dashboard": "hpcshare.dashboard",
    "dashboard_address": "hpcshare.dashboard-address",
    "tls": "hpcshare.tls",
    "interface": "hpcshare.interface",
    "dask_log_level": "hpcshare.dask-log-level",
    "prefault": "hpcshare.prefault",
}


def positive_int(name: str, value: Any) -> int:
    """``value`` as a whole number of at least 1, or a :class:`ConfigError` naming ``name`` (local)."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = 0
    if out < 1 or isinstance(value, bool) or (isinstance(value, float) and value != out):
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
    return out


def size_in_bytes(name: str, value: Any) -> int:
    """``value`` ("64 MiB", "1GiB", 4096) in bytes, or a :class:`ConfigError` naming ``name`` (local)."""
    try:
        out = int(parse_bytes(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a size like '64 MiB', got {value!r}") from exc
    if out < 0:
        raise ConfigError(f"{name} must be a size like '64 MiB', got {value!r}")
    return out


def parse_flag(value: Any) -> bool:
    """A yes/no setting from YAML, an environment variable or a keyword (local)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def seconds(name: str, value: Any) -> float:
    """A positive duration in seconds: 120, "120", "2 minutes" (local; ConfigError otherwise)."""
    try:
        out = float(parse_timedelta(value, default="seconds"))
    except (TypeError, ValueError, KeyError):
        out = -1.0
    if out <= 0:
        raise ConfigError(f"{name} must be a positive duration such as 120 or '2 minutes', got {value!r}")
    return out


def default_timeout() -> float:
    """``hpcshare.timeout`` in seconds from Dask's config, before a job's config exists (local).

    120 if it is unset or not a duration (the job's own config check then
    names the bad value).
    """
    try:
        return seconds("timeout", dask.config.get("hpcshare.timeout", 120))
    except ConfigError:
        return 120.0


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Every setting of one job, validated. Build it with :meth:`from_options`."""

    ranks_per_node: int | None = None
    readers: int | None = None  # None: auto
    read: str = "collective"  # or "per-node": how the nodes read file inputs
    shm_dir: str = "/dev/shm"
    shm_headroom: int = 64 * 2**20
    quiet: bool = False
    timeout: float = 120.0
    placement_timeout: float = 3600.0  # reading inputs, running source functions
    host_timeout: float = 60.0  # a host silent this long is lost (liveness)
    nthreads: int = 1
    memory_limit: int | None = None  # None: auto
    dashboard: bool = False  # no HTTP server at all unless asked for
    dashboard_address: str = ""  # with dashboard: "" for a Unix socket in the scratch folder, else HOST:PORT
    tls: bool = True
    interface: str | None = None  # None: loopback on one host, else the host address's interface
    dask_log_level: str = "warning"
    prefault: bool = True

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
        readers, memory_limit, rpn = raw["readers"], raw["memory_limit"], raw["ranks_per_node"]
        level = str(raw["dask_log_level"]).lower()
        if level not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(
                f"dask_log_level must be debug, info, warning, error or critical, got {level!r}"
            )
        read = str(raw["read"]).lower()
        if read not in READ_MODES:
            raise ConfigError(
                f"read must be {' or '.join(READ_MODES)}, got {raw['read']!r} "
                "(--read, config key hpcshare.read, environment DASK_HPCSHARE__READ)"
            )
        return cls(
            read=read,
            ranks_per_node=None if rpn is None else positive_int("ranks_per_node", rpn),
            readers=None if readers in (None, "auto") else positive_int("readers", readers),
            shm_dir=str(raw["shm_dir"]),
            shm_headroom=size_in_bytes("shm_headroom", raw["shm_headroom"]),
            quiet=parse_flag(raw["quiet"]),
            timeout=seconds("timeout", raw["timeout"]),
            placement_timeout=seconds("placement_timeout", raw["placement_timeout"]),
            host_timeout=seconds("host_timeout", raw["host_timeout"]),
            nthreads=positive_int("nthreads", raw["nthreads"]),
            memory_limit=None
            if memory_limit in (None, "auto")
            else size_in_bytes("memory_limit", memory_limit),
            dashboard=parse_flag(raw["dashboard"]),
            dashboard_address=str(raw["dashboard_address"] or ""),
            tls=parse_flag(raw["tls"]),
            interface=str(raw["interface"]) if raw["interface"] not in (None, "", "auto") else None,
            dask_log_level=level,
            prefault=parse_flag(raw["prefault"]),
        )
