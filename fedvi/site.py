"""What runs on a site: the local MerDel fit and the one-shot summaries it releases.

``MixtureVI.fit`` is :func:`fit_site` with the single-site settings (floor 1: every cluster
that owns a row is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedvi.data import EncodedData, encode
from fedvi.merdel import FitTrace, fit_problem, order_by_size, prune
from fedvi.options import FitOptions
from fedvi.privacy import apply_floor
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import Problem, VIState, labels_of


@dataclass(frozen=True)
class SiteFit:
    """A site's local fit. Only ``summaries`` leaves the site; the rest stays there.

    summaries: the released per-cluster statistics (clusters by decreasing size).
    problem: the site's encoded table and model. state: the final local state (its source
    gives each row's local cluster). trace: iterations, moves, convergence.
    """

    summaries: Summaries
    problem: Problem
    state: VIState
    trace: FitTrace

    @property
    def data(self) -> EncodedData:
        return self.problem.data

    def local_labels(self) -> np.ndarray:
        """``(N,)`` arg-max local cluster of each row (one pass over the table)."""
        return labels_of(self.problem, self.state.source)


def encode_site(X, spec: MixtureSpec, min_rows: int = 1, source: str | None = None):
    """Validate a site's table against the model and resolve the model's schema:
    ``(data, spec)``."""
    data = encode(X, spec, min_rows=min_rows, source=source)
    if not spec.resolved or spec.feature_names is None:
        spec = spec.resolve(data.n_levels, data.feature_names)
    return data, spec


def fit_site(
    X,
    spec: MixtureSpec,
    options: FitOptions | None = None,
    seed: int | None = 0,
    min_cluster_size: int = 5,
    source: str | None = None,
) -> SiteFit:
    """Fit MerDel on a site's rows and build the summaries it releases.

    Clusters that own fewer than ``min_cluster_size`` rows (arg-max), or whose count ``N_k`` is
    lower, are removed and their rows re-assigned before anything is released (the disclosure
    floor), so every count that leaves the site covers at least that many people; with missing
    cells, observed counts below the floor are released as not observed. A site with fewer
    rows than the floor is refused.
    """
    options = options or FitOptions()
    floor = int(min_cluster_size)
    data, spec = encode_site(X, spec, min_rows=max(2, floor), source=source)
    problem = Problem.build(data, spec, options=options)
    state, trace = fit_problem(problem, options, seed, warn_label=f"the fit of {source or 'X'}")
    # A disclosure floor (> 1) holds back clusters that own fewer rows or whose count is lower.
    min_count = floor if floor > 1 else 0.0
    state, trace = prune(problem, state, max(1, floor), options, trace, min_count)
    state = order_by_size(state)
    return SiteFit(apply_floor(state.stats, floor), problem, state, trace)
