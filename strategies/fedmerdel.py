"""FedMerDel as a Flower ``Strategy``: pre-flight, global merge, refinement, labelling.

Rounds (one phase each, :attr:`FedMerDel.phases`):

1. ``preflight``: every connected node checks its table and policy and returns its schema and
   row count (no fit). The server learns which node is which site (a node claiming an id the
   coordinator did not list is not used; two nodes claiming one id stop the run before any
   fit), agrees the categorical levels, and leaves out, naming them and saying what differs,
   sites whose schema differs from the others (the run goes on while ``min_sites`` remain).
2. ``local``: the sites fit MerDel and send their :class:`fedvi.Summaries`; the server merges
   them with :func:`fedvi.global_merge` (or into a resumed model, :func:`fedvi.extend`'s merge).
3. ``refine`` x ``refine_rounds``: sites that allow it send statistics under the global
   posterior (securely summed with SecAgg+ when ``secure_aggregation``); sites that do not
   take part contribute their one-shot statistics. A round with a missing site is not applied
   and ends refinement.
4. ``label``: the posterior is broadcast; sites write their labels locally and return counts
   per global cluster (a sum only, under secure aggregation).

The maths is the core's; this module moves its inputs and outputs and keeps
:attr:`FedMerDel.result` (a :class:`fedvi.FederatedResult`): every failure is named by site and
node in it, whatever phase it happens in.
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO, WARNING

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedvi import secagg
from fedvi.elbo import elbo
from fedvi.federated import combine_refinement, fixed_contribution
from fedvi.global_merge import check_compatible, global_merge
from fedvi.model import FittedModel
from fedvi.options import FitOptions, ServerOptions
from fedvi.protocol import (
    K_SECONDS,
    K_SITE,
    Phase,
    Preflight,
    ProtocolError,
    decode_refine,
    decode_summaries,
    encode_request,
    parse_site_error,
    reply_site,
    variable_hashes,
)
from fedvi.result import FederatedResult, SiteReport
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from strategies.options import StrategyOptions


class SiteFailureError(RuntimeError):
    """Too few sites answered, or the federation's identities are inconsistent."""


class SiteIdentityError(SiteFailureError):
    """Two nodes claim the same partition id."""


def schema_difference(ref: Preflight, other: Preflight) -> str | None:
    """What differs between two sites' schemas (by variable position and name hash), or None."""
    if other.n_features != ref.n_features and other.variable_hashes is None:
        return f"{other.n_features} variables instead of {ref.n_features}"
    if ref.variable_hashes is not None and other.variable_hashes is not None:
        a, b = list(ref.variable_hashes), list(other.variable_hashes)
        if set(a) == set(b):
            return None  # same variables; columns are matched by name on the site
        missing = [i + 1 for i, h in enumerate(a) if h not in b]
        extra = [i + 1 for i, h in enumerate(b) if h not in a]
        renamed = sorted(set(missing) & set(extra))
        parts = []
        if renamed:
            parts.append(f"variables #{renamed} renamed")
        only_missing = [i for i in missing if i not in renamed]
        only_extra = [i for i in extra if i not in renamed]
        if only_missing:
            parts.append(f"missing the reference's variables #{only_missing}")
        if only_extra:
            parts.append(f"{len(only_extra)} extra variables (its #{only_extra})")
        return "; ".join(parts)
    if (ref.variable_hashes is None) != (other.variable_hashes is None):
        return "one table has variable names and the other has none"
    if other.n_features != ref.n_features:
        return f"{other.n_features} variables instead of {ref.n_features}"
    return None


