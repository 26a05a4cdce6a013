"""Seeded k-modes initialisation, vectorised through the design matrix and streamed in blocks.

Matching counts between rows and modes are one product ``X @ M.T`` for both families, since
the categorical design matrix is one-hot and a Bernoulli match on the observed cells is
``x m + (1 - x)(1 - m)``.
"""

from __future__ import annotations

import numpy as np

from fedvi.likelihoods import Bernoulli
from fedvi.vi import Problem


def _matches(X, mask, modes: np.ndarray, bernoulli: bool) -> np.ndarray:
    """``(B, K)`` number of observed variables on which each row agrees with each mode, up to
    a per-row constant (which does not change the arg-max)."""
    if bernoulli:
        miss = modes.sum(axis=1) if mask is None else mask @ modes.T
        return np.asarray(X @ (2.0 * modes - 1.0).T) - miss
    return np.asarray(X @ modes.T)


def _assign(problem: Problem, modes: np.ndarray, bernoulli: bool) -> np.ndarray:
    labels = np.empty(problem.n_rows, dtype=np.int64)
    for start, stop, X, mask in problem.data.blocks(problem.options.block_rows):
        labels[start:stop] = np.argmax(_matches(X, mask, modes, bernoulli), axis=1)
    return labels


def _modes(problem: Problem, labels: np.ndarray, K: int, family) -> tuple[np.ndarray, np.ndarray]:
    """``(K, P)`` modes of each cluster in design-matrix coordinates, and ``(K,)`` sizes."""
    data = problem.data
    eye = np.eye(K)
    sizes = np.bincount(labels, minlength=K).astype(np.float64)
    sums = np.zeros((K, data.n_columns))
    observed = np.zeros((K, data.n_columns)) if problem.missing_bernoulli else None
    for start, stop, X, mask in data.blocks(problem.options.block_rows):
        onehot = eye[labels[start:stop]]
        sums += np.asarray(X.T @ onehot).T
        if observed is not None:
            observed += (mask.T @ onehot).T
    if isinstance(family, Bernoulli):
        seen = sizes[:, None] if observed is None else observed
        return (2.0 * sums > seen).astype(np.float64), sizes
    modes = np.zeros_like(sums)
    for start, width in zip(family.offsets, family.n_levels, strict=True):
        best = np.argmax(sums[:, start : start + width], axis=1)
        modes[np.arange(K), start + best] = 1.0
    return modes, sizes


def kmodes_labels(problem: Problem, K: int, rng: np.random.Generator, n_iter: int = 10):
    """``(N,)`` k-modes cluster labels in ``0..K-1`` from ``K`` distinct random rows."""
    family = problem.spec.family()
    bernoulli = isinstance(family, Bernoulli)
    N = problem.n_rows
    K = min(K, N)
    seeds = rng.choice(N, size=K, replace=False)
    modes, _ = problem.data.rows(seeds)
    modes = np.array(modes, dtype=np.float64)
    labels = np.full(N, -1)
    for _ in range(n_iter):
        new = _assign(problem, modes, bernoulli)
        if np.array_equal(new, labels):
            break
        labels = new
        modes, sizes = _modes(problem, labels, K, family)
        empty = np.flatnonzero(sizes == 0)
        if empty.size:
            # Re-seed empty clusters with random rows so that K clusters start the VI.
            rows = rng.choice(N, size=empty.size, replace=False)
            labels[rows] = empty
            modes, _ = _modes(problem, labels, K, family)
    return labels
