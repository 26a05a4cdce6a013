"""Site file readers (``fedvi.io``) and the data sources of ``simulations.data``."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

import fedvi.io as fio
from fedvi.io import (
    KINDS,
    DataFileError,
    SiteTable,
    open_table,
    read_column,
    read_labels,
    read_table,
    write_labels,
    write_table,
)
from simulations.data import SOURCES, load_sites, write_site_files


def _raises(path, kind, *parts, **kwargs):
    """Read ``path`` expecting a DataFileError of ``kind`` whose message holds every part."""
    with pytest.raises(DataFileError) as info:
        read_table(path, **kwargs)
    err = info.value
    assert err.kind == kind, str(err)
    for part in parts:
        assert part in str(err), f"{part!r} not in {str(err)!r}"
    return err


# -- CSV -------------------------------------------------------------------------------------
def test_csv_with_header_and_label_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("age_band,y,smoker\n0,3,1\n2,1,0\n1,3,1\n")
    t = read_table(path, label_column="y")
    np.testing.assert_array_equal(t.X, [[0, 1], [2, 0], [1, 1]])
    assert t.X.dtype == np.int8
    np.testing.assert_array_equal(t.labels, [3, 1, 3])
    assert t.labels.dtype == np.int64
    assert t.feature_names == ("age_band", "smoker")
    assert t.path == str(path) and t.n_rows == 3 and t.n_features == 2


def test_csv_text_labels_floats_and_blanks(tmp_path):
    path = tmp_path / "a.csv"
    # "1.0" (pandas' float columns) is the code 1; blanks around a value are ignored; a blank
    # line is skipped; text labels stay text.
    path.write_text("a,b,y\n1.0,0, 2 \n\n0,1,b\n")
    t = read_table(path, label_column="y")
    np.testing.assert_array_equal(t.X, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(t.labels, ["2", "b"])


@pytest.mark.parametrize(
    ("text", "kind", "where", "value"),
    [
        (
            "a,b\n0,1\n1,x\n",
            "bad-value",
            "row 2 (line 3), column 'b' (#2)",
            "value 'x' is not a number",
        ),
        (
            "a,b\n0,1\n1,0.5\n",
            "bad-value",
            "row 2 (line 3), column 'b' (#2)",
            "value '0.5' is not an integer",
        ),
        ("a,b\n0,-1\n", "bad-value", "row 1 (line 2), column 'b' (#2)", "value '-1' is negative"),
        (
            "a,b\n0,1\n1,1e300\n",
            "bad-value",
            "row 2 (line 3), column 'b' (#2)",
            "value '1e300' is too large",
        ),
        (
            "a,b\n99999999999999999999,1\n",
            "bad-value",
            "row 1 (line 2), column 'a' (#1)",
            "value '99999999999999999999' is too large for a category code",
        ),
        (
            "a,b\n0,1\n0,inf\n",
            "bad-value",
            "row 2 (line 3), column 'b' (#2)",
            "value 'inf' is not a finite",
        ),
        (
            "a,b\n0,1\n1,yes\n",
            "bad-value",
            "row 2 (line 3), column 'b' (#2)",
            "value 'yes' is not a number",
        ),
        (
            "a,b\n0,1\n40000,1\n",
            "bad-value",
            "row 2 (line 3), column 'a' (#1)",
            "value '40000' is too large",
        ),
        (
            "a,b\n0,1\n1,-2.5\n",
            "bad-value",
            "row 2 (line 3), column 'b' (#2)",
            "value '-2.5' is not an integer",
        ),
        (
            "a,b\n0,\n",
            "missing-value",
            "row 1 (line 2), column 'b' (#2)",
            "value '' is missing; pass missing=\"ignore\"",
        ),
        (
            "a,b\n0,1\nNA,1\n",
            "missing-value",
            "row 2 (line 3), column 'a' (#1)",
            "value 'NA' is missing",
        ),
        # a blank line is skipped: row 2 is on line 4
        ("a,b\n0,1\n\n1,x\n", "bad-value", "row 2 (line 4), column 'b' (#2)", "value 'x'"),
        # a quoted field spanning two lines: row 2 starts on line 4
        ('a,b\n0,"1\n"\n1,x\n', "bad-value", "row 2 (line 4), column 'b' (#2)", "value 'x'"),
        # the label column counts in the position: 'b' is the file's third column
        ("y,a,b\n1,0,1\n2,1,z\n", "bad-value", "row 2 (line 3), column 'b' (#3)", "value 'z'"),
    ],
)
def test_bad_csv_cell_names_row_line_column_value(tmp_path, text, kind, where, value):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    label = "y" if text.startswith("y,") else None
    _raises(path, kind, f"{path}: {where}: {value}", label_column=label)


def test_first_bad_cell_in_row_order(tmp_path):
    path = tmp_path / "bad.csv"
    # column 'b' fails at row 3, column 'c' at row 2 (and 'a' at row 4): row 2 is first.
    path.write_text("a,b,c\n0,0,0\n0,0,x\n0,y,0\nz,0,0\n")
    _raises(path, "bad-value", "row 2 (line 3), column 'c' (#3): value 'x'")
    # a bad value before a short row is reported first, and the other way round
    path.write_text("a,b\n0,x\n1\n")
    _raises(path, "bad-value", "row 1 (line 2), column 'b' (#2): value 'x'")
    path.write_text("a,b\n0\n1,x\n")
    _raises(path, "shape", "row 1 (line 2): 1 field(s), the header has 2")


@pytest.mark.parametrize(
    ("data", "line"),
    [(b"a,b\r\n0,1\r\n\r\n1,x\r\n", 4), (b"a,b\r0,1\r1,x\r", 3), (b'"a,1",b\n0,1\n1,x', 3)],
)
def test_line_endings_and_quoted_header(tmp_path, data, line):
    path = tmp_path / "e.csv"
    path.write_bytes(data)
    _raises(path, "bad-value", f"row 2 (line {line}), column ", "value 'x' is not a number")
    path.write_bytes(data.replace(b"x", b"0"))
    np.testing.assert_array_equal(read_table(path).X, [[0, 1], [1, 0]])


def test_exact_pass_keeps_the_rows_of_the_fast_pass(tmp_path, monkeypatch):
    # " NA " is not a number to the fast (float) pass; the exact pass reads it as missing and
    # continues after the rows the fast pass has checked.
    monkeypatch.setattr(fio, "_CSV_BLOCK_BYTES", 64)
    rows = ["0,1"] * 200
    rows[20], rows[150], rows[180] = "1.0,0", " NA ,1", "3,2"
    path = tmp_path / "na.csv"
    path.write_text("a,y,b\n" + "\n".join(r.replace(",", f",{i},") for i, r in enumerate(rows)))
    t = read_table(path, label_column="y", missing="ignore")
    expected = np.array([[0, 1]] * 200)
    expected[20], expected[150], expected[180] = [1, 0], [-1, 1], [3, 2]
    np.testing.assert_array_equal(t.X, expected)
    np.testing.assert_array_equal(t.labels, np.arange(200))
    _raises(path, "missing-value", "row 151 (line 152), column 'a' (#1): value ' NA ' is missing")


def test_line_of_row_matches_the_csv_module(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    path = tmp_path / "l.csv"
    for _ in range(40):
        rows = rng.choice(["", "0,1", "10,11"], size=rng.integers(1, 20)).tolist()
        eol = str(rng.choice(["\n", "\r\n"]))
        path.write_bytes(("a,b" + eol + eol.join(rows) + str(rng.choice(["", eol]))).encode())
        n = sum(1 for r in rows if r)
        for chunk in (1, 3, 64):
            monkeypatch.setattr(fio, "_LINE_SCAN_BYTES", chunk)
            for r in range(1, n + 2):
                assert fio._csv_line_of_row(str(path), r) == fio._csv_line_of_row_slow(str(path), r)


def test_first_bad_cell_in_a_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "_CSV_BLOCK_BYTES", 64)
    path = tmp_path / "big.csv"
    rows = ["0,1"] * 200
    rows[150] = "1,7.5"
    path.write_text("a,b\n" + "\n".join(rows) + "\n")
    _raises(path, "bad-value", "row 151 (line 152), column 'b' (#2): value '7.5'")
    rows[150] = "1,1"
    rows[170] = "1"
    path.write_text("a,b\n" + "\n".join(rows) + "\n")
    _raises(path, "shape", "row 171 (line 172): 1 field(s)")


@pytest.mark.parametrize(
    ("text", "kind", "match"),
    [
        ("a,b\n0,1\n1\n", "shape", "row 2 (line 3): 1 field(s), the header has 2"),
        ("a,b\n0,1\n1,0,1\n", "shape", "row 2 (line 3): 3 field(s), the header has 2"),
        ("0,1\n1,0\n", "bad-header", "looks like data; a header row"),
        ("a,b\n", "shape", "no data rows"),
        ("a,b\n\n\n", "shape", "no data rows"),
        ("", "bad-header", "the file is empty"),
        ("\n\n", "bad-header", "the file is empty"),
        ("a,a\n0,1\n", "bad-header", "duplicate column names in the header: ['a']"),
        ("a, a\n0,1\n", "bad-header", "duplicate column names"),
        ("a,b,\n0,1,0\n", "bad-header", "no name for column(s) #[3]"),
        ("a;b;c\n0;1;0\n", "bad-header", "separated by commas"),
    ],
)
def test_bad_csv_structure(tmp_path, text, kind, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    _raises(path, kind, f"{path}: ", match)


def test_bom_gives_the_plain_header(tmp_path):
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text("age,smoker,y\n0,1,2\n1,0,3\n")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a, b = read_table(plain, label_column="age"), read_table(bom, label_column="age")
    assert a.feature_names == b.feature_names == ("smoker", "y")
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(b.labels, [0, 1])
    np.testing.assert_array_equal(read_column(bom, "age"), [0, 1])


def test_binary_file_named_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(bytes(range(256)) * 8)
    _raises(path, "unreadable", f"{path}: binary data, not a text CSV file")
    path.write_bytes(bytes(range(128, 256)) * 8)  # no NUL byte, not UTF-8
    _raises(path, "unreadable", f"{path}: the header is not UTF-8")
    path.write_bytes(b"a,b\n0,1\n1,\xff\xfe\n")  # a text header, then bytes that are not UTF-8
    _raises(path, "unreadable", f"{path}: the file is not valid UTF-8")
    np.savez(tmp_path / "z.npz", X=np.eye(3))
    os.replace(tmp_path / "z.npz", path)  # a zip archive renamed .csv
    _raises(path, "unreadable", str(path))
    path.write_bytes("a,b\n0,1\n".encode("utf-16"))
    _raises(path, "unreadable", "UTF-16")


def test_missing_cells_error_or_minus_one(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("a,b,c\n0,1,2\n1,,0\nNA,0,1\n")
    _raises(path, "missing-value", "row 2 (line 3), column 'b' (#2): value '' is missing")
    t = read_table(path, missing="ignore")
    np.testing.assert_array_equal(t.X, [[0, 1, 2], [1, -1, 0], [-1, 0, 1]])
    assert t.X.dtype == np.int8
    # still strict about everything else
    path.write_text("a,b\n0,\n1,x\n")
    _raises(path, "bad-value", "row 2 (line 3), column 'b' (#2): value 'x'", missing="ignore")
    with pytest.raises(ValueError, match="missing must be"):
        read_table(path, missing="drop")


def test_int16_promotion(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n0,1\n127,2\n")
    assert read_table(path).X.dtype == np.int8
    path.write_text("a,b\n0,1\n128,32767\n")
    t = read_table(path)
    assert t.X.dtype == np.int16
    np.testing.assert_array_equal(t.X, [[0, 1], [128, 32767]])
    path.write_text("a,b\n0,1\n32768,0\n")
    _raises(path, "bad-value", "row 2 (line 3), column 'a' (#1): value '32768' is too large")


def test_int16_promotion_across_blocks_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "_CSV_BLOCK_BYTES", 64)
    rows = ["0,1"] * 100 + ["300,1"] + ["1,0"] * 50
    path = tmp_path / "c.csv"
    path.write_text("a,b\n" + "\n".join(rows) + "\n")
    expected = np.array([[int(v) for v in r.split(",")] for r in rows])
    for t in (read_table(path), open_table(path, cache_dir=tmp_path / "cache")):
        assert t.X.dtype == np.int16
        np.testing.assert_array_equal(t.X, expected)


def test_label_column_must_exist(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a,b\n0,1\n")
    _raises(path, "label-column", "label_column 'y' is not a column", label_column="y")
    path.write_text("a\n0\n")
    _raises(path, "shape", "no variables left", label_column="a")


# -- Parquet ---------------------------------------------------------------------------------
def test_parquet_round_trip_with_missing_and_labels(tmp_path):
    X = np.array([[0, 1, 2], [1, -1, 0], [1, 1, 300]])
    path = write_table(tmp_path / "t.parquet", X, ["a", "b", "c"], labels=[5, 6, 7])
    t = read_table(path, label_column="y", missing="ignore")
    np.testing.assert_array_equal(t.X, X)
    assert t.X.dtype == np.int16 and t.feature_names == ("a", "b", "c")
    np.testing.assert_array_equal(t.labels, [5, 6, 7])
    _raises(path, "missing-value", f"{path}: row 2, column 'b' (#2): value None is missing")
    np.testing.assert_array_equal(read_column(path, "y"), [5, 6, 7])


def test_parquet_bad_values(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    cases = [
        (pa.array([0.0, 0.5]), "row 2, column 'b' (#2): value 0.5 is not an integer"),
        (pa.array([0.0, 1e300]), "row 2, column 'b' (#2): value 1e+300 is too large"),
        (pa.array([0.0, float("inf")]), "row 2, column 'b' (#2): value inf is not a finite"),
        (pa.array([0, -3]), "row 2, column 'b' (#2): value -3 is negative"),
        (pa.array([0, 2**40]), f"row 2, column 'b' (#2): value {2**40} is too large"),
        (pa.array(["1", "yes"]), "row 2, column 'b' (#2): value 'yes' is not a number"),
    ]
    for col, match in cases:
        pq.write_table(pa.table({"a": [0, 1], "b": col}), path)
        _raises(path, "bad-value", f"{path}: {match}")
    pq.write_table(pa.table({"a": [0, 1], "a2": pa.array(["2020", "x"]).cast(pa.binary())}), path)
    _raises(path, "bad-value", "column 'a2' (#2): type binary")
    pq.write_table(pa.table({"a": [0, 1], "b": [1, 0]}), path)
    _raises(path, "label-column", "label_column 'y' is not a column", label_column="y")
    path.write_bytes(b"not parquet at all")
    _raises(path, "unreadable", f"{path}: not a readable Parquet file")


def test_parquet_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "_BLOCK_CELLS", 10)
    X = (np.random.default_rng(1).random((57, 4)) < 0.5).astype(np.int8)
    X[40, 2] = 9
    path = write_table(tmp_path / "t.parquet", X, list("abcd"))
    np.testing.assert_array_equal(read_table(path).X, X)
    X = X.astype(np.int16)
    X[41, 0], X[50, 1] = -1, -1
    path = write_table(tmp_path / "u.parquet", X, list("abcd"))
    _raises(path, "missing-value", f"{path}: row 42, column 'a' (#1): value None is missing")
    np.testing.assert_array_equal(read_table(path, missing="ignore").X, X)


# -- .npy / .npz -----------------------------------------------------------------------------
def test_npy_npz_and_sparse(tmp_path):
    X = (np.random.default_rng(0).random((20, 6)) < 0.3).astype(np.int8)
    np.save(tmp_path / "a.npy", X)
    np.testing.assert_array_equal(read_table(tmp_path / "a.npy").X, X)
    np.savez(tmp_path / "b.npz", X=X, labels=np.arange(20), feature_names=list("abcdef"))
    t = read_table(tmp_path / "b.npz", label_column="labels")
    np.testing.assert_array_equal(t.X, X)
    np.testing.assert_array_equal(t.labels, np.arange(20))
    assert t.feature_names == tuple("abcdef")
    np.testing.assert_array_equal(read_column(tmp_path / "b.npz", "labels"), np.arange(20))
    sp.save_npz(tmp_path / "c.npz", sp.csr_matrix(X))
    t = read_table(tmp_path / "c.npz")
    assert sp.issparse(t.X)
    np.testing.assert_array_equal(t.X.toarray(), X)


def test_npy_is_memory_mapped_without_copy(tmp_path):
    X = np.random.default_rng(0).random((50, 7)) < 0.3
    for dtype in (np.int8, np.uint8, bool):
        np.save(tmp_path / "a.npy", X.astype(dtype))
        t = read_table(tmp_path / "a.npy")
        assert isinstance(t.X, np.memmap) and t.X.dtype == np.int8
        assert not t.X.flags.writeable
        np.testing.assert_array_equal(t.X, X)
    np.save(tmp_path / "b.npy", np.array([[0, 200], [1, 0]], np.uint8))
    t = read_table(tmp_path / "b.npy")
    assert t.X.dtype == np.int16
    np.testing.assert_array_equal(t.X, [[0, 200], [1, 0]])
    np.save(tmp_path / "c.npy", np.array([[0.0, 1.0], [2.0, 1.0]]))
    t = read_table(tmp_path / "c.npy")
    assert t.X.dtype == np.int8
    np.testing.assert_array_equal(t.X, [[0, 1], [2, 1]])


@pytest.mark.parametrize(
    ("array", "kind", "match"),
    [
        (
            np.array([[0.0, 1.0], [1.0, 1e300]]),
            "bad-value",
            "row 2, column #2: value 1e+300 is too large",
        ),
        (np.array([[0.0, np.inf]]), "bad-value", "row 1, column #2: value inf is not a finite"),
        (np.array([[0.0, 0.5]]), "bad-value", "row 1, column #2: value 0.5 is not an integer"),
        (np.array([[0, 1], [-3, 0]]), "bad-value", "row 2, column #1: value -3 is negative"),
        (np.array([[0, 1], [1, 40000]]), "bad-value", "row 2, column #2: value 40000 is too large"),
        (np.array([[0, 2**62]]), "bad-value", f"row 1, column #2: value {2**62} is too large"),
        (np.array([[0.0, np.nan]]), "missing-value", "row 1, column #2: value nan is missing"),
        (
            np.array([[0, 1], [-1, 0]], np.int8),
            "missing-value",
            "row 2, column #1: value -1 is missing",
        ),
        (np.array([[0, 1], [1, 0]], np.int8)[:, 0], "shape", "expected a 2-D array"),
        (np.zeros((0, 3)), "shape", "no data rows"),
        (np.array([["0", "1"]]), "bad-value", "values, not numeric category codes"),
    ],
)
def test_bad_npy_and_npz(tmp_path, array, kind, match):
    np.save(tmp_path / "x.npy", array)
    _raises(tmp_path / "x.npy", kind, f"{tmp_path / 'x.npy'}: ", match)
    np.savez(tmp_path / "x.npz", X=array)
    _raises(tmp_path / "x.npz", kind, match)


def test_npz_names_in_messages_and_missing(tmp_path):
    X = np.array([[0, 1, 2], [1, -1, 0]])
    np.savez(tmp_path / "a.npz", X=X, feature_names=["u", "v", "w"])
    _raises(tmp_path / "a.npz", "missing-value", "row 2, column 'v' (#2): value -1 is missing")
    t = read_table(tmp_path / "a.npz", missing="ignore")
    np.testing.assert_array_equal(t.X, X)
    X = np.array([[0, 1, 2], [1, 0.5, 0]])
    np.savez(tmp_path / "b.npz", X=X, feature_names=["u", "v", "w"])
    _raises(tmp_path / "b.npz", "bad-value", "row 2, column 'v' (#2): value 0.5")
    np.save(tmp_path / "c.npy", np.array([[0, np.nan], [1, 1]]))
    np.testing.assert_array_equal(
        read_table(tmp_path / "c.npy", missing="ignore").X, [[0, -1], [1, 1]]
    )


def test_bad_binary_files(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"garbage")
    _raises(tmp_path / "x.npy", "unreadable", f"{tmp_path / 'x.npy'}: not a .npy array")
    sp.save_npz(tmp_path / "s.npz", sp.csr_matrix(np.array([[0, 0, 1], [1, 0, 2]])))
    _raises(
        tmp_path / "s.npz",
        "bad-value",
        f"{tmp_path / 's.npz'}: row 2, column #3: value 2 is not 0/1 (sparse input must be binary)",
    )
    _raises(tmp_path / "s.npz", "label-column", "holds no label column", label_column="y")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    _raises(tmp_path / "two.npz", "unreadable", "name it 'X'")
    (tmp_path / "z.npz").write_bytes(b"PK but not a zip")
    _raises(tmp_path / "z.npz", "unreadable", "not a readable .npz archive")
    np.savez(tmp_path / "n.npz", X=np.zeros((2, 2)), feature_names=["a"])
    _raises(tmp_path / "n.npz", "shape", "1 feature_names for 2 columns")
    np.savez(tmp_path / "l.npz", X=np.zeros((2, 2)), y=np.arange(3))
    _raises(tmp_path / "l.npz", "shape", "3 labels in 'y' for 2 rows", label_column="y")
    _raises(tmp_path / "l.npz", "label-column", "no array named 'z'", label_column="z")
    np.save(tmp_path / "a.npy", np.zeros((2, 2), np.int8))
    _raises(tmp_path / "a.npy", "label-column", "holds one unnamed array", label_column="y")
    (tmp_path / "t.txt").write_text("")
    _raises(tmp_path / "t.txt", "unsupported-format", "unsupported file type '.txt'")
    _raises(tmp_path / "missing.csv", "no-file", "no such file")
    _raises(tmp_path, "no-file", "is a directory")


def test_no_raw_low_level_errors(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_text("a,b\n0,1\n")
    for exc in (MemoryError(), OverflowError("x"), UnicodeDecodeError("utf-8", b"", 0, 1, "x")):

        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(fio, "_encode", fail)
        _raises(path, "unreadable", str(path))


def test_pyarrow_missing_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_text("a,b\n0,1\n")
    real = fio.importlib.import_module

    def no_pyarrow(name, *args):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(fio.importlib, "import_module", no_pyarrow)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_table(path)
    np.save(tmp_path / "a.npy", np.zeros((2, 2), np.int8))  # .npy needs no pyarrow
    assert read_table(tmp_path / "a.npy").X.shape == (2, 2)


def test_error_kind_vocabulary_and_pickle():
    err = DataFileError("x: row 1", kind="shape")
    assert isinstance(err, ValueError) and err.kind in KINDS
    again = pickle.loads(pickle.dumps(err))
    assert again.kind == "shape" and str(again) == "x: row 1"
    with pytest.raises(ValueError, match="unknown DataFileError kind"):
        DataFileError("x", kind="oops")


# -- cache -----------------------------------------------------------------------------------
def test_open_table_cache_hit_and_invalidation(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_text("a,b,y\n0,1,3\n1,0,4\n")
    cache = tmp_path / "cache"
    first = open_table(path, label_column="y", cache_dir=cache)
    assert isinstance(first.X, np.memmap)
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and not [f for f in files if f.endswith(".tmp")]

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(fio, "_parse", no_parse)
    second = open_table(path, label_column="y", cache_dir=cache)
    assert isinstance(second.X, np.memmap) and not second.X.flags.writeable
    np.testing.assert_array_equal(second.X, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(second.labels, [3, 4])
    assert second.feature_names == ("a", "b") and second.path == str(path)
    # other options are another entry
    with pytest.raises(AssertionError, match="parsed again"):
        open_table(path, cache_dir=cache)
    # touching the file invalidates the entry
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(AssertionError, match="parsed again"):
        open_table(path, label_column="y", cache_dir=cache)
    monkeypatch.undo()
    # an edited file is read again (and the stale entry removed)
    path.write_text("a,b,y\n1,1,3\n1,1,4\n0,0,5\n")
    third = open_table(path, label_column="y", cache_dir=cache)
    np.testing.assert_array_equal(third.X, [[1, 1], [1, 1], [0, 0]])
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 1
    # a bad file leaves nothing behind in the cache
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n0,1\n1,x\n")
    before = sorted(os.listdir(cache))
    with pytest.raises(DataFileError, match="value 'x'"):
        open_table(bad, cache_dir=cache)
    assert sorted(os.listdir(cache)) == before


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".npy", ".npz"])
def test_open_table_cache_every_format(tmp_path, monkeypatch, ext):
    X = np.array([[0, 1, 2], [1, -1, 0], [2, 2, 1]])
    if ext == ".npy":
        path = write_table(tmp_path / f"t{ext}", X)
        names, labels, label = None, None, None
    else:
        path = write_table(tmp_path / f"t{ext}", X, ["a", "b", "c"], labels=["p", "q", "r"])
        names, labels, label = ("a", "b", "c"), ["p", "q", "r"], "y"
    cache = tmp_path / "cache"
    for _ in range(2):
        t = open_table(path, label_column=label, missing="ignore", cache_dir=cache)
        np.testing.assert_array_equal(t.X, X)
        assert t.feature_names == names and t.X.dtype == np.int8
        if labels is not None:
            np.testing.assert_array_equal(t.labels, labels)
        monkeypatch.setattr(fio, "_parse", None)  # the second call must not parse


def test_cache_of_int8_npy_does_not_copy(tmp_path, monkeypatch):
    X = (np.random.default_rng(0).random((30, 5)) < 0.5).astype(np.uint8)
    np.save(tmp_path / "a.npy", X)
    cache = tmp_path / "cache"
    t = open_table(tmp_path / "a.npy", cache_dir=cache)
    assert os.path.samefile(t.X.filename, tmp_path / "a.npy")
    assert [f for f in os.listdir(cache) if f.endswith(".npy")] == []
    monkeypatch.setattr(fio, "_parse", None)
    t = open_table(tmp_path / "a.npy", cache_dir=cache)
    assert os.path.samefile(t.X.filename, tmp_path / "a.npy") and t.X.dtype == np.int8
    np.testing.assert_array_equal(t.X, X)


def test_cache_of_sparse_npz_reads_directly(tmp_path):
    X = sp.random(20, 5, density=0.3, format="csr", random_state=0)
    X.data[:] = 1
    sp.save_npz(tmp_path / "s.npz", X)
    t = open_table(tmp_path / "s.npz", cache_dir=tmp_path / "cache")
    assert sp.issparse(t.X)
    np.testing.assert_array_equal(t.X.toarray(), X.toarray())


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a,b\n0,1\n1,0\n")
    cache = tmp_path / "cache"
    open_table(path, cache_dir=cache)
    for f in os.listdir(cache):
        if f.endswith(".npy"):
            (cache / f).write_bytes(b"broken")
    np.testing.assert_array_equal(open_table(path, cache_dir=cache).X, [[0, 1], [1, 0]])


# -- read_column, write_table ----------------------------------------------------------------
def test_read_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a,b,y,name\n0,1,3,x\n1,0,4,y z\n")
    np.testing.assert_array_equal(read_column(path, "y"), [3, 4])
    assert read_column(path, "y").dtype == np.int64
    np.testing.assert_array_equal(read_column(path, "name"), ["x", "y z"])
    with pytest.raises(DataFileError, match="no column 'q'") as info:
        read_column(path, "q")
    assert info.value.kind == "label-column"
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    with pytest.raises(DataFileError) as info:
        read_column(tmp_path / "a.npy", "y")
    assert info.value.kind == "label-column"


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".npy", ".npz"])
def test_write_table_round_trip(tmp_path, ext):
    X = np.array([[0, 1, np.nan], [2, 1, 0], [1, 0, 1]])
    expected = np.where(np.isnan(X), -1, X).astype(int)
    kwargs = {} if ext == ".npy" else {"feature_names": ["a", "b", "c"], "labels": [1, 2, 1]}
    path = write_table(tmp_path / f"t{ext}", X, **kwargs)
    t = read_table(path, label_column=None if ext == ".npy" else "y", missing="ignore")
    np.testing.assert_array_equal(t.X, expected)
    if ext != ".npy":
        assert t.feature_names == ("a", "b", "c")
        np.testing.assert_array_equal(t.labels, [1, 2, 1])
    if ext == ".csv":
        assert path.endswith("t.csv")
        assert open(path).read().splitlines()[:2] == ["a,b,c,y", "0,1,,1"]


def test_write_table_sparse_and_errors(tmp_path):
    X = sp.csr_matrix(np.array([[0, 1], [1, 0]]))
    t = read_table(write_table(tmp_path / "s.npz", X))
    assert sp.issparse(t.X)
    np.testing.assert_array_equal(t.X.toarray(), X.toarray())
    np.testing.assert_array_equal(read_table(write_table(tmp_path / "s.csv", X)).X, X.toarray())
    with pytest.raises(ValueError, match="value 0.5"):
        write_table(tmp_path / "b.csv", np.array([[0, 0.5]]))
    with pytest.raises(ValueError, match="unsupported file type"):
        write_table(tmp_path / "b.txt", np.zeros((1, 1)))
    with pytest.raises(ValueError, match="holds X only"):
        write_table(tmp_path / "b.npy", np.zeros((1, 1)), labels=[1])


def test_labels_round_trip(tmp_path):
    labels = np.array([2, 0, 1, 1])
    np.testing.assert_array_equal(read_labels(write_labels(tmp_path / "l.csv", labels)), labels)


def test_site_table_is_what_read_table_returns(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a\n1\n")
    assert isinstance(read_table(path), SiteTable)


# -- simulations.data ------------------------------------------------------------------------
def _cfg(**data):
    return OmegaConf.create(
        {
            "seed": 0,
            "data": data,
            "model": {"likelihood": "bernoulli"},
            "federation": {"sites": 3, "split": "iid"},
        }
    )


def test_load_sites_dispatches_on_source(tmp_path):
    cfg = _cfg(source="simulated", n_rows=300, n_clusters=3, n_features=10)
    sites, truth, names = load_sites(cfg)
    assert len(sites) == len(truth) == 3 and names is None
    paths = write_site_files(sites, str(tmp_path), feature_names=[f"v{i}" for i in range(10)])
    files_cfg = _cfg(source="files", paths=paths, label_column=None)
    got, truth2, names2 = load_sites(files_cfg)
    assert truth2 is None and names2 == [f"v{i}" for i in range(10)]
    for a, b in zip(got, sites, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown data.source 'nope'"):
        load_sites(_cfg(source="nope"))
    SOURCES["tiny"] = lambda cfg: ([np.eye(3, dtype=int)] * 2, None, None)
    try:
        assert len(load_sites(_cfg(source="tiny")).sites) == 2
    finally:
        del SOURCES["tiny"]
