"""Which Flower nodes are there: waiting for the sites' nodes before pre-flight.

Nodes are anonymous to the server until pre-flight, where each says its partition id; while
waiting, new nodes are asked their id (``get_properties``) only to say who is connected: all
at once (a pool of threads), each at most :data:`PROBE_SECONDS`, so that the wait does not grow
with the number of nodes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from logging import INFO

from flwr.common import GetPropertiesIns
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from fedvi.protocol import K_SITE

#: Seconds a node has to say its partition id while the server waits for sites.
PROBE_SECONDS = 10.0
#: Nodes asked at once.
PROBE_THREADS = 32


def identify(proxy: ClientProxy) -> int | None:
    """The partition id a node says it has (for progress lines only; pre-flight decides)."""
    try:
        res = proxy.get_properties(GetPropertiesIns({}), timeout=PROBE_SECONDS, group_id=None)
        return int(res.properties[K_SITE])
    except Exception:  # a node that cannot say: shown by node id only
        return None


def wait_for_sites(client_manager: ClientManager, expected, seconds: float) -> None:
    """Wait until as many nodes as ``expected`` sites are connected, or ``seconds``; every
    10 s a progress line names the connected sites (and their nodes) and the missing ones."""
    deadline = time.monotonic() + seconds
    last = time.monotonic()
    known: dict[str, int | None] = {}
    while len(nodes := client_manager.all()) < len(expected):
        if time.monotonic() >= deadline:
            break
        if time.monotonic() - last >= 10:
            new = {cid: p for cid, p in nodes.items() if cid not in known}
            if new:
                with ThreadPoolExecutor(min(PROBE_THREADS, len(new))) as pool:
                    known.update(zip(new, pool.map(identify, new.values()), strict=True))
            present = {s: cid for cid, s in known.items() if s is not None and cid in nodes}
            log(
                INFO,
                "fedvi: waiting for sites: connected %s; missing %s (up to %.0f s more)",
                ", ".join(f"site {s} (node {c})" for s, c in sorted(present.items())) or "none",
                [s for s in expected if s not in present],
                deadline - time.monotonic(),
            )
            last = time.monotonic()
        client_manager.wait_for(
            len(nodes) + 1, timeout=min(10, max(1, deadline - time.monotonic()))
        )
