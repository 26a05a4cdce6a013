"""Seeded generators of the authors' simulation designs and of site splits.

Binary: ``theta_kd ~ Beta(1, 5)``, ``x ~ Bernoulli(theta_z)``. Categorical:
``phi_kd ~ Dirichlet(1, 2, ..., L)``. Irrelevant variables share one ``theta_d`` across clusters
and sit in the last columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("iid", "dirichlet", "exclusive")


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
