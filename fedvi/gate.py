"""The site's release gate: every release is allowed, priced and logged here, from the ledger.

A site (the ClientApp or ``federated_fit``) asks its :class:`SiteGate` before each release and
tells it after. The gate reads its caps and its privacy budget from the site's
:class:`fedvi.ledger.Ledger`, never from the request, so they hold within a run, across runs
and across restarts:

- ``max-local-fits`` local fits and ``max-runs`` runs per ``period-days`` (one-shot summaries are
  exact: only the floor and these caps bound what repeated fits reveal);
- ``agreed-model``: a refine or label posterior must carry the model agreed in this run's local
  fit (:func:`fedvi.policy.check_agreed_model`), and a local fit the one announced at pre-flight;
- ``max-aggregate-releases`` refinement + label releases per run;
- the privacy budget (``dp-epsilon`` per run, ``dp-epsilon-period`` over a period, zCDP rho
  added across releases and runs; ``dp-delta`` at most ``1/N``): each release of a run spends
  an equal share, fixed at the run's first aggregate release;
- ``dp-useful-release``: a site too small for its budget declines refinement
  (:func:`fedvi.privacy.refinement_useful`); its one-shot statistics stand.

The noise generator is the gate's: the site's own entropy (:func:`fedvi.privacy.site_entropy`).
"""

from __future__ import annotations

import uuid

import numpy as np

from fedvi.ledger import Ledger
from fedvi.options import ServerOptions
from fedvi.policy import PolicyRefusal, SitePolicy, check_agreed_model
from fedvi.privacy import (
    epsilon_for,
    planned_releases,
    refinement_useful,
    rho_for,
    run_budget,
    site_delta,
    site_entropy,
)

AGGREGATE_PHASES = ("refine", "label")
DAY = 86400.0


