"""Readers and writers for a site's own table on disk (no Flower, no Hydra).

Formats (by extension):

``.csv``
    A header row with the variable names, then one row per record; every cell is 0/1 or a
    non-negative integer category code (``1.0`` is read as 1). Read with ``pyarrow.csv`` in
    blocks, so memory is bounded by the block size. A UTF-8 byte-order mark (Excel's "CSV
    UTF-8") is ignored. A missing cell is empty or one of :data:`NULL_TOKENS`.
``.parquet``
    Integer, float, boolean or text columns of codes; nulls (and NaN) are missing cells. Read
    in batches.
``.npy``
    One 2-D array, memory-mapped (``mmap_mode="r"``) and validated block by block; an
    ``int8``/``uint8``/``bool`` array of codes is used in place, without a copy. NaN or -1
    marks a missing cell.
``.npz``
    Dense: the array ``X`` (or the only array), optional ``feature_names`` and an optional
    label array (``label_column`` names it). Sparse: a binary CSR written by
    ``scipy.sparse.save_npz``.

An optional ``label_column`` (a column of the file, or an array of a ``.npz``) is split off
and used only for scoring, never as a variable.

Every table comes back as compact codes (:class:`SiteTable`): ``int8`` when every code is at
most 127, else ``int16``; ``-1`` marks a missing cell, which is allowed only with
``missing="ignore"``. :func:`open_table` with a ``cache_dir`` parses a file once and memory-maps
the encoded table on later calls.

Errors are :class:`DataFileError`; the message names the cell as
``<file>: row <r> (line <l>), column '<name>' (#<j>): value <v> is ...`` where ``r`` is the
1-based data row (the first row after the header is row 1), ``l`` the line of a CSV file (the
header is line 1) and ``j`` the 1-based position of the column in the file. ``kind`` is one of
:data:`KINDS`, so that a site can report the category of a failure without its details.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import json
import math
import os
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedvi.data import MAX_CODE, DataError, describe_column

#: File extensions :func:`read_table` reads and :func:`write_table` writes.
FORMATS = (".csv", ".parquet", ".npy", ".npz")
#: The values of :attr:`DataFileError.kind`.
KINDS = (
    "no-file",
    "unsupported-format",
    "unreadable",
    "bad-header",
    "bad-value",
    "missing-value",
    "label-column",
    "shape",
)
#: CSV cells read as missing (after stripping blanks).
NULL_TOKENS = ("", "NA", "N/A", "NaN", "nan", "NULL", "null")
#: Bumped when the cache layout or the parsing rules change (part of the cache key).
CACHE_VERSION = 1

# Bytes of CSV text per pyarrow block. pyarrow reads several blocks ahead (about 8), and a block
# parsed as float64 takes ~4x its text: ~100 MiB in all, whatever the size of the file.
_CSV_BLOCK_BYTES = 2 << 20
_BLOCK_CELLS = 1 << 22  # cells per block of an array or a Parquet batch
_NPY_HEADER = 128  # bytes reserved for the header of a streamed cache .npy
_LINE_SCAN_BYTES = 16 << 20  # bytes per chunk when counting the lines of a CSV
_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_NUMBER_RE = re.compile(_NUMBER)
_NONFINITE_RE = re.compile(r"[+-]?(inf|infinity|nan)", re.IGNORECASE)
_INTEGER_RE = r"^[+-]?[0-9]{1,18}$"
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_MISSING_HINT = (
    'is missing; pass missing="ignore" to code missing cells as -1, or impute them first'
)


class DataFileError(DataError):
    """A site's data file cannot be read as a table of 0/1 or integer codes.

    ``kind`` (one of :data:`KINDS`) is the category of the failure, safe to report to a server;
    the message has the details (file, row, line, column, value).
    """

    def __init__(self, message: str, kind: str = "unreadable", row: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown DataFileError kind {kind!r}; expected one of {KINDS}")
        super().__init__(message, kind, row)


@dataclass(frozen=True)
class SiteTable:
    """A site's table as read from disk.

    X: ``(N, D)`` codes, ``int8`` when every code fits (0..127), else ``int16``; ``-1`` marks a
        missing cell. May be a read-only ``np.memmap``. A sparse ``.npz`` gives an ``(N, D)``
        CSR matrix of 0/1 (``int8``).
    labels: ``(N,)`` known labels (``label_column``) or ``None``.
    feature_names: ``D`` names (header, Parquet schema, ``feature_names`` array) or ``None``.
    path: the file read.
    """

    X: np.ndarray | sp.csr_matrix
    labels: np.ndarray | None
    feature_names: tuple[str, ...] | None
    path: str

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])


# -- small helpers ---------------------------------------------------------------------------
def _need(module: str):
    """Import a pyarrow module on first use (``import fedvi.io`` stays cheap)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            "fedvi.io needs pyarrow to read and write .csv and .parquet files: pip install pyarrow"
        ) from exc


def _where(path: str, row: int, line: int | None = None) -> str:
    return f"{path}: row {row}" + (f" (line {line})" if line is not None else "")


def _number_problem(x) -> str:
    if isinstance(x, bool):
        x = int(x)
    if isinstance(x, float) and not math.isfinite(x):
        return "is not a finite number"
    if x != math.floor(x):
        return "is not an integer category code"
    if x < 0:
        return "is negative (category codes are 0, 1, 2, ...)"
    if x > MAX_CODE:
        return f"is too large for a category code (at most {MAX_CODE})"
    return "is not a valid category code"


def _text_problem(text: str) -> str:
    t = text.strip()
    if _NUMBER_RE.match(t):
        x = float(t)
        if math.isinf(x):  # a finite literal beyond the float range
            return f"is too large for a category code (at most {MAX_CODE})"
        return _number_problem(x)
    if _NONFINITE_RE.fullmatch(t):
        return "is not a finite number"
    return "is not a number (expected 0/1 or a non-negative integer category code)"


def _value_error(where: str, value, is_missing: bool) -> DataFileError:
    """The error for one bad cell: ``where`` is ``<file>: row r (line l), column ...``."""
    if is_missing:
        return DataFileError(f"{where}: value {value!r} {_MISSING_HINT}", kind="missing-value")
    problem = _text_problem(value) if isinstance(value, str) else _number_problem(value)
    return DataFileError(f"{where}: value {value!r} {problem}", kind="bad-value")


