"""The site, once: what a site does with each phase's request, on Flower or in process.

A :class:`SiteAgent` holds one site's table (or how to read it), its own
:class:`fedvi.SitePolicy` and its per-run state (the local fit's source for map labels, the
privacy accountant, the labels it made), and answers a typed :class:`fedvi.protocol.Request`
with a typed reply (:meth:`SiteAgent.handle`). The Flower ClientApp
(:mod:`fedvi.flower.client`) decodes the wire into a request and encodes the reply; the
in-process engine (:func:`fedvi.federated_fit`) calls ``handle`` directly. Everything a site
receives is untrusted: its policy bounds what it answers and releases (the release functions of
:mod:`fedvi.labels` and :mod:`fedvi.site`, the budget of :func:`fedvi.privacy.site_accountant`).

Every release and refusal passes the site's release gate (:mod:`fedvi.gate`): the agreed
model, the caps and the privacy budget, read from the site's ledger (:mod:`fedvi.ledger`) in its
state folder, so that they hold across messages, runs and restarts. Differential-privacy noise
comes from the site's own generator: ``rng`` (default ``np.random.default_rng()``, seeded from
the operating system's entropy). Nothing in a request seeds it; tests pin it by passing a
generator here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from fedvi.data import DataError, _names_of
from fedvi.floor import floored_release
from fedvi.gate import SiteGate
from fedvi.labels import label_rows, map_labels, release_label_counts, release_refinement
from fedvi.ledger import Ledger, LedgerError, request_sha256
from fedvi.options import FitOptions
from fedvi.policy import PolicyRefusal, SitePolicy, check_posterior, check_request
from fedvi.protocol import (
    LabelReply,
    LocalReply,
    Phase,
    Preflight,
    ProtocolError,
    RefineReply,
    Reply,
    Request,
    encode_request_of,
    names_hash,
    variable_hashes,
)
from fedvi.settings import InvalidSetting
from fedvi.site import encode_site, fit_site
from fedvi.site_messages import check_schema
from fedvi.vi import Problem, Source, labels_of


def site_seed(seed: int | None, site: int) -> int | None:
    """Seed of site ``site``'s local fit: ``seed + site`` (``None`` stays random)."""
    return None if seed is None else int(seed) + int(site)


def site_fit_options(fit: FitOptions, policy: SitePolicy) -> FitOptions:
    """The run's fit options with the site's own backend/device (its hardware)."""
    changes = {k: getattr(policy, k) for k in ("backend", "device") if getattr(policy, k)}
    if changes.get("backend") == "numpy" and "device" not in changes:
        changes["device"] = "cpu"
    return dataclasses.replace(fit, **changes) if changes else fit


def safe_reason(exc: BaseException) -> str:
    """What may be said to the server about ``exc``: a rule or a category, never its text
    when that text could hold the site's data."""
    if isinstance(exc, PolicyRefusal):
        return str(exc)  # built from rule names and numbers only
    if isinstance(exc, DataError):  # a DataFileError too
        kind = getattr(exc, "kind", "bad-value")
        return f"the site's table failed validation ({kind}); details are in the site's log"
    if isinstance(exc, (InvalidSetting, ProtocolError)):
        return f"invalid request: {exc}"  # about the server's own values
    if isinstance(exc, LedgerError):
        return "refused: the site's release ledger is not available; details are in its log"
    return f"internal error ({type(exc).__name__}); details are in the site's log"


def _table_names(table) -> tuple[str, ...] | None:
    names = getattr(table, "feature_names", None)
    if names is None:
        names = _names_of(table)
    return None if names is None else tuple(str(n) for n in names)


