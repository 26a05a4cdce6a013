"""The FedMerDel run as a state machine over phases, knowing nothing about transport.

An engine asks :meth:`Coordinator.next_round` for the next :class:`Round` (a phase and one
typed :class:`fedvi.protocol.Request` per site it asks), delivers the requests, and hands the
replies back with :meth:`Coordinator.accept` (a typed reply or a :class:`Failure` per site).
When ``next_round()`` returns ``None`` the run is over and :attr:`Coordinator.result` (a
:class:`fedvi.FederatedResult`) is settled. Two engines drive it: the in-process one
(:func:`fedvi.federated_fit`, sites are :class:`fedvi.site_agent.SiteAgent` calls) and the
Flower strategy (``strategies/fedmerdel.py``, sites are ClientApps).

Every rule of the run lives here once:

- the roster: expected sites, those that answered pre-flight, those taking part in each phase,
  and those left out, each with its cause (:class:`Failure`);
- schema agreement: the reference schema is the resumed model's, the configured variable
  names, or the first answering site's; a site whose schema differs is left out and named
  (on both engines), and the run goes on while ``min_sites`` remain;
- one-shot vs refined: a run is one-shot when no refinement round was applied; only a
  one-shot run may label with the local-to-global map (``label_mode="map"``);
- refinement (docs/method.md §7-8): each round is one CAVI step on the pooled rows; a round
  that would lower the ELBO (a site's floor withheld a cluster) is not applied, is reported
  with the clusters and sites whose floor withheld statistics, and the next round starts from
  it while the best posterior is kept (unless the statistics carry DP noise: every round is
  applied); with ``refine_moves`` (noiseless, every site refining) each round carries merge
  pairs, split candidates and delete trials (:mod:`fedvi.refine_moves`) whose exact scores
  come from the summed replies; ``refine_tol`` ends refinement once a round without moves
  gains less; a round with a missing or malformed site is not applied and ends refinement;
- one meaning of K: after labelling, global clusters that own no rows are removed
  (:func:`fedvi.settle.settle_clusters`), with one more exact refinement round and a label
  round (or, without refinement, a label round) so that the sites' labels use the new ids;
  a resumed model's old-to-new ids are recorded (``result.id_map``, model info ``id_map``);
- the merge: :func:`fedvi.global_merge` (into the resumed model's clusters when resuming);
- every reply is checked (:mod:`fedvi.reply_checks`) before use: a bad reply is refused,
  its site named (``malformed``) and the run goes on without it;
- the end of the run: status ``completed``/``completed_with_failures``, or ``failed`` with the
  reason (:meth:`fedvi.FederatedResult.settle`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedvi import secagg
from fedvi.elbo import elbo
from fedvi.global_merge import check_compatible, global_merge
from fedvi.model import FittedModel
from fedvi.options import FitOptions, ServerOptions
from fedvi.policy import PolicyRefusal
from fedvi.protocol import (
    LabelReply,
    LocalReply,
    Phase,
    Preflight,
    RefineMoves,
    RefineReply,
    Request,
    decode_refine_reply,
    encode_refine,
    variable_hashes,
)
from fedvi.refine_moves import (
    DeleteTrial,
    Track,
    apply_merges,
    apply_splits,
    pooled_start,
    propose_deletes,
    propose_pairs,
    propose_splits,
    remap_pairs,
)
from fedvi.reply_checks import (
    BadReply,
    check_label_counts,
    check_move_statistics,
    check_preflight,
    check_refinement,
    check_summaries,
)
from fedvi.result import FederatedResult, SiteReport
from fedvi.settle import settle_clusters
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import relevance_step

#: Causes of a :class:`Failure`. The first eight come from the engine (what happened to a
#: request); ``schema`` and ``secagg_halted`` are the coordinator's own decisions.
CAUSES = (
    "site_error",
    "offline",
    "timeout",
    "malformed",
    "not_expected",
    "duplicate_id",
    "not_connected",
    "no_reply",
    "schema",
    "secagg_halted",
)
_TEXT = {
    "offline": "node offline (the SuperLink stopped receiving its heartbeat, or it left)",
    "timeout": "no reply within the round timeout (the node is still online)",
    "no_reply": "no reply (the node died, left, or timed out)",
    "not_connected": "not connected",
    "secagg_halted": "secure aggregation halted: too few sites answered one of its stages",
}


class SiteFailureError(RuntimeError):
    """Too few sites can go on, or the federation's identities are inconsistent."""


class SiteIdentityError(SiteFailureError):
    """Two nodes claim the same partition id."""


@dataclass(frozen=True)
class Failure:
    """Why a site gave no usable reply. ``cause``: one of :data:`CAUSES`; ``detail``: the
    site's rule (``site_error``), what is wrong (``malformed``, ``schema``) or the nodes
    (``duplicate_id``); ``node``: the Flower node, if any."""

    cause: str
    detail: str = ""
    node: str | None = None

    def __post_init__(self):
        if self.cause not in CAUSES:
            raise ValueError(f"failure cause {self.cause!r} is not one of {CAUSES}")

    @property
    def message(self) -> str:
        """The text recorded in :attr:`FederatedResult.failures` (no data in it)."""
        if self.cause == "site_error":
            return self.detail
        if self.cause == "malformed":
            return f"malformed reply: {self.detail}"
        if self.cause == "schema":
            return f"schema differs from the reference: {self.detail}"
        if self.cause in ("offline", "timeout") and self.detail:
            return self.detail  # the round runner's own words: the node, and when it knew
        if self.cause in _TEXT:
            return _TEXT[self.cause] + (f" ({self.detail})" if self.detail else "")
        return f"{self.cause.replace('_', ' ')}: {self.detail}"


