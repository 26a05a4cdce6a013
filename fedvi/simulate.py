"""Seeded generators of the authors' simulation designs and of site splits.

Binary: ``theta_kd ~ Beta(1, 5)``, ``x ~ Bernoulli(theta_z)``. Categorical:
``phi_kd ~ Dirichlet(1, 2, ..., L)``. Irrelevant variables share one ``theta_d`` across clusters
and sit in the last columns.

:func:`add_missing` blanks cells (NaN) completely at random or at a rate that depends on the
true cluster, for studies of ignorable missing values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("iid", "dirichlet", "exclusive")
MISSING = ("mcar", "cluster")
#: Highest per-cluster missing rate of the ``cluster`` mechanism.
MAX_CLUSTER_RATE = 0.95


@dataclass(frozen=True)
class SimulatedData:
    """X: ``(N, D)`` int8 table; z: ``(N,)`` true clusters; params: ``(K, D)`` or ``(K, D, L)``;
    relevant: ``(D,)`` bool, True for the variables that differ between clusters."""

    X: np.ndarray
    z: np.ndarray
    params: np.ndarray
    relevant: np.ndarray


def _weights(n_clusters: int, weights) -> np.ndarray:
    w = np.full(n_clusters, 1.0 / n_clusters) if weights is None else np.asarray(weights, float)
    if w.shape != (n_clusters,) or (w < 0).any():
        raise ValueError(f"weights must be {n_clusters} non-negative numbers, got {weights}")
    return w / w.sum()


def simulate(
    n_rows: int,
    n_clusters: int,
    n_features: int,
    likelihood: str = "bernoulli",
    n_levels: int = 2,
    weights=None,
    n_irrelevant: int = 0,
    seed: int = 0,
) -> SimulatedData:
    """Draw a table from the authors' design (see module docstring)."""
    if not 0 <= n_irrelevant < n_features:
        raise ValueError(f"n_irrelevant must be in [0, {n_features}), got {n_irrelevant}")
    rng = np.random.default_rng(seed)
    w = _weights(n_clusters, weights)
    z = rng.choice(n_clusters, size=n_rows, p=w)
    relevant = np.arange(n_features) < n_features - n_irrelevant
    if likelihood == "bernoulli":
        theta = rng.beta(1.0, 5.0, size=(n_clusters, n_features))
        theta[:, ~relevant] = rng.beta(1.0, 5.0, size=(~relevant).sum())
        X = (rng.random((n_rows, n_features)) < theta[z]).astype(np.int8)
        return SimulatedData(X, z, theta, relevant)
    if likelihood != "categorical":
        raise ValueError(f"likelihood must be 'bernoulli' or 'categorical', got {likelihood!r}")
    conc = np.arange(1, n_levels + 1, dtype=float)
    phi = rng.dirichlet(conc, size=(n_clusters, n_features))
    phi[:, ~relevant] = rng.dirichlet(conc, size=(~relevant).sum())
    # Inverse-CDF sampling for all cells at once.
    cdf = np.cumsum(phi[z], axis=2)
    u = rng.random((n_rows, n_features, 1))
    X = np.minimum((u > cdf).sum(axis=2), n_levels - 1).astype(np.int8)
    return SimulatedData(X, z, phi, relevant)