class SiteGate:
    """One site's gate for one run (``run_id``; a fresh random id when not given).

    ``rng``: the site's noise generator (tests inject one; default OS entropy).
    """

    def __init__(
        self,
        policy: SitePolicy,
        ledger: Ledger,
        run_id: str | None = None,
        rng: np.random.Generator | None = None,
    ):
        self.policy = policy
        self.ledger = ledger
        self.run = str(run_id) if run_id is not None else uuid.uuid4().hex
        self.rng = site_entropy(rng)
        self._plan = 1  # the plan of the release being made (set by aggregate)

    # -- ledger views ------------------------------------------------------------------------
    def _period(self) -> list[dict]:
        return self.ledger.since(self.policy.period_days * DAY)

    def _released(self, lines, phases) -> list[dict]:
        return [e for e in lines if e.get("decision") == "released" and e.get("phase") in phases]

    def _this_run(self, phases) -> list[dict]:
        return [e for e in self._released(self.ledger.entries(), phases) if e["run"] == self.run]

    def agreed_model(self) -> dict | None:
        """The resolved model of this run's latest local fit (``None`` before one)."""
        local = self._this_run(("local",))
        return local[-1]["model"] if local else None

    # -- refusals ----------------------------------------------------------------------------
    def refuse(self, phase: str, rule: str, reason: str, sha: str | None = None):
        """Log a refusal and raise it (a :class:`PolicyRefusal` naming ``rule``)."""
        exc = PolicyRefusal(rule, reason)
        self.log_refusal(phase, exc, sha)
        raise exc

    def log_refusal(self, phase: str, exc: PolicyRefusal, sha: str | None = None) -> None:
        """Log a refusal raised elsewhere in the site (its rule only); marks it logged."""
        exc.logged = True
        self.ledger.append(
            run=self.run, phase=phase, request_sha256=sha, decision="refused", rule=exc.rule
        )

    # -- pre-flight and local fits -----------------------------------------------------------
    def preflight(
        self, spec, n_rows: int, n_features: int, server: ServerOptions, sha: str | None = None
    ) -> bool:
        """Log the pre-flight (the model it announces) and say whether the site declines
        refinement (too small for its budget: ``True``)."""
        self.ledger.append(
            run=self.run,
            phase="preflight",
            rows=int(n_rows),
            released="schema and row count",
            model=spec.to_dict(),
            request_sha256=sha,
            decision="released",
        )
        return not self.refinement_useful(n_rows, n_features, server)

    def refinement_useful(self, n_rows: int, n_features: int, server: ServerOptions) -> bool:
        """Whether this site's budget gives a useful refinement release (always, without DP)."""
        budget = run_budget(self.policy, server, n_rows)
        if budget is None:
            return True
        rho = min(rho_for(*budget), self._period_left(n_rows)) / planned_releases(
            self.policy, server
        )
        return rho > 0 and refinement_useful(n_rows, n_features, rho)

    def start_local(self, spec, sha: str | None = None) -> None:
        """Check the caps of a local fit (``max-local-fits``, ``max-runs``) and that its model
        is the one this run announced at pre-flight; refuses (logged) otherwise."""
        period = self._period()
        fits = self._released(period, ("local",))
        if len(fits) >= self.policy.max_local_fits:
            self.refuse(
                "local",
                "max-local-fits",
                f"this site released {len(fits)} local fits in {self.policy.period_days:g} "
                "days, its cap",
                sha,
            )
        runs = {e["run"] for e in fits}
        if self.run not in runs and len(runs) >= self.policy.max_runs:
            self.refuse(
                "local",
                "max-runs",
                f"this site joined {len(runs)} runs in {self.policy.period_days:g} days, its cap",
                sha,
            )
        pre = [e for e in self._released(self.ledger.entries(), ("preflight",))]
        pre = [e for e in pre if e["run"] == self.run]
        if pre and _unresolved(pre[-1]["model"]) != _unresolved(spec.to_dict()):
            self.refuse(
                "local",
                "agreed-model",
                "the local fit's model differs from the one announced at pre-flight",
                sha,
            )

    def local_released(
        self, resolved_spec, n_clusters: int, n_rows: int, floor: int, sha: str | None = None
    ) -> None:
        """Log a local fit's release (its resolved model becomes this run's agreed model)."""
        self.ledger.append(
            run=self.run,
            phase="local",
            clusters=int(n_clusters),
            rows=int(n_rows),
            released="one-shot summaries (exact)",
            floor=int(floor),
            model=resolved_spec.to_dict(),
            request_sha256=sha,
            decision="released",
        )

    # -- aggregate releases ------------------------------------------------------------------
    def _period_left(self, n_rows: int) -> float:
        spent = sum(e.get("rho") or 0.0 for e in self._released(self._period(), AGGREGATE_PHASES))
        total = rho_for(self.policy.dp_epsilon_period, site_delta(self.policy.dp_delta, n_rows))
        return total - spent

    def aggregate(
        self,
        phase: str,
        posterior,
        n_rows: int,
        n_features: int,
        server: ServerOptions,
        sha: str | None = None,
    ) -> float | None:
        """Allow one refine or label release under ``posterior``: its rho (``None`` when the
        site opted out of noise), or a logged :class:`PolicyRefusal` naming the rule."""
        try:
            check_agreed_model(posterior, self.agreed_model())
        except PolicyRefusal as exc:
            self.log_refusal(phase, exc, sha)
            raise
        made = self._this_run(AGGREGATE_PHASES)
        if len(made) >= self.policy.max_aggregate_releases:
            self.refuse(
                phase,
                "max-aggregate-releases",
                f"this site made {len(made)} aggregate releases in this run, its cap",
                sha,
            )
        plan = planned_releases(self.policy, server)
        if made:
            plan = int(made[0].get("plan") or plan)
        elif phase == "label":  # labels first (no refinement, or declined): the run's last
            plan = 1
        self._plan = plan
        if phase == "refine" and self.policy.allow_labels and len(made) + 1 >= plan:
            self.refuse(
                phase,
                "max-aggregate-releases",
                f"refinement release {len(made) + 1} of a run of {plan}: the last release of a "
                "run is kept for the label counts",
                sha,
            )
        budget = run_budget(self.policy, server, n_rows)
        if budget is None:
            return None
        if made:  # the plan and the share of each release are fixed at the first release
            rho = float(made[0]["rho"])
            if len(made) >= plan:
                self.refuse(
                    phase,
                    "dp-epsilon",
                    f"this run's privacy budget is spent after {len(made)} releases",
                    sha,
                )
        else:
            rho = min(rho_for(*budget), self._period_left(n_rows)) / plan
        total = rho_for(self.policy.dp_epsilon_period, site_delta(self.policy.dp_delta, n_rows))
        if rho <= 1e-9 * total or rho > self._period_left(n_rows) + 1e-12 * total:
            self.refuse(
                phase,
                "dp-epsilon-period",
                f"this site's privacy budget for {self.policy.period_days:g} days is spent",
                sha,
            )
        if phase == "refine" and not refinement_useful(n_rows, n_features, rho):
            self.refuse(
                phase,
                "dp-useful-release",
                "this site is too small for its privacy budget to give a useful refinement "
                "release; its one-shot statistics stand",
                sha,
            )
        return rho

    def released(
        self,
        phase: str,
        clusters: int,
        n_rows: int,
        what: str,
        rho: float | None,
        floor: int,
        server: ServerOptions,
        sha: str | None = None,
    ) -> dict:
        """Log an aggregate release; returns what the reply may say about the budget."""
        made = self._this_run(AGGREGATE_PHASES)
        budget = run_budget(self.policy, server, n_rows)
        entry = {
            "run": self.run,
            "phase": phase,
            "round": len(made) + 1,
            "clusters": int(clusters),
            "rows": int(n_rows),
            "released": what,
            "floor": int(floor),
            "request_sha256": sha,
            "decision": "released",
            "plan": int(made[0]["plan"]) if made else self._plan,
        }
        if rho is not None:
            delta = budget[1]
            entry.update(rho=rho, epsilon=epsilon_for(rho, delta), delta=delta, noise="gaussian")
        self.ledger.append(**entry)
        if rho is None:
            return {}
        spent = sum(e["rho"] for e in made) + rho
        return {
            "privacy.epsilon_spent": epsilon_for(spent, budget[1]),
            "privacy.releases": len(made) + 1,
        }


def _unresolved(model: dict) -> dict:
    """A model without what resolution against the table fills in (levels, names)."""
    return {k: v for k, v in model.items() if k not in ("n_levels", "feature_names")}
