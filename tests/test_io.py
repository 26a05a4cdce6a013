"""Site file readers (``fedvi.io``) and the data sources of ``simulations.data``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from fedvi.io import DataFileError, read_labels, read_table, write_labels
from simulations.data import SOURCES, load_sites, write_site_files


def test_csv_with_header_and_label_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("age_band,y,smoker\n0,3,1\n2,1,0\n1,3,1\n")
    t = read_table(path, label_column="y")
    np.testing.assert_array_equal(t.X, [[0, 1], [2, 0], [1, 1]])
    np.testing.assert_array_equal(t.labels, [3, 1, 3])
    assert t.feature_names == ("age_band", "smoker")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n0,1\n1,x\n", r"bad\.csv: row 2, column 'b': value 'x' is not a number"),
        ("a,b\n0,1\n1,0.5\n", r"row 2, column 'b': value '0.5' is not an integer"),
        ("a,b\n0,-1\n", r"row 1, column 'b': negative code"),
        ("a,b\n0,1\n1\n", r"row 2 has 1 fields, the header has 2"),
        ("0,1\n1,0\n", r"looks like data; a header row"),
        ("a,b\n", r"no data rows"),
        ("", r"the file is empty"),
        ("a,a\n0,1\n", r"duplicate column names"),
        ("a,b\n0,\n", r"column 'b': value '' is not a number"),
    ],
)
def test_bad_csv_names_file_column_value(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataFileError, match=match):
        read_table(path)


def test_label_column_must_exist(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a,b\n0,1\n")
    with pytest.raises(DataFileError, match="label_column 'y' is not a column"):
        read_table(path, label_column="y")


def test_npy_npz_and_sparse(tmp_path):
    X = (np.random.default_rng(0).random((20, 6)) < 0.3).astype(np.int8)
    np.save(tmp_path / "a.npy", X)
    np.testing.assert_array_equal(read_table(tmp_path / "a.npy").X, X)
    np.savez(tmp_path / "b.npz", X=X, labels=np.arange(20), feature_names=list("abcdef"))
    t = read_table(tmp_path / "b.npz", label_column="labels")
    np.testing.assert_array_equal(t.X, X)
    np.testing.assert_array_equal(t.labels, np.arange(20))
    assert t.feature_names == tuple("abcdef")
    sp.save_npz(tmp_path / "c.npz", sp.csr_matrix(X))
    t = read_table(tmp_path / "c.npz")
    assert sp.issparse(t.X)
    np.testing.assert_array_equal(t.X.toarray(), X)


def test_bad_binary_files(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match=r"x\.npy"):
        read_table(tmp_path / "x.npy")
    sp.save_npz(tmp_path / "s.npz", sp.csr_matrix(np.array([[0, 2], [1, 0]])))
    with pytest.raises(DataFileError, match=r"s\.npz: sparse input must be binary: value 2"):
        read_table(tmp_path / "s.npz")
    np.save(tmp_path / "f.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(DataFileError, match=r"row 0, column 1"):
        read_table(tmp_path / "f.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    with pytest.raises(DataFileError, match="name it 'X'"):
        read_table(tmp_path / "two.npz")
    (tmp_path / "t.parquet").write_text("")
    with pytest.raises(DataFileError, match="unsupported file type '.parquet'"):
        read_table(tmp_path / "t.parquet")
    with pytest.raises(DataFileError, match="no such file"):
        read_table(tmp_path / "missing.csv")


def test_labels_round_trip(tmp_path):
    labels = np.array([2, 0, 1, 1])
    np.testing.assert_array_equal(read_labels(write_labels(tmp_path / "l.csv", labels)), labels)


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
