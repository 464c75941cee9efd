"""The Dask HTTP servers of a job: closed, or the scheduler's on a private Unix socket.

distributed starts an HTTP server (tornado) in the scheduler and in every
worker, bokeh or not: worker lists, call stacks, worker logs, Prometheus
metrics, with no login. On a shared node loopback is not private: every
local user can connect. So every server's TCP listener is closed as soon as
the server has started, and the connections it took meanwhile with it
(:func:`dask_setup`, run by Dask as a preload: ``distributed.scheduler.preload``
and ``distributed.worker.preload``, set by :func:`preload_config`). When the
job asks for the dashboard (``hpcshare.dashboard``, ``--dashboard``):

- with no ``dashboard-address`` (the default), the scheduler's server serves
  on a Unix socket in the job's scratch folder (mode 0700, the socket 0600):
  only the job's user reaches it, through ``ssh -L 8787:SOCKET NODE``;
- with a ``dashboard-address`` (``HOST:PORT``), the scheduler's server stays
  where Dask put it, and the job warns that whoever reaches it sees the job.

Workers' servers are always closed. This module imports nothing of hpcshare
at module level: Dask imports it by name in the scheduler and workers.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

__all__ = ["SOCKET_NAME", "dask_setup", "preload_config", "socket_path"]

SOCKET_NAME = "dashboard.sock"
_KEY = "hpcshare.dashboard-socket"  # the Dask config key dask_setup reads: the socket, "" for none, "tcp"


def socket_path(scratch: str) -> str:
    """The dashboard's Unix socket in the job's scratch folder on the scheduler's host (local)."""
    return os.path.join(scratch, SOCKET_NAME)


def preload_config(dashboard: bool, address: str, scratch: str | None) -> dict[str, Any]:
    """Dask config that runs :func:`dask_setup` in the scheduler and every worker (local).

    ``dashboard`` and ``address`` are the job's settings; ``scratch`` its
    private folder on this host.
    """
    import dask

    where = ""
    if dashboard:
        where = "tcp" if address else socket_path(scratch or "")
    return {
        "distributed.scheduler.preload": [*dask.config.get("distributed.scheduler.preload", []), __name__],
        "distributed.worker.preload": [*dask.config.get("distributed.worker.preload", []), __name__],
        _KEY: where,
    }


async def dask_setup(server: Any) -> None:
    """Close ``server``'s TCP HTTP listener; serve the scheduler's on the Unix socket if asked (local).

    Runs when the server has started. A failure to close ends the job: the
    job must not run with an HTTP server nobody asked for.
    """
    import dask

    http = getattr(server, "http_server", None)
    if http is None:
        return
    where = dask.config.get(_KEY, "")
    is_scheduler = type(server).__name__ == "Scheduler"
    if is_scheduler and where == "tcp":
        return  # the user's address: Dask's listener stays (the job warns about it)
    try:
        http.stop()  # no new connections
        await http.close_all_connections()  # nor any taken while the server started
    except Exception as exc:  # pragma: no cover - tornado's own API
        _fatal(f"could not close the HTTP server of the Dask {type(server).__name__.lower()}: {exc}")
    if is_scheduler and where:
        _serve_on_socket(server, where)


def _serve_on_socket(server: Any, path: str) -> None:
    """Serve the scheduler's HTTP application on a Unix socket at ``path``, mode 0600."""
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_unix_socket

    try:
        sock = bind_unix_socket(path, mode=0o600)
    except OSError as exc:
        print(
            f"hpcshare: warning: no Dask dashboard: cannot make its Unix socket {path} ({exc.strerror}); "
            "a shorter temporary directory (TMPDIR) helps if the path is over 107 bytes",
            file=sys.stderr,
            flush=True,
        )
        return
    http = HTTPServer(server.http_application)
    http.add_socket(sock)
    http.address, http.port = path, 0  # type: ignore[attr-defined]  # what Dask reads of a service
    server.services["dashboard"] = http  # Dask stops its services when the scheduler closes


def _fatal(message: str) -> None:
    from mpi4py import MPI

    from . import ending

    print(
        f"hpcshare: error: rank {MPI.COMM_WORLD.Get_rank()} on {socket.gethostname()}: {message}",
        file=sys.stderr,
        flush=True,
    )
    ending.abort(code=1)