def _encode(
    a: np.ndarray,
    null: np.ndarray | None = None,
    *,
    ignore: bool,
    nan_missing: bool,
    minus_one_missing: bool,
    need_codes: bool = True,
):
    """Validate a numeric column or block ``a`` (vectorised).

    ``null``: cells known to be missing (their value in ``a`` is ignored). ``nan_missing`` /
    ``minus_one_missing``: NaN / -1 also mark a missing cell. Returns ``(codes, bad, missing,
    hi)``: ``codes`` int8/int16 with -1 for missing cells (``None`` when a cell is bad or
    ``need_codes`` is false), ``bad`` the flat C-order index of the first bad cell or -1,
    ``missing`` whether that cell is a missing one, ``hi`` the largest code.
    """
    k = a.dtype.kind
    if k not in "biuf":
        raise TypeError(f"not a numeric dtype: {a.dtype}")
    every = k == "b" or (k == "u" and a.dtype.itemsize == 1)  # every value is a code
    small = k == "i" and a.dtype.itemsize == 1
    if not every and null is None:
        # Fast path: every cell is a code 0..127. ``c`` is wrapped or garbage where a value is
        # not a code (-1, NaN, 0.5, 1e300, 200): then ``c != a`` or ``c < 0``.
        with np.errstate(invalid="ignore", over="ignore"):
            c = a.astype(np.int8, copy=not small or need_codes)
        ok = c >= 0 if small else (c >= 0) & (c == a)
        if ok.all():
            return (c if need_codes else None), -1, False, int(c.max(initial=0))
    with np.errstate(invalid="ignore", over="ignore"):
        c = a.astype(np.int16)
    ok = None if every else (c >= 0) if small else (c >= 0) & (c == a)
    miss = None
    if k == "f" and nan_missing:
        miss = np.isnan(a)
    if minus_one_missing and k in "if":
        miss = a == -1 if miss is None else miss | (a == -1)
    if null is not None:
        ok = ~null if ok is None else ok & ~null
        miss = null if miss is None else miss | null
    if ok is not None and not ok.all():
        bad = ~ok
        if ignore and miss is not None:
            bad &= ~miss
        if bad.any():
            first = int(np.argmax(bad))
            return None, first, bool(miss is not None and miss.flat[first]), 0
        np.putmask(c, ~ok, -1)
    hi = int(c.max(initial=0))
    if not need_codes:
        return None, -1, False, hi
    return (c.astype(np.int8) if hi <= 127 else c), -1, False, hi


def _strings_to_numbers(col):
    """A pyarrow string array as ``(values float64, missing mask)``: a missing cell (null, or
    one of :data:`NULL_TOKENS`) reads 0, text that is not a number NaN."""
    pa, pc = _need("pyarrow"), _need("pyarrow.compute")
    t = pc.utf8_trim_whitespace(col)
    miss = pc.is_in(t, value_set=pa.array(NULL_TOKENS, type=col.type))
    if col.null_count:
        miss = pc.or_kleene(miss, pc.is_null(col))
    miss = pc.fill_null(miss, True)
    if pc.any(miss).as_py():
        t = pc.if_else(miss, "0", t)
    try:  # every cell a number (the usual case): one cast
        v = pc.cast(t, pa.float64())
    except pa.ArrowInvalid:
        num = pc.fill_null(pc.match_substring_regex(t, _NUMBER), False)
        v = pc.cast(pc.if_else(num, t, "nan"), pa.float64())
    return v.to_numpy(zero_copy_only=False), miss.to_numpy(zero_copy_only=False)


def _arrow_column(col, *, ignore: bool, nan_missing: bool, describe: str):
    """Validate one pyarrow column (numbers, or text read as numbers). Returns ``(codes,
    bad, is_missing, value)``: ``bad`` is the index of the first bad cell (-1 if none) and
    ``value`` its value in the file. ``describe``: ``<file>: column ...`` for a type error."""
    pa, pc = _need("pyarrow"), _need("pyarrow.compute")
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        v, null = _strings_to_numbers(col)
        nan_missing = False
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        null, filled = None, col
        if col.null_count:
            null = col.is_null().to_numpy(zero_copy_only=False)
            filled = pc.fill_null(col, False if pa.types.is_boolean(t) else pa.scalar(0, type=t))
        v = filled.to_numpy(zero_copy_only=False)
    elif pa.types.is_null(t):
        v, null = np.zeros(len(col), np.int8), np.ones(len(col), bool)
    else:
        raise DataFileError(
            f"{describe}: type {t} is not a column of integer category codes", kind="bad-value"
        )
    codes, bad, is_missing, _ = _encode(
        v, null, ignore=ignore, nan_missing=nan_missing, minus_one_missing=False
    )
    value = col[bad].as_py() if bad >= 0 else None
    return codes, bad, is_missing, value


def _stack(columns: list[np.ndarray], n: int) -> np.ndarray:
    dtype = np.int16 if any(c.dtype == np.int16 for c in columns) else np.int8
    block = np.empty((n, len(columns)), dtype=dtype)
    for j, c in enumerate(columns):
        block[:, j] = c
    return block


def _label_values(arr) -> np.ndarray:
    """Labels as int64 when every one is an integer, else as text (or floats)."""
    pa, pc = _need("pyarrow"), _need("pyarrow.compute")
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_integer(t) and not arr.null_count:
        return arr.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr)
        if (
            not s.null_count
            and pc.all(pc.match_substring_regex(s, _INTEGER_RE)).as_py() is not False
        ):
            return pc.cast(s, pa.int64()).to_numpy(zero_copy_only=False)
        return np.asarray(pc.fill_null(s, "").to_numpy(zero_copy_only=False), dtype=str)
    if pa.types.is_floating(t) and not arr.null_count:
        v = arr.to_numpy(zero_copy_only=False)
        if np.isfinite(v).all() and (v == np.round(v)).all() and np.abs(v).max(initial=0) < 2**53:
            return v.astype(np.int64)
        return v
    return np.asarray(arr.to_numpy(zero_copy_only=False))


