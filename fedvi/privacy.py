"""Disclosure control and differential privacy of what a site releases (docs/privacy.md).

Two mechanisms, both applied by the site to its own releases:

- **the disclosure floor** (``min_cluster_size``): no released statistic covers fewer rows of the
  site. Local clusters below it are removed before anything is sent (their rows go to the other
  clusters, :func:`fedvi.merdel.prune`); in refinement rounds the site's rows are assigned only
  to global clusters that own at least the floor of them (:func:`fedvi.labels.refinement_stats`);
  label counts below it are suppressed; with missing cells, an observed count ``O_kd`` below it
  is released as "not observed" (:func:`apply_floor`).
- **Gaussian noise** (optional) on the aggregate rounds (refinement statistics, label counts),
  calibrated per row and accounted with zero-concentrated DP (zCDP): one row adds at most 1 to
  the counts (its responsibilities sum to 1), at most ``sqrt(D)`` in L2 norm to the sums and
  the observed counts (``||r ⊗ x|| <= ||x||``), and at most ``log G`` to the entropies. Each
  block gets an equal share of the round's zCDP budget ``rho``; rounds compose by adding rho;
  ``(epsilon, delta)`` follows from ``epsilon = rho + 2 sqrt(rho log(1/delta))``. The floor is
  then applied to the *noisy* counts (post-processing keeps the guarantee). The one-shot local
  summaries are NOT protected by noise: only the floor protects them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from fedvi.summaries import Summaries

if TYPE_CHECKING:
    from fedvi.options import ServerOptions
    from fedvi.policy import SitePolicy


def rho_for(epsilon: float, delta: float) -> float:
    """The zCDP ``rho`` whose ``(epsilon, delta)``-DP conversion gives ``epsilon``."""
    L = math.log(1.0 / delta)
    return (math.sqrt(L + epsilon) - math.sqrt(L)) ** 2


def epsilon_for(rho: float, delta: float) -> float:
    """``(epsilon, delta)``-DP of a ``rho``-zCDP mechanism (Bun & Steinke 2016, Prop. 1.3)."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def gaussian_sigma(sensitivity: float, rho: float) -> float:
    """Noise scale of the Gaussian mechanism with L2 ``sensitivity`` at ``rho``-zCDP."""
    return sensitivity / math.sqrt(2.0 * rho)


@dataclass
class Accountant:
    """A site's privacy budget over the aggregate rounds of one run.

    ``epsilon``/``delta``: the total guarantee; ``releases``: how many aggregate releases the run
    plans (fixed at the first release, so a server cannot stretch the budget by re-announcing a
    shorter plan). Each release spends ``rho_total / releases``.
    """

    epsilon: float
    delta: float
    releases: int
    spent_rho: float = 0.0
    made: int = 0

    @property
    def rho_total(self) -> float:
        return rho_for(self.epsilon, self.delta)

    @property
    def rho_per_release(self) -> float:
        return self.rho_total / max(self.releases, 1)

    def spend(self) -> float:
        """The rho of the next release; refuses when the budget would be exceeded."""
        rho = self.rho_per_release
        if self.spent_rho + rho > self.rho_total * (1 + 1e-9):
            raise BudgetExhausted(
                f"the privacy budget (epsilon {self.epsilon}) is spent after {self.made} releases"
            )
        self.spent_rho += rho
        self.made += 1
        return rho

    @property
    def epsilon_spent(self) -> float:
        return epsilon_for(self.spent_rho, self.delta) if self.spent_rho > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "releases": self.releases,
            "spent_rho": self.spent_rho,
            "made": self.made,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Accountant:
        return cls(**d)


class BudgetExhausted(RuntimeError):
    """A release would exceed the site's privacy budget."""


def tighter(site: float | None, server: float | None) -> float | None:
    """The smaller of the site's and the server's epsilon (or delta); either may be None."""
    given = [e for e in (site, server) if e is not None]
    return min(given) if given else None


def site_accountant(policy: SitePolicy, server: ServerOptions) -> Accountant | None:
    """A site's budget for one run (``None`` without DP): the tighter of its own and the run's
    ``(epsilon, delta)``, in equal shares over the ``refine_rounds`` refinement releases and the
    label counts."""
    eps = tighter(policy.dp_epsilon, server.dp_epsilon)
    if eps is None:
        return None
    return Accountant(eps, tighter(policy.dp_delta, server.dp_delta), server.refine_rounds + 1)


