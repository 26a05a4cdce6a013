"""The evidence lower bound as a function of summaries only (docs/method.md).

All terms assume the global factors ``q(pi)``, ``q(phi)`` (and ``q(delta)``) at their optimum
given the statistics, which is where CAVI evaluates it after each global step. With missing
cells each variable's data term uses its observed counts ``O_kd`` instead of ``N_k``; without
them every formula is the complete-data one.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaln, gammaln, xlogy

from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries


def weights_term(counts: np.ndarray, alpha0: float, prior_dim: int) -> float:
    """``log B(alpha_hat) - log B(alpha0 1_K0)`` for ``K = len(counts)`` non-empty clusters.

    The ``K0 - K`` empty components have ``alpha_hat = alpha0`` and contribute zero.
    """
    K = len(counts)
    if K > prior_dim:
        raise ValueError(f"{K} clusters exceed the prior dimension K0={prior_dim}")
    return float(
        gammaln(prior_dim * alpha0)
        - K * gammaln(alpha0)
        - gammaln(counts.sum() + prior_dim * alpha0)
        + gammaln(alpha0 + counts).sum()
    )


def relevance_terms_by_variable(spec: MixtureSpec, c, column_totals, n_obs) -> np.ndarray:
    """``(D,)`` variable-selection terms at the optimal ``q(delta)``:

    ``(1 - c_d) log p(x_.d | phi0_d) + log B(c + a, 1 - c + b) - log B(a, b) + H[c_d]``.
    ``n_obs``: rows observed per variable (or the number of rows).
    """
    a, b = spec.relevance_prior
    null = spec.family().null_loglik(column_totals, n_obs)
    ent = -xlogy(c, c) - xlogy(1.0 - c, 1.0 - c)
    return (1.0 - c) * null + betaln(c + a, 1.0 - c + b) - betaln(a, b) + ent


def relevance_objective(s: Summaries, c: np.ndarray) -> np.ndarray:
    """``(D,)`` the part of the ELBO that depends on ``c_d``, per variable, at the optimal
    ``q(phi)`` and ``q(delta)``; the ELBO is a sum of these over ``d`` plus terms free of ``c``."""
    fam = s.spec.family()
    return fam.phi_term_by_variable(s.sums, s.counts, c, s.observed) + relevance_terms_by_variable(
        s.spec, c, s.column_totals, s.column_observed_or_rows()
    )


def elbo(s: Summaries, relevance: np.ndarray | None = None) -> float:
    """The ELBO of a :class:`Summaries` (its own ``relevance`` unless one is given)."""
    c = s.relevance if relevance is None else relevance
    spec = s.spec
    fam = spec.family()
    c_phi = c if spec.variable_selection else None
    value = (
        fam.phi_term(s.sums, s.counts, c_phi, s.observed).sum()
        + weights_term(s.counts, spec.alpha0, s.prior_dim)
        + float(np.sum(s.entropy))
    )
    if spec.variable_selection:
        if c is None:
            raise ValueError("variable selection needs the relevance c_d")
        value += float(
            relevance_terms_by_variable(spec, c, s.column_totals, s.column_observed_or_rows()).sum()
        )
    return float(value)


def merge_gain(s: Summaries, j, k) -> np.ndarray:
    """``(M,)`` ELBO change of merging clusters ``j[m]`` and ``k[m]`` of ``s``, entropy
    excluded.

    Exact for clusters of different sites (their entropy is unchanged); for clusters of one site
    it is an upper bound, since merging can only lower the assignment entropy.
    """
    fam = s.spec.family()
    j = np.asarray(j, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    if j.size == 0:
        return np.zeros(0)
    c = s.relevance if s.spec.variable_selection else None
    N, S = s.counts, s.sums
    O = s.observed
    Oj = None if O is None else O[j]
    Ok = None if O is None else O[k]
    Ojk = None if O is None else O[j] + O[k]
    merged = fam.phi_term(S[j] + S[k], N[j] + N[k], c, Ojk)
    parts = fam.phi_term(S[j], N[j], c, Oj) + fam.phi_term(S[k], N[k], c, Ok)
    a0 = s.spec.alpha0
    Nj, Nk = N[j], N[k]
    dw = gammaln(a0 + Nj + Nk) + gammaln(a0) - gammaln(a0 + Nj) - gammaln(a0 + Nk)
    return merged - parts + dw