# -- sinks: where the encoded blocks go ------------------------------------------------------
class _SinkOSError(Exception):
    """An OSError while writing the cache (not a problem of the data file)."""

    def __init__(self, original: OSError):
        super().__init__(str(original))
        self.original = original


class _MemorySink:
    """Keeps the encoded blocks in memory; ``finish`` concatenates them."""

    def __init__(self):
        self.blocks: list[np.ndarray] = []
        self.ncols = 0

    def start(self, ncols: int) -> None:
        self.ncols = ncols

    def add(self, block: np.ndarray) -> None:
        self.blocks.append(block)

    def finish(self) -> np.ndarray:
        dtype = np.int16 if any(b.dtype == np.int16 for b in self.blocks) else np.int8
        if not self.blocks:
            return np.empty((0, self.ncols), dtype=dtype)
        if len(self.blocks) == 1:
            out = self.blocks.pop().astype(dtype, copy=False)
            return out
        # Copy block by block into untouched pages, freeing each block once copied: the peak is
        # about one table, not two.
        out = np.empty((sum(len(b) for b in self.blocks), self.ncols), dtype=dtype)
        start = 0
        for i, b in enumerate(self.blocks):
            out[start : start + len(b)] = b
            start += len(b)
            self.blocks[i] = None
        self.blocks = []
        return out

    def abort(self) -> None:
        self.blocks = []


def _npy_header(dtype, shape: tuple[int, int]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``_NPY_HEADER`` bytes."""
    descr = np.dtype(dtype).str
    d = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    body = d.encode("latin1")
    room = _NPY_HEADER - 10
    if len(body) + 1 > room:  # pragma: no cover - needs > 10**40 rows
        raise ValueError(f"shape {shape} too large for the cache header")
    body = body + b" " * (room - len(body) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + body


class _NpySink:
    """Streams the encoded blocks into a temporary ``.npy`` in ``directory`` (int8, rewritten
    as int16 the first time a code above 127 arrives); ``finish`` returns its path."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fh = None
        self.tmp = None
        self.ncols = 0
        self.rows = 0
        self.dtype = np.int8

    def _open(self):
        fd, self.tmp = tempfile.mkstemp(dir=self.directory, prefix=".fedvi-", suffix=".npy.tmp")
        self.fh = os.fdopen(fd, "w+b")
        self.fh.write(b"\0" * _NPY_HEADER)

    def start(self, ncols: int) -> None:
        self.ncols = ncols
        try:
            if self.fh is None:
                self._open()
        except OSError as exc:
            raise _SinkOSError(exc) from exc

    def add(self, block: np.ndarray) -> None:
        try:
            if block.dtype == np.int16 and self.dtype == np.int8:
                self._upgrade()
            self.fh.write(memoryview(np.ascontiguousarray(block, dtype=self.dtype)).cast("B"))
        except OSError as exc:
            raise _SinkOSError(exc) from exc
        self.rows += block.shape[0]

    def _upgrade(self) -> None:
        """Rewrite the rows so far as int16, block by block."""
        old, old_tmp = self.fh, self.tmp
        try:
            self._open()
            old.flush()
            old.seek(_NPY_HEADER)
            remaining = self.rows * self.ncols
            while remaining:
                chunk = np.frombuffer(old.read(min(remaining, _BLOCK_CELLS)), dtype=np.int8)
                if not len(chunk):
                    raise OSError(f"{old_tmp}: shorter than the rows written")
                self.fh.write(memoryview(chunk.astype(np.int16)).cast("B"))
                remaining -= len(chunk)
        finally:
            old.close()
            os.unlink(old_tmp)
        self.dtype = np.int16

    def finish(self) -> str:
        try:
            self.fh.seek(0)
            self.fh.write(_npy_header(self.dtype, (self.rows, self.ncols)))
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        except OSError as exc:
            raise _SinkOSError(exc) from exc
        return self.tmp

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)


# -- CSV -------------------------------------------------------------------------------------
class _Restart(Exception):
    """The fast CSV pass met something it does not handle: re-read in the exact mode."""


