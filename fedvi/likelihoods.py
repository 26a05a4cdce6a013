"""Conjugate likelihood families: Bernoulli/Beta and Categorical/Dirichlet.

Each family maps sufficient statistics to the quantities that VI and the ELBO need, as pure
functions of ``(S, N, c)``:

- ``S``: ``(K, P)`` per-cluster sums of the design matrix (``P = D`` for Bernoulli,
  ``P = sum L_d`` one-hot columns for categorical),
- ``N``: ``(K,)`` per-cluster counts,
- ``c``: ``(D,)`` relevance weights of the variables (all ones without variable selection;
  SPEC §8), so that ``beta_hat = beta + c_d S``.
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

    def _posterior(self, S, N, c):
        cw = np.ones(self.n_features) if c is None else c
        A = self.a + cw * S
        B = self.b + cw * (N[:, None] - S)
        return A, B

    def phi_term(self, S, N, c=None) -> np.ndarray:
        """``(K,)``: ``sum_d log B(a_hat, b_hat) - log B(a, b)`` per cluster."""
        A, B = self._posterior(S, N, c)
        return betaln(A, B).sum(axis=1) - self.n_features * betaln(self.a, self.b)

    def phi_term_by_variable(self, S, N, c=None) -> np.ndarray:
        """``(D,)``: the ``phi`` part of the ELBO of each variable, summed over clusters."""
        A, B = self._posterior(S, N, c)
        return (betaln(A, B) - betaln(self.a, self.b)).sum(axis=0)

    def log_likelihood_weights(self, S, N, c=None):
        """``W (K, P)`` and ``bias (K,)`` with ``E_q log p(x_n | z_n=k) = x_n @ W[k] + bias[k]``.

        Irrelevant variables (weight ``1 - c_d``) add a constant over ``k`` and are left out.
        """
        A, B = self._posterior(S, N, c)
        dab = digamma(A + B)
        e1 = digamma(A) - dab
        e0 = digamma(B) - dab
        cw = np.ones(self.n_features) if c is None else c
        return cw * (e1 - e0), (cw * e0).sum(axis=1)

    def expected_phi(self, S, N, c=None) -> np.ndarray:
        """``(K, D)`` posterior mean of ``P(x_d = 1 | cluster k)``."""
        A, B = self._posterior(S, N, c)
        return A / (A + B)

    def relevance_data_term(self, S, N, T, n_rows, c=None) -> np.ndarray:
        """``(D,)``: ``sum_k E log p(x | phi_k) - log p(x | phi0)`` summed over rows (SPEC §8)."""
        A, B = self._posterior(S, N, c)
        dab = digamma(A + B)
        fit = (S * (digamma(A) - dab) + (N[:, None] - S) * (digamma(B) - dab)).sum(axis=0)
        return fit - self.null_loglik(T, n_rows)

    def null_loglik(self, T, n_rows) -> np.ndarray:
        """``(D,)`` log-likelihood of each column under its pooled frequency ``phi0 = T / n``."""
        p = T / n_rows
        return xlogy(T, p) + xlogy(n_rows - T, 1.0 - p)

    def block_index(self) -> np.ndarray:
        """``(P,)`` variable index of each design column."""
        return np.arange(self.n_features)

    def prior_dict(self) -> dict:
        return {"a": float(self.a), "b": float(self.b)}


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
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_block", np.repeat(np.arange(len(self.n_levels)), self.n_levels))

    @property
    def n_features(self) -> int:
        return len(self.n_levels)

    @property
    def n_columns(self) -> int:
        return int(self.n_levels.sum())

    def block_index(self) -> np.ndarray:
        return self._block

    def _blocksum(self, M: np.ndarray) -> np.ndarray:
        """``(K, P) -> (K, D)`` sums over each variable's levels."""
        return np.add.reduceat(M, self._offsets, axis=1)

    def _posterior(self, S, c):
        beta_p = self.beta[self._block]
        cw = np.ones(self.n_columns) if c is None else c[self._block]
        return beta_p + cw * S

    def _log_mbeta_prior(self) -> float:
        return float(
            (self.n_levels * gammaln(self.beta) - gammaln(self.n_levels * self.beta)).sum()
        )

    def phi_term(self, S, N, c=None) -> np.ndarray:
        """``(K,)``: ``sum_d log MB(beta_hat_kd) - log MB(beta 1)`` per cluster."""
        Bh = self._posterior(S, c)
        return (
            gammaln(Bh).sum(axis=1)
            - gammaln(self._blocksum(Bh)).sum(axis=1)
            - self._log_mbeta_prior()
        )

    def phi_term_by_variable(self, S, N, c=None) -> np.ndarray:
        Bh = self._posterior(S, c)
        per = self._blocksum(gammaln(Bh)) - gammaln(self._blocksum(Bh))
        prior = self.n_levels * gammaln(self.beta) - gammaln(self.n_levels * self.beta)
        return (per - prior).sum(axis=0)

    def _elog(self, S, c):
        Bh = self._posterior(S, c)
        return digamma(Bh) - digamma(self._blocksum(Bh))[:, self._block]

    def log_likelihood_weights(self, S, N, c=None):
        elog = self._elog(S, c)
        if c is not None:
            elog = elog * c[self._block]
        return elog, np.zeros(S.shape[0])

    def expected_phi(self, S, N, c=None) -> np.ndarray:
        """``(K, sum L_d)`` posterior mean of ``P(x_d = l | cluster k)``, one-hot blocks."""
        Bh = self._posterior(S, c)
        return Bh / self._blocksum(Bh)[:, self._block]

    def relevance_data_term(self, S, N, T, n_rows, c=None) -> np.ndarray:
        fit = np.add.reduceat((S * self._elog(S, c)).sum(axis=0), self._offsets)
        return fit - self.null_loglik(T, n_rows)

    def null_loglik(self, T, n_rows) -> np.ndarray:
        return np.add.reduceat(xlogy(T, T / n_rows), self._offsets)

    def prior_dict(self) -> dict:
        return {"beta": self.beta.tolist()}
