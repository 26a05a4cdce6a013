"""Readers for a site's own table on disk (no Flower, no Hydra).

Formats: CSV with a header (0/1 or integer category codes), ``.npy`` (one 2-D array),
``.npz`` (dense: an array named ``X`` or the only array; sparse: a file written by
``scipy.sparse.save_npz``, binary CSR). An optional ``label_column`` (a CSV column name, or for
``.npz`` an array name such as ``"labels"``) is split off and used only for scoring, never
for fitting. Every error names the file and, where it applies, the column and the value.
"""

from __future__ import annotations

import csv
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

FORMATS = (".csv", ".npy", ".npz")


class DataFileError(ValueError):
    """A site's data file cannot be read as a table of 0/1 or integer codes."""


@dataclass(frozen=True)
class SiteTable:
    """A site's table as read from disk.

    X: ``(N, D)`` int64 ndarray, or CSR for a sparse ``.npz``. labels: ``(N,)`` known labels
    (``label_column``) or ``None``. feature_names: ``D`` names (CSV header) or ``None``.
    """

    X: np.ndarray | sp.csr_matrix
    labels: np.ndarray | None
    feature_names: tuple[str, ...] | None
    path: str

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])


def _integer(value: str, path: str, row: int, column: str) -> int:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        raise DataFileError(
            f"{path}: row {row}, column {column!r}: value {value!r} is not a number "
            "(expected 0/1 or an integer category code; missing values are not supported)"
        ) from None
    if not np.isfinite(number) or number != round(number):
        raise DataFileError(
            f"{path}: row {row}, column {column!r}: value {value!r} is not an integer code"
        )
    if number < 0:
        raise DataFileError(
            f"{path}: row {row}, column {column!r}: negative code {value!r} (codes are 0..L-1)"
        )
    return int(number)


