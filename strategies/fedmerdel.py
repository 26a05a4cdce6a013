"""FedMerDel on Flower: a thin ``Strategy`` over :class:`fedvi.coordinator.Coordinator`.

The run's logic (phases, roster, schema agreement, merge, refinement acceptance, labelling,
the result) is the coordinator's, the same one :func:`fedvi.federated_fit` drives in process.
This adapter only moves messages: ``configure_fit`` asks the coordinator for the round and
encodes each site's typed request as ``FitIns`` (:mod:`fedvi.protocol`); ``aggregate_fit``
decodes the replies (or the SecAgg+ sum) and the failures, and hands them to
``Coordinator.accept``. What is Flower's stays here or beside it: which node is which site
(learnt in pre-flight), waiting for the nodes (:mod:`strategies.nodes`);
:class:`strategies.workflow.PhaseFitWorkflow` runs the rounds (SecAgg+, each phase's timeout).
"""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.strategy import Strategy

from fedvi import secagg
from fedvi.coordinator import (
    Coordinator,
    Failure,
    InSum,
    Round,
    SiteFailureError,
    SiteIdentityError,
    SummedReply,
    schema_difference,
)
from fedvi.model import FittedModel
from fedvi.options import FitOptions, ServerOptions
from fedvi.protocol import (
    K_SECONDS,
    Phase,
    ProtocolError,
    Request,
    decode_reply,
    encode_request_of,
    label_file_of,
    parse_site_error,
    privacy_of,
    reply_site,
)
from fedvi.spec import MixtureSpec
from strategies.node_status import RoundFailure
from strategies.nodes import wait_for_sites
from strategies.options import StrategyOptions

__all__ = ["FedMerDel", "SiteFailureError", "SiteIdentityError", "schema_difference"]


def fitins(req: Request) -> FitIns:
    """A typed request on the wire."""
    return FitIns(*_parameters(encode_request_of(req)))


def _parameters(wire):
    arrays, config = wire
    return ndarrays_to_parameters(arrays), config


