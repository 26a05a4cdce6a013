"""One meaning of K: the global clusters that own rows (docs/method.md §8).

``MixtureVI`` removes a cluster that is the most probable cluster of no row. The federated run
does the same at its end: a global cluster that no site's labels use (every site that reported
its label counts reported 0), or whose posterior count is noise-level, is removed, so
``n_clusters`` is the number of distinct labels. Pure functions: the coordinator
(:meth:`fedvi.coordinator.Coordinator._settle`) calls them, on both engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedvi.summaries import Summaries


@dataclass(frozen=True)
class Settled:
    """keep: ``(G,)`` bool, the clusters that stay. old_to_new: ``(G,)`` new id of each
    cluster (``-1`` where removed)."""

    keep: np.ndarray
    old_to_new: np.ndarray

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())

    def relabel(self, labels: np.ndarray) -> np.ndarray:
        """Labels in the new ids (a removed cluster labels no row, so none becomes -1)."""
        out = self.old_to_new[np.asarray(labels, dtype=np.int64)]
        if (out < 0).any():
            raise ValueError("a removed cluster still labels rows")
        return out


def settle_clusters(
    posterior: Summaries,
    label_counts: Sequence[np.ndarray | None] = (),
    min_mass: float = 1.0,
) -> Settled:
    """Which global clusters stay at the end of a run.

    posterior: the global :class:`Summaries` (``G`` clusters). label_counts: one ``(G,)``
    array of released label counts per site (``-1`` or any value other than 0 for a suppressed
    count, which stands for 1..floor-1 rows), or ``None`` for a site that reported none (then
    only the mass decides). min_mass: a cluster whose posterior count ``N_g`` is below this is
    noise (less than one row's worth of weight).

    When every site reported its counts, a cluster stays if some site's count is not 0 (the
    labels decide, as ``MixtureVI``'s pruning does); otherwise (a site did not report, e.g.
    :func:`fedvi.extend`, where the model's earlier sites are absent) a cluster stays if its
    mass is at least ``min_mass``. At least one cluster stays.
    """
    counts = np.asarray(posterior.counts, dtype=np.float64)
    G = len(counts)
    reported = [None if c is None else np.asarray(c) for c in label_counts]
    if reported and all(c is not None for c in reported):
        for c in reported:
            if c.shape != (G,):
                raise ValueError(f"label counts have shape {c.shape}, expected ({G},)")
        keep = np.any([c != 0 for c in reported], axis=0) & (counts > 0)
    else:
        keep = counts >= float(min_mass)
    if G and not keep.any():
        keep[np.argmax(counts)] = True
    old_to_new = np.full(G, -1, dtype=np.int64)
    old_to_new[keep] = np.arange(int(keep.sum()))
    return Settled(keep, old_to_new)
