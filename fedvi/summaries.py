"""Per-cluster sufficient statistics: what a site sends, and what the server works on.

A :class:`Summaries` holds sums over rows only (nothing in it has a row index). It does its own
arithmetic, as bnpy's ``SuffStatBag`` does: :meth:`~Summaries.subset`,
:meth:`~Summaries.reorder`, :meth:`~Summaries.combine` (merge clusters into groups),
:meth:`Summaries.concat` (pool several sites' clusters side by side) and
:meth:`Summaries.add` (sum same-shape statistics of several sites, as in refinement). The local
moves, the global merge, pooling and refinement all go through these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedvi.spec import MixtureSpec

#: Array order on the wire (see :meth:`Summaries.to_arrays`); absent arrays travel empty.
ARRAY_FIELDS = (
    "counts",
    "sums",
    "entropy",
    "column_totals",
    "relevance",
    "observed",
    "column_observed",
)


@dataclass(frozen=True)
class Summaries:
    """Sufficient statistics of one site's (or the pooled) clusters (docs/method.md).

    counts: ``(K,)`` ``N_k = sum_n r_nk``.
    sums: ``(K, P)`` ``S_k = sum_n r_nk x_n`` over observed cells (one-hot blocks for
        categorical).
    entropy: ``(K,)`` ``H_k = -sum_n r_nk log r_nk``; needed for the ELBO's value only, never
        for a merge decision between sites.
    column_totals: ``(P,)`` ``T = sum_n x_n`` (variable selection's pooled frequencies).
    n_rows: number of rows summarised.
    prior_dim: ``K0``, the dimension of the weights' Dirichlet prior.
    spec: the resolved model the statistics were computed under.
    relevance: ``(D,)`` ``c_d`` (variable selection) or ``None``.
    observed: ``(K, D)`` ``O_kd = sum_n r_nk m_nd`` (Bernoulli with missing cells) or ``None``
        (every cell observed: ``O_kd = N_k``; categorical: the block sums of ``sums``).
    column_observed: ``(D,)`` rows observed per variable, or ``None`` (``n_rows``).
    """

    counts: np.ndarray
    sums: np.ndarray
    entropy: np.ndarray
    column_totals: np.ndarray
    n_rows: int
    prior_dim: int
    spec: MixtureSpec
    relevance: np.ndarray | None = None
    observed: np.ndarray | None = None
    column_observed: np.ndarray | None = None

    def __post_init__(self):
        K = len(self.counts)
        fam = self.spec.family()
        P, D = fam.n_columns, fam.n_features
        checks = [
            ("counts", self.counts, (K,)),
            ("sums", self.sums, (K, P)),
            ("entropy", self.entropy, (K,)),
            ("column_totals", self.column_totals, (P,)),
            ("relevance", self.relevance, (D,)),
            ("observed", self.observed, (K, D)),
            ("column_observed", self.column_observed, (D,)),
        ]
        for name, value, shape in checks:
            if value is not None and np.shape(value) != shape:
                raise ValueError(f"{name} has shape {np.shape(value)}, expected {shape}")

    @property
    def n_clusters(self) -> int:
        return len(self.counts)

    # -- derived quantities ----------------------------------------------------------------
    def variable_observed(self) -> np.ndarray:
        """``(K, D)`` observed counts per cluster and variable."""
        return self.spec.family().observed(self.sums, self.counts, self.observed)

    def column_observed_or_rows(self) -> np.ndarray | float:
        return self.n_rows if self.column_observed is None else self.column_observed

    def pooled_frequency(self) -> np.ndarray:
        """``(P,)`` ``phi0``: each design column's frequency among its observed rows."""
        return self.spec.family().pooled_frequency(
            self.column_totals, self.column_observed_or_rows()
        )

    def profiles(self) -> np.ndarray:
        """``(K, P)`` posterior mean of ``P(x_d = l | cluster k)`` (one-hot blocks for
        categorical; ``P(x_d = 1)`` for Bernoulli).

        With variable selection, ``c_d E[phi_kd] + (1 - c_d) phi0_d``: an irrelevant variable's
        profile is its pooled frequency ``phi0_d``, shared by all clusters.
        """
        fam = self.spec.family()
        phi = fam.expected_phi(self.sums, self.counts, self.relevance, self.observed)
        if self.relevance is None:
            return phi
        c = self.relevance[fam.block_index()]
        return c * phi + (1.0 - c) * self.pooled_frequency()

    # -- arithmetic --------------------------------------------------------------------------
    def subset(self, keep) -> Summaries:
        """The statistics of clusters ``keep`` only (indices, in that order, or a mask)."""
        return replace(
            self,
            counts=self.counts[keep],
            sums=self.sums[keep],
            entropy=self.entropy[keep],
            observed=None if self.observed is None else self.observed[keep],
        )

    def reorder(self, order) -> Summaries:
        """Clusters in the order ``order`` (a permutation of ``0..K-1``)."""
        order = np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(self.n_clusters)):
            raise ValueError(f"not a permutation of {self.n_clusters} clusters: {order}")
        return self.subset(order)

    def combine(self, group_of, n_groups: int | None = None, entropy=None) -> Summaries:
        """Merge clusters into groups: ``group_of (K,)`` gives each cluster's group in
        ``0..G-1``. Counts, sums and observed counts add up; the entropies add up too (exact
        when the merged clusters hold different rows, as clusters of different sites do) unless
        ``entropy (G,)`` is given (a merge of one site's clusters, whose rows overlap)."""
        group_of = np.asarray(group_of, dtype=np.int64)
        G = int(group_of.max()) + 1 if n_groups is None else int(n_groups)

        def add(a):
            out = np.zeros((G, *a.shape[1:]))
            np.add.at(out, group_of, a)
            return out

        return replace(
            self,
            counts=add(self.counts),
            sums=add(self.sums),
            entropy=add(self.entropy) if entropy is None else np.asarray(entropy, float),
            observed=None if self.observed is None else add(self.observed),
        )

    @staticmethod
    def _observed_of(parts: Sequence[Summaries]) -> list[np.ndarray] | None:
        if all(p.observed is None for p in parts):
            return None
        return [np.array(p.variable_observed(), dtype=np.float64) for p in parts]

    @staticmethod
    def _column_observed(parts: Sequence[Summaries]) -> np.ndarray | None:
        if all(p.column_observed is None for p in parts):
            return None
        D = parts[0].spec.n_features
        return np.sum(
            [
                np.full(D, float(p.n_rows)) if p.column_observed is None else p.column_observed
                for p in parts
            ],
            axis=0,
        )

    @classmethod
    def concat(cls, parts: Sequence[Summaries]) -> Summaries:
        """Several sites' clusters side by side (the server's pool). Column totals and rows
        add up, the prior dimensions add up, and ``c_d`` is the row-weighted mean of the
        parts' (a starting point that the server then re-fits)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        n_rows = int(sum(p.n_rows for p in parts))
        relevance = None
        if parts[0].spec.variable_selection:
            relevance = sum(p.n_rows * p.relevance for p in parts) / max(n_rows, 1)
        observed = cls._observed_of(parts)
        return cls(
            counts=np.concatenate([p.counts for p in parts]),
            sums=np.vstack([p.sums for p in parts]),
            entropy=np.concatenate([p.entropy for p in parts]),
            column_totals=np.sum([p.column_totals for p in parts], axis=0),
            n_rows=n_rows,
            prior_dim=int(sum(p.prior_dim for p in parts)),
            spec=parts[0].spec,
            relevance=relevance,
            observed=None if observed is None else np.vstack(observed),
            column_observed=cls._column_observed(parts),
        )

    @classmethod
    def add(cls, parts: Sequence[Summaries], like: Summaries | None = None) -> Summaries:
        """Element-wise sum of same-shape statistics (each site's rows under the same global
        clusters); ``like`` supplies ``prior_dim``, ``spec`` and ``relevance`` (default: the
        first part's)."""
        if not parts:
            raise ValueError("nothing to add")
        ref = like if like is not None else parts[0]
        observed = cls._observed_of(parts)
        return replace(
            ref,
            counts=np.sum([p.counts for p in parts], axis=0),
            sums=np.sum([p.sums for p in parts], axis=0),
            entropy=np.sum([p.entropy for p in parts], axis=0),
            column_totals=np.sum([p.column_totals for p in parts], axis=0),
            n_rows=int(sum(p.n_rows for p in parts)),
            observed=None if observed is None else np.sum(observed, axis=0),
            column_observed=cls._column_observed(parts),
        )

    # -- the wire ----------------------------------------------------------------------------
    def to_arrays(self) -> list[np.ndarray]:
        """The arrays sent on the wire, in :data:`ARRAY_FIELDS` order (absent ones empty)."""
        return [
            np.zeros(0)
            if getattr(self, name) is None
            else np.asarray(getattr(self, name), dtype=np.float64)
            for name in ARRAY_FIELDS
        ]

    @classmethod
    def from_arrays(
        cls, arrays: list[np.ndarray], spec: MixtureSpec, n_rows: int, prior_dim: int
    ) -> Summaries:
        """Inverse of :meth:`to_arrays`, given the scalars that travel beside the arrays."""
        if len(arrays) != len(ARRAY_FIELDS):
            raise ValueError(
                f"expected {len(ARRAY_FIELDS)} arrays {ARRAY_FIELDS}, got {len(arrays)}"
            )
        a = dict(zip(ARRAY_FIELDS, (np.asarray(x, dtype=np.float64) for x in arrays), strict=True))
        K = len(a["counts"])
        D = spec.n_features
        return cls(
            counts=a["counts"],
            sums=a["sums"].reshape(K, -1),
            entropy=a["entropy"],
            column_totals=a["column_totals"],
            n_rows=int(n_rows),
            prior_dim=int(prior_dim),
            spec=spec,
            relevance=a["relevance"] if a["relevance"].size else None,
            observed=a["observed"].reshape(K, D) if a["observed"].size else None,
            column_observed=a["column_observed"] if a["column_observed"].size else None,
        )

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.to_arrays()))
