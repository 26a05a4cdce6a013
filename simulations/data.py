"""Where a run's site tables come from: ``load_sites(cfg)`` dispatches on ``cfg.data.source``.

Add a source by registering a function ``cfg -> SiteData`` in :data:`SOURCES`, e.g.
``SOURCES["mnist"] = load_mnist``. The Flower sites read their tables from files
(:func:`write_site_files` writes in-memory sources out first), exactly as deployed sites do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from fedvi.io import SiteTable, read_table
from fedvi.simulate import add_missing, simulate, split_sites


class SiteData(NamedTuple):
    """sites: one ``(N_b, D)`` table per site (dense or CSR). truth: one ``(N_b,)`` array of
    known labels per site, or ``None``. feature_names: ``D`` names or ``None``. A source may
    return any 3-tuple in this order."""

    sites: list
    truth: list[np.ndarray] | None
    feature_names: list[str] | None


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def load_simulated(cfg) -> SiteData:
    """The authors' design (``fedvi.simulate``) split by ``cfg.federation.split``."""
    d, fed = cfg.data, cfg.federation
    seed = int(cfg.seed if _get(d, "seed") is None else d.seed)
    sim = simulate(
        int(d.n_rows),
        int(d.n_clusters),
        int(d.n_features),
        likelihood=str(cfg.model.likelihood),
        n_levels=int(_get(d, "n_levels", 2) or 2),
        weights=None if _get(d, "weights") is None else list(d.weights),
        n_irrelevant=int(_get(d, "n_irrelevant", 0) or 0),
        seed=seed,
    )
    parts = split_sites(
        sim.z,
        int(fed.sites),
        str(fed.split),
        seed=seed,
        concentration=float(_get(fed, "concentration", 0.5)),
        n_exclusive=_get(fed, "n_exclusive"),
    )
    empty = [b for b, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"split {fed.split!r} left sites {empty} without rows; use fewer sites or more rows"
        )
    X = sim.X
    rate = float(_get(d, "missing_rate", 0.0) or 0.0)
    if rate > 0:
        # Cells missing at random (data.missing_mechanism: mcar | cluster), as NaN; fit with
        # model.missing=ignore.
        X = add_missing(X, sim.z, rate, str(_get(d, "missing_mechanism", "mcar")), seed=seed)
    return SiteData([X[p] for p in parts], [sim.z[p] for p in parts], None)


def load_files(cfg) -> SiteData:
    """One file per site (``cfg.data.paths``); see :mod:`fedvi.io` for the formats."""
    paths = [os.path.abspath(str(p)) for p in (_get(cfg.data, "paths") or [])]
    if not paths:
        raise ValueError("data.source=files needs data.paths: one file per site")
    label_column = _get(cfg.data, "label_column")
    # Missing cells as the sites read them (the model's ``missing``: error | ignore).
    missing = str(_get(cfg.model, "missing", None) or "error")
    tables: list[SiteTable] = [
        read_table(p, label_column=label_column, missing=missing) for p in paths
    ]
    names = [t.feature_names for t in tables]
    if any(n != names[0] for n in names[1:]):
        bad = [t.path for t, n in zip(tables, names, strict=True) if n != names[0]]
        raise ValueError(
            f"the site files do not share one header: {bad} differ from {tables[0].path}"
        )
    truth = None
    if label_column is not None:
        truth = [np.asarray(t.labels) for t in tables]
    sites = [_nan_missing(t.X) for t in tables]
    return SiteData(sites, truth, None if names[0] is None else list(names[0]))


def _nan_missing(X):
    """A file's codes with its missing cells (``-1``) as NaN, as the simulated sources and
    ``fedvi.federated_fit`` take them (the codes as they are when nothing is missing)."""
    if sp.issparse(X) or not (X == -1).any():
        return X
    return np.where(X == -1, np.nan, X.astype(np.float64))


#: ``cfg.data.source`` -> loader. Another source: ``SOURCES["name"] = fn``.
SOURCES: dict[str, Callable[..., SiteData]] = {
    "simulated": load_simulated,
    "files": load_files,
}


def load_sites(cfg) -> SiteData:
    """``(sites, truth, feature_names)`` of the configured source (see :class:`SiteData`)."""
    source = str(cfg.data.source)
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; registered: {sorted(SOURCES)}")
    sites, truth, names = SOURCES[source](cfg)
    return SiteData(list(sites), None if truth is None else list(truth), names)


def read_site_truth(paths: list[str], label_column: str) -> list[np.ndarray]:
    """Each site file's known labels (that column only; the tables are not loaded)."""
    from fedvi.io import read_column

    return [np.asarray(read_column(p, label_column)) for p in paths]


def site_file_paths(cfg) -> list[str] | None:
    """The files the sites read directly (``data.source=files``), else ``None``."""
    if str(cfg.data.source) != "files":
        return None
    return [os.path.abspath(str(p)) for p in cfg.data.paths]


def write_site_files(sites: list, directory: str, feature_names=None) -> list[str]:
    """Write in-memory site tables for the Flower sites to read: ``site<b>.npz`` (CSR, or
    dense ``X`` with ``feature_names`` when names are given) or ``site<b>.npy``."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for b, X in enumerate(sites):
        if sp.issparse(X):
            path = os.path.join(directory, f"site{b}.npz")
            sp.save_npz(path, sp.csr_matrix(X))
        elif feature_names is not None:
            path = os.path.join(directory, f"site{b}.npz")
            np.savez(path, X=np.asarray(X), feature_names=np.asarray(feature_names, dtype=str))
        else:
            path = os.path.join(directory, f"site{b}.npy")
            np.save(path, np.asarray(X))
        paths.append(os.path.abspath(path))
    return paths


# Real benchmarks (issue 4, simulations/real_data.py): data.source=mnist | digits.
from simulations.real_data import LOADERS as _REAL_DATA  # noqa: E402

SOURCES.update(_REAL_DATA)
