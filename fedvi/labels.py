"""A site's work under the global posterior: labels, label counts and refinement statistics.

Everything here runs on the site, on its own rows, and returns either per-row results that stay
on the site (labels) or statistics subject to the site's disclosure floor (and optional noise,
:mod:`fedvi.privacy`).
"""

from __future__ import annotations

import numpy as np

from fedvi.data import EncodedData
from fedvi.floor import floored_release
from fedvi.options import FitOptions
from fedvi.privacy import noisy_counts, noisy_release, suppress_counts
from fedvi.summaries import Summaries
from fedvi.vi import Problem, run_pass, source_of


def global_problem(data: EncodedData, posterior: Summaries, options: FitOptions | None = None):
    """The site's rows under the global model (its prior dimension is the global one)."""
    return Problem.build(data, posterior.spec, prior_dim=posterior.prior_dim, options=options)


def global_responsibilities(
    data: EncodedData, posterior: Summaries, options: FitOptions | None = None
) -> np.ndarray:
    """``(N, G)`` responsibilities of a site's rows under the global posterior (local step)."""
    problem = global_problem(data, posterior, options)
    return run_pass(problem, source_of(problem, posterior), stats=False, resp=True).resp


def label_rows(
    data: EncodedData, posterior: Summaries, options: FitOptions | None = None
) -> np.ndarray:
    """``(N,)`` global cluster of each row: arg-max of the local step under the posterior."""
    problem = global_problem(data, posterior, options)
    return run_pass(problem, source_of(problem, posterior), stats=False, labels=True).labels


def map_labels(local_labels: np.ndarray, site_mapping: np.ndarray) -> np.ndarray:
    """``(N,)`` global cluster of each row's local arg-max cluster (the paper's labelling)."""
    return np.asarray(site_mapping)[local_labels]


def refinement_stats(
    data: EncodedData,
    posterior: Summaries,
    floor: int = 1,
    options: FitOptions | None = None,
    restrict: bool = True,
) -> Summaries:
    """A site's statistics per global cluster under the global posterior (sums only).

    With ``restrict`` (default), the site's rows are given only to the global clusters whose
    statistics meet the floor (:func:`fedvi.floor.releasable`: no row holds more than
    ``1/floor`` of a cluster's weight); the local step is redone without the others, which are
    released as zeros, so the released statistics are those of a valid assignment and the
    pooled ELBO stays exact. (Under differential privacy the floor is applied to the noisy
    counts instead: ``restrict=False``.)
    """
    # The soft floor lives in fedvi.floor (floored_release also gives pair entropies).
    if restrict:
        return floored_release(data, posterior, floor, options).stats
    problem = global_problem(data, posterior, options)
    p = run_pass(problem, source_of(problem, posterior))
    return problem.summaries(p.counts, p.sums, p.entropy, p.observed, posterior.relevance)


def label_counts(labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(G,)`` rows per global cluster."""
    return np.bincount(labels, minlength=n_clusters).astype(np.int64)


def release_refinement(
    data: EncodedData,
    posterior: Summaries,
    floor: int,
    options: FitOptions | None = None,
    rho: float | None = None,
    rng: np.random.Generator | None = None,
) -> Summaries:
    """What a site releases in a refinement round: its :func:`refinement_stats` under its
    floor, or, at ``rho``-zCDP (the share of its budget its gate granted, :mod:`fedvi.gate`),
    the unrestricted statistics with noise from the site's own generator ``rng`` (default OS
    entropy) and the floor applied to the noisy counts."""
    stats = refinement_stats(data, posterior, floor, options, restrict=rho is None)
    if rho is None:
        return stats
    return noisy_release(stats, rho, floor, rng)


def release_label_counts(
    labels: np.ndarray,
    n_clusters: int,
    floor: int,
    rho: float | None = None,
    rng: np.random.Generator | None = None,
    marker: int = -1,
) -> np.ndarray:
    """``(G,)`` label counts as a site releases them: at ``rho``-zCDP with noise from the
    site's own generator, then counts below the floor replaced by ``marker``; without noise
    (``rho=None``, the site's opt-out), exact counts with secondary suppression so that no
    suppressed count follows from the site's row count."""
    counts = label_counts(labels, n_clusters)
    if rho is not None:
        counts = noisy_counts(counts, rho, len(labels), rng)
    return suppress_counts(counts, floor, marker, secondary=rho is None)
