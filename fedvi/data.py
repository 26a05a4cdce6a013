"""Validation and compact encoding of a site's table, and the blocks the VI reads it in.

A table stays compact (``int8``/``int16`` codes with ``-1`` for a missing cell, or a sparse CSR
of 0/1): the local step converts one block of rows at a time to the design matrix (binary
values, or one-hot blocks for categorical), so memory grows with the block size, not with N.

Every check raises :class:`DataError` (a ``ValueError``) whose message names the row (1-based),
the column (by name and 1-based position) and the value, and the source when one is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from fedvi.spec import LIKELIHOODS, MixtureSpec

#: Levels inferred from the data (largest code + 1) above this are refused: such a code is far
#: more likely an identifier or a typo than a category. Pass ``n_levels`` to go beyond it.
MAX_INFERRED_LEVELS = 1000
#: Largest category code (codes are stored as int16).
MAX_CODE = 32767
#: Rows per block when validating an in-memory table (bounds the temporaries).
CHECK_BLOCK = 65536


class DataError(ValueError):
    """A table cannot be used as it is; ``kind`` says which kind of problem (for reports that
    must not carry the details), the message says exactly where. A file's problems are a
    :class:`fedvi.io.DataFileError`, a subclass."""

    def __init__(self, message: str, kind: str = "bad-value", row: int | None = None):
        super().__init__(message)
        self.kind = kind
        #: The 0-based index of the data row the message names, if it names one (so that a
        #: reader of the file can add the file and its line: :func:`fedvi.io.locate_error`).
        self.row = row

    def __reduce__(self):
        return type(self), (str(self), self.kind, self.row)


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def describe_column(j: int, names: Sequence[str] | None) -> str:
    """``column 'name' (#3)`` or ``column #3`` (1-based position)."""
    return f"column {names[j]!r} (#{j + 1})" if names is not None else f"column #{j + 1}"


def show(value) -> str:
    """A cell value as the user wrote it (``2``, ``1e+300``, ``nan``), not numpy's repr."""
    v = value.item() if hasattr(value, "item") else value
    return repr(v)


def describe_cell(i: int, j: int, names: Sequence[str] | None) -> str:
    """``row 5, column 'x3' (#4)``: the 1-based data row and the column."""
    return f"row {i + 1}, {describe_column(j, names)}"


@dataclass(frozen=True, eq=False)
class EncodedData:
    """A validated table, compact, read by the VI in blocks of rows.

    values: ``(N, D)`` ``int8``/``int16`` codes (``-1`` marks a missing cell), or an ``(N, D)``
        CSR matrix of 0/1 (Bernoulli only; no missing cells). May be a read-only memory map.
    likelihood: ``"bernoulli"`` or ``"categorical"``.
    n_levels: ``(D,)`` levels per variable (2 for Bernoulli).
    feature_names: the ``D`` variable names, or ``None``.
    has_missing: whether any cell is missing.
    """

    values: np.ndarray | sp.csr_matrix
    likelihood: str
    n_levels: np.ndarray
    feature_names: tuple[str, ...] | None = None
    has_missing: bool = False

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_features(self) -> int:
        return len(self.n_levels)

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_levels)[:-1]]).astype(np.int64)

    @property
    def n_columns(self) -> int:
        """``P``: columns of the design matrix (``D`` or ``sum L_d``)."""
        return self.n_features if self.likelihood == "bernoulli" else int(self.n_levels.sum())

    @property
    def sparse(self) -> bool:
        return sp.issparse(self.values)

    def block(self, start: int, stop: int, dtype=np.float64):
        """Rows ``start:stop`` as ``(X, mask)``: the design block ``(B, P)`` (dense, or CSR for
        sparse and categorical tables) and, for a Bernoulli table with missing cells, the
        ``(B, D)`` 0/1 mask of observed cells (else ``None``)."""
        v = self.values[start:stop]
        if self.sparse:
            X = v if v.dtype == dtype else v.astype(dtype)
            return X, None
        if self.likelihood == "bernoulli":
            X = v.astype(dtype)
            if not self.has_missing:
                return X, None
            mask = (v >= 0).astype(dtype)
            np.maximum(X, 0, out=X)
            return X, mask
        return self._one_hot(v, dtype), None

    def _one_hot(self, codes: np.ndarray, dtype) -> sp.csr_matrix:
        B, D = codes.shape
        cols = codes.astype(np.int64) + self.offsets[None, :]
        if self.has_missing:
            valid = codes >= 0
            indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int64)
            indices = cols[valid]
        else:
            indptr = np.arange(0, B * D + 1, D, dtype=np.int64)
            indices = cols.ravel()
        data = np.ones(len(indices), dtype=dtype)
        return sp.csr_matrix((data, indices, indptr), shape=(B, self.n_columns))

    def blocks(
        self, block_rows: int, dtype=np.float64
    ) -> Iterator[tuple[int, int, object, object]]:
        """``(start, stop, X, mask)`` for consecutive blocks of ``block_rows`` rows."""
        for start in range(0, self.n_rows, block_rows):
            stop = min(start + block_rows, self.n_rows)
            X, mask = self.block(start, stop, dtype)
            yield start, stop, X, mask

    def design(self, dtype=np.float64):
        """The whole design matrix (dense ndarray or CSR): for small tables and the torch
        backend only; the VI itself reads blocks."""
        X, mask = self.block(0, self.n_rows, dtype)
        return X, mask

    def rows(self, index: np.ndarray, dtype=np.float64):
        """Design rows ``index`` (dense ``(len(index), P)``) and their mask."""
        sub = dataclasses.replace(self, values=self.values[np.asarray(index)])
        X, mask = sub.block(0, len(index), dtype)
        return (X.toarray() if sp.issparse(X) else X), mask

    @cached_property
    def totals(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(T (P,), observed (D,) or None)``: column totals of the design matrix and, with
        missing cells, the rows observed per variable."""
        T = np.zeros(self.n_columns)
        obs = np.zeros(self.n_features) if self.has_missing else None
        for start in range(0, self.n_rows, CHECK_BLOCK):
            v = self.values[start : start + CHECK_BLOCK]
            if self.sparse:
                T += np.asarray(v.sum(axis=0)).ravel()
            elif self.likelihood == "bernoulli":  # counted on the codes: no float copy
                T += (v == 1).sum(axis=0)
                if obs is not None:
                    obs += (v >= 0).sum(axis=0)
            else:
                cols = v.astype(np.int64) + self.offsets[None, :]
                T += np.bincount(cols[v >= 0], minlength=self.n_columns)
        if obs is not None and self.likelihood == "categorical":
            obs = np.add.reduceat(T, self.offsets)
        return T, obs


# -- validation -------------------------------------------------------------------------------
def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows[0]), int(cols[0])


def _names_of(X) -> tuple[str, ...] | None:
    cols = getattr(X, "columns", None)
    if cols is None:
        return None
    names = tuple(str(c).lstrip("\ufeff").strip() for c in cols)
    return names


def align_columns(
    values, names: Sequence[str] | None, expected: Sequence[str] | None, source: str | None
):
    """Reorder a named table's columns to ``expected``; a clear error lists the missing and
    extra names. Unnamed tables keep their positions."""
    if names is None or expected is None:
        return values, names
    names, expected = list(names), list(expected)
    if names == expected:
        return values, tuple(names)
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        raise DataError(
            f"the variables{_where(source)} differ from the model's: "
            f"missing {missing or 'none'}, extra {extra or 'none'}",
            kind="bad-header",
        )
    order = [names.index(n) for n in expected]
    return values[:, order], tuple(expected)


def _frame_values(X):
    """A DataFrame's values as a float array when it holds missing entries (NaN), else its
    natural numeric dtype; object columns are refused naming the column."""
    for j, dtype in enumerate(X.dtypes):
        kind = getattr(dtype, "kind", "O")
        if kind not in "biuf":
            # A nullable integer/boolean extension dtype is fine; text is not.
            if str(dtype) in ("Int8", "Int16", "Int32", "Int64", "UInt8", "boolean", "Float64"):
                continue
            raise DataError(
                f"X: {describe_column(j, [str(c) for c in X.columns])} holds {dtype} values; "
                "expected 0/1 or integer codes",
                kind="bad-value",
            )
    if bool(X.isna().to_numpy().any()):
        return X.to_numpy(dtype=np.float64, na_value=np.nan)
    return X.to_numpy()


def _as_array(X, source: str | None) -> np.ndarray:
    try:
        arr = np.asarray(X)
    except Exception as exc:  # pragma: no cover - numpy's own message is kept
        raise DataError(f"X{_where(source)} cannot be read as an array: {exc}", "shape") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise DataError(
            f"X{_where(source)} must hold numbers (0/1 or integer codes), got dtype {arr.dtype}",
            kind="bad-value",
        )
    return arr


def _check_shape(shape, n_features: int | None, min_rows: int, source: str | None) -> None:
    if len(shape) != 2:
        raise DataError(
            f"X{_where(source)} must be 2-D (rows, variables), got shape {shape}", kind="shape"
        )
    n, d = shape
    if n == 0 or d == 0:
        raise DataError(f"X{_where(source)} is empty: shape {shape}", kind="shape")
    if n_features is not None and d != n_features:
        raise DataError(
            f"X{_where(source)} has {d} columns but the model expects {n_features} variables",
            kind="shape",
        )
    if n < min_rows:
        raise DataError(
            f"X{_where(source)} has {n} rows; at least {min_rows} are needed", kind="shape"
        )


def _compact_codes(
    arr: np.ndarray,
    likelihood: str,
    missing: str,
    names,
    source: str | None,
    missing_code: bool,
) -> tuple[np.ndarray, bool]:
    """Validate ``arr`` block by block and return compact codes (``-1`` missing) and whether any
    cell is missing. ``missing_code``: ``-1`` already marks a missing cell (tables from
    :mod:`fedvi.io`)."""
    N, D = arr.shape
    where = _where(source)
    is_float = np.issubdtype(arr.dtype, np.floating)
    if np.issubdtype(arr.dtype, np.bool_):
        return arr.view(np.int8), False
    # Fast path: an int8 (or, for codes above 127, int16) table already holding valid codes,
    # as :mod:`fedvi.io` writes them, is used as it is (no copy).
    lo_allowed = -1 if missing_code else 0
    int16_codes = arr.dtype == np.int16 and likelihood == "categorical"
    if arr.dtype == np.int8 or int16_codes:
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= lo_allowed and (likelihood == "categorical" or hi <= 1) and hi <= MAX_CODE:
            has_missing = lo < 0
            if has_missing and missing == "error":
                _raise_missing(arr < 0, names, where)
            return (arr.astype(np.int8, copy=False) if hi <= 127 else arr), has_missing
    out = None
    has_missing = False
    for start in range(0, N, CHECK_BLOCK):
        block = arr[start : start + CHECK_BLOCK]
        if is_float:
            nan = np.isnan(block)
            if nan.any():
                if missing == "error":
                    _raise_missing(nan, names, where, offset=start)
                has_missing = True
            bad = ~nan & (~np.isfinite(block) | (block != np.round(block)))
            if bad.any():
                i, j = _first_bad(bad)
                raise DataError(
                    f"X{where}: {describe_cell(start + i, j, names)}: value {show(block[i, j])} is "
                    "not an integer code",
                    kind="bad-value",
                    row=start + i,
                )
        else:
            nan = None
            if missing_code:
                miss = block == -1
                if miss.any():
                    if missing == "error":
                        _raise_missing(miss, names, where, offset=start)
                    has_missing = True
                    nan = miss
        present = block if nan is None else np.where(nan, 0, block)
        if likelihood == "bernoulli":
            bad = (present != 0) & (present != 1)
            if bad.any():
                i, j = _first_bad(bad)
                raise DataError(
                    f"X{where} must be binary (0/1) for likelihood='bernoulli': "
                    f"{describe_cell(start + i, j, names)}: value {show(block[i, j])}",
                    kind="bad-value",
                    row=start + i,
                )
        else:
            bad = (present < 0) | (present > MAX_CODE)
            if bad.any():
                i, j = _first_bad(bad)
                what = "negative category code" if present[i, j] < 0 else "category code too large"
                raise DataError(
                    f"X{where}: {describe_cell(start + i, j, names)}: {what} {show(block[i, j])}; "
                    f"codes must be 0..L_d-1 (at most {MAX_CODE})",
                    kind="bad-value",
                    row=start + i,
                )
        codes = present.astype(np.int16 if likelihood == "categorical" else np.int8)
        if nan is not None:
            codes[nan] = -1
        if out is None:
            out = np.empty((N, D), dtype=codes.dtype)
        out[start : start + len(block)] = codes
    if out is not None and out.dtype == np.int16 and (N == 0 or int(out.max()) <= 127):
        out = out.astype(np.int8)
    return out, has_missing


def _raise_missing(mask, names, where, offset: int = 0):
    i, j = _first_bad(mask)
    raise DataError(
        f"X{where}: {describe_cell(offset + i, j, names)}: missing value; pass missing='ignore' "
        "to leave missing cells out of the likelihood, or impute them first",
        kind="missing-value",
        row=offset + i,
    )


def infer_levels(codes: np.ndarray, names=None, source: str | None = None) -> np.ndarray:
    """``(D,)`` levels per column: the largest code + 1, and at least 2; refuses a code that
    would give more than :data:`MAX_INFERRED_LEVELS` levels."""
    top = np.zeros(codes.shape[1], dtype=np.int64)
    for start in range(0, codes.shape[0], CHECK_BLOCK):
        np.maximum(top, codes[start : start + CHECK_BLOCK].max(axis=0), out=top)
    too_many = top + 1 > MAX_INFERRED_LEVELS
    if too_many.any():
        j = int(np.flatnonzero(too_many)[0])
        i = int(np.flatnonzero(codes[:, j] == top[j])[0])
        raise DataError(
            f"X{_where(source)}: {describe_cell(i, j, names)}: code {int(top[j])} would make "
            f"{int(top[j]) + 1} levels (levels are inferred as the largest code + 1, at most "
            f"{MAX_INFERRED_LEVELS}); pass n_levels= or recode the column",
            kind="bad-value",
            row=i,
        )
    return np.maximum(top + 1, 2)


def check_levels(n_levels, n_features: int) -> np.ndarray:
    levels = np.asarray(n_levels)
    if levels.ndim == 0:
        levels = np.full(n_features, int(levels))
    if levels.shape != (n_features,):
        raise DataError(
            f"n_levels must be one integer or one entry per variable ({n_features}), "
            f"got {len(levels)} entries",
            kind="shape",
        )
    return levels.astype(np.int64)


def _encode_sparse(X, n_features, min_rows, source, names) -> EncodedData:
    Xc = sp.csr_matrix(X, dtype=np.float64)
    _check_shape(Xc.shape, n_features, min_rows, source)
    data = Xc.data
    bad = ~np.isfinite(data) | ((data != 0) & (data != 1))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(Xc.indptr, k, side="right") - 1)
        raise DataError(
            f"X{_where(source)} must be binary (0/1) for likelihood='bernoulli': "
            f"{describe_cell(row, int(Xc.indices[k]), names)}: value {show(data[k])}",
            kind="bad-value",
            row=row,
        )
    Xc.eliminate_zeros()
    Xc.sort_indices()
    return EncodedData(Xc, "bernoulli", np.full(Xc.shape[1], 2, dtype=np.int64), names, False)


def encode(X, spec: MixtureSpec, min_rows: int = 1, source: str | None = None) -> EncodedData:
    """Validate ``X`` against the model ``spec`` and encode it compactly.

    ``X``: an array ``(N, D)`` (0/1 or integer codes; NaN marks a missing cell), a pandas
    DataFrame (columns aligned by name to ``spec.feature_names`` when both have names), a
    ``scipy.sparse`` matrix (Bernoulli), a table read by :mod:`fedvi.io` (``-1`` marks a missing
    cell), or an :class:`EncodedData` (checked against ``spec``).
    """
    if spec.likelihood not in LIKELIHOODS:  # pragma: no cover - MixtureSpec checks it
        raise ValueError(spec.likelihood)
    D_expected = len(spec.n_levels) if spec.resolved else None
    if isinstance(X, EncodedData):
        if X.likelihood != spec.likelihood:
            raise DataError(
                f"data encoded for {X.likelihood!r}, model is {spec.likelihood!r}", kind="shape"
            )
        _check_shape(X.values.shape, D_expected, min_rows, source)
        if X.has_missing and spec.missing == "error":
            raise DataError(
                f"X{_where(source)} has missing cells; pass missing='ignore'",
                kind="missing-value",
            )
        if spec.resolved and tuple(X.n_levels) != tuple(spec.n_levels):
            # Levels agreed across sites: this table's codes must fit them.
            levels = np.asarray(spec.n_levels, dtype=np.int64)
            if (X.n_levels > levels).any() and not X.sparse:
                top = infer_levels(X.values, X.feature_names, source) if X.n_rows else levels
                if (top > np.maximum(levels, 2)).any():
                    j = int(np.flatnonzero(top > levels)[0])
                    raise DataError(
                        f"X{_where(source)}: {describe_column(j, X.feature_names)} has codes "
                        f"up to {int(top[j]) - 1}, out of range for {levels[j]} levels",
                        kind="bad-value",
                    )
            return dataclasses.replace(X, n_levels=levels)
        return X
    missing_code = False
    names = None
    if hasattr(X, "X") and hasattr(X, "feature_names") and hasattr(X, "path"):  # io.SiteTable
        names, source, X = X.feature_names, source or X.path, X.X
        missing_code = True
    elif hasattr(X, "columns") and hasattr(X, "dtypes"):  # a pandas DataFrame
        names = _names_of(X)
        _check_shape(X.shape, None, 1, source)
        X = _frame_values(X)
    if sp.issparse(X):
        if spec.likelihood != "bernoulli":
            raise DataError(
                f"X{_where(source)}: sparse input is supported for likelihood='bernoulli' only; "
                "pass categorical codes as a dense array",
                kind="shape",
            )
        if spec.feature_names is not None and D_expected is None:
            D_expected = len(spec.feature_names)
        return _encode_sparse(X, D_expected, min_rows, source, spec.feature_names)
    arr = _as_array(X, source)
    if arr.ndim == 2 and names is not None and spec.feature_names is not None:
        arr, names = align_columns(arr, names, spec.feature_names, source)
    elif names is None and spec.feature_names is not None:
        names = spec.feature_names
        D_expected = D_expected or len(names)
    _check_shape(arr.shape, D_expected, min_rows, source)
    codes, has_missing = _compact_codes(
        arr, spec.likelihood, spec.missing, names, source, missing_code
    )
    D = codes.shape[1]
    if spec.likelihood == "bernoulli":
        levels = np.full(D, 2, dtype=np.int64)
    elif spec.resolved or spec.n_levels is not None:
        levels = check_levels(spec.n_levels, D)
        over = codes.max(axis=0) >= levels
        if over.any():
            j = int(np.flatnonzero(over)[0])
            i = int(np.flatnonzero(codes[:, j] >= levels[j])[0])
            raise DataError(
                f"X{_where(source)}: {describe_cell(i, j, names)}: category code "
                f"{int(codes[i, j])} is out of range for a variable with {levels[j]} levels "
                f"(codes 0..{levels[j] - 1})",
                kind="bad-value",
                row=i,
            )
    else:
        levels = infer_levels(codes, names, source)
    return EncodedData(codes, spec.likelihood, levels, names, has_missing)


def site_list(datasets, what: str = "datasets") -> list:
    """``datasets`` as a list of site tables; a single table is refused with a clear message
    (a 2-D array would otherwise be read as a list of rows)."""
    if hasattr(datasets, "shape") or hasattr(datasets, "columns") or isinstance(datasets, str):
        raise TypeError(
            f"{what} must be a list with one table per site, got a single "
            f"{type(datasets).__name__}; pass [X] for one site"
        )
    try:
        out = list(datasets)
    except TypeError:
        raise TypeError(
            f"{what} must be a list with one table per site, got {type(datasets).__name__}"
        ) from None
    if not out:
        raise ValueError(f"{what} is empty: at least one site's table is needed")
    return out