def _csv_header(path: str) -> list[str]:
    """The first record of a CSV, read with Python's csv module (a BOM is dropped)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataFileError(
            f"{path}: the file is UTF-16 text; save it as CSV UTF-8", kind="unreadable"
        )
    if b"\0" in head:
        raise DataFileError(
            f"{path}: binary data, not a text CSV file (is it another format renamed .csv?)",
            kind="unreadable",
        )
    try:
        # surrogateescape: a byte that is not UTF-8 further down is not the header's problem
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            for record in csv.reader(fh):
                if record:
                    break
            else:
                record = None
    except csv.Error as exc:
        raise DataFileError(
            f"{path}: not a readable CSV header: {exc}", kind="unreadable"
        ) from None
    if record is not None:
        if _SURROGATE_RE.search("".join(record)):
            raise DataFileError(
                f"{path}: the header is not UTF-8 text; save the file as CSV UTF-8",
                kind="unreadable",
            )
        return record
    raise DataFileError(f"{path}: the file is empty (a header row is expected)", kind="bad-header")


def _looks_numeric(text: str) -> bool:
    t = text.strip()
    return bool(_NUMBER_RE.match(t) or _NONFINITE_RE.fullmatch(t))


def _check_header(path, header: list[str], label_column, what: str, text: bool = True):
    """``(names, feature indices, label index or None)`` after the header checks; ``text``: a
    CSV header (also refuses a single ``;``-separated name and a row of numbers)."""
    names = [h.strip() for h in header]
    if text and len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
        raise DataFileError(
            f"{path}: the {what} has a single column {names[0][:60]!r}; fields must be "
            "separated by commas",
            kind="bad-header",
        )
    empty = [j + 1 for j, h in enumerate(names) if not h]
    if empty:
        raise DataFileError(
            f"{path}: the {what} has no name for column(s) #{empty[:10]} (a trailing comma?)",
            kind="bad-header",
        )
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = sorted({h for h in names if h in seen or seen.add(h)})
        raise DataFileError(
            f"{path}: duplicate column names in the {what}: {dup[:10]}", kind="bad-header"
        )
    if text and all(_looks_numeric(h) for h in names):
        raise DataFileError(
            f"{path}: the first row {names[:5]}... looks like data; a header row with the "
            "variable names is required",
            kind="bad-header",
        )
    li = None
    if label_column is not None:
        if label_column not in names:
            raise DataFileError(
                f"{path}: label_column {label_column!r} is not a column "
                f"(columns: {names[:20]}{' ...' if len(names) > 20 else ''})",
                kind="label-column",
            )
        li = names.index(label_column)
    feats = [j for j in range(len(names)) if j != li]
    if not feats:
        raise DataFileError(
            f"{path}: no variables left after removing the label column", kind="shape"
        )
    return names, feats, li


def _csv_line_of_row(path: str, row: int) -> int | None:
    """The file line where data row ``row`` (1-based) starts: the ``row + 1``-th non-blank line
    (blank lines are skipped by the reader). Vectorised over 16 MiB chunks; a file with quoted
    fields or lone CR line ends is scanned with the csv module instead."""
    target = row + 1
    lineno = nonblank = 0
    pending = 0  # bytes of the current, unterminated line so far
    prev_cr = False  # whether the previous chunk ended with b"\r"
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_LINE_SCAN_BYTES)
            if chunk.endswith(b"\r"):
                chunk += fh.read(1)
            if not chunk:
                break
            if b'"' in chunk or chunk.count(b"\r") != chunk.count(b"\r\n"):
                return _csv_line_of_row_slow(path, row)
            a = np.frombuffer(chunk, dtype=np.uint8)
            nl = np.flatnonzero(a == 10)
            if len(nl):
                starts = np.concatenate(([0], nl[:-1] + 1))
                length = nl - starts
                cr = np.zeros(len(nl), dtype=bool)
                has = nl > 0
                cr[has] = a[nl[has] - 1] == 13
                if length[0] == 0 and pending:
                    cr[0] = prev_cr
                length[0] += pending
                content = length - cr
                cum = np.cumsum(content > 0) + nonblank
                if cum[-1] >= target:
                    return lineno + int(np.searchsorted(cum, target)) + 1
                nonblank, lineno = int(cum[-1]), lineno + len(nl)
                pending = len(a) - int(nl[-1]) - 1
            else:
                pending += len(a)
            prev_cr = bool(a[-1] == 13)
    if pending - prev_cr > 0 and nonblank + 1 >= target:
        return lineno + 1
    return None


def locate_error(exc: DataError, path: str | os.PathLike) -> DataFileError:
    """``exc``, raised while checking the table read from ``path``, with the file and, for a
    data row of a CSV file, the file line in front: ``<file>, line <l>: <message>`` (the
    message keeps the 1-based data row, the column and the value). An error that already names
    its file (a :class:`DataFileError`) is returned as it is."""
    if isinstance(exc, DataFileError):
        return exc
    path = os.fspath(path)
    where = path
    if exc.row is not None and os.path.splitext(path)[1].lower() == ".csv":
        with contextlib.suppress(OSError):
            line = _csv_line_of_row(path, exc.row + 1)
            if line is not None:
                where += f", line {line}"
    kind = exc.kind if exc.kind in KINDS else "bad-value"
    return DataFileError(f"{where}: {exc}", kind=kind, row=exc.row)


def _csv_line_of_row_slow(path: str, row: int) -> int | None:
    target, count, prev = row + 1, 0, 0
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.reader(fh)
            for record in reader:
                if record:
                    count += 1
                    if count == target:
                        return prev + 1
                prev = reader.line_num
    except csv.Error:
        return None
    return None


def _read_csv(path, label_column, ignore, sink):
    header = _csv_header(path)
    names, feats, li = _check_header(path, header, label_column, "header")
    sink.start(len(feats))
    done = _CsvProgress()
    try:
        _csv_pass(path, names, feats, li, True, ignore, sink, done)
    except _Restart:  # keep the rows read so far, read the rest in the exact mode
        _csv_pass(path, names, feats, li, False, ignore, sink, done)
    if not done.rows:
        raise DataFileError(f"{path}: no data rows after the header", kind="shape")
    y = None if li is None else _label_values(_need("pyarrow").concat_arrays(done.labels))
    return tuple(names[j] for j in feats), y


class _CsvProgress:
    """The rows of a CSV already validated and sent to the sink, and their labels."""

    def __init__(self):
        self.rows = 0
        self.labels: list = []


def _csv_pass(path, names, feats, li, fast, ignore, sink, done: _CsvProgress):
    """One pass over the CSV. ``fast``: multi-threaded, cells parsed as float64; anything odd
    raises :class:`_Restart`. Otherwise single-threaded, cells read as text, every problem
    located exactly (the first bad cell in row order); the first ``done.rows`` rows (checked by
    the fast pass) are skipped."""
    pa, pcsv = _need("pyarrow"), _need("pyarrow.csv")
    ncols = len(names)
    cols = [f"c{j}" for j in range(ncols)]
    types = {c: pa.float64() if fast else pa.string() for c in cols}
    if li is not None:
        types[cols[li]] = pa.string()
    invalid: list[tuple[int | None, int]] = []

    def on_invalid(row):
        if not invalid:
            invalid.append((row.number, row.actual_columns))
        return "skip"

    read = pcsv.ReadOptions(
        column_names=cols, skip_rows_after_names=1, block_size=_CSV_BLOCK_BYTES, use_threads=fast
    )
    # newlines_in_values: a quoted line break is split correctly across blocks (slower); the
    # fast pass meets such a split as a parse error and hands over to the exact pass.
    parse = pcsv.ParseOptions(
        invalid_row_handler=None if fast else on_invalid, newlines_in_values=not fast
    )
    convert = pcsv.ConvertOptions(
        column_types=types,
        null_values=list(NULL_TOKENS) if fast else [],
        strings_can_be_null=False,
        quoted_strings_can_be_null=fast,
    )

    def shape_error():
        number, actual = invalid[0]
        r = number - 1
        return DataFileError(
            f"{_where(path, r, _csv_line_of_row(path, r))}: {actual} field(s), the header has "
            f"{ncols}",
            kind="shape",
        )

    def arrow_failed(exc):
        if fast:
            return _Restart()
        if invalid:
            return shape_error()
        text = str(exc)
        if "UTF8" in text or "UTF-8" in text:
            return DataFileError(
                f"{path}: the file is not valid UTF-8 text ({text}); save it as CSV UTF-8",
                kind="unreadable",
            )
        return DataFileError(f"{path}: not a readable CSV file: {text}", kind="unreadable")

    try:
        reader = pcsv.open_csv(
            path, read_options=read, parse_options=parse, convert_options=convert
        )
    except pa.ArrowException as exc:
        raise arrow_failed(exc) from None
    offset = 0  # rows of this pass before the batch
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as exc:
            raise arrow_failed(exc) from None
        n = batch.num_rows
        if offset + n <= done.rows:  # validated by the fast pass
            offset += n
            continue
        if offset < done.rows:
            batch = batch.slice(done.rows - offset)
            offset, n = done.rows, batch.num_rows
        columns, first = [], None
        for j in feats:
            col = batch.column(j)
            if fast:
                null = None
                if col.null_count:  # nulls come out as NaN, an error unless missing
                    null = col.is_null().to_numpy(zero_copy_only=False)
                v = col.to_numpy(zero_copy_only=False)
                codes, bad, _, _ = _encode(
                    v, null, ignore=ignore, nan_missing=False, minus_one_missing=False
                )
                if bad >= 0:
                    raise _Restart()
                columns.append(codes)
                continue
            v, null = _strings_to_numbers(col)
            codes, bad, is_missing, _ = _encode(
                v, null, ignore=ignore, nan_missing=False, minus_one_missing=False
            )
            if bad >= 0 and (first is None or bad < first[0]):
                first = (bad, j, is_missing, col[bad].as_py())
            if first is None:
                columns.append(codes)
        if first is not None:
            bad, j, is_missing, value = first
            r = offset + bad + 1
            if invalid and invalid[0][0] - 1 <= r:
                raise shape_error()
            where = f"{_where(path, r, _csv_line_of_row(path, r))}, {describe_column(j, names)}"
            raise _value_error(where, value, is_missing)
        sink.add(_stack(columns, n))
        if li is not None:
            done.labels.append(batch.column(li))
        offset += n
        done.rows = offset
    if invalid:
        raise shape_error()


# -- Parquet ---------------------------------------------------------------------------------
def _read_parquet(path, label_column, ignore, sink):
    pa, pq = _need("pyarrow"), _need("pyarrow.parquet")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(
            f"{path}: not a readable Parquet file: {exc}", kind="unreadable"
        ) from None
    schema = pf.schema_arrow
    names, feats, li = _check_header(path, list(schema.names), label_column, "schema", False)
    if pf.metadata.num_rows == 0:
        raise DataFileError(f"{path}: no data rows", kind="shape")
    sink.start(len(feats))
    batch_rows = max(1, _BLOCK_CELLS // len(names))
    offset = 0
    labels = []
    for batch in pf.iter_batches(batch_size=batch_rows):
        n = batch.num_rows
        if not n:
            continue
        columns, first = [], None
        for j in feats:
            codes, bad, is_missing, value = _arrow_column(
                batch.column(j),
                ignore=ignore,
                nan_missing=True,
                describe=f"{path}: {describe_column(j, names)}",
            )
            if bad >= 0 and (first is None or bad < first[0]):
                first = (bad, j, is_missing, value)
            if first is None:
                columns.append(codes)
        if first is not None:
            bad, j, is_missing, value = first
            where = f"{_where(path, offset + bad + 1)}, {describe_column(j, names)}"
            raise _value_error(where, value, is_missing)
        sink.add(_stack(columns, n))
        if li is not None:
            labels.append(batch.column(li))
        offset += n
    y = None if li is None else _label_values(pa.chunked_array(labels, schema.field(li).type))
    return tuple(names[j] for j in feats), y


# -- .npy / .npz -----------------------------------------------------------------------------
def _check_array_shape(path: str, shape, dtype, what: str = "array") -> None:
    if len(shape) != 2:
        raise DataFileError(
            f"{path}: expected a 2-D {what} (rows, variables), got shape {tuple(shape)}",
            kind="shape",
        )
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataFileError(
            f"{path}: the {what} holds {dtype} values, not numeric category codes",
            kind="bad-value",
        )
    if shape[0] == 0:
        raise DataFileError(f"{path}: no data rows", kind="shape")
    if shape[1] == 0:
        raise DataFileError(f"{path}: no variables (0 columns)", kind="shape")


def _encode_array(a, path, names, ignore, sink, in_place: bool):
    """Validate a 2-D array block by block. ``in_place``: an int8/uint8/bool array of valid
    codes is returned as an ``int8`` view, without a copy; else the codes go to ``sink`` and
    ``None`` is returned."""
    n, d = a.shape
    step = max(1, _BLOCK_CELLS // d)

    def scan(emit: bool):
        hi = 0
        for start in range(0, n, step):
            block = a[start : start + step]
            codes, bad, is_missing, h = _encode(
                block, ignore=ignore, nan_missing=True, minus_one_missing=True, need_codes=emit
            )
            if bad >= 0:
                i, j = divmod(bad, d)
                where = f"{_where(path, start + i + 1)}, {describe_column(j, names)}"
                raise _value_error(where, block[i, j].item(), is_missing)
            hi = max(hi, h)
            if emit:
                sink.add(codes)
        return hi

    if in_place and a.dtype.kind in "biu" and a.dtype.itemsize == 1:
        if scan(emit=False) <= 127:
            return a.view(np.int8)
    sink.start(d)
    scan(emit=True)
    return None


def _npy_header_of(path: str):
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(fh)
            if version == (2, 0):
                return np.lib.format.read_array_header_2_0(fh)
        except ValueError as exc:
            raise DataFileError(
                f"{path}: not a .npy array file: {exc}", kind="unreadable"
            ) from None
    return None  # another version: let np.load judge


def _read_npy(path, label_column, ignore, sink, in_place):
    if label_column is not None:
        raise DataFileError(
            f"{path}: a .npy file holds one unnamed array; label_column={label_column!r} needs "
            "a .csv, .parquet or .npz file",
            kind="label-column",
        )
    header = _npy_header_of(path)
    if header is not None:
        _check_array_shape(path, header[0], header[2])
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFileError(
            f"{path}: not a readable .npy array: {exc}", kind="unreadable"
        ) from None
    _check_array_shape(path, a.shape, a.dtype)
    return _encode_array(a, path, None, ignore, sink, in_place)


_SPARSE_KEYS = {"format", "shape", "data", "indices", "indptr"}


def _npz_keys(path: str) -> set[str]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return set(archive.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataFileError(
            f"{path}: not a readable .npz archive: {exc}", kind="unreadable"
        ) from None


def _read_sparse(path, label_column):
    if label_column is not None:
        raise DataFileError(
            f"{path}: a sparse .npz holds no label column {label_column!r}; save the labels "
            "in a separate file",
            kind="label-column",
        )
    try:
        X = sp.csr_matrix(sp.load_npz(path))
    except Exception as exc:  # scipy raises several types for a damaged file
        raise DataFileError(
            f"{path}: not a readable sparse matrix: {exc}", kind="unreadable"
        ) from None
    if X.shape[0] == 0:
        raise DataFileError(f"{path}: no data rows", kind="shape")
    if X.dtype.kind not in "biuf":
        raise DataFileError(f"{path}: the sparse matrix holds {X.dtype} values", kind="bad-value")
    X.sum_duplicates()
    bad = ~((X.data == 0) | (X.data == 1))
    if bad.any():
        ks = np.flatnonzero(bad)
        rows = np.searchsorted(X.indptr, ks, side="right") - 1
        cols = X.indices[ks]
        k = int(np.lexsort((cols, rows))[0])
        raise DataFileError(
            f"{_where(path, int(rows[k]) + 1)}, {describe_column(int(cols[k]), None)}: value "
            f"{X.data[ks[k]].item()!r} is not 0/1 (sparse input must be binary)",
            kind="bad-value",
        )
    X = sp.csr_matrix((X.data.astype(np.int8), X.indices, X.indptr), shape=X.shape)
    return X


def _read_npz(path, label_column, ignore, sink, in_place):
    keys = _npz_keys(path)
    if _SPARSE_KEYS <= keys:
        return _read_sparse(path, label_column), None, None
    with np.load(path, allow_pickle=False) as archive:
        names = None
        if "feature_names" in keys:
            names = tuple(str(v).strip() for v in np.asarray(archive["feature_names"]).ravel())
        if "X" in keys:
            key = "X"
        else:
            data_keys = sorted(keys - {"feature_names", label_column or ""})
            if len(data_keys) != 1:
                raise DataFileError(
                    f"{path}: cannot tell which array is the table: arrays {sorted(keys)}; "
                    "name it 'X'",
                    kind="unreadable",
                )
            key = data_keys[0]
        a = archive[key]
        _check_array_shape(path, a.shape, a.dtype, f"array {key!r}")
        if names is not None:
            if len(names) != a.shape[1]:
                raise DataFileError(
                    f"{path}: {len(names)} feature_names for {a.shape[1]} columns", kind="shape"
                )
            if len(set(names)) != len(names):
                raise DataFileError(f"{path}: duplicate feature_names", kind="bad-header")
        labels = None
        if label_column is not None:
            if label_column not in keys or label_column in ("X", "feature_names"):
                raise DataFileError(
                    f"{path}: no array named {label_column!r} for the labels "
                    f"(arrays: {sorted(keys)})",
                    kind="label-column",
                )
            labels = np.asarray(archive[label_column]).ravel()
            if len(labels) != a.shape[0]:
                raise DataFileError(
                    f"{path}: {len(labels)} labels in {label_column!r} for {a.shape[0]} rows",
                    kind="shape",
                )
        X = _encode_array(a, path, names, ignore, sink, in_place)
    return X, labels, names


# -- dispatch, cache -------------------------------------------------------------------------
def _format_of(path: str) -> str:
    if not os.path.exists(path):
        raise DataFileError(f"{path}: no such file", kind="no-file")
    if os.path.isdir(path):
        raise DataFileError(f"{path}: is a directory, not a data file", kind="no-file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise DataFileError(
            f"{path}: unsupported file type {ext!r}; use one of {FORMATS}",
            kind="unsupported-format",
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open the file: {exc}", kind="unreadable") from None
    return ext


def _check_missing(missing: str) -> bool:
    if missing not in ("error", "ignore"):
        raise ValueError(f"missing must be 'error' or 'ignore', got {missing!r}")
    return missing == "ignore"


_LOW_LEVEL = (ValueError, OverflowError, EOFError, OSError, zipfile.BadZipFile)


@contextlib.contextmanager
def _file_errors(path: str, what: str = "the table"):
    """Turn what a reader may raise (ArrowInvalid, OverflowError, UnicodeDecodeError,
    MemoryError, ...) into a :class:`DataFileError` of kind ``unreadable``; an OSError of the
    cache is raised as it is."""
    try:
        yield
    except DataFileError:
        raise
    except _SinkOSError as exc:
        raise exc.original from None
    except MemoryError:
        raise DataFileError(
            f"{path}: not enough memory to read {what}; pass cache_dir= to open_table to "
            "stream a table to disk",
            kind="unreadable",
        ) from None
    except Exception as exc:
        if isinstance(exc, _LOW_LEVEL) or type(exc).__module__.startswith("pyarrow"):
            raise DataFileError(
                f"{path}: cannot read {what}: {type(exc).__name__}: {exc}", kind="unreadable"
            ) from None
        raise


def _parse(path, ext, label_column, ignore, sink, in_place):
    """``(X or None when the codes went to sink, labels, feature_names)``; every failure is a
    :class:`DataFileError` (or an OSError of the cache)."""
    with _file_errors(path):
        if ext == ".csv":
            names, labels = _read_csv(path, label_column, ignore, sink)
            return None, labels, names
        if ext == ".parquet":
            names, labels = _read_parquet(path, label_column, ignore, sink)
            return None, labels, names
        if ext == ".npy":
            return _read_npy(path, label_column, ignore, sink, in_place), None, None
        return _read_npz(path, label_column, ignore, sink, in_place)


def _cache_key(path: str, st: os.stat_result, label_column, missing) -> str:
    ap = os.path.abspath(path)
    state = [ap, st.st_size, st.st_mtime_ns, st.st_ino, label_column, missing, CACHE_VERSION]
    return (
        hashlib.sha256(ap.encode()).hexdigest()[:16]
        + "-"
        + hashlib.sha256(json.dumps(state).encode()).hexdigest()[:24]
    )


def _atomic(directory: str, final: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fedvi-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cache_files(cache_dir: str, key: str) -> tuple[str, str, str]:
    base = os.path.join(cache_dir, key)
    return base + ".json", base + ".npy", base + ".labels.npy"


def _cache_load(cache_dir: str, key: str, path: str) -> SiteTable | None:
    meta_path, x_path, y_path = _cache_files(cache_dir, key)
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("version") != CACHE_VERSION:
            return None
        if meta["x"] == "source":
            X = np.load(path, mmap_mode="r", allow_pickle=False).view(np.int8)
        else:
            X = np.load(x_path, mmap_mode="r", allow_pickle=False)
        if list(X.shape) != meta["shape"] or X.dtype.name != meta["dtype"]:
            return None
        y = np.load(y_path, allow_pickle=False) if meta["labels"] else None
        if y is not None and len(y) != X.shape[0]:
            return None
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    names = meta.get("feature_names")
    return SiteTable(X, y, None if names is None else tuple(names), path)


def _cache_prune(cache_dir: str, key: str, st: os.stat_result) -> None:
    """Remove the entries of older versions of the same file."""
    prefix = key.split("-")[0] + "-"
    for name in os.listdir(cache_dir):
        if not (name.startswith(prefix) and name.endswith(".json")) or name == key + ".json":
            continue
        try:
            with open(os.path.join(cache_dir, name), encoding="utf-8") as fh:
                meta = json.load(fh)
            if [meta.get("size"), meta.get("mtime_ns")] == [st.st_size, st.st_mtime_ns]:
                continue
            for f in _cache_files(cache_dir, name[: -len(".json")]):
                if os.path.exists(f):
                    os.unlink(f)
        except (OSError, ValueError):
            continue


def _cached(path, ext, label_column, missing, cache_dir) -> SiteTable:
    os.makedirs(cache_dir, exist_ok=True)
    st = os.stat(path)
    key = _cache_key(path, st, label_column, missing)
    hit = _cache_load(cache_dir, key, path)
    if hit is not None:
        return hit
    if ext == ".npz" and _SPARSE_KEYS <= _npz_keys(path):  # already compact: no cache
        return SiteTable(_read_sparse(path, label_column), None, None, path)
    meta_path, x_path, y_path = _cache_files(cache_dir, key)
    in_place = ext == ".npy"  # a .npz member cannot be memory-mapped: cache a copy
    sink = _NpySink(cache_dir)
    try:
        X, labels, names = _parse(path, ext, label_column, missing == "ignore", sink, in_place)
        copied = X is None  # else a valid int8/uint8/bool .npy, used in place
        if copied:
            with _file_errors(path):
                tmp = sink.finish()
            os.replace(tmp, x_path)
            sink.tmp = None
            X = np.load(x_path, mmap_mode="r", allow_pickle=False)
    finally:
        sink.abort()
    if labels is not None:
        labels = np.asarray(labels)
        _atomic(cache_dir, y_path, lambda fh: np.save(fh, labels, allow_pickle=False))
    meta = {
        "version": CACHE_VERSION,
        "source": os.path.abspath(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "label_column": label_column,
        "missing": missing,
        "x": "cache" if copied else "source",
        "shape": list(X.shape),
        "dtype": X.dtype.name,
        "feature_names": None if names is None else list(names),
        "labels": labels is not None,
    }
    _atomic(cache_dir, meta_path, lambda fh: fh.write(json.dumps(meta).encode("utf-8")))
    _cache_prune(cache_dir, key, st)
    return SiteTable(X, labels, names, path)


# -- public API ------------------------------------------------------------------------------
def open_table(
    path: str | os.PathLike,
    label_column: str | None = None,
    missing: str = "error",
    cache_dir: str | os.PathLike | None = None,
) -> SiteTable:
    """Read (parse and validate) a site's table; see the module docstring for the formats.

    ``missing``: ``"error"`` (the first missing cell is an error) or ``"ignore"`` (missing cells
    become -1). ``cache_dir``: the first call writes the encoded table there (``<key>.npy``,
    ``<key>.json``, ``<key>.labels.npy``; the key hashes the file's path, size, mtime, the
    options and :data:`CACHE_VERSION`, so an edited file is read again); later calls return it
    memory-mapped without parsing. CSV and Parquet are streamed into the cache block by block.
    Not copied: a sparse ``.npz`` (compact already; read on every call) and a ``.npy`` of valid
    ``int8``/``uint8``/``bool`` codes (memory-mapped in place; the cache only records that it
    was validated).
    """
    path = os.fspath(path)
    ignore = _check_missing(missing)
    ext = _format_of(path)
    if cache_dir is not None:
        return _cached(path, ext, label_column, missing, os.fspath(cache_dir))
    sink = _MemorySink()
    try:
        X, labels, names = _parse(path, ext, label_column, ignore, sink, True)
        if X is None:
            with _file_errors(path):
                X = sink.finish()
    finally:
        sink.abort()
    return SiteTable(X, labels, names, path)


def read_table(
    path: str | os.PathLike, label_column: str | None = None, missing: str = "error"
) -> SiteTable:
    """Read a site's table without a cache (see :func:`open_table`)."""
    return open_table(path, label_column=label_column, missing=missing)


