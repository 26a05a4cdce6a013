"""Conjugate likelihood families: Bernoulli/Beta and Categorical/Dirichlet.

Each family maps sufficient statistics to what VI and the ELBO need, as pure functions of:

- ``S``: ``(K, P)`` per-cluster sums of the design matrix (``P = D`` for Bernoulli,
  ``P = sum L_d`` one-hot columns for categorical), over observed cells only;
- ``N``: ``(K,)`` per-cluster counts;
- ``c``: ``(D,)`` relevance weights of the variables (``None``: all ones; variable selection
  gives ``beta_hat = beta + c_d S``);
- ``O``: ``(K, D)`` per-cluster observed counts ``O_kd = sum_n r_nk m_nd`` when some cells are
  missing (``None``: every cell observed, ``O_kd = N_k``). The categorical family never needs
  ``O``: its one-hot block of a missing cell is all zeros, so ``O_kd`` is the block sum of ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import betaln, digamma, gammaln, xlogy


@dataclass(frozen=True)
class Bernoulli:
    """``x_nd ~ Bernoulli(phi_kd)``, ``phi_kd ~ Beta(a, b)``. Design matrix: the 0/1 values."""

    n_features: int
    a: float = 0.5
    b: float = 0.5
    name: str = field(default="bernoulli", init=False)

    @property
    def n_levels(self) -> np.ndarray:
        return np.full(self.n_features, 2, dtype=np.int64)

    @property
    def n_columns(self) -> int:
        return self.n_features

    def observed(self, S, N, O=None) -> np.ndarray:
        """``(K, D)`` observed counts (``N_k`` broadcast when every cell is observed)."""
        return np.broadcast_to(N[:, None], S.shape) if O is None else O

    def _posterior(self, S, N, c, O=None):
        cw = 1.0 if c is None else c
        A = self.a + cw * S
        B = self.b + cw * (self.observed(S, N, O) - S)
        return A, B

    def phi_term(self, S, N, c=None, O=None) -> np.ndarray:
        """``(K,)``: ``sum_d log B(a_hat, b_hat) - log B(a, b)`` per cluster."""
        A, B = self._posterior(S, N, c, O)
        return betaln(A, B).sum(axis=1) - self.n_features * betaln(self.a, self.b)

    def phi_term_by_variable(self, S, N, c=None, O=None) -> np.ndarray:
        """``(D,)``: the ``phi`` part of the ELBO of each variable, summed over clusters."""
        A, B = self._posterior(S, N, c, O)
        return (betaln(A, B) - betaln(self.a, self.b)).sum(axis=0)

    def log_likelihood_weights(self, S, N, c=None, O=None):
        """``W (K, D)``, ``bias (K,)`` and ``E0 (K, D)`` of the local step.

        ``E_q log p(x_n | z_n=k) = x_n @ W[k] + m_n @ E0[k]`` where ``m_n`` marks the observed
        cells; with every cell observed the second term is ``bias[k] = E0[k].sum()``.
        Irrelevant variables (weight ``1 - c_d``) add a constant over ``k`` and are left out.
        """
        A, B = self._posterior(S, N, c, O)
        dab = digamma(A + B)
        e1 = digamma(A) - dab
        e0 = digamma(B) - dab
        cw = 1.0 if c is None else c
        E0 = cw * e0
        return cw * (e1 - e0), E0.sum(axis=1), E0

    def expected_phi(self, S, N, c=None, O=None) -> np.ndarray:
        """``(K, D)`` posterior mean of ``P(x_d = 1 | cluster k)``."""
        A, B = self._posterior(S, N, c, O)
        return A / (A + B)

    def relevance_data_term(self, S, N, T, n_obs, c=None, O=None) -> np.ndarray:
        """``(D,)``: ``sum_k E log p(x | phi_k) - log p(x | phi0)`` over observed cells
        (docs/method.md, variable selection); ``T (D,)`` column totals, ``n_obs`` observed rows
        per variable."""
        A, B = self._posterior(S, N, c, O)
        dab = digamma(A + B)
        fit = (S * (digamma(A) - dab) + (self.observed(S, N, O) - S) * (digamma(B) - dab)).sum(
            axis=0
        )
        return fit - self.null_loglik(T, n_obs)

    def null_loglik(self, T, n_obs) -> np.ndarray:
        """``(D,)`` log-likelihood of each column under its pooled frequency ``T / n_obs``."""
        n_obs = np.broadcast_to(np.asarray(n_obs, dtype=np.float64), T.shape)
        p = np.divide(T, n_obs, out=np.zeros_like(T, dtype=np.float64), where=n_obs > 0)
        return xlogy(T, p) + xlogy(n_obs - T, 1.0 - p)

    def pooled_frequency(self, T, n_obs) -> np.ndarray:
        """``(P,)`` ``phi0``: each column's observed frequency."""
        n_obs = np.broadcast_to(np.asarray(n_obs, dtype=np.float64), T.shape)
        return np.divide(T, n_obs, out=np.zeros_like(T, dtype=np.float64), where=n_obs > 0)

    def block_index(self) -> np.ndarray:
        """``(P,)`` variable index of each design column."""
        return np.arange(self.n_features)

    def blocksum(self, M: np.ndarray) -> np.ndarray:
        return M