class FedMerDel(Strategy):
    """The FedMerDel server (see the module docstring). spec, fit, server: the run's settings;
    options: the Flower server's own (:class:`StrategyOptions`); expected_sites: partition ids
    of the sites to use; seed: the run's seed; resume: a model to extend with new sites;
    site_slots: how many sites compute at once (a simulation's CPU slots; ``None``: every site
    on its own machine), which stretches the derived timeouts."""

    def __init__(
        self,
        spec: MixtureSpec,
        fit: FitOptions,
        server: ServerOptions,
        options: StrategyOptions,
        expected_sites,
        seed: int = 0,
        resume: FittedModel | None = None,
        site_slots: int | None = None,
    ):
        super().__init__()
        self.options, self.site_slots = options, site_slots
        self.coordinator = Coordinator(
            spec,
            fit,
            server,
            expected_sites,
            seed=int(seed),
            resume=resume,
            min_sites=options.min_sites,
            secure_aggregation=options.secure_aggregation,
        )
        self.node_site: dict[str, int] = {}
        self.rounds: dict[int, Round | None] = {}
        self._unsent: dict[int, dict[int, Failure]] = {}
        self._aggregated: set[int] = set()

    def __repr__(self) -> str:
        return f"FedMerDel({self.coordinator!r})"

    # --- the coordinator's state, for the runner and the outputs ---------------------------
    result = property(lambda self: self.coordinator.result)
    failures = property(lambda self: self.coordinator.result.failures)
    phases = property(lambda self: self.coordinator.phases)
    agreed_spec = property(lambda self: self.coordinator.agreed_spec)
    num_rounds = property(lambda self: len(self.coordinator.plan))

    def round(self, server_round: int) -> Round | None:
        """The coordinator's round for Flower round ``server_round`` (``None``: the run is
        over, e.g. refinement stopped early and the label round already ran)."""
        if server_round not in self.rounds:
            self.rounds[server_round] = self.coordinator.next_round()
        return self.rounds[server_round]

    # --- Strategy API ---------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([])

    def configure_fit(self, server_round: int, parameters, client_manager: ClientManager):
        rnd = self.round(server_round)
        if rnd is None:
            return []
        encoded: dict[int, FitIns] = {}  # one encoding per distinct request

        def ins(req: Request) -> FitIns:
            return encoded.setdefault(id(req), fitins(req))

        if rnd.phase is Phase.PREFLIGHT:  # nodes are anonymous until they say their site
            wait_for_sites(client_manager, self.coordinator.expected, self.options.wait_for_sites)
            req = rnd.requests[rnd.sites[0]]
            return [(p, ins(req)) for _, p in sorted(client_manager.all().items())]
        by_site = {
            self.node_site[c]: p for c, p in client_manager.all().items() if c in self.node_site
        }
        self._unsent[server_round] = {
            s: Failure("not_connected") for s in rnd.sites if s not in by_site
        }
        out = [(by_site[s], ins(rnd.requests[s])) for s in rnd.sites if s in by_site]
        log(INFO, "fedvi round %d: phase %s on sites %s", server_round, rnd.phase.value, rnd.sites)
        return out

    def aggregate_fit(self, server_round: int, results, failures):
        rnd = self.rounds.get(server_round)
        if rnd is None or server_round in self._aggregated:
            return None, {}
        self._aggregated.add(server_round)
        replies: dict[int, object] = dict(self._unsent.pop(server_round, {}))
        unattributed, nodes = [], {}
        for f in failures:
            proxy, text = (
                (None, f"{f}") if isinstance(f, BaseException) else (f[0], f"{f[1].status.message}")
            )
            site, said, reason = parse_site_error(text)
            node = None if proxy is None else proxy.cid
            if isinstance(f, RoundFailure):  # the runner knows the node and why: offline/timeout
                node, site, cause = str(f.node_id), f.site, f.cause
            else:
                # A node's own error reply (its launcher refused the app, say) is its error.
                cause = "site_error" if said is not None or proxy is not None else "no_reply"
            site = self.node_site.get(node, site)
            failure = Failure(cause, reason if cause != "no_reply" else "", node)
            if site is None:
                unattributed.append(failure)
            elif site not in replies:  # SecAgg+ reports one site's error twice
                replies[site] = failure
        sums = []
        for proxy, res in results:
            try:
                site = reply_site(res.metrics)
            except ProtocolError as exc:
                known = self.node_site.get(proxy.cid)
                bad = Failure("malformed", str(exc), proxy.cid)
                (unattributed.append(bad) if known is None else replies.setdefault(known, bad))
                continue
            known = self.node_site.get(proxy.cid)
            if rnd.phase is not Phase.PREFLIGHT and known != site:
                if known is not None:
                    replies[known] = Failure("malformed", f"reply claims site {site}", proxy.cid)
                continue
            if rnd.phase is Phase.PREFLIGHT and site in nodes:
                pair = " and ".join(sorted([nodes[site], proxy.cid]))
                replies[site] = Failure("duplicate_id", pair, proxy.cid)
                continue
            nodes[site] = proxy.cid
            arrays = parameters_to_ndarrays(res.parameters)
            if rnd.secure:
                seconds = float(res.metrics.get(K_SECONDS, 0.0))
                replies[site] = InSum(seconds, privacy_of(res.metrics), label_file_of(res.metrics))
                sums.append(arrays)
                continue
            rep = self.result.sites.get(site)
            try:
                n_rows = None if rep is None else rep.n_rows
                req = rnd.requests.get(site)
                replies[site] = decode_reply(rnd.phase, site, arrays, res.metrics, req, n_rows)
            except ProtocolError as exc:
                replies[site] = Failure("malformed", str(exc), proxy.cid)
            log(INFO, "fedvi %s: site %d (node %s)", rnd.phase.value, site, proxy.cid)
        summed = None
        if rnd.secure and sums:
            scale = rnd.requests[rnd.sites[0]].secagg_scale
            in_sum = tuple(sorted(s for s, r in replies.items() if isinstance(r, InSum)))
            summed = SummedReply(secagg.decode_limbs(sums[0], len(sums), scale), in_sum)
        known = len(self.failures)
        try:
            self.coordinator.accept(rnd, replies, summed, nodes, unattributed)
        finally:
            for s, cid in nodes.items():
                if s in self.coordinator.preflights:
                    self.node_site[cid] = s
            for f in self.failures[known:]:
                who = f"site {f['site']} (node {f['node']})"
                log(WARNING, "fedvi phase %s: %s failed: %s", f["phase"], who, f["error"])
        post = self.coordinator.posterior
        params = None if post is None else ndarrays_to_parameters(post.to_arrays())
        return params, {
            "phase": rnd.phase.value,
            "n_clusters": 0 if post is None else post.n_clusters,
        }

    def after_secure_round(self, server_round: int) -> None:
        """After a SecAgg+ round: if the protocol halted before aggregating (too few sites
        answered a stage), the coordinator hears that every site asked failed."""
        rnd = self.rounds.get(server_round)
        if rnd is None or server_round in self._aggregated:
            return
        self._aggregated.add(server_round)
        node = {s: r.node_id for s, r in self.result.sites.items()}
        self.coordinator.accept(
            rnd, {s: Failure("secagg_halted", node=node.get(s)) for s in rnd.sites}
        )

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None
