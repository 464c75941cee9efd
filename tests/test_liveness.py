"""Rank 0's side of the liveness connections: who it admits, without MPI (real sockets, real threads).

The job-level behaviour (a lost host named, cut-off ranks ending) runs on
emulated hosts in test_host_faults.py; here the listener's rules, which
another user on the network can poke at while a job starts.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from hpcshare.liveness import Liveness
from hpcshare.sync import WaitTimeout

TOKEN = secrets.token_bytes(16)


def _rank_0(timeout: float = 10.0) -> Liveness:
    config = SimpleNamespace(timeout=timeout, host_timeout=60.0)
    return Liveness(topo=SimpleNamespace(rank=0), config=config, scratch="")  # type: ignore[arg-type]


def _hello(port: int, token: bytes, rank: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(token + rank.to_bytes(4, "big"))
    return conn


def test_a_silent_stranger_does_not_hold_up_the_ranks() -> None:
    """Another user connects first and says nothing: the job's ranks are admitted at once anyway."""
    live = _rank_0(timeout=30.0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        strangers = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        ranks: list[socket.socket] = []

        def connect() -> None:
            time.sleep(0.2)  # after the strangers
            ranks.extend(_hello(port, TOKEN, r) for r in (2, 3))

        helper = threading.Thread(target=connect)
        helper.start()
        started = time.monotonic()
        live._accept(listener, TOKEN, {2, 3})
        took = time.monotonic() - started
        helper.join()
    assert sorted(live._conns) == [2, 3]
    assert took < 10, f"the ranks waited {took:.1f} s behind silent connections"
    for conn in [*strangers, *ranks, *live._conns.values()]:
        conn.close()


def test_a_wrong_secret_or_rank_is_not_admitted() -> None:
    """A hello without the job's secret, or naming a rank the job does not expect, is closed."""
    live = _rank_0(timeout=3.0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        wrong = _hello(port, secrets.token_bytes(16), 2)
        unexpected = _hello(port, TOKEN, 7)
        with pytest.raises(WaitTimeout, match=r"ranks 2: .* did not connect to rank 0 within 3 s"):
            live._accept(listener, TOKEN, {2})
    assert live._conns == {}
    for conn in (wrong, unexpected):
        conn.settimeout(5)
        assert conn.recv(1) == b"", "rank 0 kept a connection that is not one of the job's ranks"
        conn.close()