def read_column(path: str | os.PathLike, name: str) -> np.ndarray:
    """One column of a file (e.g. the known labels, to score a result) without reading the
    table: a CSV or Parquet column by name, or a ``.npz`` array. Integer-valued columns come
    back as int64, others as text."""
    path = os.fspath(path)
    ext = _format_of(path)
    with _file_errors(path, f"column {name!r}"):
        if ext == ".csv":
            return _read_csv_column(path, name)
        if ext == ".parquet":
            pf = _need("pyarrow.parquet").ParquetFile(path)
            if name not in pf.schema_arrow.names:
                raise DataFileError(
                    f"{path}: no column {name!r} (columns: {pf.schema_arrow.names[:20]})",
                    kind="label-column",
                )
            return _label_values(pf.read(columns=[name]).column(name))
        if ext == ".npz":
            keys = _npz_keys(path)
            if name not in keys or _SPARSE_KEYS <= keys:
                raise DataFileError(
                    f"{path}: no array named {name!r} (arrays: {sorted(keys)})",
                    kind="label-column",
                )
            with np.load(path, allow_pickle=False) as archive:
                return np.asarray(archive[name]).ravel()
        raise DataFileError(
            f"{path}: a .npy file holds one unnamed array; no column {name!r}",
            kind="label-column",
        )


