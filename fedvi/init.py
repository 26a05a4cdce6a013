"""Seeded k-modes initialisation (SPEC §2), vectorised through the design matrix.

Matching counts between rows and modes are one product ``X @ M.T`` for both families, since
the categorical design matrix is one-hot and a Bernoulli match is ``x m + (1 - x)(1 - m)``.
"""

from __future__ import annotations

import numpy as np

from fedvi.likelihoods import Bernoulli, Categorical


def _matches(X, modes: np.ndarray, family) -> np.ndarray:
    """``(N, K)`` number of variables on which each row agrees with each mode, up to a
    per-row constant (which does not change the arg-max)."""
    if isinstance(family, Bernoulli):
        return np.asarray(X @ (2.0 * modes - 1.0).T) - modes.sum(axis=1)
    return np.asarray(X @ modes.T)


def _modes(X, labels: np.ndarray, K: int, family) -> tuple[np.ndarray, np.ndarray]:
    """``(K, P)`` modes of each cluster in design-matrix coordinates, and ``(K,)`` sizes."""
    onehot = np.zeros((X.shape[0], K))
    onehot[np.arange(X.shape[0]), labels] = 1.0
    sizes = onehot.sum(axis=0)
    sums = np.asarray((X.T @ onehot).T)
    if isinstance(family, Bernoulli):
        return (2.0 * sums > sizes[:, None]).astype(np.float64), sizes
    assert isinstance(family, Categorical)
    modes = np.zeros_like(sums)
    for start, width in zip(family._offsets, family.n_levels, strict=True):
        best = np.argmax(sums[:, start : start + width], axis=1)
        modes[np.arange(K), start + best] = 1.0
    return modes, sizes


def kmodes_labels(X, K: int, family, rng: np.random.Generator, n_iter: int = 10) -> np.ndarray:
    """``(N,)`` k-modes cluster labels in ``0..K-1`` from ``K`` distinct random rows."""
    N = X.shape[0]
    K = min(K, N)
    seeds = rng.choice(N, size=K, replace=False)
    modes = np.asarray(X[seeds].todense()) if hasattr(X, "todense") else X[seeds].copy()
    labels = np.full(N, -1)
    for _ in range(n_iter):
        new = np.argmax(_matches(X, modes, family), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        modes, sizes = _modes(X, labels, K, family)
        empty = np.flatnonzero(sizes == 0)
        if empty.size:
            # Re-seed empty clusters with random rows so that K clusters start the VI.
            rows = rng.choice(N, size=empty.size, replace=False)
            labels[rows] = empty
            modes, _ = _modes(X, labels, K, family)
    return labels
