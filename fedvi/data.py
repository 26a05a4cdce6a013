"""Input validation and encoding of a site's table.

Every check raises ``ValueError`` (or ``TypeError``) whose message names what is wrong:
the column, the offending value, and the source when one is given (``source=`` is a file
name or a site label), so that a researcher can find the bad cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

LIKELIHOODS = ("bernoulli", "categorical")


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


@dataclass(frozen=True)
class EncodedData:
    """A validated table ready for the VI updates.

    matrix: ``(N, P)`` float64 design matrix. Bernoulli: ``P = D``, the 0/1 values, dense
        ndarray or CSR. Categorical: ``P = sum(L_d)``, CSR one-hot blocks.
    n_levels: ``(D,)`` number of levels per variable (2 for every Bernoulli variable).
    """

    matrix: np.ndarray | sp.csr_matrix
    likelihood: str
    n_levels: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_features(self) -> int:
        return len(self.n_levels)


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows[0]), int(cols[0])


def _check_shape(X, n_features: int | None, min_rows: int, source: str | None) -> None:
    if X.ndim != 2:
        raise ValueError(f"X{_where(source)} must be 2-D (rows, variables), got shape {X.shape}")
    n, d = X.shape
    if n == 0 or d == 0:
        raise ValueError(f"X{_where(source)} is empty: shape {X.shape}")
    if n_features is not None and d != n_features:
        raise ValueError(
            f"X{_where(source)} has {d} columns but the model expects {n_features} variables"
        )
    if n < min_rows:
        raise ValueError(f"X{_where(source)} has {n} rows; at least {min_rows} are needed")


def _as_array(X, source: str | None) -> np.ndarray:
    try:
        arr = np.asarray(X)
    except Exception as exc:  # pragma: no cover - numpy's own message is kept
        raise TypeError(f"X{_where(source)} cannot be read as an array: {exc}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"X{_where(source)} must be numeric, got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, source: str | None) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            i, j = _first_bad(bad)
            raise ValueError(
                f"X{_where(source)} contains NaN or inf (first at row {i}, column {j}: "
                f"{arr[i, j]}); missing values are not supported, impute or drop them first"
            )


def encode_bernoulli(
    X, n_features: int | None = None, min_rows: int = 1, source: str | None = None
) -> EncodedData:
    """Validate a 0/1 table (dense or ``scipy.sparse``) and return it as float64."""
    if sp.issparse(X):
        Xc = sp.csr_matrix(X, dtype=np.float64)
        _check_shape(Xc, n_features, min_rows, source)
        data = Xc.data
        if not np.isfinite(data).all():
            raise ValueError(f"X{_where(source)} contains NaN or inf")
        bad = (data != 0) & (data != 1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(Xc.indptr, k, side="right") - 1)
            raise ValueError(
                f"X{_where(source)} must be binary (0/1) for likelihood='bernoulli': "
                f"value {data[k]} at row {row}, column {Xc.indices[k]}"
            )
        Xc.eliminate_zeros()
        Xc.sort_indices()
        return EncodedData(Xc, "bernoulli", np.full(Xc.shape[1], 2, dtype=np.int64))
    arr = _as_array(X, source)
    _check_shape(arr, n_features, min_rows, source)
    _check_finite(arr, source)
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        i, j = _first_bad(bad)
        raise ValueError(
            f"X{_where(source)} must be binary (0/1) for likelihood='bernoulli': "
            f"value {arr[i, j]} at row {i}, column {j}"
        )
    return EncodedData(
        np.ascontiguousarray(arr, dtype=np.float64),
        "bernoulli",
        np.full(arr.shape[1], 2, dtype=np.int64),
    )


def categorical_codes(
    X, n_features: int | None = None, min_rows: int = 1, source: str | None = None
) -> np.ndarray:
    """Validate integer codes ``0..L_d-1`` and return them as an ``(N, D)`` int64 array."""
    if sp.issparse(X):
        raise TypeError(
            f"X{_where(source)}: sparse input is supported for likelihood='bernoulli' only; "
            "pass categorical codes as a dense array"
        )
    arr = _as_array(X, source)
    _check_shape(arr, n_features, min_rows, source)
    _check_finite(arr, source)
    if np.issubdtype(arr.dtype, np.floating):
        frac = arr != np.round(arr)
        if frac.any():
            i, j = _first_bad(frac)
            raise ValueError(
                f"X{_where(source)} must hold integer category codes: value {arr[i, j]} "
                f"at row {i}, column {j}"
            )
    codes = arr.astype(np.int64)
    neg = codes < 0
    if neg.any():
        i, j = _first_bad(neg)
        raise ValueError(
            f"X{_where(source)} has a negative category code {codes[i, j]} at row {i}, "
            f"column {j}; codes must be 0..L_d-1"
        )
    return codes


def infer_levels(codes: np.ndarray) -> np.ndarray:
    """``(D,)`` number of levels per column: the largest code + 1, and at least 2."""
    return np.maximum(codes.max(axis=0) + 1, 2).astype(np.int64)


def check_levels(n_levels, n_features: int) -> np.ndarray:
    levels = np.asarray(n_levels)
    if levels.ndim == 0:
        levels = np.full(n_features, int(levels))
    if levels.shape != (n_features,):
        raise ValueError(
            f"n_levels must be a scalar or have one entry per variable ({n_features}), "
            f"got shape {levels.shape}"
        )
    if not np.issubdtype(levels.dtype, np.integer) or (levels < 1).any():
        raise ValueError(f"n_levels must be positive integers, got {levels.tolist()}")
    return levels.astype(np.int64)


def one_hot(codes: np.ndarray, n_levels: np.ndarray) -> sp.csr_matrix:
    """``(N, sum L_d)`` CSR one-hot encoding of ``(N, D)`` codes, blocks in column order."""
    n, d = codes.shape
    offsets = np.concatenate([[0], np.cumsum(n_levels)[:-1]])
    indices = (codes + offsets[None, :]).ravel()
    indptr = np.arange(0, n * d + 1, d, dtype=np.int64)
    data = np.ones(n * d, dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(n, int(n_levels.sum())))


def encode_categorical(
    X,
    n_levels=None,
    n_features: int | None = None,
    min_rows: int = 1,
    source: str | None = None,
) -> EncodedData:
    """Validate integer codes and one-hot encode them (levels inferred when not given)."""
    codes = categorical_codes(X, n_features, min_rows, source)
    levels = infer_levels(codes) if n_levels is None else check_levels(n_levels, codes.shape[1])
    over = codes >= levels[None, :]
    if over.any():
        i, j = _first_bad(over)
        raise ValueError(
            f"X{_where(source)} has category code {codes[i, j]} at row {i}, column {j}, "
            f"out of range for a variable with {levels[j]} levels (codes 0..{levels[j] - 1})"
        )
    return EncodedData(one_hot(codes, levels), "categorical", levels)


def encode(
    X,
    likelihood: str,
    n_levels=None,
    n_features: int | None = None,
    min_rows: int = 1,
    source: str | None = None,
) -> EncodedData:
    """Validate ``X`` for ``likelihood`` and encode it (see :class:`EncodedData`)."""
    check_likelihood(likelihood)
    if isinstance(X, EncodedData):
        if X.likelihood != likelihood:
            raise ValueError(f"data encoded for {X.likelihood!r}, model is {likelihood!r}")
        return X
    if likelihood == "bernoulli":
        if n_levels is not None and np.any(np.asarray(n_levels) != 2):
            raise ValueError("likelihood='bernoulli' has exactly 2 levels per variable")
        return encode_bernoulli(X, n_features, min_rows, source)
    return encode_categorical(X, n_levels, n_features, min_rows, source)
