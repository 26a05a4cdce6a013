"""Drive the real strategy through its production runner, in this process.

:class:`LocalGrid` is a Flower ``Grid`` whose nodes are real site ``ClientApp`` s
(:func:`fedvi.flower.client.make_client_app`, with its SecAgg+ mod), each with its own node
``Context`` kept between messages, as a SuperNode keeps it. :func:`run_protocol` runs a
strategy on it with :func:`strategies.workflow.run_strategy`: Flower's ``DefaultWorkflow`` with
:class:`strategies.workflow.PhaseFitWorkflow` (per-phase timeouts, SecAgg+ rounds), the same
code path as the ServerApp and the simulation. Not a mock: the same strategy, workflow, Flower
message conversion, ClientApp, protocol and core functions run; only the transport is a
function call (so a run takes a second, without the simulation engine's start-up).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace
from uuid import uuid4

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import (
    Code,
    FitRes,
    GetPropertiesRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity

import fedvi
from fedvi.flower.client import FedviClient, make_client_app
from fedvi.options import FitOptions, ServerOptions
from strategies.fedmerdel import FedMerDel
from strategies.options import StrategyOptions
from strategies.workflow import run_strategy


def phase_of(msg: Message) -> str | None:
    """The fedvi phase a message asks for (``None`` for SecAgg+ set-up stages)."""
    cfg = msg.content.config_records.get("fitins.config")
    return None if cfg is None else cfg.get("fedvi.phase")


class LocalGrid(Grid):
    """Nodes ``{node_id: (ClientApp, node_config)}`` called in process. ``after(node_id,
    phase)`` runs after a node answered a phase (a test's fault: a file that disappears);
    ``joins_after[node_id]``: seconds after the start before the node connects; ``silent``:
    nodes that never answer (a dead node). ``rounds[node_id]``: the Flower rounds it was
    asked in."""

    def __init__(self, nodes: dict, after=None, joins_after=None, silent=()):
        import time

        self._t0 = time.monotonic()
        self.apps = {nid: app for nid, (app, _) in nodes.items()}
        self.contexts = {
            nid: Context(1, nid, dict(cfg), RecordDict(), {}) for nid, (_, cfg) in nodes.items()
        }
        self.after = after
        self.joins_after = dict(joins_after or {})
        self.silent = set(silent)
        self.rounds: dict[int, set] = defaultdict(set)
        self._replies: dict[str, Message] = {}
        self._run = SimpleNamespace(run_id=1)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        import time

        now = time.monotonic() - self._t0
        return [n for n in self.apps if self.joins_after.get(n, 0) <= now]

    #: Seconds between pulls of the runner's round loop (replies are ready at once here).
    pull_interval = 0.01

    def push_messages(self, messages):
        """Deliver each message to its node now; its reply waits to be pulled."""
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            nid = msg.metadata.dst_node_id
            phase = phase_of(msg)
            if msg.metadata.message_type == "train":
                self.rounds[nid].add(msg.metadata.group_id)
            if nid in self.silent:
                continue
            try:  # the node gets its own copy, as it would after the wire's serialisation
                reply = self.apps[nid](copy.deepcopy(msg), self.contexts[nid])
            except Exception as ex:  # what the SuperNode reports: the exception's text
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[mid] = reply
            if self.after is not None and phase is not None:
                self.after(nid, phase)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def asked(self, node_id: int) -> int:
        return len(self.rounds[node_id])


def run_protocol(strategy: FedMerDel, grid: LocalGrid) -> FedMerDel:
    """Run ``strategy`` to its end on ``grid`` through the production runner (the process's
    task identity set as Flower's ServerApp runtime sets it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    run_strategy(grid, Context(1, 0, {}, RecordDict(), {}), strategy)
    return strategy


def write_sites(tmp_path, tables) -> list:
    paths = []
    for b, X in enumerate(tables):
        paths.append(tmp_path / f"site{b}.npy")
        np.save(paths[-1], X)
    return paths


def site_policy(path, tmp_path, policy=None) -> fedvi.SitePolicy:
    """A simulated site's policy: its file and output folder, as its ClientApp factory gives
    them (never the server)."""
    import dataclasses

    # Unless a test gives a policy, its sites opt out of DP noise (``dp_epsilon=None``; by
    # default a site's aggregate releases are noisy): the tests compare runs exactly.
    base = policy or fedvi.SitePolicy(dp_epsilon=None)
    return dataclasses.replace(base, data_path=str(path), output_dir=str(tmp_path / "labels"))


def grid_for(paths, tmp_path, policies=None, rngs=None, pids=None, **kw) -> LocalGrid:
    """One node ``1000 + b`` per site file (partition id ``pids[b]``, default ``b``)."""
    pids = list(range(len(paths))) if pids is None else pids
    policies = policies or [None] * len(paths)
    nodes = {}
    for b, path in enumerate(paths):
        pol = site_policy(path, tmp_path, policies[b])
        rng = None if rngs is None else rngs[b]
        app = make_client_app(lambda pid, pol=pol: pol, rng_for=lambda pid, rng=rng: rng)
        nodes[1000 + b] = (app, {"partition-id": pids[b]})
    return LocalGrid(nodes, **kw)


def make_strategy(paths, tmp_path, spec=None, fit=None, server=None, options=None, **kw):
    """A strategy for the sites ``paths`` (seed 7)."""
    return FedMerDel(
        spec or fedvi.MixtureSpec(n_components=12),
        fit or FitOptions(),
        server or ServerOptions(),
        options or StrategyOptions(wait_for_sites=5),
        range(len(paths)),
        seed=7,
        **kw,
    )


class LocalProxy(ClientProxy):
    """A real site client behind a ``ClientProxy`` (to call ``configure_fit`` and
    ``aggregate_fit`` by hand, as a unit)."""

    def __init__(self, node_id: int, client: FedviClient):
        super().__init__(str(node_id))
        self.node_id = node_id
        self.client = client

    def fit(self, ins, timeout, group_id):
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


def site_client(pid: int, path, tmp_path, policy=None) -> FedviClient:
    """A simulated site's client (its files named by its own policy)."""
    return FedviClient({"partition-id": pid}, RecordDict(), site_policy(path, tmp_path, policy))