class SiteAgent:
    """One site (see the module docstring).

    site: its partition id. table: its table (anything :func:`fedvi.encode` reads) or a
    function ``load(missing) -> table`` (a file read on demand). policy: its rules (default
    :class:`SitePolicy`). rng: its noise generator (default: OS entropy). state_dir: the folder
    of its release ledger (``None``: in memory, for one in-process run). run_id: the run (the
    ledger's per-run caps and budget; default: a fresh id). label_sink: called
    as ``label_sink(labels, posterior)`` with the ``(N,)`` labels the site makes and the
    posterior that made them; it returns the name of the file it wrote (the ClientApp writes
    them to the site's disk), or ``None``.
    """

    def __init__(
        self,
        site: int,
        table,
        policy: SitePolicy | None = None,
        *,
        rng: np.random.Generator | None = None,
        label_sink: Callable[[np.ndarray, object], str | None] | None = None,
        state_dir: str | Callable[[], str] | None = None,
        run_id=None,
    ):
        self.site = int(site)
        self.name = f"site {self.site}"
        self._table = table
        self.policy = policy if policy is not None else SitePolicy()
        self.rng = rng if rng is not None else np.random.default_rng()
        self.label_sink = label_sink
        self.state_dir, self.run_id = state_dir, run_id
        self._gate: SiteGate | None = None
        self.sha: str | None = None  # the request being answered (the ledger's hash of it)
        # Per-run state (the ClientApp keeps it in the node's context between messages).
        self.local_source: Source | None = None
        self.labels: np.ndarray | None = None
        self._encoded: dict = {}

    # --- the table ------------------------------------------------------------------------
    def _load(self, missing: str):
        return self._table(missing) if callable(self._table) else self._table

    def table(self, req: Request, spec=None):
        """The site's table encoded against ``spec`` (default: the request's), its variables
        in the run's agreed order: ``(data, resolved spec)``."""
        spec = spec or req.spec
        key = (spec, req.variable_order)
        try:
            if key in self._encoded:
                return self._encoded[key]
        except TypeError:  # an unhashable spec: no cache
            key = None
        t = self._load(spec.missing)
        if req.variable_order is not None and spec.feature_names is None:
            spec = dataclasses.replace(spec, feature_names=self._ordered(t, req.variable_order))
        out = encode_site(t, spec, min_rows=1, source=self.name)
        if key is not None:
            self._encoded = {key: out}  # one encoding kept: the phases reuse the agreed spec
        return out

    def _ordered(self, table, order) -> tuple[str, ...]:
        """This table's variable names in the run's agreed order (given as name hashes)."""
        names = _table_names(table)
        if names is None:
            raise PolicyRefusal("schema", "the run matches variables by name; this table has none")
        check_schema(names, order)  # names this table's odd columns, at the site, by its names
        by_hash = dict(zip(variable_hashes(names), names, strict=True))
        if set(by_hash) != set(order):
            raise PolicyRefusal("schema", "this table's variables differ from the agreed ones")
        return tuple(by_hash[h] for h in order)

    # --- phases -------------------------------------------------------------------------------
    @property
    def gate(self) -> SiteGate:
        """The site's release gate for this run (its ledger in the site's state folder)."""
        if self._gate is None:
            folder = self.state_dir() if callable(self.state_dir) else self.state_dir
            self._gate = SiteGate(self.policy, Ledger(folder), self.run_id, self.rng)
        return self._gate

    def handle(self, req: Request, secure: bool = False, sha: str | None = None) -> Reply:
        """The site's answer to ``req`` (``secure``: the round is summed with SecAgg+, as the
        site's own transport says, never the request; ``sha``: the hash of the request as
        received, default that of its encoding). Raises what the site refuses or fails on; the
        engine turns it into a failure that carries only :func:`safe_reason`. Every refusal is
        logged in the site's ledger."""
        t0 = time.perf_counter()
        self.sha = sha if sha is not None else request_sha256(*encode_request_of(req))
        handler = {
            Phase.PREFLIGHT: self._preflight,
            Phase.LOCAL: self._local,
            Phase.REFINE: self._refine,
            Phase.LABEL: self._label,
        }[req.phase]
        try:
            reply = handler(req, secure)
        except PolicyRefusal as exc:
            if not getattr(exc, "logged", False):
                self.gate.log_refusal(req.phase.value, exc, self.sha)
            raise
        if not isinstance(reply, Preflight):
            reply = dataclasses.replace(reply, seconds=time.perf_counter() - t0)
        return reply

    def _floor(self, req: Request) -> int:
        return self.policy.floor(req.server.min_cluster_size)

    def _opts(self, req: Request) -> FitOptions:
        return site_fit_options(req.fit, self.policy)

    def _preflight(self, req: Request, secure: bool) -> Preflight:
        check_request(req.spec, self.policy)
        data, _ = self.table(req)
        if data.n_rows < self._floor(req):
            raise PolicyRefusal(
                "min-cluster-size", "the site has fewer rows than the disclosure floor"
            )
        declines = self.gate.preflight(req.spec, data.n_rows, data.n_features, req.server, self.sha)
        return Preflight(
            site=self.site,
            n_rows=data.n_rows,
            n_features=data.n_features,
            levels=tuple(int(v) for v in data.n_levels),
            names_hash=names_hash(data.feature_names),
            variable_hashes=None
            if data.feature_names is None
            else tuple(variable_hashes(data.feature_names)),
            has_missing=bool(data.has_missing),
            policy=self.policy.summary(declines),
        )

    def _local(self, req: Request, secure: bool) -> LocalReply:
        check_request(req.spec, self.policy)
        self.gate.start_local(req.spec, self.sha)  # the caps and the announced model
        t0 = time.perf_counter()
        data, spec = self.table(req)
        load = time.perf_counter() - t0
        fit = fit_site(
            data,
            spec,
            self._opts(req),
            seed=site_seed(req.seed, self.site),
            min_cluster_size=self._floor(req),
            source=self.name,
        )
        self.local_source = fit.state.source
        floor = self._floor(req)
        self.gate.local_released(spec, fit.summaries.n_clusters, data.n_rows, floor, self.sha)
        return LocalReply(
            fit.summaries, int(fit.trace.n_iter), bool(fit.trace.converged), load_seconds=load
        )

    def _released(self, req: Request, data, rho, what: str) -> dict | None:
        """Log an aggregate release in the ledger; the reply's budget figures (or ``None``)."""
        spent = self.gate.released(
            req.phase.value,
            req.posterior.n_clusters,
            data.n_rows,
            what,
            rho,
            self._floor(req),
            req.server,
            self.sha,
        )
        return {k.split(".", 1)[1]: v for k, v in spent.items()} or None

    def _aggregate_round(self, req: Request, secure: bool, rule: str, allowed: bool):
        if not allowed:
            raise PolicyRefusal(rule, f"this site does not answer {req.phase.value} rounds")
        if self.policy.require_secure_aggregation and not secure:
            raise PolicyRefusal(
                "require-secure-aggregation",
                f"this site answers {req.phase.value} rounds under secure aggregation only",
            )
        check_posterior(req.posterior, self.policy)
        data, _ = self.table(req, req.posterior.spec)
        # The gate checks the agreed model and the caps, and grants this release's budget.
        rho = self.gate.aggregate(
            req.phase.value, req.posterior, data.n_rows, data.n_features, req.server, self.sha
        )
        return data, rho

    def _refine(self, req: Request, secure: bool) -> RefineReply:
        data, rho = self._aggregate_round(req, secure, "allow-refine", self.policy.allow_refine)
        if req.moves is not None:
            return self._refine_moves(data, req, rho)
        stats = release_refinement(
            data, req.posterior, self._floor(req), self._opts(req), rho, self.gate.rng
        )
        privacy = self._released(req, data, rho, "counts, sums, entropies per cluster")
        return RefineReply(stats, privacy=privacy)

    def _refine_moves(self, data, req: Request, rho: float | None) -> RefineReply:
        """A refinement round with moves (:mod:`fedvi.refine_moves`): the statistics under the
        soft floor (:func:`fedvi.floor.floored_release`) with the pairs' merged-column entropies
        and the split candidates' second moments under the same responsibilities, and the
        statistics under each delete-trial posterior. Noiseless only: every value is an exact
        sum over the site's rows, bounded by its floor like the statistics."""
        moves, post, floor = req.moves, req.posterior, self._floor(req)
        if rho is not None:
            raise PolicyRefusal(
                "dp", "refinement moves need exact sums; this site adds privacy noise"
            )
        self._check_moves(req)
        opts = self._opts(req)
        rel = floored_release(data, post, floor, opts, moves.pairs, moves.splits)
        trials = []
        for t in moves.trials:
            check_posterior(t, self.policy)
            trials.append(floored_release(data, t, floor, opts).stats)
        second = rel.second
        if second is None:
            second = np.zeros((0, post.sums.shape[1], post.sums.shape[1]))
        # The ledger says what this release holds beyond the statistics: each delete
        # proposal is one more full set of them, each split candidate a (P, P) matrix.
        what = (
            f"counts, sums, entropies per cluster; move statistics: {len(moves.pairs)} pair "
            f"entropies, {len(trials)} more sets under delete proposals, {len(second)} second "
            "moments"
        )
        privacy = self._released(req, data, rho, what)
        return RefineReply(
            rel.stats,
            privacy=privacy,
            pair_entropy=rel.pair_entropy,
            second=second,
            trials=tuple(trials),
        )

    def _check_moves(self, req: Request) -> None:
        """The site's policy allows move statistics, and the moves asked for stay within the
        run's own settings and the posterior's clusters (a request is untrusted: each pair,
        split and trial is work and a release)."""
        if not self.policy.allow_refine_moves:
            raise PolicyRefusal(
                "allow-refine-moves",
                "this site does not send the statistics of global moves (pair entropies, delete "
                "proposals, second moments)",
            )
        moves, server, G = req.moves, req.server, req.posterior.n_clusters
        pairs, splits = moves.pairs, moves.splits
        if len(pairs) > server.refine_max_pairs or len(splits) > server.refine_splits:
            raise PolicyRefusal("refine-moves", "more pairs or splits than the run's settings")
        if len(moves.trials) > server.refine_deletes:
            raise PolicyRefusal("refine-moves", "more delete trials than the run's settings")
        ids = np.concatenate([pairs.ravel(), splits])
        if ((ids < 0) | (ids >= G)).any() or (pairs[:, 0] == pairs[:, 1]).any():
            raise PolicyRefusal("refine-moves", "a move names a cluster the posterior lacks")
        if any(t.spec != req.posterior.spec for t in moves.trials):
            raise PolicyRefusal("refine-moves", "a trial posterior has another model")

    def _label(self, req: Request, secure: bool) -> LabelReply:
        data, rho = self._aggregate_round(req, secure, "allow-labels", self.policy.allow_labels)
        posterior = req.posterior
        if req.mapping is not None:
            labels = map_labels(self._local_labels(data, req), self._checked_mapping(req))
        else:
            labels = label_rows(data, posterior, self._opts(req))
        self.labels = labels
        written = None if self.label_sink is None else self.label_sink(labels, posterior)
        marker = 0 if secure else -1
        shown = release_label_counts(
            labels, posterior.n_clusters, self._floor(req), rho, self.gate.rng, marker
        )
        privacy = self._released(req, data, rho, "label counts per cluster")
        # Under secure aggregation the server sees only the sum: no per-site scalar about it.
        n_suppressed = None if secure else int((shown == marker).sum())
        return LabelReply(shown, n_suppressed, privacy=privacy, file=written)

    def _checked_mapping(self, req: Request) -> np.ndarray:
        m = req.mapping
        if m.ndim != 1 or (m < 0).any() or (m >= req.posterior.n_clusters).any():
            raise PolicyRefusal("posterior", "the local-to-global map is not valid")
        return m

    def _local_labels(self, data, req: Request) -> np.ndarray:
        if self.local_source is None:
            raise PolicyRefusal("label-mode", "map labelling needs this site's local fit")
        if len(req.mapping) != self.local_source.n_clusters:
            raise PolicyRefusal("posterior", "the map does not match this site's local clusters")
        problem = Problem.build(data, req.posterior.spec, options=self._opts(req))
        return labels_of(problem, self.local_source)