def apply_floor(s: Summaries, floor: int) -> Summaries:
    """Release observed counts only where they cover at least ``floor`` rows: a cell (cluster,
    variable) with ``O_kd < floor`` is released as not observed (``S_kd = O_kd = 0``), and a
    variable observed in fewer than ``floor`` rows of the site contributes nothing to the
    column totals. The released statistics stay exactly those of the site's rows with those
    cells masked, so the ELBO computed from them is exact for what is released. Without
    missing cells nothing changes (every released cluster already owns ``floor`` rows)."""
    fam = s.spec.family()
    if s.observed is None and s.column_observed is None:
        return s
    obs = np.array(s.variable_observed(), dtype=np.float64)
    low = obs < floor
    if not low.any() and (s.column_observed is None or (s.column_observed >= floor).all()):
        return s
    block = fam.block_index()
    sums = s.sums.copy()
    sums[low[:, block]] = 0.0
    observed = None
    if s.observed is not None:
        observed = np.where(low, 0.0, s.observed)
    totals, col_obs = s.column_totals, s.column_observed
    if col_obs is not None:
        low_col = col_obs < floor
        if low_col.any():
            totals = np.where(low_col[block], 0.0, totals)
            col_obs = np.where(low_col, 0.0, col_obs)
    return replace(s, sums=sums, observed=observed, column_totals=totals, column_observed=col_obs)


def noisy_release(s: Summaries, rho: float, rng: np.random.Generator, floor: int) -> Summaries:
    """Gaussian noise on the per-cluster statistics of ``s`` at ``rho``-zCDP (equal shares per
    block), clamped to valid values, then the floor on the noisy counts (post-processing)."""
    fam = s.spec.family()
    D = fam.n_features
    G = s.n_clusters
    blocks = 3 + (1 if s.observed is not None else 0)
    share = rho / blocks
    counts = s.counts + rng.normal(0.0, gaussian_sigma(1.0, share), size=G)
    counts = np.clip(counts, 0.0, float(s.n_rows))
    sums = s.sums + rng.normal(0.0, gaussian_sigma(math.sqrt(D), share), size=s.sums.shape)
    observed = s.observed
    if observed is not None:
        observed = observed + rng.normal(0.0, gaussian_sigma(math.sqrt(D), share), observed.shape)
        observed = np.clip(observed, 0.0, counts[:, None])
    limit = fam.observed(s.sums, counts, observed)[:, fam.block_index()]
    sums = np.clip(sums, 0.0, limit)
    sens = math.log(max(G, 2))
    entropy = s.entropy + rng.normal(0.0, gaussian_sigma(sens, share), size=G)
    entropy = np.clip(entropy, 0.0, counts * sens)
    keep = counts >= floor
    z = ~keep
    counts, entropy = np.where(keep, counts, 0.0), np.where(keep, entropy, 0.0)
    sums[z] = 0.0
    if observed is not None:
        observed = np.where(keep[:, None], observed, 0.0)
    noisy = replace(s, counts=counts, sums=sums, entropy=entropy, observed=observed)
    return apply_floor(noisy, floor)


def noisy_counts(
    counts: np.ndarray, rho: float, rng: np.random.Generator, n_rows: int | None = None
) -> np.ndarray:
    """Label counts (one row changes one count by 1) with Gaussian noise at ``rho``-zCDP,
    rounded and clamped to ``[0, n_rows]``."""
    noisy = counts + rng.normal(0.0, gaussian_sigma(1.0, rho), size=counts.shape)
    top = np.inf if n_rows is None else n_rows
    return np.clip(np.rint(noisy), 0, top).astype(np.int64)


def suppress_counts(counts: np.ndarray, floor: int, marker: int = -1) -> np.ndarray:
    """``(G,)`` int64 counts with values in ``1..floor-1`` replaced by ``marker`` (``-1``, or
    ``0`` where the counts are summed securely)."""
    out = np.asarray(counts, dtype=np.int64).copy()
    out[(out > 0) & (out < int(floor))] = marker
    return out
