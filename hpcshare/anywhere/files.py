"""The files of a Dask cluster's shared objects: their names, and opening only our own.

Every file lives in the shared-memory directory (``hpcshare.shm-dir``) of
a group of workers (:mod:`hpcshare.anywhere.groups`):

- ``hpcshare-dask-<cluster>.group``: the group's marker (its token inside),
  held open with a shared ``flock`` by every process of the cluster in the
  group;
- ``hpcshare-dask-<cluster>-<object>``: one object (the bytes of
  :mod:`hpcshare.codec`);
- ``hpcshare-dask-<cluster>-<object>.part``: an object being written, held
  with an exclusive ``flock`` by its writer and renamed when complete.

``<cluster>`` and ``<object>`` are 32 random hex characters each, so no one
can guess a name before it exists; files are 0600 and opened with
``O_NOFOLLOW``, and a file that another user owns, or that others may
read, is refused (someone made it to read or corrupt ours). The task path:
nothing here imports MPI.
"""

from __future__ import annotations

import os
import secrets
import stat

from ..errors import HpcshareError

__all__ = [
    "GENERATION",
    "PLUGIN",
    "PREFIX",
    "cluster_of",
    "generation_of",
    "is_cluster_generation",
    "marker_path",
    "new_token",
    "object_path",
    "open_own",
    "owned_by_us",
    "part_path",
]

PREFIX = "hpcshare-dask-"  #: every file name of this path starts so (the MPI path's: hpcshare-<12 hex>-)
GENERATION = "dask-"  #: a handle whose generation starts so is resolved by the cluster's store
PLUGIN = "hpcshare-sharing"  #: the name of hpcshare's scheduler, worker and nanny plugins
_MARKER = ".group"
_PART = ".part"


def new_token() -> str:
    """32 random hex characters: a cluster's or an object's name (local)."""
    return secrets.token_hex(16)


def generation_of(cluster: str) -> str:
    """The generation of handles of ``cluster``'s objects."""
    return GENERATION + cluster


def is_cluster_generation(generation: str) -> bool:
    return generation.startswith(GENERATION)


def cluster_of(generation: str) -> str:
    return generation.removeprefix(GENERATION)


def marker_path(shm_dir: str, cluster: str) -> str:
    return os.path.join(shm_dir, f"{PREFIX}{cluster}{_MARKER}")


def object_path(shm_dir: str, cluster: str, name: str) -> str:
    return os.path.join(shm_dir, f"{PREFIX}{cluster}-{name}")


def part_path(shm_dir: str, cluster: str, name: str) -> str:
    return object_path(shm_dir, cluster, name) + _PART


def parse(entry: str) -> tuple[str, str | None, str] | None:
    """(cluster, object name or None for the marker, "marker"/"object"/"part") of a file name, or None."""
    if not entry.startswith(PREFIX):
        return None
    rest = entry[len(PREFIX) :]
    if rest.endswith(_MARKER):
        return rest[: -len(_MARKER)], None, "marker"
    cluster, sep, name = rest.partition("-")
    if not sep:
        return None
    if name.endswith(_PART):
        return cluster, name[: -len(_PART)], "part"
    return cluster, name, "object"


def owned_by_us(st: os.stat_result) -> bool:
    """A regular file of this user that nobody else may read or write."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def open_own(path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path``, which must be our own 0600 regular file (local).

    Raises ``FileNotFoundError`` when it does not exist, and
    :class:`HpcshareError` when someone else made it.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not owned_by_us(st):
        os.close(fd)
        raise HpcshareError(
            f"{path} is not hpcshare's: it is owned by uid {st.st_uid} with mode {stat.filemode(st.st_mode)}, "
            f"while hpcshare runs as uid {os.geteuid()} and makes its files 0600. Someone else made it "
            "(to read or change your data): remove it or have it removed, and tell your administrator"
        )
    return fd
