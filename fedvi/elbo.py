"""The evidence lower bound as a function of summaries only (SPEC §3, §6, §8).

All terms assume the global factors ``q(pi)``, ``q(phi)`` (and ``q(delta)``) at their optimum
given the statistics, which is where CAVI evaluates it after each global step.
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


def relevance_terms_by_variable(
    spec: MixtureSpec, c: np.ndarray, column_totals, n_rows: int
) -> np.ndarray:
    """``(D,)`` variable-selection terms (SPEC §8) at the optimal ``q(delta)``:

    ``(1 - c_d) log p(x_.d | phi0_d) + log B(c + a, 1 - c + b) - log B(a, b) + H[c_d]``.
    """
    a, b = spec.relevance_prior
    null = spec.family().null_loglik(column_totals, n_rows)
    ent = -xlogy(c, c) - xlogy(1.0 - c, 1.0 - c)
    return (1.0 - c) * null + betaln(c + a, 1.0 - c + b) - betaln(a, b) + ent


def relevance_term(spec: MixtureSpec, c: np.ndarray, column_totals, n_rows: int) -> float:
    """Sum of :func:`relevance_terms_by_variable`."""
    return float(relevance_terms_by_variable(spec, c, column_totals, n_rows).sum())


def relevance_objective(spec, counts, sums, column_totals, n_rows, c) -> np.ndarray:
    """``(D,)`` the part of the ELBO that depends on ``c_d``, per variable, at the optimal
    ``q(phi)`` and ``q(delta)``; the ELBO is a sum of these over ``d`` plus terms free of ``c``."""
    fam = spec.family()
    return fam.phi_term_by_variable(sums, counts, c) + relevance_terms_by_variable(
        spec, c, column_totals, n_rows
    )


def elbo_terms(
    spec: MixtureSpec,
    counts: np.ndarray,
    sums: np.ndarray,
    entropy: np.ndarray,
    prior_dim: int,
    relevance: np.ndarray | None = None,
    column_totals: np.ndarray | None = None,
    n_rows: int | None = None,
) -> float:
    """The ELBO from per-cluster ``counts (K,)``, ``sums (K, P)``, ``entropy (K,)``."""
    fam = spec.family()
    value = (
        fam.phi_term(sums, counts, relevance).sum()
        + weights_term(counts, spec.alpha0, prior_dim)
        + float(np.sum(entropy))
    )
    if spec.variable_selection:
        if relevance is None or column_totals is None or n_rows is None:
            raise ValueError("variable selection needs relevance, column_totals and n_rows")
        value += relevance_term(spec, relevance, column_totals, n_rows)
    return float(value)


def elbo(summaries: Summaries, relevance: np.ndarray | None = None) -> float:
    """The ELBO of a :class:`Summaries` (its own ``relevance`` unless one is given)."""
    c = summaries.relevance if relevance is None else relevance
    return elbo_terms(
        summaries.spec,
        summaries.counts,
        summaries.sums,
        summaries.entropy,
        summaries.prior_dim,
        c if summaries.spec.variable_selection else None,
        summaries.column_totals,
        summaries.n_rows,
    )


def merge_gain(
    spec: MixtureSpec,
    counts: np.ndarray,
    sums: np.ndarray,
    j: np.ndarray,
    k: np.ndarray,
    relevance: np.ndarray | None = None,
) -> np.ndarray:
    """``(M,)`` ELBO change of merging clusters ``j[m]`` and ``k[m]``, entropy excluded.

    Exact for clusters of different sites (their entropy is unchanged, SPEC §6); for clusters
    of one site it is an upper bound, since merging can only lower the assignment entropy.
    """
    fam = spec.family()
    j = np.asarray(j, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    if j.size == 0:
        return np.zeros(0)
    Nj, Nk = counts[j], counts[k]
    merged = fam.phi_term(sums[j] + sums[k], Nj + Nk, relevance)
    parts = fam.phi_term(sums[j], Nj, relevance) + fam.phi_term(sums[k], Nk, relevance)
    a0 = spec.alpha0
    dw = gammaln(a0 + Nj + Nk) + gammaln(a0) - gammaln(a0 + Nj) - gammaln(a0 + Nk)
    return merged - parts + dw