def split_sites(
    z: np.ndarray,
    n_sites: int,
    split: str = "iid",
    seed: int = 0,
    concentration: float = 0.5,
    n_exclusive: int | None = None,
) -> list[np.ndarray]:
    """Row indices of each site.

    ``iid``: random equal split (the authors' batches). ``dirichlet``: each site's cluster mix
    is drawn from ``Dirichlet(concentration)``, rows of each cluster spread accordingly.
    ``exclusive``: ``n_exclusive`` clusters (default: one per site, up to K/2) live on one site
    only; the other clusters are split at random.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    rng = np.random.default_rng(seed)
    N = len(z)
    if split == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(N), n_sites)]
    clusters = np.unique(z)
    site = np.empty(N, dtype=np.int64)
    if split == "dirichlet":
        props = rng.dirichlet(np.full(n_sites, concentration), size=len(clusters))
        for k, p in zip(clusters, props, strict=True):
            rows = np.flatnonzero(z == k)
            site[rows] = rng.choice(n_sites, size=len(rows), p=p)
    else:
        n_ex = min(n_sites, len(clusters) // 2) if n_exclusive is None else int(n_exclusive)
        owner = {int(k): b % n_sites for b, k in enumerate(clusters[:n_ex])}
        site[:] = rng.integers(0, n_sites, size=N)
        for k, b in owner.items():
            site[z == k] = b
    return [np.flatnonzero(site == b) for b in range(n_sites)]


def missing_rates(z: np.ndarray, rate: float, mechanism: str = "mcar") -> np.ndarray:
    """``(N,)`` probability that each cell of row ``n`` is missing under ``mechanism``.

    ``mcar``: ``rate`` for every row. ``cluster``: with the distinct labels of ``z`` sorted
    and ``k = 0..K-1`` a row's position among them, ``min(rate * 2 (k + 1) / (K + 1),
    MAX_CLUSTER_RATE)``: the rates rise linearly from ``2 rate / (K + 1)`` (first cluster) to
    ``2 rate K / (K + 1)`` (last) and their unweighted mean over the clusters is ``rate``
    (before the cap), so the overall rate is ``rate`` for equal clusters and
    ``sum_k w_k rate_k`` for cluster weights ``w``.
    """
    if mechanism not in MISSING:
        raise ValueError(f"mechanism must be one of {MISSING}, got {mechanism!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    z = np.asarray(z)
    if mechanism == "mcar":
        return np.full(len(z), float(rate))
    _, k = np.unique(z, return_inverse=True)
    K = int(k.max()) + 1 if len(k) else 0
    return np.minimum(rate * 2.0 * (k + 1) / (K + 1), MAX_CLUSTER_RATE)


def add_missing(
    X: np.ndarray,
    z: np.ndarray | None,
    rate: float,
    mechanism: str = "mcar",
    seed: int = 0,
) -> np.ndarray:
    """A float64 copy of the dense table ``X`` with NaN in the missing cells; ``X`` is kept.

    Each cell of row ``n`` is missing independently with probability
    ``missing_rates(z, rate, mechanism)[n]``: ``mcar``, missing completely at random, every
    cell with probability ``rate``; ``cluster``, a rate that depends on the row's true cluster
    ``z`` (see :func:`missing_rates`) and never on the cell's value, so the values are missing
    at random given the cluster (the "ignorable" assumption of a mixture that skips missing
    cells holds given ``z``). ``z`` is only needed for ``cluster``.

    No row is left without an observed cell: in a row whose every cell would be missing, one
    cell drawn uniformly among those this call blanked is observed again. This lowers the
    missing fraction of ``mcar`` from ``rate`` to ``rate - rate**D / D`` in expectation
    (``D`` columns; negligible unless ``D`` is small or ``rate`` near 1). Cells that were
    already NaN in ``X`` stay NaN. Seeded by ``seed``.
    """
    out = np.array(X, dtype=np.float64, copy=True)
    if out.ndim != 2:
        raise ValueError(f"X must be a 2-d table, got shape {out.shape}")
    if mechanism == "cluster" and z is None:
        raise ValueError("mechanism 'cluster' needs the true clusters z")
    if z is not None and len(z) != len(out):
        raise ValueError(f"z has {len(z)} labels for {len(out)} rows")
    p = missing_rates(np.zeros(len(out)) if z is None else z, rate, mechanism)
    rng = np.random.default_rng(seed)
    blank = (rng.random(out.shape) < p[:, None]) & ~np.isnan(out)
    out[blank] = np.nan
    empty = np.flatnonzero(np.isnan(out).all(axis=1) & blank.any(axis=1))
    if len(empty):
        # One blanked cell per such row, uniformly: the largest random key among its cells.
        keys = np.where(blank[empty], rng.random((len(empty), out.shape[1])), -1.0)
        cols = keys.argmax(axis=1)
        out[empty, cols] = np.asarray(X, dtype=np.float64)[empty, cols]
    return out
