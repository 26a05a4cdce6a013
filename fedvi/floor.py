"""The disclosure floor for soft responsibilities (docs/method.md §8, docs/privacy.md).

A hard cluster "covers" its rows: with a floor of ``f`` each row holds at most ``1/f`` of its
released statistics. Under soft responsibilities a site's statistics for global cluster ``k``
are weighted sums ``sum_n r_nk (.)``; what bounds one row's part of them is its share of the
weight, ``r_nk / N_k``. The rule here releases cluster ``k``'s statistics when

    covering_k = N_k / max_n r_nk >= floor   and   N_k >= floor,

i.e. no row holds more than ``1/floor`` of the released weight and the weight is that of at
least ``floor`` rows: exactly the guarantee of a hard cluster of ``floor`` rows (for hard
assignments both are the number of rows). ``covering_k`` is
Renyi's effective number of order infinity; the order-2 one, ``N_k^2 / sum_n r_nk^2``, is
always at least as large and weaker: a posterior that puts ``r = 1`` on one row and spreads
1.24 rows of weight over many others reaches an order-2 effective number of 5 while that row
holds 45 % of the statistic. A cluster with many rows of soft membership (e.g. 1,288 rows,
none above 0.48) covers thousands of rows and is released at every site where it holds
``floor`` rows of weight, whereas the former
arg-max rule ("owns at least ``floor`` rows") withheld it at the sites where it owned few.

Withheld clusters get none of the site's rows: the local step is redone without them (until
every remaining cluster meets the floor), so the released statistics are those of a valid
assignment and the pooled ELBO stays exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedvi.data import EncodedData
from fedvi.options import FitOptions
from fedvi.privacy import apply_floor
from fedvi.summaries import Summaries
from fedvi.vi import Problem, run_pass, source_of


def covering_rows(counts: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """``(K,)`` rows a statistic covers: ``N_k / max_n r_nk`` (0 where a cluster has no mass).

    counts: ``(K,)`` ``N_k = sum_n r_nk``; peak: ``(K,)`` ``max_n r_nk``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    peak = np.asarray(peak, dtype=np.float64)
    return np.divide(counts, peak, out=np.zeros_like(counts), where=peak > 0)


def releasable(counts: np.ndarray, peak: np.ndarray, floor: float) -> np.ndarray:
    """``(K,)`` bool: the clusters whose statistics a site may release under ``floor``: they
    cover at least ``floor`` rows (:func:`covering_rows`) and hold at least ``floor`` rows of
    weight (``N_k >= floor``, the count the floor has always bounded). A tiny tolerance
    absorbs rounding so that ``floor`` rows of weight 1 pass."""
    f = float(floor) * (1.0 - 1e-12)
    return (covering_rows(counts, peak) >= f) & (np.asarray(counts, dtype=np.float64) >= f)


@dataclass(frozen=True)
class FlooredRelease:
    """A site's refinement release under its floor.

    stats: :class:`Summaries` per global cluster (withheld clusters are zeros).
    withheld: ``(G,)`` bool, the global clusters this site gave none of its rows (stays on the
        site unless the run reports it, e.g. in process).
    pair_entropy: ``(M,)`` ``-sum_n (r_j + r_k) log(r_j + r_k)`` of the requested pairs under
        the same responsibilities as ``stats`` (``None`` when no pairs were asked).
    second: ``(M, P, P)`` ``sum_n r_nk x_n x_n^T`` of the requested clusters (split moves;
        zeros for a withheld cluster), or ``None``.
    """

    stats: Summaries
    withheld: np.ndarray
    pair_entropy: np.ndarray | None = None
    second: np.ndarray | None = None


def floored_release(
    data: EncodedData,
    posterior: Summaries,
    floor: int = 1,
    options: FitOptions | None = None,
    pairs: np.ndarray | None = None,
    second: np.ndarray | None = None,
) -> FlooredRelease:
    """A site's statistics per global cluster under the global posterior, restricted to the
    clusters that meet the floor (:func:`releasable`), and the merged-column entropies of
    ``pairs (M, 2)`` of global clusters and the second moments of clusters ``second (M,)``
    under the same responsibilities (one pass more only when the floor withholds a cluster).
    Second moments are computed with the numpy backend."""
    if second is not None and options is not None and options.backend != "numpy":
        options = dataclasses.replace(options, backend="numpy", device="cpu")
    problem = Problem.build(data, posterior.spec, prior_dim=posterior.prior_dim, options=options)
    G = posterior.n_clusters
    pairs = None if pairs is None else np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    allowed = np.arange(G)
    while True:
        sub = posterior.subset(allowed)
        local = None
        if pairs is not None:
            # Pairs among the allowed clusters; a withheld cluster has r = 0 at this site.
            pos = np.full(G, -1)
            pos[allowed] = np.arange(len(allowed))
            local = pos[pairs]
        sec = None
        if second is not None:
            pos2 = np.full(G, -1)
            pos2[allowed] = np.arange(len(allowed))
            sec = pos2[np.asarray(second, dtype=np.int64)]
        p = run_pass(
            problem,
            source_of(problem, sub),
            peak=floor > 1,
            pairs=_usable(local),
            second=None if sec is None else sec[sec >= 0],
        )
        if floor <= 1:
            break
        low = ~releasable(p.counts, p.peak, floor)
        if not low.any():
            break
        if low.all():
            low[np.argmax(covering_rows(p.counts, p.peak))] = False
        allowed = allowed[~low]

    def scatter(a):
        out = np.zeros((G, *a.shape[1:]))
        out[allowed] = a
        return out

    entropy = scatter(p.entropy)
    stats = problem.summaries(
        scatter(p.counts),
        scatter(p.sums),
        entropy,
        None if p.observed is None else scatter(p.observed),
        posterior.relevance,
    )
    withheld = np.ones(G, dtype=bool)
    withheld[allowed] = False
    pair_h = None
    if pairs is not None:
        pair_h = _pair_values(local, p.pair_entropy, entropy, pairs)
    moments = None
    if second is not None:
        moments = np.zeros((len(sec), *p.second.shape[1:]))
        moments[sec >= 0] = p.second
    return FlooredRelease(apply_floor(stats, floor), withheld, pair_h, moments)


def _usable(local: np.ndarray | None) -> np.ndarray | None:
    """The pairs whose both clusters are allowed (the others need no rows)."""
    if local is None:
        return None
    return local[(local >= 0).all(axis=1)]


def _pair_values(local, computed, entropy, pairs) -> np.ndarray:
    """``(M,)`` merged entropies: computed for allowed pairs; where a cluster is withheld its
    column is zero, so the merged entropy is the other cluster's own entropy."""
    out = np.zeros(len(pairs))
    both = (local >= 0).all(axis=1)
    out[both] = computed
    one = ~both
    out[one] = entropy[pairs[one, 0]] + entropy[pairs[one, 1]]
    return out
