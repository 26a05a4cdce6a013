"""Per-cluster sufficient statistics: what a site sends, and what the server works on.

A :class:`Summaries` holds sums over rows only (SPEC §5): nothing in it has a row index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

from fedvi.spec import MixtureSpec

#: Array order on the wire (see :meth:`Summaries.to_arrays`).
ARRAY_FIELDS = ("counts", "sums", "entropy", "column_totals", "relevance")


@dataclass(frozen=True)
class Summaries:
    """Sufficient statistics of one site's (or the pooled) clusters.

    counts: ``(K,)`` ``N_k = sum_n r_nk``.
    sums: ``(K, P)`` ``S_k = sum_n r_nk x_n`` (one-hot blocks for categorical).
    entropy: ``(K,)`` ``H_k = -sum_n r_nk log r_nk``; needed for the ELBO's absolute value
        only, never for a merge decision between sites (SPEC §6).
    column_totals: ``(P,)`` ``T = sum_n x_n`` (variable selection's ``phi0``; SPEC §8).
    n_rows: number of rows summarised.
    prior_dim: ``K0``, the dimension of the weights' Dirichlet prior.
    spec: the model (family, schema, priors) the statistics were computed under.
    relevance: ``(D,)`` the site's ``c_d`` (variable selection) or ``None``.
    """

    counts: np.ndarray
    sums: np.ndarray
    entropy: np.ndarray
    column_totals: np.ndarray
    n_rows: int
    prior_dim: int
    spec: MixtureSpec
    relevance: np.ndarray | None = None

    def __post_init__(self):
        K = len(self.counts)
        P = self.spec.family().n_columns
        if self.sums.shape != (K, P):
            raise ValueError(f"sums has shape {self.sums.shape}, expected ({K}, {P})")
        if self.entropy.shape != (K,):
            raise ValueError(f"entropy has shape {self.entropy.shape}, expected ({K},)")
        if self.column_totals.shape != (P,):
            raise ValueError(f"column_totals has shape {self.column_totals.shape}, expected ({P},)")
        if self.relevance is not None and self.relevance.shape != (self.spec.n_features,):
            raise ValueError(f"relevance has shape {self.relevance.shape}")

    @property
    def n_clusters(self) -> int:
        return len(self.counts)

    def profiles(self) -> np.ndarray:
        """``(K, P)`` posterior mean of ``P(x_d = l | cluster k)`` (one-hot blocks for
        categorical; ``P(x_d = 1)`` for Bernoulli).

        With variable selection, ``c_d E[phi_kd] + (1 - c_d) phi0_d``: an irrelevant variable's
        profile is its pooled frequency ``phi0_d = T_d / N``, shared by all clusters.
        """
        fam = self.spec.family()
        phi = fam.expected_phi(self.sums, self.counts, self.relevance)
        if self.relevance is None:
            return phi
        c = self.relevance[fam.block_index()]
        return c * phi + (1.0 - c) * (self.column_totals / self.n_rows)

    def subset(self, keep: np.ndarray) -> Summaries:
        """The statistics of clusters ``keep`` only (indices or boolean mask)."""
        return replace(
            self, counts=self.counts[keep], sums=self.sums[keep], entropy=self.entropy[keep]
        )

    def to_arrays(self) -> list[np.ndarray]:
        """The arrays sent on the wire, in :data:`ARRAY_FIELDS` order."""
        rel = self.relevance if self.relevance is not None else np.zeros(0)
        return [
            np.asarray(self.counts, dtype=np.float64),
            np.asarray(self.sums, dtype=np.float64),
            np.asarray(self.entropy, dtype=np.float64),
            np.asarray(self.column_totals, dtype=np.float64),
            np.asarray(rel, dtype=np.float64),
        ]

    def metadata(self) -> dict[str, str | int | float | bool]:
        """Scalar metadata sent with the arrays (Flower metrics accept scalars only)."""
        return {
            "n_rows": int(self.n_rows),
            "prior_dim": int(self.prior_dim),
            "schema_hash": self.spec.schema_hash(),
            "model_hash": self.spec.model_hash(),
            "spec": json.dumps(self.spec.to_dict()),
        }

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], metadata: dict) -> Summaries:
        if len(arrays) != len(ARRAY_FIELDS):
            raise ValueError(
                f"expected {len(ARRAY_FIELDS)} arrays {ARRAY_FIELDS}, got {len(arrays)}"
            )
        counts, sums, entropy, totals, rel = (np.asarray(a, dtype=np.float64) for a in arrays)
        spec = MixtureSpec.from_dict(json.loads(metadata["spec"]))
        return cls(
            counts=counts,
            sums=sums.reshape(len(counts), -1),
            entropy=entropy,
            column_totals=totals,
            n_rows=int(metadata["n_rows"]),
            prior_dim=int(metadata["prior_dim"]),
            spec=spec,
            relevance=rel if rel.size else None,
        )

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.to_arrays()))
