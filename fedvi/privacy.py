"""Disclosure control and differential privacy of what a site releases (docs/privacy.md).

Two mechanisms, both applied by the site to its own releases:

- **the disclosure floor** (``min_cluster_size``): no released statistic covers fewer rows of the
  site. Local clusters below it are removed before anything is sent (their rows go to the other
  clusters, :func:`fedvi.merdel.prune`); in refinement rounds the site's rows are assigned only
  to global clusters that own at least the floor of them (:func:`fedvi.labels.refinement_stats`);
  label counts below it are suppressed; with missing cells, an observed count ``O_kd`` below it
  is released as "not observed" (:func:`apply_floor`).
- **Gaussian noise** (on by default, :class:`fedvi.SitePolicy` ``dp_epsilon``) on the
  aggregate rounds (refinement statistics, label counts),
  calibrated per row and accounted with zero-concentrated DP (zCDP): one row adds at most 1 to
  the counts (its responsibilities sum to 1), at most ``sqrt(D)`` in L2 norm to the sums and
  the observed counts (``||r ⊗ x|| <= ||x||``), and at most ``log G`` to the entropies. Each
  block gets an equal share of the round's zCDP budget ``rho``; rounds compose by adding rho;
  ``(epsilon, delta)`` follows from ``epsilon = rho + 2 sqrt(rho log(1/delta))``. The floor is
  then applied to the *noisy* counts (post-processing keeps the guarantee). The one-shot local
  summaries are NOT protected by noise: only the floor protects them.

The noise is drawn from the site's own entropy (:func:`site_entropy`), never from a request;
the budget of each release is granted by the site's release gate (:mod:`fedvi.gate`) from its
ledger, across runs.
"""

from __future__ import annotations

import math
from dataclasses import replace
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


def site_entropy(rng: np.random.Generator | None = None) -> np.random.Generator:
    """The generator that draws a site's noise: ``rng`` when the site injects its own (tests),
    else a fresh one from the operating system's entropy. A seed is refused: nothing that a
    request carries may decide the noise (a coordinator that knows the seed subtracts it)."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            "the site's noise comes from its own entropy: give a numpy Generator the site "
            f"owns (or None for OS entropy), not {type(rng).__name__}"
        )
    return rng


def tighter(site: float | None, server: float | None) -> float | None:
    """The smaller of the site's and the server's epsilon (or delta); either may be None."""
    given = [e for e in (site, server) if e is not None]
    return min(given) if given else None


def site_delta(policy_delta: float | None, n_rows: int) -> float:
    """The site's own delta: its policy's, else ``1/N`` (``N`` its rows)."""
    return float(policy_delta) if policy_delta is not None else 1.0 / max(int(n_rows), 2)


def run_budget(
    policy: SitePolicy, server: ServerOptions, n_rows: int
) -> tuple[float, float] | None:
    """``(epsilon, delta)`` of one run at this site, ``None`` when it opted out of noise
    (``dp-epsilon=none``). The server may only lower either: a larger epsilon or delta from
    the server is clamped to the site's (never raised)."""
    if policy.dp_epsilon is None:
        return None
    eps = tighter(policy.dp_epsilon, server.dp_epsilon)
    delta = tighter(site_delta(policy.dp_delta, n_rows), server.dp_delta)
    return float(eps), float(delta)


def planned_releases(policy: SitePolicy, server: ServerOptions) -> int:
    """Aggregate releases a run plans: with noise, its refinement rounds and the label round
    (the budget is shared among them); at most the site's ``max-aggregate-releases``. Without
    noise (the opt-out) no budget is shared, and the plan is the cap itself, which leaves room
    for the rounds that settle K at the end of a noiseless run (:mod:`fedvi.settle`)."""
    if policy.dp_epsilon is None:
        return max(1, policy.max_aggregate_releases)
    return max(1, min(server.refine_rounds + 1, policy.max_aggregate_releases))


def refine_blocks(n_missing_blocks: int = 0) -> int:
    """Blocks of a refinement release sharing its rho (counts, sums, entropies, observed)."""
    return 3 + n_missing_blocks


#: A refinement release is useful when the site's rows are at least this many times the noise
#: scale of its per-cluster sums (measured: docs/privacy.md, ``bench_privacy.py --rows``).
USEFUL_ROWS_PER_SIGMA = 200.0


def refinement_useful(n_rows: int, n_features: int, rho_per_release: float) -> bool:
    """Whether a site of ``n_rows`` rows and ``n_features`` columns gives a useful refinement
    release at ``rho_per_release``: its rows at least :data:`USEFUL_ROWS_PER_SIGMA` times the
    noise scale of one cluster's sums (``sqrt(D) / sqrt(2 rho / 3)``). A smaller site declines
    refinement (its one-shot statistics stand) rather than send noise."""
    sigma = gaussian_sigma(math.sqrt(max(n_features, 1)), rho_per_release / refine_blocks())
    return n_rows >= USEFUL_ROWS_PER_SIGMA * sigma


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


def noisy_release(
    s: Summaries, rho: float, floor: int, rng: np.random.Generator | None = None
) -> Summaries:
    """Gaussian noise on the per-cluster statistics of ``s`` at ``rho``-zCDP (equal shares per
    block), clamped to valid values, then the floor on the noisy counts (post-processing).
    ``rng``: the site's own generator (:func:`site_entropy`; default OS entropy)."""
    rng = site_entropy(rng)
    fam = s.spec.family()
    D = fam.n_features
    G = s.n_clusters
    blocks = refine_blocks(1 if s.observed is not None else 0)
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
    counts: np.ndarray,
    rho: float,
    n_rows: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Label counts (one row changes one count by 1) with Gaussian noise at ``rho``-zCDP from
    the site's own generator, rounded and clamped to ``[0, n_rows]``. Their total is not the
    site's ``N``, so a suppressed count cannot be completed from it."""
    rng = site_entropy(rng)
    noisy = counts + rng.normal(0.0, gaussian_sigma(1.0, rho), size=counts.shape)
    top = np.inf if n_rows is None else n_rows
    return np.clip(np.rint(noisy), 0, top).astype(np.int64)


def suppress_counts(
    counts: np.ndarray, floor: int, marker: int = -1, secondary: bool = False
) -> np.ndarray:
    """``(G,)`` int64 counts with values in ``1..floor-1`` replaced by ``marker`` (``-1``, or
    ``0`` where the counts are summed securely).

    ``secondary`` (exact counts, whose total ``N`` the server knows from pre-flight): when any
    count is suppressed, the smallest released counts are suppressed too until at least two
    are and their total reaches the floor, so that ``N`` minus the released counts gives
    neither a single suppressed count nor a total below the floor (with two or more cells
    summing to at least the floor, no cell's value follows from the total)."""
    c = np.asarray(counts, dtype=np.int64)
    hide = (c > 0) & (c < int(floor))
    if secondary and hide.any():
        order = np.argsort(np.where(hide | (c <= 0), np.iinfo(np.int64).max, c), kind="stable")
        for g in order:
            if hide.sum() >= 2 and c[hide].sum() >= floor:
                break
            if hide[g] or c[g] <= 0:
                continue
            hide[g] = True
    out = c.copy()
    out[hide] = marker
    return out
