"""Merge gains of cluster pairs from the two clusters' statistics alone, in vectorised blocks.

The ELBO change of merging clusters ``i`` and ``j`` of different sites (docs/method.md, global
merge) is

    ΔL = phi(S_i + S_j) - phi(S_i) - phi(S_j)
         + log Γ(α0 + N_i + N_j) + log Γ(α0) - log Γ(α0 + N_i) - log Γ(α0 + N_j)

with ``phi`` a cluster's ``sum_d log B(beta_hat_kd) - log B(prior)`` (Bernoulli: Beta
functions, with the observed counts ``O_kd`` in place of ``N_k`` when cells are missing;
categorical: multivariate Beta functions over each variable's levels; variable selection:
``beta_hat = beta + c_d S``). :class:`PairGain` keeps ``phi`` of every cluster, so a pair costs
one ``phi`` of the merged statistics: ``O(D)`` (``O(sum L_d)`` for categorical) log-gamma
evaluations, and a block of ``M`` pairs is a few ``(M, P)`` array operations.

It is the scorer of :func:`fedvi.global_merge` and of any other move that merges clusters of
different sites from summaries (global merge or delete moves between refinement rounds).
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaln, gammaln

from fedvi.likelihoods import Bernoulli
from fedvi.summaries import Summaries

#: Elements of one ``(M, P)`` temporary array; a block holds ``BLOCK_CELLS // P`` pairs.
BLOCK_CELLS = 1 << 20


class PairGain:
    """Mutable statistics of ``K`` clusters and the batched gain of merging any two of them.

    Build with :meth:`from_summaries`; :meth:`gains` scores pairs, :meth:`merge` folds one
    cluster into another (the other's row is then unused). The entropy is left out: the gain is
    exact for clusters with disjoint sets of sites (the global merge's invariant) and an upper
    bound for clusters that share rows.
    """

    def __init__(self, s: Summaries):
        self.spec = s.spec
        self.family = s.spec.family()
        self.counts = np.array(s.counts, dtype=np.float64)
        self.sums = np.array(s.sums, dtype=np.float64)
        self.observed = None if s.observed is None else np.array(s.observed, dtype=np.float64)
        self.relevance = s.relevance if s.spec.variable_selection else None
        fam = self.family
        if isinstance(fam, Bernoulli):
            self._prior = fam.n_features * betaln(fam.a, fam.b)
            # The merged A + B is a + b + c (N_i + N_j) when every cell is observed: one
            # log-gamma per pair instead of one per pair and variable (without c).
            self._blocks = None
        else:
            self._prior = fam._log_mbeta_prior()
            self._blocks = fam.blocksum(self.sums)  # (K, D) observed counts per variable
            self._cw = None if self.relevance is None else self.relevance[fam.block_index()]
            self._beta_p = fam.beta[fam.block_index()]
            self._beta_sum = fam.n_levels * fam.beta
        self.self_term = self._phi(self.sums, self.counts, self.observed, self._blocks)

    @classmethod
    def from_summaries(cls, s: Summaries) -> PairGain:
        """A scorer over the clusters of ``s`` (its arrays are copied)."""
        return cls(s)

    def set_relevance(self, relevance: np.ndarray | None) -> None:
        """New ``c_d`` (variable selection): every cluster's own term is recomputed."""
        if not self.spec.variable_selection:
            return
        self.relevance = relevance
        if self._blocks is not None:
            self._cw = relevance[self.family.block_index()]
        self.self_term = self._phi(self.sums, self.counts, self.observed, self._blocks)

    # -- the data term of a set of clusters ------------------------------------------------
    def _phi(self, S, N, O, Ob) -> np.ndarray:
        """``(M,)`` ``phi`` of clusters with statistics ``S (M, P)``, ``N (M,)``, ``O (M, D)``
        (Bernoulli with missing cells) and ``Ob (M, D)`` (categorical block sums)."""
        fam = self.family
        c = self.relevance
        if Ob is None:
            a, b = fam.a, fam.b
            n = N[:, None] if O is None else O
            if c is None:
                A = a + S
                B = b + (n - S)
            else:
                A = a + c * S
                B = b + c * (n - S)
            out = gammaln(A).sum(axis=1) + gammaln(B).sum(axis=1)
            if O is None and c is None:
                out -= fam.n_features * gammaln(a + b + N)
            else:
                out -= gammaln(A + B).sum(axis=1)
            return out - self._prior
        Bh = self._beta_p + (S if self._cw is None else self._cw * S)
        tot = self._beta_sum + (Ob if c is None else c * Ob)
        return gammaln(Bh).sum(axis=1) - gammaln(tot).sum(axis=1) - self._prior

    # -- pairs -------------------------------------------------------------------------------
    def gains(self, i, j) -> np.ndarray:
        """``(M,)`` ELBO change of merging cluster ``i[m]`` with ``j[m]`` (entropy excluded)."""
        i = np.asarray(i, dtype=np.int64).ravel()
        j = np.asarray(j, dtype=np.int64).ravel()
        if i.shape != j.shape:
            raise ValueError(f"i and j must have the same length, got {i.size} and {j.size}")
        out = np.empty(i.size)
        step = max(1, BLOCK_CELLS // max(1, self.sums.shape[1]))
        a0 = self.spec.alpha0
        for s in range(0, i.size, step):
            ii, jj = i[s : s + step], j[s : s + step]
            Ni, Nj = self.counts[ii], self.counts[jj]
            O = None if self.observed is None else self.observed[ii] + self.observed[jj]
            Ob = None if self._blocks is None else self._blocks[ii] + self._blocks[jj]
            merged = self._phi(self.sums[ii] + self.sums[jj], Ni + Nj, O, Ob)
            dw = gammaln(a0 + Ni + Nj) + gammaln(a0) - gammaln(a0 + Ni) - gammaln(a0 + Nj)
            out[s : s + step] = merged - self.self_term[ii] - self.self_term[jj] + dw
        return out

    def gains_against(self, i: int, others) -> np.ndarray:
        """``(M,)`` gains of merging cluster ``i`` with each of ``others``."""
        others = np.asarray(others, dtype=np.int64).ravel()
        return self.gains(np.full(others.size, int(i)), others)

    def merge(self, i: int, j: int) -> None:
        """Fold cluster ``j`` into ``i``: statistics add up, ``i``'s own term is refreshed."""
        self.counts[i] += self.counts[j]
        self.sums[i] += self.sums[j]
        if self.observed is not None:
            self.observed[i] += self.observed[j]
        if self._blocks is not None:
            self._blocks[i] += self._blocks[j]
        one = slice(i, i + 1)
        self.self_term[i] = self._phi(
            self.sums[one],
            self.counts[one],
            None if self.observed is None else self.observed[one],
            None if self._blocks is None else self._blocks[one],
        )[0]


def pair_gains(s: Summaries, i, j) -> np.ndarray:
    """``(M,)`` ELBO change of merging clusters ``i[m]`` and ``j[m]`` of ``s``, entropy excluded
    (one-off use; build a :class:`PairGain` once to score many blocks or to merge)."""
    return PairGain(s).gains(i, j)