@dataclass(frozen=True)
class Categorical:
    """``x_nd ~ Categorical(phi_kd)``, ``phi_kd ~ Dirichlet(beta_d 1_{L_d})``.

    Design matrix: one-hot blocks of width ``L_d``. ``beta``: ``(D,)`` per-level concentration.
    """

    n_levels: np.ndarray
    beta: np.ndarray
    name: str = field(default="categorical", init=False)

    def __post_init__(self):
        object.__setattr__(self, "n_levels", np.asarray(self.n_levels, dtype=np.int64))
        object.__setattr__(self, "beta", np.asarray(self.beta, dtype=np.float64))
        offsets = np.concatenate([[0], np.cumsum(self.n_levels)[:-1]]).astype(np.int64)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "_block", np.repeat(np.arange(len(self.n_levels)), self.n_levels))

    @property
    def n_features(self) -> int:
        return len(self.n_levels)

    @property
    def n_columns(self) -> int:
        return int(self.n_levels.sum())

    def block_index(self) -> np.ndarray:
        return self._block

    def blocksum(self, M: np.ndarray) -> np.ndarray:
        """``(..., P) -> (..., D)`` sums over each variable's levels."""
        return np.add.reduceat(M, self.offsets, axis=-1)

    def observed(self, S, N, O=None) -> np.ndarray:
        return self.blocksum(S)

    def _posterior(self, S, c):
        beta_p = self.beta[self._block]
        cw = 1.0 if c is None else c[self._block]
        return beta_p + cw * S

    def _log_mbeta_prior(self) -> float:
        return float(
            (self.n_levels * gammaln(self.beta) - gammaln(self.n_levels * self.beta)).sum()
        )

    def phi_term(self, S, N, c=None, O=None) -> np.ndarray:
        """``(K,)``: ``sum_d log MB(beta_hat_kd) - log MB(beta 1)`` per cluster."""
        Bh = self._posterior(S, c)
        return (
            gammaln(Bh).sum(axis=1)
            - gammaln(self.blocksum(Bh)).sum(axis=1)
            - self._log_mbeta_prior()
        )

    def phi_term_by_variable(self, S, N, c=None, O=None) -> np.ndarray:
        Bh = self._posterior(S, c)
        per = self.blocksum(gammaln(Bh)) - gammaln(self.blocksum(Bh))
        prior = self.n_levels * gammaln(self.beta) - gammaln(self.n_levels * self.beta)
        return (per - prior).sum(axis=0)

    def _elog(self, S, c):
        Bh = self._posterior(S, c)
        return digamma(Bh) - digamma(self.blocksum(Bh))[:, self._block]

    def log_likelihood_weights(self, S, N, c=None, O=None):
        """``W (K, P)``, ``bias (K,)`` (zeros) and ``E0 = None``: a missing cell's one-hot
        block is all zeros, so ``x_n @ W[k]`` already sums over observed cells only."""
        elog = self._elog(S, c)
        if c is not None:
            elog = elog * c[self._block]
        return elog, np.zeros(S.shape[0]), None

    def expected_phi(self, S, N, c=None, O=None) -> np.ndarray:
        """``(K, sum L_d)`` posterior mean of ``P(x_d = l | cluster k)``, one-hot blocks."""
        Bh = self._posterior(S, c)
        return Bh / self.blocksum(Bh)[:, self._block]

    def relevance_data_term(self, S, N, T, n_obs=None, c=None, O=None) -> np.ndarray:
        fit = self.blocksum((S * self._elog(S, c)).sum(axis=0))
        return fit - self.null_loglik(T)

    def null_loglik(self, T, n_obs=None) -> np.ndarray:
        """``(D,)``; a variable's observed rows are the block sum of its column totals."""
        return self.blocksum(xlogy(T, self.pooled_frequency(T)))

    def pooled_frequency(self, T, n_obs=None) -> np.ndarray:
        tot = self.blocksum(T)[self._block]
        return np.divide(T, tot, out=np.zeros_like(T, dtype=np.float64), where=tot > 0)