class FedMerDel(Strategy):
    """The FedMerDel server (see the module docstring).

    spec, fit, server: the run's model, local-fit and server settings. options: the Flower
    server's own (:class:`StrategyOptions`). expected_sites: partition ids of the sites to use.
    seed: seed of the run (site ``b`` fits with ``seed + b``). sim_paths: the simulation's own
    site files (only sites that opt in accept them). resume: a model to extend with new sites.
    site_slots: how many sites compute at once (a simulation's CPU slots; ``None``: every site
    on its own machine), which stretches the derived timeouts.
    """

    def __init__(
        self,
        spec: MixtureSpec,
        fit: FitOptions,
        server: ServerOptions,
        options: StrategyOptions,
        expected_sites,
        seed: int = 0,
        sim_paths: dict | None = None,
        resume: FittedModel | None = None,
        site_slots: int | None = None,
    ):
        super().__init__()
        self.spec, self.fit, self.server, self.options = spec, fit, server, options
        self.expected = tuple(sorted(int(s) for s in expected_sites))
        if resume is not None:  # the model's own sites are already in it
            self.expected = tuple(s for s in self.expected if s not in resume.site_ids)
        if not self.expected:
            raise ValueError("no expected sites (besides those already in the resumed model)")
        self.min_sites = len(self.expected) if options.min_sites is None else options.min_sites
        if self.min_sites > len(self.expected):
            raise ValueError(
                f"min_sites={self.min_sites} exceeds the {len(self.expected)} expected sites"
            )
        self.seed = int(seed)
        self.sim_paths = sim_paths
        self.resume = resume
        self.site_slots = site_slots
        if resume is not None:
            self.spec = resume.spec
            server = dataclasses.replace(server, refine_rounds=0)
        self.phases = (
            [Phase.PREFLIGHT, Phase.LOCAL] + [Phase.REFINE] * server.refine_rounds + [Phase.LABEL]
        )
        self.result = FederatedResult(label_mode=server.label_mode)
        self.result.privacy = {
            "secure_aggregation": options.secure_aggregation,
            "dp_epsilon": server.dp_epsilon,
            "dp_delta": server.dp_delta,
        }
        if resume is not None:
            self.result.notes.append(
                f"resumed from a model of {len(resume.site_ids)} sites {list(resume.site_ids)}: "
                "new sites are merged in, no refinement rounds"
            )
        self.node_site: dict[str, int] = {}
        self.preflights: dict[int, Preflight] = {}
        self.agreed_spec: MixtureSpec | None = None
        self.variable_order: tuple[str, ...] | None = None
        self.posterior: Summaries | None = None
        self.fixed: dict[int, Summaries] = {}
        self.membership: np.ndarray | None = None
        self.refining = True
        self._asked: dict[int, set[int]] = {}
        self._t0 = 0.0
        self._aggregated: set[int] = set()

    def __repr__(self) -> str:
        return f"FedMerDel(sites={list(self.expected)}, phases={[p.value for p in self.phases]})"

    @property
    def num_rounds(self) -> int:
        return len(self.phases)

    @property
    def failures(self) -> list[dict]:
        return self.result.failures

    def phase(self, server_round: int) -> Phase:
        if not 1 <= server_round <= len(self.phases):
            raise ValueError(f"round {server_round} is outside the plan {self.phases}")
        return self.phases[server_round - 1]

    def secure_round(self, server_round: int) -> bool:
        """Whether this round's replies are summed with SecAgg+: refine and label rounds, when
        at least two sites take part (SecAgg+ cannot sum one site's arrays: a label round with
        one site left runs plain, its counts floored as always, and says so)."""
        phase = self.phase(server_round)
        if not self.options.secure_aggregation or phase not in (Phase.REFINE, Phase.LABEL):
            return False
        if len(self.participants(phase)) < 2:
            self.result.notes.append(
                f"round {server_round} ({phase.value}) ran without secure aggregation: fewer "
                "than 2 sites take part"
            )
            return False
        return True

    # --- timeouts -----------------------------------------------------------------------------
    def timeout_for(self, phase: Phase) -> float:
        """Seconds a site has to answer ``phase``: the configured ``round_timeout``, else a
        bound derived from the largest site's table (rows x variables) from pre-flight."""
        if phase is Phase.PREFLIGHT:
            return self.options.preflight_timeout
        if self.options.round_timeout is not None:
            return self.options.round_timeout
        cells = max((p.n_rows * p.n_features for p in self.preflights.values()), default=1e6)
        waves = 1
        if self.site_slots:  # sites take turns for the CPU slots of a simulation
            waves = -(-max(len(self.preflights), 1) // self.site_slots)
        if phase is Phase.LOCAL:
            return 120.0 + 3e-6 * cells * waves
        return 60.0 + 5e-7 * cells * waves

    # --- Strategy API ---------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([])

    def request(self, phase: Phase, site: int | None = None) -> FitIns:
        """The round sent to ``site`` (``FitIns``)."""
        spec = self.agreed_spec or self.spec
        posterior = mapping = scale = None
        if phase in (Phase.REFINE, Phase.LABEL):
            posterior = self.posterior
        if (
            phase is Phase.LABEL
            and self.result.label_mode == "map"
            and site in self.result.sites
            and self.result.sites[site].mapping is not None
        ):
            mapping = self.result.sites[site].mapping
        server = self.server
        if self.options.secure_aggregation and phase in (Phase.REFINE, Phase.LABEL):
            scale = self.secagg_scale()
        arrays, config = encode_request(
            phase,
            spec,
            self.fit,
            server,
            self.seed,
            posterior=posterior,
            mapping=mapping,
            sim_paths=self.sim_paths,
            secagg_scale=scale,
            variable_order=None if phase is Phase.PREFLIGHT else self.variable_order,
        )
        return FitIns(ndarrays_to_parameters(arrays), config)

    def secagg_scale(self) -> float:
        """One power-of-two scale above any value a site may send in a SecAgg+ round: the
        largest site's rows times ``log G`` (entropies), with room for DP noise."""
        rows = max((p.n_rows for p in self.preflights.values()), default=1)
        G = self.posterior.n_clusters if self.posterior is not None else 2
        bound = rows * max(1.0, float(np.log(max(G, 2)))) + 1.0
        if self.server.dp_epsilon is not None or any(
            p.policy.get("dp_epsilon") for p in self.preflights.values()
        ):
            bound *= 4.0  # clamped noisy values stay within the counts; headroom for the sum
        return secagg.secagg_scale(bound)

    def wait_for_sites(self, client_manager: ClientManager) -> None:
        """Wait until as many nodes as expected sites are connected, or ``wait_for_sites``
        seconds. Every 10 s of waiting, a progress line says which sites are connected (each
        new node is asked its partition id once) and which are missing."""
        n = len(self.expected)
        deadline = time.monotonic() + self.options.wait_for_sites
        last = time.monotonic()  # the first progress line after 10 s of waiting
        known: dict[str, int | None] = {}
        while True:
            nodes = client_manager.all()
            if len(nodes) >= n or time.monotonic() >= deadline:
                break
            if time.monotonic() - last >= 10:
                for cid, proxy in nodes.items():
                    if cid not in known:
                        known[cid] = self._identify(proxy)
                present = {s: cid for cid, s in known.items() if s is not None and cid in nodes}
                log(
                    INFO,
                    "fedvi: waiting for sites: connected %s; missing %s (up to %.0f s more)",
                    ", ".join(f"site {s} (node {c})" for s, c in sorted(present.items())) or "none",
                    [s for s in self.expected if s not in present],
                    deadline - time.monotonic(),
                )
                last = time.monotonic()
            client_manager.wait_for(
                len(nodes) + 1, timeout=min(10, max(1, deadline - time.monotonic()))
            )

    @staticmethod
    def _identify(proxy: ClientProxy) -> int | None:
        """The partition id a node says it has (for progress lines only; pre-flight decides)."""
        try:
            res = proxy.get_properties(GetPropertiesIns({}), timeout=30, group_id=None)
            return int(res.properties[K_SITE])
        except Exception:  # a node that cannot say: shown by node id only
            return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        phase = self.phase(server_round)
        self._t0 = time.perf_counter()
        if phase is Phase.PREFLIGHT:
            self.wait_for_sites(client_manager)
            ins = self.request(phase)
            out = [(p, ins) for _, p in sorted(client_manager.all().items())]
            self._asked[server_round] = set()
            log(INFO, "fedvi round %d: pre-flight on %d nodes", server_round, len(out))
            return out
        if phase is Phase.REFINE and not self.refining:
            return []
        sites = self.participants(phase)
        by_site = {
            self.node_site[cid]: p
            for cid, p in client_manager.all().items()
            if cid in self.node_site
        }
        # One request for all sites (the posterior is encoded once), except map labelling,
        # where each site gets its own local-to-global map.
        per_site = phase is Phase.LABEL and self.result.label_mode == "map"
        common = None if per_site else self.request(phase)
        out = []
        for s in sites:
            if s not in by_site:
                self._fail(phase, s, None, "not connected")
                continue
            out.append((by_site[s], self.request(phase, s) if per_site else common))
        self._asked[server_round] = {self.node_site[p.cid] for p, _ in out}
        if phase is Phase.REFINE and self.options.secure_aggregation and len(out) < 2:
            self._stop_refining("secure aggregation needs at least 2 sites that take part")
            return []
        log(
            INFO,
            "fedvi round %d: phase %s on sites %s",
            server_round,
            phase.value,
            sorted(self._asked[server_round]),
        )
        return out

    def participants(self, phase: Phase) -> list[int]:
        """The sites a phase is sent to."""
        ok = [s for s, r in sorted(self.result.sites.items()) if r.status == "ok"]
        if phase is Phase.LOCAL:
            return [s for s in ok if s not in self.fixed]
        if phase is Phase.REFINE:
            return [s for s in ok if s not in self.fixed and self._allows(s, "allow_refine")]
        return [s for s in ok if self._allows(s, "allow_labels")]

    def _allows(self, site: int, rule: str) -> bool:
        """Whether a site's policy (as it reported it in pre-flight) lets it answer a round:
        a site that requires secure aggregation answers refine and label rounds only when
        the run uses it."""
        pre = self.preflights.get(site)
        if pre is None:
            return True
        if pre.policy.get("require_secure_aggregation") and not self.options.secure_aggregation:
            return False
        return bool(pre.policy.get(rule, True))

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        phase = self.phase(server_round)
        self._aggregated.add(server_round)
        try:
            answers = self._collect(server_round, phase, results, failures)
            handler = {
                Phase.PREFLIGHT: self._aggregate_preflight,
                Phase.LOCAL: self._aggregate_local,
                Phase.REFINE: self._aggregate_refine,
                Phase.LABEL: self._aggregate_label,
            }[phase]
            handler(answers, server_round)
        except Exception as exc:
            self.result.status = "failed"
            self.result.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.result.timings[phase.value] = self.result.timings.get(phase.value, 0.0) + (
                time.perf_counter() - self._t0
            )
        if phase is Phase.LABEL:
            self._complete()
        post = self.posterior
        return (None if post is None else ndarrays_to_parameters(post.to_arrays())), {
            "phase": phase.value,
            "n_clusters": 0 if post is None else post.n_clusters,
        }

    def after_secure_round(self, server_round: int) -> None:
        """Called after a SecAgg+ round: if the protocol halted before aggregating (too few
        sites answered a stage), say so and go on without that round's result."""
        if server_round in self._aggregated:
            return
        phase = self.phase(server_round)
        why = "secure aggregation halted: too few sites answered one of its stages"
        for site in sorted(self._asked.get(server_round, ())):
            self._fail(phase, site, self.result.sites[site].node_id, why)
        if phase is Phase.REFINE:
            self._stop_refining(why)
        else:
            self.result.notes.append(f"label counts unknown: {why}")
            self._complete()

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None

    # --- bookkeeping ---------------------------------------------------------------------
    def _site_report(self, site: int) -> SiteReport:
        if site not in self.result.sites:
            self.result.sites[site] = SiteReport(site=site)
        return self.result.sites[site]

    def _fail(self, phase: Phase, site: int | None, node: str | None, error: str) -> None:
        entry = {
            "phase": phase.value,
            "site": site,
            "node": None if node is None else str(node),
            "error": error,
        }
        self.result.failures.append(entry)
        who = f"site {site}" if site is not None else "a node"
        if node is not None:
            who += f" (node {node})"
        log(WARNING, "fedvi phase %s: %s failed: %s", phase.value, who, error)
        if site is not None and site in self.result.sites and phase is not Phase.LABEL:
            rep = self.result.sites[site]
            rep.status, rep.error = "failed", error

    def _stop_refining(self, why: str) -> None:
        if self.refining:
            self.refining = False
            self.result.notes.append(f"refinement stopped: {why}")
            log(WARNING, "fedvi: refinement stopped: %s", why)

    def _collect(self, server_round, phase: Phase, results, failures) -> dict[int, tuple]:
        """Answers by site (sorted); every failure and every site that did not answer is named."""
        answers: dict[int, tuple] = {}
        failed_sites: set[int] = set()
        for f in failures:
            if isinstance(f, BaseException):
                site, _, reason = parse_site_error(f"{f}")
                node = (
                    None if site is None else self.result.sites.get(site, SiteReport(site)).node_id
                )
            else:
                proxy, res = f
                node = proxy.cid
                site, _, reason = parse_site_error(f"{res.status.message}")
                site = self.node_site.get(proxy.cid, site)
            if site is None and phase is not Phase.PREFLIGHT:
                continue  # named below, as a site that did not answer
            if site is not None:
                if site in failed_sites:
                    continue  # SecAgg+ reports one site's error twice
                failed_sites.add(site)
            self._fail(phase, site, node, reason)
        seen_nodes = {}
        for proxy, res in results:
            try:
                site = reply_site(res.metrics)
            except ProtocolError as exc:
                self._fail(phase, None, proxy.cid, str(exc))
                continue
            known = self.node_site.get(proxy.cid)
            if phase is not Phase.PREFLIGHT and known != site:
                self._fail(phase, known, proxy.cid, f"reply claims site {site}")
                continue
            if phase is Phase.PREFLIGHT and site in seen_nodes:
                raise SiteIdentityError(
                    f"two nodes claim site {site} (partition-id): nodes "
                    f"{' and '.join(sorted([seen_nodes[site], proxy.cid]))}; give each SuperNode "
                    "its own partition-id"
                )
            seen_nodes[site] = proxy.cid
            arrays = parameters_to_ndarrays(res.parameters)
            answers[site] = (proxy, arrays, dict(res.metrics), int(res.num_examples))
        asked = self._asked.get(server_round, set())
        for site in sorted(asked - set(answers) - failed_sites):
            node = self.result.sites[site].node_id if site in self.result.sites else None
            self._fail(phase, site, node, "no reply (the node died, left, or timed out)")
        for site, (_, arrays, metrics, _) in answers.items():
            if site not in self.expected:
                continue
            rep = self._site_report(site)
            rep.add_uplink(phase.value, arrays)
            rep.seconds[phase.value] = float(metrics.get(K_SECONDS, 0.0))
            log(
                INFO,
                "fedvi %s: site %d (node %s): %s rows, %.2f s",
                phase.value,
                site,
                answers[site][0].cid,
                metrics.get("schema.n_rows", rep.n_rows),
                rep.seconds[phase.value],
            )
            if "privacy.epsilon_spent" in metrics:
                rep.privacy = {"epsilon_spent": float(metrics["privacy.epsilon_spent"])}
        return dict(sorted(answers.items()))

    def _require(self, phase: Phase, n: int) -> None:
        if n < self.min_sites:
            detail = "; ".join(f"site {f['site']}: {f['error']}" for f in self.result.failures)
            raise SiteFailureError(
                f"phase {phase.value!r}: only {n} of {len(self.expected)} sites can go on "
                f"(min_sites={self.min_sites}). Failures: {detail or 'none reported'}"
            )

    # --- phases -----------------------------------------------------------------------------
    def _aggregate_preflight(self, answers, server_round) -> None:
        for site, (proxy, _, metrics, _) in answers.items():
            if site not in self.expected:
                self.result.notes.append(
                    f"node {proxy.cid} claims site {site}, which is not an expected site: not used"
                )
                log(
                    WARNING,
                    "fedvi: node %s claims site %d, not expected: not used",
                    proxy.cid,
                    site,
                )
                continue
            try:
                pre = Preflight.from_metrics(site, metrics)
            except ProtocolError as exc:
                self._fail(Phase.PREFLIGHT, site, proxy.cid, str(exc))
                continue
            self.preflights[site] = pre
            self.node_site[proxy.cid] = site
            rep = self._site_report(site)
            rep.node_id, rep.n_rows, rep.status = proxy.cid, pre.n_rows, "ok"
            rep.schema = {
                "n_rows": pre.n_rows,
                "n_features": pre.n_features,
                "levels": list(pre.levels),
                "names_hash": pre.names_hash,
                "has_missing": pre.has_missing,
            }
            rep.policy = dict(pre.policy)
        for f in self.result.failures:
            if f["phase"] == "preflight" and f["site"] is not None:
                self._site_report(f["site"]).status = "failed"
                self._site_report(f["site"]).error = f["error"]
        for s in [s for s in self.expected if s not in self.result.sites]:
            self._fail(Phase.PREFLIGHT, s, None, "not connected")
            self._site_report(s).status = "failed"
        self._agree_schema()
        ok = [s for s, r in self.result.sites.items() if r.status == "ok"]
        log(
            INFO,
            "fedvi pre-flight: sites %s ready (%s rows); missing or failed: %s",
            sorted(ok),
            [self.preflights[s].n_rows for s in sorted(ok)],
            sorted(s for s, r in self.result.sites.items() if r.status != "ok"),
        )
        self._require(Phase.PREFLIGHT, len(ok))

    def _agree_schema(self) -> None:
        """Leave out sites whose schema differs from the reference (the resumed model's, the
        configured variable names, or the first site's), and agree on the levels."""
        ok = sorted(s for s, r in self.result.sites.items() if r.status == "ok")
        if not ok:
            return
        ref = self.preflights[ok[0]]
        model = self.spec  # the resumed model's, when resuming
        if model.feature_names is not None:
            names = model.feature_names
            ref = dataclasses.replace(
                ref, n_features=len(names), variable_hashes=tuple(variable_hashes(names))
            )
        elif self.resume is not None:
            ref = dataclasses.replace(ref, n_features=model.n_features, variable_hashes=None)
        for s in ok:
            pre = self.preflights[s]
            diff = schema_difference(ref, pre)
            if (
                diff is None
                and self.spec.likelihood == "bernoulli"
                and any(v > 2 for v in pre.levels)
            ):
                diff = "non-binary values in a Bernoulli model"
            if diff is not None:
                self._fail(
                    Phase.PREFLIGHT,
                    s,
                    self.result.sites[s].node_id,
                    f"schema differs from the reference: {diff}",
                )
                self.result.sites[s].status = "failed"
        ok = sorted(s for s, r in self.result.sites.items() if r.status == "ok")
        if not ok:
            return
        if ref.variable_hashes is not None and model.feature_names is None:
            self.variable_order = tuple(ref.variable_hashes)
        spec = self.spec
        if spec.resolved:
            self.agreed_spec = spec
            return
        if spec.likelihood == "categorical" and spec.n_levels is None:
            levels = np.max([self._levels_in_order(self.preflights[s], ref) for s in ok], axis=0)
        elif isinstance(spec.n_levels, int):
            levels = np.full(self.preflights[ok[0]].n_features, spec.n_levels)
        else:
            levels = np.full(self.preflights[ok[0]].n_features, 2)
        self.agreed_spec = spec.resolve(levels, spec.feature_names)

    @staticmethod
    def _levels_in_order(pre: Preflight, ref: Preflight) -> np.ndarray:
        """A site's levels per variable, in the reference's order of variables (matched by
        name hash when the tables have names; by position otherwise)."""
        levels = np.asarray(pre.levels)
        if pre.variable_hashes is None or ref.variable_hashes is None:
            return levels
        where = {h: i for i, h in enumerate(pre.variable_hashes)}
        return levels[[where[h] for h in ref.variable_hashes]]

    def _aggregate_local(self, answers, server_round) -> None:
        sites, summaries = [], []
        for site, (proxy, arrays, metrics, _) in answers.items():
            try:
                s = decode_summaries(arrays, metrics, "summaries")
            except (ProtocolError, ValueError) as exc:
                self._fail(Phase.LOCAL, site, proxy.cid, f"malformed summaries ({exc})")
                continue
            rep = self.result.sites[site]
            rep.summaries, rep.n_rows = s, s.n_rows
            rep.n_iter = int(metrics.get("fit.n_iter", 0))
            rep.converged = bool(metrics.get("fit.converged", False))
            sites.append(site)
            summaries.append(s)
        self._require(Phase.LOCAL, len(sites))
        names = [f"site {s}" for s in sites]
        check_compatible(summaries, names)
        base = None
        if self.resume is not None:
            r = self.resume
            base = (r.posterior, r.membership, list(r.site_ids))
        merged = global_merge(
            summaries, self.server.merge_mode, names=names, site_ids=sites, base=base
        )
        self.result.merge = merged
        self.posterior = merged.posterior
        self.membership = merged.membership
        for s, m in zip(sites, merged.mapping, strict=True):
            self.result.sites[s].mapping = m
        self.result.elbo_history = [merged.elbo_before, merged.elbo]
        one_shot = self.server.refine_rounds == 0 or self.resume is not None
        self.result.label_mode = (
            "map" if self.server.label_mode == "map" and one_shot else "posterior"
        )
        for s in sites:
            if not self._allows(s, "allow_refine"):
                self.fixed[s] = fixed_contribution(
                    self.result.sites[s].summaries,
                    self.result.sites[s].mapping,
                    self.posterior.n_clusters,
                )
        log(
            INFO,
            "fedvi merge (%s): %d local clusters from %d sites -> %d global clusters",
            self.server.merge_mode,
            sum(s.n_clusters for s in summaries),
            len(sites),
            merged.n_clusters,
        )

    def _aggregate_refine(self, answers, server_round) -> None:
        asked = self._asked.get(server_round, set())
        missing = sorted(asked - set(answers))
        if missing:
            self._stop_refining(f"sites {missing} did not answer round {server_round}")
            return
        if not answers:
            return
        post = self.posterior
        if self.options.secure_aggregation:
            _, arrays, metrics, _ = next(iter(answers.values()))
            summed = secagg.decode_limbs(arrays, len(answers), self.secagg_scale())
            n_rows = sum(self.result.sites[s].n_rows for s in answers)
            stats = [decode_refine(summed, post, n_rows)]
        else:
            stats = []
            for site, (proxy, arrays, _, _) in answers.items():
                try:
                    stats.append(decode_refine(arrays, post, self.result.sites[site].n_rows))
                except ProtocolError as exc:
                    self._fail(Phase.REFINE, site, proxy.cid, str(exc))
                    self._stop_refining(f"site {site} sent malformed statistics")
                    return
        noisy = self.server.dp_epsilon is not None or any(
            self.preflights[s].policy.get("dp_epsilon") for s in answers
        )
        new, accepted, kept = combine_refinement(post, stats, list(self.fixed.values()), noisy)
        if not accepted:
            self._stop_refining(
                f"round {server_round} would have lowered the ELBO (sites' floors restricted "
                "their assignments)"
            )
            return
        self.fixed = {s: f.subset(kept) for s, f in self.fixed.items()}
        self.membership = self.membership[kept]
        self.posterior = new
        self.result.elbo_history.append(float(elbo(new)))
        log(INFO, "fedvi refinement: ELBO %.4f", self.result.elbo_history[-1])

    def _aggregate_label(self, answers, server_round) -> None:
        G = self.posterior.n_clusters
        if self.options.secure_aggregation and answers:
            _, arrays, _, _ = next(iter(answers.values()))
            total = secagg.decode_limbs(arrays, len(answers), self.secagg_scale())[0]
            self.result.privacy["label_counts_total"] = np.rint(total).astype(np.int64).tolist()
            for site in answers:
                self.result.sites[site].counts = None
        else:
            for site, (proxy, arrays, _, _) in answers.items():
                counts = np.asarray(arrays[0], dtype=np.int64) if arrays else np.zeros(0)
                if counts.shape != (G,):
                    self._fail(Phase.LABEL, site, proxy.cid, "label counts of the wrong shape")
                    continue
                self.result.sites[site].counts = counts
        log(INFO, "fedvi: labels written on sites %s", sorted(answers))

    def _complete(self) -> None:
        model_sites = list(self.result.merge.site_ids) if self.result.merge else []
        self.result.model = FittedModel(self.posterior, tuple(model_sites), self.membership)
        failed = [s for s, r in self.result.sites.items() if r.status != "ok"]
        self.result.status = (
            "completed_with_failures" if (failed or self.result.failures) else "completed"
        )