def _read_csv_column(path: str, name: str) -> np.ndarray:
    pa, pcsv = _need("pyarrow"), _need("pyarrow.csv")
    names = [h.strip() for h in _csv_header(path)]
    if name not in names:
        raise DataFileError(
            f"{path}: no column {name!r} (columns: {names[:20]})", kind="label-column"
        )
    cols = [f"c{j}" for j in range(len(names))]
    want = cols[names.index(name)]
    table = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(
            column_names=cols, skip_rows_after_names=1, block_size=_CSV_BLOCK_BYTES
        ),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            include_columns=[want], column_types={want: pa.string()}, strings_can_be_null=False
        ),
    )
    return _label_values(table.column(want))


def _codes_for_writing(X) -> np.ndarray:
    a = np.asarray(X)
    if a.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, variables), got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"X must hold numeric codes, got dtype {a.dtype}")
    codes, bad, _, _ = _encode(a, ignore=True, nan_missing=True, minus_one_missing=True)
    if bad >= 0:
        i, j = divmod(bad, a.shape[1])
        raise ValueError(
            f"X: row {i + 1}, column #{j + 1}: value {a[i, j].item()!r} "
            f"{_number_problem(a[i, j].item())}"
        )
    return codes


def write_table(
    path: str | os.PathLike,
    X,
    feature_names=None,
    labels=None,
    label_column: str = "y",
) -> str:
    """Write a table of codes (``-1`` or NaN: missing) as ``.csv``, ``.parquet``, ``.npy`` or
    ``.npz``; returns the path. CSV/Parquet: a header (``feature_names``, default ``x1..xD``)
    and the labels as a last column ``label_column``; missing cells are empty CSV cells /
    Parquet nulls. ``.npz``: arrays ``X``, ``feature_names`` and ``label_column``; a sparse
    ``X`` is written with ``scipy.sparse.save_npz`` (no names or labels). ``.npy``: ``X``
    only. Written to a temporary file first, then renamed."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unsupported file type {ext!r}; use one of {FORMATS}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if sp.issparse(X) and ext == ".npz":
        if feature_names is not None or labels is not None:
            raise ValueError("a sparse .npz holds the matrix only; write names/labels elsewhere")
        M = sp.csr_matrix(X)
        if M.nnz and not np.isin(M.data, (0, 1)).all():
            raise ValueError("a sparse table must be binary (0/1)")
        _atomic(directory, path, lambda fh: sp.save_npz(fh, M))
        return path
    codes = _codes_for_writing(X.toarray() if sp.issparse(X) else X)
    n, d = codes.shape
    if feature_names is not None:
        feature_names = [str(v) for v in feature_names]
        if len(feature_names) != d:
            raise ValueError(f"{len(feature_names)} feature_names for {d} columns")
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} rows")
    if ext == ".npy":
        if feature_names is not None or labels is not None:
            raise ValueError(
                "a .npy file holds X only; use .npz, .csv or .parquet for names/labels"
            )
        _atomic(directory, path, lambda fh: np.save(fh, codes, allow_pickle=False))
        return path
    if ext == ".npz":
        arrays = {"X": codes}
        if feature_names is not None:
            arrays["feature_names"] = np.asarray(feature_names, dtype=str)
        if labels is not None:
            if label_column in arrays:
                raise ValueError(f"label_column {label_column!r} clashes with an array name")
            arrays[label_column] = labels
        _atomic(directory, path, lambda fh: np.savez(fh, **arrays))
        return path
    pa = _need("pyarrow")
    names = feature_names or [f"x{j + 1}" for j in range(d)]
    columns = {}
    for j, name in enumerate(names):
        c = codes[:, j]
        columns[name] = pa.array(c, mask=c < 0) if (c < 0).any() else pa.array(c)
    if labels is not None:
        if label_column in columns:
            raise ValueError(f"label_column {label_column!r} is also a feature name")
        columns[label_column] = pa.array(labels.tolist())
    table = pa.table(columns)
    if ext == ".parquet":
        pq = _need("pyarrow.parquet")
        _atomic(directory, path, lambda fh: pq.write_table(table, fh))
        return path
    pcsv = _need("pyarrow.csv")
    # pyarrow quotes every name of the header; plain names are written without quotes
    plain = all(re.fullmatch(r"[^,\"\r\n]*", str(h)) for h in columns)

    def write(fh):
        if plain:
            fh.write((",".join(columns) + "\n").encode("utf-8"))
        pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=not plain))

    _atomic(directory, path, write)
    return path


def write_labels(path: str | os.PathLike, labels: np.ndarray, model: str | None = None) -> str:
    """Write ``(N,)`` global cluster ids as a CSV (``row,cluster``; ``row`` is the 1-based
    data row, as in error messages), atomically; with ``model`` (the model's hash,
    :func:`fedvi.label_files.model_hash`) a third column ``model`` holds it. Returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    pa, pcsv = _need("pyarrow"), _need("pyarrow.csv")
    labels = np.asarray(labels, dtype=np.int64).ravel()
    columns = {"row": np.arange(1, len(labels) + 1), "cluster": labels}
    if model is not None:
        columns["model"] = pa.array([str(model)] * len(labels), pa.string())
    table = pa.table(columns)

    def write(fh):
        fh.write(b",".join(n.encode() for n in columns) + b"\n")  # unquoted, unlike pyarrow's
        # quoting "none": a hash is hex digits, and the file reads as plain numbers and text
        pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False, quoting_style="none"))

    _atomic(directory, path, write)
    return path


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Inverse of :func:`write_labels`: ``(N,)`` int64 cluster ids."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=1, usecols=1)
    return data if data.size else np.zeros(0, dtype=np.int64)
