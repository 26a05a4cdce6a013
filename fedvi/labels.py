"""Labelling a site's rows under the global posterior, and refinement rounds (SPEC §7)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedvi.data import EncodedData
from fedvi.elbo import elbo
from fedvi.summaries import Summaries
from fedvi.vi import local_step, relevance_step

LABEL_MODES = ("posterior", "map")


def global_responsibilities(data: EncodedData, posterior: Summaries) -> np.ndarray:
    """``(N, G)`` responsibilities of a site's rows under the global posterior (local step)."""
    return _local(data, posterior).resp


def _local(data: EncodedData, posterior: Summaries):
    return local_step(
        data.matrix,
        posterior.spec,
        posterior.counts,
        posterior.sums,
        posterior.relevance,
        posterior.prior_dim,
    )


def label_rows(data: EncodedData, posterior: Summaries) -> np.ndarray:
    """``(N,)`` global cluster of each row: arg-max of the local step under the posterior."""
    return np.argmax(global_responsibilities(data, posterior), axis=1)


def map_labels(local_labels: np.ndarray, site_mapping: np.ndarray) -> np.ndarray:
    """``(N,)`` global cluster of each row's local arg-max cluster (the paper's labelling)."""
    return np.asarray(site_mapping)[local_labels]


def refinement_stats(data: EncodedData, posterior: Summaries) -> Summaries:
    """A site's statistics per global cluster under the global posterior (sums only)."""
    step = _local(data, posterior)
    return replace(
        posterior,
        counts=step.counts,
        sums=step.sums,
        entropy=step.entropy,
        column_totals=np.asarray(data.matrix.sum(axis=0)).ravel(),
        n_rows=data.n_rows,
    )


def combine_refinement(
    posterior: Summaries, site_stats: list[Summaries], empty_threshold: float = 1e-6
) -> Summaries:
    """Sum the sites' refinement statistics into the new global posterior.

    One round is one CAVI iteration on the pooled rows, so the ELBO does not decrease; the
    ``c_d`` update (variable selection) runs here, on the summed statistics.
    """
    counts = np.sum([s.counts for s in site_stats], axis=0)
    sums = np.sum([s.sums for s in site_stats], axis=0)
    entropy = np.sum([s.entropy for s in site_stats], axis=0)
    keep = counts >= empty_threshold
    new = replace(
        posterior,
        counts=counts[keep],
        sums=sums[keep],
        entropy=entropy[keep],
        column_totals=np.sum([s.column_totals for s in site_stats], axis=0),
        n_rows=int(sum(s.n_rows for s in site_stats)),
    )
    if new.spec.variable_selection:
        c = relevance_step(
            new.spec, new.column_totals, new.n_rows, new.counts, new.sums, new.relevance
        )
        new = replace(new, relevance=c)
    if elbo(new) < elbo(posterior) - 1e-8 * abs(elbo(posterior)):
        raise RuntimeError(
            f"refinement lowered the global ELBO ({elbo(posterior)} -> {elbo(new)}): the sites' "
            "statistics are inconsistent with the posterior they were computed under"
        )
    return new
