"""Drive the real strategy and real site clients through Flower's own legacy server loop,
in-process: ``LocalProxy`` hands each round's ``FitIns`` to a real :class:`FedviClient` (what
the simulation engine and a SuperNode do across processes), so a whole run takes a second.
Not a mock: the same strategy, client, protocol and core functions run; only the transport is
a function call."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.common import (
    Code,
    FitRes,
    GetPropertiesRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

import fedvi
from fedvi.flower.client import FedviClient
from fedvi.options import FitOptions, ServerOptions
from strategies.fedmerdel import FedMerDel
from strategies.options import StrategyOptions


class LocalProxy(ClientProxy):
    """Runs a real site client in this process; a site's exception reaches the server as an
    error reply from that node, as it does through Flower's Grid."""

    def __init__(self, node_id: int, client: FedviClient):
        super().__init__(str(node_id))
        self.node_id = node_id
        self.client = client
        self.rounds = 0

    def fit(self, ins, timeout, group_id):
        self.rounds += 1
        try:
            arrays, n, metrics = self.client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
        except Exception as exc:  # what the SuperNode sends back: the exception's text
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, f"{exc}"), Parameters([], ""), 0, {})
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(Status(Code.OK, ""), self.client.get_properties(ins.config))

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def run_protocol(strategy: FedMerDel, proxies: list[LocalProxy]) -> FedMerDel:
    """Flower's legacy ``Server`` loop over ``proxies``, one round per phase."""
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    Server(client_manager=manager, strategy=strategy).fit(strategy.num_rounds, timeout=None)
    return strategy


def write_sites(tmp_path, tables) -> list:
    paths = []
    for b, X in enumerate(tables):
        paths.append(tmp_path / f"site{b}.npy")
        np.save(paths[-1], X)
    return paths


def site_client(pid: int, node_config: dict | None = None, policy=None) -> FedviClient:
    """A site as the simulation builds it (opted in to server-sent paths) unless a
    ``node_config``/``policy`` says otherwise."""
    if policy is None and node_config is None:
        # Opted out of DP noise: the tests compare the protocol with federated_fit exactly.
        policy = fedvi.SitePolicy(allow_server_paths=True, dp_epsilon=None)
    return FedviClient({"partition-id": pid, **(node_config or {})}, RecordDict(), policy)


def proxies_for(n: int, cls=LocalProxy, policies=None) -> list[LocalProxy]:
    policies = policies or [None] * n
    return [cls(1000 + b, site_client(b, policy=policies[b])) for b in range(n)]


def make_strategy(paths, tmp_path, spec=None, fit=None, server=None, options=None, **kw):
    """A strategy for the site files ``paths`` (sent to the sites as the simulation does)."""
    return FedMerDel(
        spec or fedvi.MixtureSpec(n_components=12),
        fit or FitOptions(),
        server or ServerOptions(),
        options or StrategyOptions(wait_for_sites=5),
        range(len(paths)),
        seed=7,
        sim_paths={
            "sim.data_paths": [str(p) for p in paths],
            "sim.output_dir": str(tmp_path / "labels"),
        },
        **kw,
    )