@dataclass(frozen=True)
class SummedReply:
    """A securely aggregated round as the coordinator sees it: the sum of the listed sites'
    arrays (refinement statistics, or label counts), never one site's."""

    values: list[np.ndarray]
    sites: tuple[int, ...]


@dataclass(frozen=True)
class InSum:
    """A site's part in a securely aggregated round (its own values are only in the sum)."""

    seconds: float = 0.0
    privacy: dict | None = None
    label_file: str | None = None


@dataclass(frozen=True)
class Round:
    """One round: its position in the plan (1-based), phase, one request per site asked
    (pre-flight: every expected site, which the Flower engine sends to every node), and
    whether its replies are summed securely (SecAgg+)."""

    number: int
    phase: Phase
    requests: dict[int, Request]
    secure: bool = False

    @property
    def sites(self) -> list[int]:
        return sorted(self.requests)


def combine_refinement(
    posterior: Summaries,
    site_stats: Iterable[Summaries],
    fixed: Iterable[Summaries] = (),
    noisy: bool = False,
    empty_threshold: float = 1e-6,
) -> tuple[Summaries, bool, np.ndarray]:
    """Sum the sites' refinement statistics (and the ``fixed`` contributions of sites that do
    not take part) into the next global posterior; ``(posterior, accepted, kept)`` where
    ``kept (G,)`` marks the previous clusters that survive (empty ones are removed).

    A round is one CAVI iteration on the pooled rows (restricted, at sites that apply their
    disclosure floor, to the clusters they may release), so it is accepted only if the ELBO
    does not fall; otherwise the previous posterior is returned with ``accepted=False``. Column
    totals are those of the one-shot summaries (the same rows). ``noisy``: the statistics carry
    differential-privacy noise, so the ELBO is not comparable and every round is accepted. The
    ``c_d`` update (variable selection) runs here, on the summed statistics.
    """
    summed = Summaries.add([*site_stats, *fixed], like=posterior)
    new = dataclasses.replace(
        summed,
        column_totals=posterior.column_totals,
        column_observed=posterior.column_observed,
        n_rows=posterior.n_rows,
    )
    keep = new.counts >= empty_threshold
    if not keep.all():
        new = new.subset(keep)
    if new.spec.variable_selection:
        new = dataclasses.replace(new, relevance=relevance_step(new, new.relevance))
    if not noisy and elbo(new) < elbo(posterior) - 1e-8 * abs(elbo(posterior)):
        return posterior, False, np.ones(posterior.n_clusters, dtype=bool)
    return new, True, keep


#: How the notes that say an asked refinement did not take effect begin (``federated_fit``
#: turns them into warnings when the caller asked for it).
NO_SITE_REFINES = "no site refines"
MOVES_OFF = "refinement moves off"


def refusal_note(round_no: int, withheld: dict[int, list[int]]) -> str:
    """Why refinement round ``round_no`` was not applied, naming the clusters and sites whose
    floor withheld statistics (the usual cause; no sites named under secure aggregation, where
    the server sees only the sum)."""
    text = (
        f"refinement round {round_no} not applied: it would have lowered the ELBO; the next "
        "round starts from it and the best posterior is kept"
    )
    if withheld:
        parts = "; ".join(
            f"cluster {g} at site(s) {', '.join(map(str, s))}"
            if s
            else f"cluster {g} (at every site; secure aggregation names none)"
            for g, s in sorted(withheld.items())
        )
        return text + f" (the sites' disclosure floors withheld: {parts})"
    return text + " (no site's floor withheld a cluster)"


#: Label rounds after the first, each after removing clusters that own no rows (with a
#: refinement round before it when the run refines): the rounds the engines plan for it.
SETTLE_PASSES = 2


def fixed_contribution(summaries: Summaries, mapping: np.ndarray, n_clusters: int) -> Summaries:
    """A site's one-shot statistics per global cluster (what it contributes when it does not
    take part in refinement): its local clusters summed by ``mapping``."""
    return summaries.combine(mapping, n_clusters)


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


def _levels_in_order(pre: Preflight, ref: Preflight) -> np.ndarray:
    """A site's levels per variable, in the reference's order of variables (matched by name
    hash when the tables have names; by position otherwise)."""
    levels = np.asarray(pre.levels)
    if pre.variable_hashes is None or ref.variable_hashes is None:
        return levels
    where = {h: i for i, h in enumerate(pre.variable_hashes)}
    return levels[[where[h] for h in ref.variable_hashes]]