def read_csv(path: str, label_column: str | None = None) -> SiteTable:
    """Read a CSV with a header row; every other cell is 0/1 or a non-negative integer code."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataFileError(f"{path}: the file is empty (a header row is expected)") from None
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise DataFileError(f"{path}: duplicate column names in the header: {dup}")
        if all(_looks_numeric(h) for h in header):
            raise DataFileError(
                f"{path}: the first row {header[:5]}... looks like data; a header row with "
                "the variable names is required"
            )
        rows: list[list[int]] = []
        labels: list[str] = []
        li = None
        if label_column is not None:
            if label_column not in header:
                raise DataFileError(
                    f"{path}: label_column {label_column!r} is not a column (columns: {header})"
                )
            li = header.index(label_column)
        for r, line in enumerate(reader, start=1):
            if not line or all(not c.strip() for c in line):
                continue
            if len(line) != len(header):
                raise DataFileError(
                    f"{path}: row {r} has {len(line)} fields, the header has {len(header)}"
                )
            values = []
            for j, cell in enumerate(line):
                if j == li:
                    labels.append(cell.strip())
                    continue
                values.append(_integer(cell, path, r, header[j]))
            rows.append(values)
    names = tuple(h for j, h in enumerate(header) if j != li)
    if not rows:
        raise DataFileError(f"{path}: no data rows after the header")
    if not names:
        raise DataFileError(f"{path}: no variables left after removing the label column")
    X = np.asarray(rows, dtype=np.int64)
    y = None if li is None else _label_array(labels)
    return SiteTable(X, y, names, path)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_array(labels: list[str]) -> np.ndarray:
    try:
        return np.asarray([int(v) for v in labels], dtype=np.int64)
    except ValueError:
        return np.asarray(labels, dtype=str)


def _check_table(X: np.ndarray, path: str, names=None) -> np.ndarray:
    if X.ndim != 2:
        raise DataFileError(f"{path}: expected a 2-D table (rows, variables), got shape {X.shape}")
    if X.dtype == object or not (
        np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.bool_)
    ):
        raise DataFileError(f"{path}: expected numeric codes, got dtype {X.dtype}")
    if np.issubdtype(X.dtype, np.floating):
        bad = ~np.isfinite(X) | (X != np.round(X))
        if bad.any():
            i, j = (int(v[0]) for v in np.nonzero(bad))
            col = names[j] if names else j
            raise DataFileError(
                f"{path}: row {i}, column {col!r}: value {X[i, j]} is not an integer code"
            )
    neg = X < 0
    if neg.any():
        i, j = (int(v[0]) for v in np.nonzero(neg))
        col = names[j] if names else j
        raise DataFileError(f"{path}: row {i}, column {col!r}: negative code {X[i, j]}")
    return X.astype(np.int64)


def read_npy(path: str) -> SiteTable:
    """Read one 2-D array saved with ``numpy.save``."""
    try:
        X = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataFileError(f"{path}: not a readable .npy array: {exc}") from exc
    return SiteTable(_check_table(np.asarray(X), path), None, None, path)


def read_npz(path: str, label_column: str | None = None) -> SiteTable:
    """Read a dense ``.npz`` (array ``X`` or the only array; optional ``feature_names``) or a
    sparse CSR file from ``scipy.sparse.save_npz`` (binary only)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"{path}: not a readable .npz archive: {exc}") from exc
    with archive:
        keys = set(archive.files)
        if {"format", "shape", "data", "indices", "indptr"} <= keys:
            try:
                X = sp.load_npz(path).tocsr()
            except Exception as exc:
                raise DataFileError(f"{path}: not a readable sparse matrix: {exc}") from exc
            labels = None
            if label_column is not None:
                raise DataFileError(
                    f"{path}: a sparse .npz holds no label column {label_column!r}; save the "
                    "labels in a separate dense .npz"
                )
            if X.nnz and not np.isin(X.data, (0, 1)).all():
                k = int(np.flatnonzero(~np.isin(X.data, (0, 1)))[0])
                row = int(np.searchsorted(X.indptr, k, side="right") - 1)
                raise DataFileError(
                    f"{path}: sparse input must be binary: value {X.data[k]} at row {row}, "
                    f"column {X.indices[k]}"
                )
            return SiteTable(X.astype(np.float64), labels, None, path)
        names = None
        if "feature_names" in keys:
            names = tuple(str(v) for v in archive["feature_names"])
        data_keys = sorted(keys - {"feature_names", label_column or ""})
        if "X" in keys:
            key = "X"
        elif len(data_keys) == 1:
            key = data_keys[0]
        else:
            raise DataFileError(
                f"{path}: cannot tell which array is the table: arrays {sorted(keys)}; name it 'X'"
            )
        X = _check_table(np.asarray(archive[key]), path, names)
        labels = None
        if label_column is not None:
            if label_column not in keys:
                raise DataFileError(
                    f"{path}: no array named {label_column!r} for the labels "
                    f"(arrays: {sorted(keys)})"
                )
            labels = np.asarray(archive[label_column]).ravel()
            if len(labels) != X.shape[0]:
                raise DataFileError(
                    f"{path}: {len(labels)} labels in {label_column!r} for {X.shape[0]} rows"
                )
        if names is not None and len(names) != X.shape[1]:
            raise DataFileError(f"{path}: {len(names)} feature_names for {X.shape[1]} columns")
    return SiteTable(X, labels, names, path)


def read_table(path: str | os.PathLike, label_column: str | None = None) -> SiteTable:
    """Read a site's table, dispatching on the file extension (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataFileError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return read_csv(path, label_column)
    if ext == ".npy":
        if label_column is not None:
            raise DataFileError(
                f"{path}: a .npy file holds one array; label_column={label_column!r} needs a "
                ".csv or .npz file"
            )
        return read_npy(path)
    if ext == ".npz":
        return read_npz(path, label_column)
    raise DataFileError(f"{path}: unsupported file type {ext!r}; use one of {FORMATS}")


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> str:
    """Write ``(N,)`` global cluster ids as a CSV (``row,cluster``); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        fh.write("row,cluster\n")
        for i, k in enumerate(np.asarray(labels).tolist()):
            fh.write(f"{i},{k}\n")
    os.replace(tmp, path)
    return path


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Inverse of :func:`write_labels`: ``(N,)`` int64 cluster ids."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return data[:, 1] if data.size else np.zeros(0, dtype=np.int64)
