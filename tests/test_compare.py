"""Comparators (simulations/compare.py): table structure, scores, missing packages, outputs."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from fedvi.simulate import simulate, split_sites
from simulations import compare


@pytest.fixture(scope="module")
def easy():
    """Three well-separated binary clusters over three sites (a Dirichlet-skewed split)."""
    d = simulate(1500, 3, 100, weights=[0.4, 0.3, 0.3], seed=12)
    parts = split_sites(d.z, 3, "dirichlet", seed=12)
    return [d.X[p] for p in parts], [d.z[p] for p in parts]


def cfg_for(likelihood="bernoulli", comparators="all", **extra):
    return {
        "seed": 0,
        "plots": False,
        "model": {"likelihood": likelihood, "n_components": 8},
        "comparators": comparators,
        **extra,
    }


def test_method_names():
    assert compare.method_names("all") == list(compare.METHODS)
    assert compare.method_names(True) == list(compare.METHODS)
    assert compare.method_names(["kfed", "stepmix"]) == ["fedmerdel", "stepmix", "kfed"]
    assert compare.method_names("kmodes, merdel_central") == [
        "fedmerdel",
        "merdel_central",
        "kmodes",
    ]
    with pytest.raises(ValueError, match="unknown comparators"):
        compare.method_names(["kmeans++"])


def test_core_comparators_find_the_true_k_and_write_the_table(easy, tmp_path):
    sites, truth = easy
    rows = compare.run_comparators(
        cfg_for(), sites, truth, None, str(tmp_path), methods=["fedmerdel_core", "merdel_central"]
    )
    by = {r["method"]: r for r in rows}
    assert set(by) == {"fedmerdel_core", "merdel_central"}
    for r in rows:
        assert r["status"] == "ok"
        assert r["k_true"] == 3 and r["k_found"] == 3
        assert -1.0 <= r["ari"] <= 1.0 and r["ari"] > 0.9
        assert 0.0 <= r["nmi"] <= 1.0
        assert r["n_rows"] == 1500 and r["n_sites"] == 3
    assert by["fedmerdel_core"]["federated"] and by["fedmerdel_core"]["uplink_bytes"] > 0
    assert by["merdel_central"]["uplink_bytes"] is None
    with open(tmp_path / "comparison.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == ["fedmerdel_core", "merdel_central"]
    assert list(table[0]) == list(compare.COLUMNS)
    md = (tmp_path / "comparison.md").read_text()
    assert md.count("\n") == 4 and "merdel_central" in md
    meta = json.loads((tmp_path / "comparison.json").read_text())
    assert meta["seed"] == 0 and meta["config"]["model"]["n_components"] == 8


def test_flower_row_comes_first_from_the_run_results(easy, tmp_path):
    sites, truth = easy
    results = {
        "complete": True,
        "n_clusters": 3,
        "ari": 0.5,
        "nmi": 0.6,
        "wall_clock": {"simulation": 2.5},
        "uplink_bytes": {"site 0": 10, "site 1": 20, "site 2": 30},
    }
    rows = compare.run_comparators(
        cfg_for(), sites, truth, results, str(tmp_path), methods=["merdel_central"]
    )
    assert [r["method"] for r in rows] == ["fedmerdel", "merdel_central"]
    assert rows[0]["uplink_bytes"] == 60 and rows[0]["wall_s"] == 2.5 and rows[0]["ari"] == 0.5


def test_kfed_is_one_shot_and_counts_its_uplink(easy):
    sites, truth = easy
    [r] = compare.compare(cfg_for(), sites, truth, methods=["kfed"])
    assert r.status == "ok" and r.k_found == 3 and r.ari > 0.7
    # Each site sends at most K centres of D float64 plus their sizes.
    assert r.uplink_bytes <= 3 * 3 * (100 + 1) * 8
    assert r.uplink_bytes % 8 == 0


def test_stepmix_with_true_k():
    pytest.importorskip("stepmix", reason="StepMix is an optional comparator: fedvi[experiments]")
    d = simulate(1500, 3, 100, weights=[0.4, 0.3, 0.3], seed=12)
    sites, truth = [d.X[:700], d.X[700:]], [d.z[:700], d.z[700:]]
    [r] = compare.compare(cfg_for(), sites, truth, None, ["stepmix"])
    assert r.status == "ok" and r.k_found == 3 and r.ari > 0.9


def test_kmodes_with_true_k_on_categorical_data():
    pytest.importorskip("kmodes", reason="k-modes is an optional comparator: fedvi[experiments]")
    d = simulate(900, 3, 30, likelihood="categorical", n_levels=3, seed=5)
    [r] = compare.compare(
        cfg_for("categorical"), [d.X[:400], d.X[400:]], [d.z[:400], d.z[400:]], None, ["kmodes"]
    )
    assert r.status == "ok" and r.k_true == 3 and r.k_found <= 3
    assert -1.0 <= r.ari <= 1.0


def test_missing_comparator_is_reported_not_raised(easy, monkeypatch, capsys, tmp_path):
    sites, truth = easy
    for mod in ("stepmix", "stepmix.stepmix", "kmodes", "kmodes.kmodes"):
        monkeypatch.setitem(sys.modules, mod, None)  # import now raises ImportError
    rows = compare.run_comparators(
        cfg_for(), sites, truth, None, str(tmp_path), methods=["stepmix", "kmodes"]
    )
    assert [r["method"] for r in rows] == ["stepmix", "kmodes"]
    for r in rows:
        assert r["status"].startswith("missing:") and "fedvi[experiments]" in r["status"]
        assert r["ari"] is None
    err = capsys.readouterr().err
    assert "comparator stepmix: missing" in err and "comparator kmodes: missing" in err
    assert "missing: stepmix not installed" in (tmp_path / "comparison.md").read_text()


def test_failing_comparator_becomes_an_error_row(easy, monkeypatch):
    sites, truth = easy

    def boom(problem):
        raise RuntimeError("no convergence")

    monkeypatch.setitem(compare.FITTERS, "kfed", boom)
    rs = {
        r.method: r
        for r in compare.compare(cfg_for(), sites, truth, None, ["kfed", "merdel_central"])
    }
    assert rs["kfed"].status == "error: RuntimeError: no convergence"
    assert rs["merdel_central"].status == "ok"


def test_without_truth_k_comes_from_the_config_or_the_method_is_skipped(easy):
    sites, _ = easy
    [r] = compare.compare(cfg_for(), sites, None, None, ["kfed"])
    assert r.status.startswith("skipped") and r.ari is None
    [r] = compare.compare(cfg_for(data={"n_clusters": 3}), sites, None, None, ["kfed"])
    assert r.status == "ok" and r.k_found == 3 and r.ari is None


def test_truth_must_match_the_rows(easy):
    sites, truth = easy
    with pytest.raises(ValueError, match="labels for"):
        compare.compare(cfg_for(), sites, [truth[0]], None, ["merdel_central"])


def test_figures_are_written(easy, tmp_path):
    sites, truth = easy
    cfg = {**cfg_for(), "plots": True}
    compare.run_comparators(cfg, sites, truth, None, str(tmp_path), methods=["merdel_central"])
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "comparison_profiles.png").stat().st_size > 0


def test_one_hot_and_matched_order():
    X = np.array([[0, 2], [1, 0]])
    E = compare.one_hot(X, "categorical", [2, 3])
    np.testing.assert_array_equal(E, [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0]])
    truth = np.array([0, 0, 1, 1, 2])
    labels = np.array([7, 7, 3, 3, 5])
    assert compare.matched_order(truth, labels).tolist() == [7, 3, 5]


def test_same_config_same_numbers(easy):
    sites, truth = easy
    methods = ["fedmerdel_core", "merdel_central", "kfed"]
    first = compare.compare(cfg_for(), sites, truth, None, methods)
    again = compare.compare(cfg_for(), sites, truth, None, methods)
    for a, b in zip(first, again, strict=True):
        assert (a.method, a.k_found, a.ari, a.nmi) == (b.method, b.k_found, b.ari, b.nmi)
        np.testing.assert_array_equal(a.labels, b.labels)