class Coordinator:
    """The run (see the module docstring).

    spec, fit, server: the run's settings. expected_sites: partition ids of the sites to use.
    seed: the run's seed (site ``b`` fits with ``seed + b``; never the seed of any noise).
    resume: a :class:`FittedModel` whose sites are already in it; the expected sites join it
    (no refinement). min_sites: how many sites must remain for the run to go on (default: all).
    secure_aggregation: sum refinement and label replies with SecAgg+ (the Flower engine).
    """

    def __init__(
        self,
        spec: MixtureSpec,
        fit: FitOptions,
        server: ServerOptions,
        expected_sites: Iterable[int],
        seed: int | None = 0,
        resume: FittedModel | None = None,
        min_sites: int | None = None,
        secure_aggregation: bool = False,
    ):
        self.spec, self.fit, self.server = spec, fit, server
        self.expected = tuple(sorted(int(s) for s in expected_sites))
        if len(set(self.expected)) != len(self.expected):
            raise ValueError(f"expected sites are not distinct: {list(expected_sites)}")
        if resume is not None:  # the model's own sites are already in it
            self.expected = tuple(s for s in self.expected if s not in resume.site_ids)
            self.spec = resume.spec
            self.server = dataclasses.replace(server, refine_rounds=0)
        if not self.expected:
            raise ValueError("no expected sites (besides those already in the resumed model)")
        self.min_sites = len(self.expected) if min_sites is None else int(min_sites)
        if not 1 <= self.min_sites <= len(self.expected):
            raise ValueError(
                f"min_sites={self.min_sites} must be in 1..{len(self.expected)} (expected sites)"
            )
        self.seed = None if seed is None else int(seed)
        self.resume = resume
        self.secure_aggregation = bool(secure_aggregation)
        self.phases = (
            [Phase.PREFLIGHT, Phase.LOCAL] + [Phase.REFINE] * self.server.refine_rounds
        ) + [Phase.LABEL]
        # Slots after the label round, used only when clusters that own no rows are removed.
        self.plan = self.phases + [Phase.REFINE, Phase.LABEL] * SETTLE_PASSES
        self.result = FederatedResult(label_mode=self.server.label_mode)
        self.result.privacy = {
            "secure_aggregation": self.secure_aggregation,
            "dp_epsilon": self.server.dp_epsilon,
            "dp_delta": self.server.dp_delta,
        }
        if resume is not None:
            self.result.notes.append(
                f"resumed from a model of {len(resume.site_ids)} sites {list(resume.site_ids)}: "
                "new sites are merged in, no refinement rounds"
            )
        self.preflights: dict[int, Preflight] = {}
        self.agreed_spec: MixtureSpec | None = None
        self.variable_order: tuple[str, ...] | None = None
        self.posterior: Summaries | None = None
        self.membership: np.ndarray | None = None
        self.fixed: dict[int, Summaries] = {}
        self.schema_told: set[int] = set()  # left out for their schema; told in round 2
        self.refining = True
        self.refined = 0  # refinement rounds applied
        self.refine_runs = 0  # refinement rounds run
        self.moves = False  # refinement moves on (decided after the merge)
        self.main: Track | None = None  # the posterior refinement goes on from
        self.best: Track | None = None  # the best applied one
        self.best_elbo = -np.inf
        self.trials: list[DeleteTrial] = []
        self.failed_moves: dict[str, dict[int, float]] = {"delete": {}, "split": {}}
        self._split_plan: tuple[np.ndarray, np.ndarray] | None = None
        self.settle_map: np.ndarray | None = None  # (G_merge,) ids after settling (-1: gone)
        self._pending: str | None = None  # settling: "refit" (refine, label) or "label"
        self._labelled = False
        self._next = 0  # index in self.plan
        self._open: Round | None = None
        self._t0 = 0.0
        self.done = False

    def __repr__(self) -> str:
        return f"Coordinator(sites={list(self.expected)}, phases={[p.value for p in self.phases]})"

    # --- the roster -------------------------------------------------------------------------
    @property
    def roster(self) -> dict[int, dict]:
        """Every site the run knows of: ``{"state": "expected" | "taking part" | "left out",
        "reason": ..., "node": ...}``."""
        out = {s: {"state": "expected", "reason": None, "node": None} for s in self.expected}
        for s, rep in self.result.sites.items():
            state = "taking part" if rep.status == "ok" else "left out"
            out[s] = {"state": state, "reason": rep.error, "node": rep.node_id}
        return dict(sorted(out.items()))

    def _report(self, site: int) -> SiteReport:
        if site not in self.result.sites:
            self.result.sites[site] = SiteReport(site=site)
        return self.result.sites[site]

    def ok_sites(self) -> list[int]:
        return [s for s, r in sorted(self.result.sites.items()) if r.status == "ok"]

    def allows(self, site: int, rule: str) -> bool:
        """Whether a site's policy (as it reported it in pre-flight) lets it answer a round: a
        site that requires secure aggregation answers refine and label rounds only when the
        run uses it."""
        pre = self.preflights.get(site)
        if pre is None:
            return True
        if pre.policy.get("require_secure_aggregation") and not self.secure_aggregation:
            return False
        return bool(pre.policy.get(rule, True))

    def participants(self, phase: Phase) -> list[int]:
        """The sites a phase is sent to."""
        if phase is Phase.PREFLIGHT:
            return list(self.expected)
        ok = self.ok_sites()
        if phase is Phase.LOCAL:
            return ok
        if phase is Phase.REFINE:
            return [s for s in ok if s not in self.fixed and self.allows(s, "allow_refine")]
        return [s for s in ok if self.allows(s, "allow_labels")]

    def fail(self, phase: Phase, site: int | None, failure: Failure) -> None:
        """Record a failure (the site is left out of later phases, except after labelling)."""
        self.result.failures.append(
            {
                "phase": phase.value,
                "site": site,
                "node": failure.node,
                "error": failure.message,
                "cause": failure.cause,
            }
        )
        # A site that refused a refinement round by its own policy (a cap, its budget) keeps
        # its one-shot statistics and still labels; any other failure leaves it out.
        refused = (
            phase is Phase.REFINE
            and failure.cause == "site_error"
            and failure.detail.startswith(PolicyRefusal.PREFIX)
        )
        if site is not None and phase is not Phase.LABEL and not refused:
            rep = self._report(site)
            rep.status, rep.error = "failed", failure.message
            if failure.node is not None and rep.node_id is None:
                rep.node_id = failure.node

    def _stop_refining(self, why: str) -> None:
        if self.refining:
            self.refining = False
            self.result.notes.append(f"refinement stopped: {why}")

    def _require(self, phase: Phase, n: int) -> None:
        if n < self.min_sites:
            detail = "; ".join(f"site {f['site']}: {f['error']}" for f in self.result.failures)
            raise SiteFailureError(
                f"phase {phase.value!r}: only {n} of {len(self.expected)} sites can go on "
                f"(min_sites={self.min_sites}). Failures: {detail or 'none reported'}"
            )

    @property
    def noisy(self) -> bool:
        """Whether aggregate releases carry differential-privacy noise (the run's or a site's
        own epsilon, as reported in pre-flight)."""
        return self.server.dp_epsilon is not None or any(
            p.policy.get("dp_epsilon") for p in self.preflights.values()
        )

    @property
    def one_shot(self) -> bool:
        """No refinement round was applied: the posterior is the merge's."""
        return self.refined == 0

    def secagg_scale(self) -> float:
        """One power-of-two scale above any value a site may send in a SecAgg+ round: the
        largest site's rows times ``log G`` (entropies), with room for DP noise."""
        rows = max((p.n_rows for p in self.preflights.values()), default=1)
        G = self.posterior.n_clusters if self.posterior is not None else 2
        bound = rows * max(1.0, float(np.log(max(G, 2)))) + 1.0
        if self.noisy:
            bound *= 4.0  # clamped noisy values stay within the counts; headroom for the sum
        return secagg.secagg_scale(bound)

    # --- rounds -------------------------------------------------------------------------------
    def request(
        self,
        phase: Phase,
        site: int | None = None,
        secure: bool = False,
        moves: RefineMoves | None = None,
    ) -> Request:
        """The request of ``phase`` for ``site`` (the same for every site, except map labels)."""
        posterior = mapping = None
        if phase in (Phase.REFINE, Phase.LABEL):
            posterior = self.posterior
        if phase is Phase.LABEL and self.result.label_mode == "map":
            # A local cluster whose global cluster was removed (settling) labels no rows: any
            # valid id serves.
            mapping = np.maximum(self.result.sites[site].mapping, 0)
        return Request(
            phase=phase,
            spec=self.agreed_spec or self.spec,
            fit=self.fit,
            server=self.server,
            seed=self.seed,
            posterior=posterior,
            mapping=mapping,
            secagg_scale=self.secagg_scale() if secure else None,
            variable_order=None if phase is Phase.PREFLIGHT else self.variable_order,
            moves=moves,
        )

    def _propose(self) -> RefineMoves | None:
        """The moves the next refinement round carries (:mod:`fedvi.refine_moves`): pairs
        to score, split candidates and the delete trials in flight (new ones proposed)."""
        if not self.moves or self._pending is not None:
            return None
        main, server = self.main, self.server
        pairs = propose_pairs(main.posterior, server.refine_max_pairs)
        busy = {t.cid for t in self.trials}
        n_del = server.refine_deletes - len(self.trials)
        self.trials += propose_deletes(main, self.failed_moves["delete"], busy, n_del)
        splits = propose_splits(main, self.failed_moves["split"], server.refine_splits)
        self._split_plan = (main.cids[splits], main.posterior.counts[splits])
        return RefineMoves(pairs, splits, tuple(t.track.posterior for t in self.trials))

    def _end_refinement(self) -> None:
        """Refinement is over: the best applied posterior is the run's (a pooled start that
        never caught up with the one-shot merge gives way to the merge)."""
        if self.best is None or self._labelled:
            return
        best, merged = self.best, self.result.merge
        if self.best_elbo < merged.elbo and not self.noisy:
            best = Track(merged.posterior, merged.membership, np.arange(merged.n_clusters))
        self.posterior, self.membership = best.posterior, best.membership
        self.trials = []

    def next_round(self) -> Round | None:
        """The next round to run, or ``None`` when the run is over (:attr:`result` settled)."""
        if self._open is not None:
            raise RuntimeError(f"round {self._open.number} has not been accepted yet")
        while self._next < len(self.plan) and not self.done:
            number, phase = self._next + 1, self.plan[self._next]
            self._next += 1
            settling = self._next > len(self.phases)
            if settling and phase is Phase.REFINE and self._pending != "refit":
                continue
            if settling and phase is Phase.LABEL and self._pending is None:
                continue
            if phase is Phase.REFINE and not (self.refining or settling):
                continue
            sites = self.participants(phase)
            if phase is Phase.LOCAL:
                # A site left out for its schema still gets the local request with the agreed
                # variables, so that it can say in its own log, by its own column names, what
                # differs; it refuses before fitting and its answer is not used.
                sites = sorted({*sites, *self.schema_told})
            secure = self.secure_aggregation and phase in (Phase.REFINE, Phase.LABEL)
            if secure and len(sites) < 2:
                # SecAgg+ cannot sum one site's arrays.
                if phase is Phase.REFINE:
                    self._stop_refining("secure aggregation needs at least 2 sites that take part")
                    continue
                secure = False
                self.result.notes.append(
                    f"round {number} ({phase.value}) ran without secure aggregation: fewer "
                    "than 2 sites take part"
                )
            if phase is Phase.REFINE and not sites:
                self._stop_refining(
                    f"{NO_SITE_REFINES} (refine_rounds={self.server.refine_rounds} asked; "
                    "allow-refine is false in their policies, or they are too small for their "
                    "privacy budget): the one-shot merge is the result"
                )
                continue
            if phase is Phase.LABEL and not self._labelled:
                self._end_refinement()
                use_map = self.server.label_mode == "map" and self.one_shot
                self.result.label_mode = "map" if use_map else "posterior"
            if phase is Phase.LABEL and self.result.label_mode == "map":
                requests = {s: self.request(phase, s, secure) for s in sites}
            else:
                moves = self._propose() if phase is Phase.REFINE else None
                common = self.request(phase, None, secure, moves)
                requests = dict.fromkeys(sites, common)
            self._open = Round(number, phase, requests, secure)
            self._t0 = time.perf_counter()
            return self._open
        self._finish()
        return None

    def accept(
        self,
        rnd: Round,
        replies: Mapping[int, object],
        summed: SummedReply | None = None,
        nodes: Mapping[int, str] | None = None,
        unattributed: Iterable[Failure] = (),
    ) -> None:
        """Take a round's replies: per site a typed reply, an :class:`InSum` (secure rounds) or
        a :class:`Failure`; ``summed``: the secure sum; ``nodes``: the Flower node of each site
        that answered (pre-flight); ``unattributed``: failures of nodes that named no site
        (pre-flight; later, a site that does not answer is named as ``offline``).
        Raises :class:`SiteFailureError` when the run cannot go on (the result records why)."""
        if rnd is not self._open:
            raise RuntimeError(f"round {rnd.number} is not the open round")
        self._open = None
        nodes = dict(nodes or {})
        phase = rnd.phase
        if phase is Phase.LOCAL:  # left out already (schema); asked only to tell its operator
            replies = {s: r for s, r in replies.items() if s not in self.schema_told}
        try:
            for failure in unattributed:
                if phase is Phase.PREFLIGHT:
                    self.fail(phase, None, failure)
            good: dict[int, object] = {}
            for site, reply in sorted(replies.items()):
                if isinstance(reply, Failure):
                    if reply.cause == "duplicate_id":
                        raise SiteIdentityError(
                            f"two nodes claim site {site} (partition-id): nodes {reply.detail}; "
                            "give each SuperNode its own partition-id"
                        )
                    if reply.cause == "not_expected" or site not in rnd.requests:
                        self._not_expected(site, reply.node)
                        continue
                    self.fail(phase, site, reply)
                elif site not in rnd.requests:
                    self._not_expected(site, nodes.get(site))
                else:
                    good[site] = reply
            missing = [s for s in rnd.sites if s not in replies and s not in self.schema_told]
            cause = "not_connected" if phase is Phase.PREFLIGHT else "no_reply"
            for site in missing:
                node = self.result.sites[site].node_id if site in self.result.sites else None
                self.fail(phase, site, Failure(cause, node=node))
            handler = {
                Phase.PREFLIGHT: self._preflight,
                Phase.LOCAL: self._local,
                Phase.REFINE: self._refine,
                Phase.LABEL: self._label,
            }[phase]
            handler(rnd, good, summed, nodes)
            if phase is Phase.LABEL:
                self._labelled = True
                self._settle(rnd)
                if self._pending is None:  # nothing left to settle: the last round
                    self._finish()
        except Exception as exc:
            self.done = True
            self.result.settle(exc)
            raise
        finally:
            took = time.perf_counter() - self._t0
            self.result.timings[phase.value] = self.result.timings.get(phase.value, 0.0) + took

    def _not_expected(self, site: int, node: str | None) -> None:
        who = f"node {node}" if node is not None else "a site"
        self.result.notes.append(
            f"{who} claims site {site}, which is not an expected site: not used"
        )

    def _typed(self, phase: Phase, site: int, reply, kind) -> bool:
        if isinstance(reply, kind):
            return True
        self.fail(phase, site, Failure("malformed", f"not a {phase.value} reply", self._node(site)))
        return False

    def _node(self, site: int) -> str | None:
        rep = self.result.sites.get(site)
        return None if rep is None else rep.node_id

    def _seconds(self, phase: Phase, site: int, reply) -> None:
        rep = self.result.sites[site]
        rep.seconds[phase.value] = float(getattr(reply, "seconds", 0.0))
        privacy = getattr(reply, "privacy", None)
        if privacy:
            rep.privacy = dict(privacy)

    # --- phases -------------------------------------------------------------------------------
    def _preflight(self, rnd, good, summed, nodes) -> None:
        for site, pre in good.items():
            if not self._typed(rnd.phase, site, pre, Preflight):
                continue
            try:
                check_preflight(pre)
            except BadReply as exc:
                self.fail(rnd.phase, site, Failure("malformed", str(exc), nodes.get(site)))
                continue
            self.preflights[site] = pre
            rep = self._report(site)
            rep.node_id, rep.n_rows, rep.status = nodes.get(site), pre.n_rows, "ok"
            rep.schema = {
                "n_rows": pre.n_rows,
                "n_features": pre.n_features,
                "levels": list(pre.levels),
                "names_hash": pre.names_hash,
                "has_missing": pre.has_missing,
            }
            rep.policy = dict(pre.policy)
            self._seconds(rnd.phase, site, pre)
        self._agree_schema()
        self._require(Phase.PREFLIGHT, len(self.ok_sites()))

    def _agree_schema(self) -> None:
        """Leave out sites whose schema differs from the reference (the resumed model's, the
        configured variable names, or the first site's), and agree on the levels."""
        ok = self.ok_sites()
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
            if diff is None and model.likelihood == "bernoulli" and any(v > 2 for v in pre.levels):
                diff = "non-binary values in a Bernoulli model"
            if diff is not None:
                self.fail(Phase.PREFLIGHT, s, Failure("schema", diff, self._node(s)))
                if ref.variable_hashes is not None and pre.variable_hashes is not None:
                    self.schema_told.add(s)
        ok = self.ok_sites()
        if not ok:
            return
        if ref.variable_hashes is not None and model.feature_names is None:
            self.variable_order = tuple(ref.variable_hashes)
        if model.resolved:
            self.agreed_spec = model
            return
        if model.likelihood == "categorical" and model.n_levels is None:
            levels = np.max([_levels_in_order(self.preflights[s], ref) for s in ok], axis=0)
        elif isinstance(model.n_levels, int):
            levels = np.full(self.preflights[ok[0]].n_features, model.n_levels)
        else:
            levels = np.full(self.preflights[ok[0]].n_features, 2)
        self.agreed_spec = model.resolve(levels, model.feature_names)

    def _local(self, rnd, good, summed, nodes) -> None:
        sites, summaries = [], []
        asked = (self.agreed_spec or self.spec).n_components
        for site, reply in good.items():
            if not self._typed(rnd.phase, site, reply, LocalReply):
                continue
            try:
                check_summaries(reply.summaries, self.preflights[site].n_rows, asked)
                check_compatible([reply.summaries], [f"site {site}"])
                spec = reply.summaries.spec
                agreed = self.agreed_spec
                if agreed is not None and tuple(spec.n_levels) != tuple(agreed.n_levels):
                    raise BadReply("summaries under other levels than the agreed ones")
            except (BadReply, ValueError) as exc:
                self.fail(rnd.phase, site, Failure("malformed", str(exc), self._node(site)))
                continue
            rep = self.result.sites[site]
            rep.summaries, rep.n_rows = reply.summaries, reply.summaries.n_rows
            rep.n_iter, rep.converged = int(reply.n_iter), bool(reply.converged)
            rep.add_uplink("local", reply.summaries.to_arrays())
            self._seconds(rnd.phase, site, reply)
            sites.append(site)
            summaries.append(reply.summaries)
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
        self.result.elbo_history = [float(merged.elbo_before), float(merged.elbo)]
        for s in sites:
            if not self.allows(s, "allow_refine"):
                rep = self.result.sites[s]
                self.fixed[s] = fixed_contribution(
                    rep.summaries, rep.mapping, self.posterior.n_clusters
                )
        G = merged.n_clusters
        self.settle_map = np.arange(G)
        self.main = Track(merged.posterior, merged.membership, np.arange(G))
        # Moves need exact sums from every site that refines (no noise, no fixed part).
        no_moves = [s for s in sites if not self.allows(s, "allow_refine_moves")]
        self.moves = bool(
            self.server.refine_moves
            and self.server.refine_rounds > 0
            and not self.noisy
            and not self.fixed
            and not no_moves
            and self.resume is None
        )
        self._note_refinement(sites, no_moves)
        if self.moves and self.server.refine_start == "pooled":
            local = [self.result.sites[s].summaries for s in sites]
            self.main = pooled_start(local, merged.posterior)
            self.posterior, self.membership = self.main.posterior, self.main.membership
        self.best, self.best_elbo = self.main, float(elbo(self.main.posterior))

    def _note_refinement(self, sites: list[int], no_moves: list[int]) -> None:
        """Say in the result's notes when the asked refinement (or its moves) will not run as
        asked because of the sites' own policies (``no_moves``: the sites that refuse move
        statistics), so that a run never looks refined when it is not."""
        if self.server.refine_rounds == 0 or self.resume is not None:
            return
        fixed = sorted(self.fixed)
        if fixed and len(fixed) < len(sites):  # none refines: "refinement stopped" says so
            self.result.notes.append(
                f"sites {fixed} do not refine (allow-refine false, or too small for their "
                "privacy budget): their one-shot statistics stay fixed in the refinement rounds"
            )
        if self.server.refine_moves and not self.moves and len(fixed) < len(sites):
            unknown = "so the exact ELBO that decides a move is unknown"
            if fixed:
                why = f"a site does not refine, {unknown}"
            elif self.noisy:
                why = f"the sites add privacy noise, {unknown}"
            else:
                why = (
                    f"sites {no_moves} do not send move statistics "
                    "(allow-refine-moves=false in their policy)"
                )
            self.result.notes.append(f"{MOVES_OFF}: {why}")

    def _refine(self, rnd, good, summed, nodes) -> None:
        settling = self._pending == "refit"
        if settling:  # whatever happens, the label round follows
            self._pending = "label"
        req = rnd.requests[rnd.sites[0]]
        missing = [s for s in rnd.sites if s not in good]
        if missing:
            self._stop_refining(f"sites {missing} did not answer round {rnd.number}")
            return
        replies = self._refine_replies(rnd, req, good, summed)
        if replies is None:
            return
        if settling:
            self._refit(self.posterior, replies)
        else:
            self._refine_step(req, replies)

    def _refine_replies(self, rnd, req, good, summed) -> dict[int, RefineReply] | None:
        """The round's checked replies: per site, or one for the secure sum (site ``-1``);
        ``None`` when refinement stops because of a malformed one."""
        noisy, post = self.noisy, self.posterior
        if rnd.secure:
            try:
                if summed is None or sorted(summed.sites) != rnd.sites:
                    raise BadReply("the secure sum does not cover the sites asked")
                n_rows = sum(self.result.sites[s].n_rows for s in rnd.sites)
                total = decode_refine_reply(summed.values, req, n_rows)
                check_refinement(total.stats, post, n_rows, noisy)
                check_move_statistics(total, req, n_rows)
            except (BadReply, ValueError) as exc:
                for s in rnd.sites:
                    self.fail(rnd.phase, s, Failure("malformed", f"secure sum: {exc}"))
                self._stop_refining("the securely summed statistics were malformed")
                return None
            width = len(encode_refine(total.stats))
            for s in rnd.sites:
                self._seconds(rnd.phase, s, good[s])
                self.result.sites[s].add_uplink("refine", summed.values[:width])
                if req.moves is not None:
                    self.result.sites[s].add_uplink("refine_moves", summed.values[width:])
            return {-1: total}
        for site, reply in good.items():
            try:
                if not isinstance(reply, RefineReply):
                    raise BadReply("not a refine reply")
                n_rows = self.result.sites[site].n_rows
                check_refinement(reply.stats, post, n_rows, noisy)
                check_move_statistics(reply, req, n_rows)
            except BadReply as exc:
                self.fail(rnd.phase, site, Failure("malformed", str(exc), self._node(site)))
                self._stop_refining(f"site {site} sent malformed statistics")
                return None
        for site, reply in good.items():
            self._seconds(rnd.phase, site, reply)
            arrays = reply.to_arrays()
            width = len(encode_refine(reply.stats))
            self.result.sites[site].add_uplink("refine", arrays[:width])
            if req.moves is not None:
                self.result.sites[site].add_uplink("refine_moves", arrays[width:])
        return dict(good)

    def _refine_step(self, req: Request, replies: dict[int, RefineReply]) -> None:
        """One refinement round (docs/method.md §7): the pooled CAVI step, the exact merges,
        splits and delete trials, the best posterior and convergence."""
        noisy, moves, server = self.noisy, req.moves, self.server
        self.refine_runs += 1
        r = self.refine_runs
        main, best_elbo = self.main, self.best_elbo
        withheld: dict[int, list[int]] = {}
        if not noisy:  # a withheld cluster is released as zeros by the site
            for site, reply in sorted(replies.items()):
                for g in np.flatnonzero((reply.stats.counts == 0) & (main.posterior.counts > 0)):
                    withheld.setdefault(int(g), []).extend([] if site < 0 else [site])
        stats = [rep.stats for rep in replies.values()]
        new, _, kept = combine_refinement(main.posterior, stats, list(self.fixed.values()), True)
        lowered = not noisy and elbo(new) < best_elbo - 1e-8 * abs(best_elbo)
        pairs = None if moves is None else moves.pairs
        log = {"round": r, "applied": not lowered, "withheld": withheld, "merges": 0}
        log.update(candidates=0 if pairs is None else len(pairs), deletes=0, splits=0)
        self.result.rounds.append(log)
        if lowered:
            self.result.notes.append(refusal_note(r, withheld))
        self.fixed = {s: f.subset(kept) for s, f in self.fixed.items()}
        main = main.after_round(new, kept)
        if moves is not None:
            main = self._apply_moves(main, moves, kept, list(replies.values()), log)
        log["elbo"] = float(elbo(main.posterior))
        # Applied: not lower than the best so far (to the tolerance of combine_refinement).
        if noisy or log["elbo"] >= best_elbo - 1e-8 * abs(best_elbo):
            self.best, self.best_elbo = main, log["elbo"]
            self.refined += 1
            self.result.elbo_history.append(self.best_elbo)  # after each applied round
        self.main = main
        self.posterior, self.membership = main.posterior, main.membership
        moved = log["merges"] or log["deletes"] or log["splits"] or self.trials
        gain = self.best_elbo - best_elbo
        small = server.refine_tol > 0 and gain < server.refine_tol * abs(self.best_elbo)
        if not (noisy or moved or lowered) and small and self.refining:
            self.refining = False
            self.result.notes.append(f"refinement converged after {r} rounds")

    def _apply_moves(self, main: Track, moves: RefineMoves, kept, replies, log) -> Track:
        """Score and apply the round's merges, splits and delete trials from the summed
        replies (exact ELBO; :mod:`fedvi.refine_moves`)."""
        splits = moves.splits
        split_cids, split_counts = self._split_plan
        # Split candidates in the round's ids (-1: gone or merged this round).
        at = np.where(kept, np.cumsum(kept) - 1, -1)[splits] if len(splits) else np.full(0, -1)
        if len(moves.pairs):
            pair_h = np.sum([rep.pair_entropy for rep in replies], axis=0)
            p2, h2 = remap_pairs(moves.pairs, kept, pair_h)
            outcome = apply_merges(main.posterior, p2, h2)
            if outcome.n_merges:
                main = main.merged(outcome)
                log["merges"] = outcome.n_merges
                hit = np.isin(at, outcome.accepted.ravel())
                at = np.where(hit | (at < 0), -1, outcome.group_of[np.maximum(at, 0)])
        if len(at):
            ok = at >= 0
            second = np.sum([rep.second for rep in replies], axis=0)
            done = apply_splits(main.posterior, at[ok], second[ok])
            if done.split:
                main = main.split(done)
                log["splits"] = len(done.split)
            for cid, count, k in zip(split_cids, split_counts, at, strict=True):
                if k not in done.split:
                    self.failed_moves["split"][int(cid)] = float(count)
        for i, t in enumerate(self.trials):
            t_new, _, t_kept = combine_refinement(
                t.track.posterior, [rep.trials[i] for rep in replies], noisy=True
            )
            t.track = t.track.after_round(t_new, t_kept)
            t.rounds_left -= 1
        done_trials = [t for t in self.trials if t.rounds_left == 0]
        self.trials = [t for t in self.trials if t.rounds_left > 0]
        winner = max(done_trials, key=lambda t: elbo(t.track.posterior), default=None)
        if winner is not None and elbo(winner.track.posterior) > elbo(main.posterior):
            main = winner.track
            log["deletes"] = 1
            self.trials = []  # the others were proposals against the replaced posterior
        for t in done_trials:
            if t is not winner or main is not t.track:
                self.failed_moves["delete"][t.cid] = t.count
        return main

    def _refit(self, post: Summaries, replies: dict[int, RefineReply]) -> None:
        """The exact refinement round after settling: the sites' rows reassigned without the
        removed clusters (always applied: the removed clusters' mass moves to the others)."""
        new, _, kept = combine_refinement(post, [r.stats for r in replies.values()], noisy=True)
        self.membership = self.membership[kept]
        new_id = np.full(len(kept), -1)
        new_id[kept] = np.arange(int(kept.sum()))
        self._compose(new_id)
        self.posterior = new
        self.result.elbo_history.append(float(elbo(new)))

    def _compose(self, old_to_new: np.ndarray) -> None:
        m = self.settle_map
        self.settle_map = np.where(m >= 0, old_to_new[np.maximum(m, 0)], -1)

    def _settle(self, rnd: Round) -> None:
        """After a label round: remove the global clusters that own no rows
        (:func:`fedvi.settle.settle_clusters` on the released label counts; with a secure sum,
        or a site that reported none, on the mass), and plan the rounds that relabel."""
        self._pending = None
        if self.posterior is None:
            return
        if self._next >= len(self.plan):  # no slot left: the clusters stay
            return
        G = self.posterior.n_clusters
        ok = [s for s in rnd.sites if self.result.sites[s].status == "ok"]
        counts = [self.result.sites[s].counts for s in ok]
        counts = [c if c is not None and len(c) == G else None for c in counts]
        if rnd.secure or self.resume is not None or len(ok) < len(self.ok_sites()):
            counts = [*counts, None]  # some site's counts are not known: the mass decides
        settled = settle_clusters(self.posterior, counts)
        if not settled.n_removed:
            return
        removed = np.flatnonzero(~settled.keep).tolist()
        if self.noisy:
            self.result.notes.append(
                f"clusters {removed} seem to own no rows by the noisy label counts: kept (a "
                "label round more would spend privacy budget)"
            )
            return
        self.result.notes.append(f"clusters {removed} own no rows: removed at the end of the run")
        self.membership = self.membership[settled.keep]
        self.posterior = self.posterior.subset(settled.keep)
        self._compose(settled.old_to_new)
        for s in self.ok_sites():
            rep = self.result.sites[s]
            if rep.mapping is not None:
                rep.mapping = settled.old_to_new[rep.mapping]
            if rep.counts is not None and len(rep.counts) == G:
                rep.counts = rep.counts[settled.keep]
        refit = (
            self.server.refine_rounds > 0
            and not self.fixed
            and self.resume is None
            and bool(self.participants(Phase.REFINE))
        )
        self._pending = "refit" if refit else "label"

    def _label(self, rnd, good, summed, nodes) -> None:
        G = self.posterior.n_clusters
        noisy = self.noisy
        if rnd.secure:
            if summed is None or not good:
                if any(f["cause"] == "secagg_halted" for f in self.result.failures):
                    self.result.notes.append(f"label counts unknown: {_TEXT['secagg_halted']}")
                return
            n_rows = sum(self.result.sites[s].n_rows for s in summed.sites)
            try:
                total = check_label_counts(
                    np.rint(summed.values[0]), G, n_rows, marker=0, noisy=noisy
                )
            except (BadReply, IndexError) as exc:
                for s in summed.sites:
                    self.fail(rnd.phase, s, Failure("malformed", f"secure sum: {exc}"))
                return
            self.result.privacy["label_counts_total"] = total.tolist()
            for s in summed.sites:
                self.result.sites[s].counts = None
                self.result.sites[s].label_file = getattr(good.get(s), "label_file", None)
                self._seconds(rnd.phase, s, good.get(s, InSum()))
            return
        for site, reply in good.items():
            rep = self.result.sites[site]
            try:
                if not isinstance(reply, LabelReply):
                    raise BadReply("not a label reply")
                counts = check_label_counts(reply.counts, G, rep.n_rows, noisy=noisy)
            except BadReply as exc:
                self.fail(rnd.phase, site, Failure("malformed", str(exc), self._node(site)))
                continue
            rep.counts = counts
            rep.label_file = reply.file
            rep.add_uplink("label", [counts])
            self._seconds(rnd.phase, site, reply)

    def _finish(self) -> None:
        """The end of the run: the global model and the status (``settle``)."""
        if self.done:
            return
        self.done = True
        if self.posterior is not None:
            model_sites = list(self.result.merge.site_ids) if self.result.merge else []
            info = {}
            base_map = self.result.merge.base_map if self.result.merge else None
            if self.resume is not None and base_map is not None:
                # The resumed model's clusters in the new ids (-1: removed), for its sites'
                # labels (``python -m fedvi label --relabel``).
                m = self.settle_map
                self.result.id_map = np.where(base_map >= 0, m[np.maximum(base_map, 0)], -1)
                info = {
                    **self.resume.info,
                    "id_map": {
                        "from_n_clusters": self.resume.n_clusters,
                        "map": self.result.id_map.tolist(),
                    },
                }
            self.result.model = FittedModel(
                self.posterior, tuple(model_sites), self.membership, info=info
            )
            failed = [s for s, r in self.result.sites.items() if r.status != "ok"]
            self.result.status = (
                "completed_with_failures" if (failed or self.result.failures) else "completed"
            )
        self.result.settle()
