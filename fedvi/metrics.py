"""Clustering agreement scores (no scikit-learn needed at run time)."""

from __future__ import annotations

import numpy as np
from scipy.special import comb


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(|a|, |b|)`` table of co-occurrence counts of two labelings of the same rows."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"labelings have different shapes: {a.shape} vs {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    return table


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985); 1 for identical partitions."""
    t = contingency(a, b)
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
    t = contingency(a, b).astype(float)
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
