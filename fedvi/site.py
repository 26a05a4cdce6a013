"""What runs on a site: the local MerDel fit and the one-shot summaries it sends (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedvi.data import EncodedData, encode
from fedvi.merdel import FitOptions, FitTrace, prune
from fedvi.mixture import fit_problem, order_by_size
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import Problem, summaries_of


@dataclass(frozen=True)
class SiteFit:
    """A site's local fit. Only ``summaries`` leaves the site; the rest stays there.

    summaries: per-cluster statistics to send. local_labels: ``(N,)`` arg-max local cluster
    of each row (used for paper-mode labelling). data: the encoded rows, kept for labelling.
    """

    summaries: Summaries
    local_labels: np.ndarray
    data: EncodedData
    trace: FitTrace


def encode_site(X, spec: MixtureSpec, min_rows: int = 1, source: str | None = None) -> EncodedData:
    """Validate a site's table against the shared schema ``spec``."""
    return encode(
        X,
        spec.likelihood,
        spec.n_levels,
        n_features=spec.n_features,
        min_rows=min_rows,
        source=source,
    )


def fit_site(
    X,
    spec: MixtureSpec,
    n_components: int = 20,
    seed: int | None = 0,
    options: FitOptions | None = None,
    min_cluster_size: int = 5,
    source: str | None = None,
) -> SiteFit:
    """Fit MerDel on a site's rows and build its summaries.

    Clusters that own fewer than ``min_cluster_size`` rows (arg-max) are removed and their rows
    re-assigned before anything is sent (the disclosure threshold of SPEC §5), so every count
    that leaves the site covers at least that many people. A site with fewer rows than the
    threshold cannot send anything and is refused.
    """
    options = options or FitOptions()
    min_rows = max(2, int(min_cluster_size))
    data = X if isinstance(X, EncodedData) else encode_site(X, spec, min_rows, source)
    if data.n_rows < min_rows:
        raise ValueError(
            f"site{' ' + source if source else ''} has {data.n_rows} rows; at least "
            f"{min_rows} are needed (min_cluster_size={min_cluster_size})"
        )
    problem = Problem.build(data.matrix, spec, int(n_components), options.backend, options.device)
    state, trace = fit_problem(problem, options, seed)
    state, trace = prune(problem, state, max(1, int(min_cluster_size)), options, trace)
    state = order_by_size(state)
    return SiteFit(summaries_of(problem, state), np.argmax(state.resp, axis=1), data, trace)
