"""Clustering agreement scores (no scikit-learn needed at run time)."""

from __future__ import annotations

import numpy as np
from scipy.special import comb


def _codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels as codes ``0..n-1`` and ``n``: small non-negative integers as they are (a
    ``bincount`` away from their table), anything else through ``np.unique``."""
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() < 2 * x.size:
        codes = x.astype(np.int64, copy=False)
        used = np.bincount(codes)
        if (used > 0).all():
            return codes, len(used)
        remap = np.cumsum(used > 0) - 1
        return remap[codes], int((used > 0).sum())
    _, inv = np.unique(x, return_inverse=True)
    return inv.ravel(), int(inv.max()) + 1 if inv.size else 0


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(|a|, |b|)`` table of co-occurrence counts of two labelings of the same rows (one
    ``bincount`` over the pairs: memory linear in the rows, not in the table)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"labelings have different shapes: {a.shape} vs {b.shape}")
    ia, na = _codes(a.ravel())
    ib, nb = _codes(b.ravel())
    return np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb)


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985); 1 for identical partitions."""
    return _ari(contingency(a, b))


def agreement(a, b) -> tuple[float, float]:
    """``(ARI, NMI)`` of two labelings from one contingency table."""
    t = contingency(a, b)
    return _ari(t), _nmi(t)


def _ari(t: np.ndarray) -> float:
    n = t.sum()
    sum_cells = comb(t, 2).sum()
    sum_a = comb(t.sum(axis=1), 2).sum()
    sum_b = comb(t.sum(axis=0), 2).sum()
    expected = sum_a * sum_b / comb(n, 2)
    top = 0.5 * (sum_a + sum_b)
    if top == expected:
        return 1.0
    return float((sum_cells - expected) / (top - expected))


def normalized_mutual_info(a, b) -> float:
    """NMI with the arithmetic-mean normaliser (scikit-learn's default)."""
    return _nmi(contingency(a, b))


def _nmi(t: np.ndarray) -> float:
    t = t.astype(float)
    n = t.sum()
    pa, pb, pab = t.sum(axis=1) / n, t.sum(axis=0) / n, t / n
    nz = pab > 0
    mi = (pab[nz] * np.log(pab[nz] / np.outer(pa, pb)[nz])).sum()
    ha = -(pa[pa > 0] * np.log(pa[pa > 0])).sum()
    hb = -(pb[pb > 0] * np.log(pb[pb > 0])).sum()
    if ha == 0 and hb == 0:
        return 1.0
    denom = 0.5 * (ha + hb)
    return float(mi / denom) if denom > 0 else 0.0
