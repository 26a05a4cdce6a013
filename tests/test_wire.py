"""What a site sends holds no rows: the NumPyClient's ``fit`` called directly (SPEC §5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("flwr")

import fedvi  # noqa: E402
from fedvi.federated import site_seed  # noqa: E402
from fedvi.flower_client import FedviClient, posterior_config  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.simulate import simulate  # noqa: E402
from strategies.fedmerdel import FedMerDel  # noqa: E402

MODEL = {"likelihood": "bernoulli", "n_levels": None, "alpha0": 0.01, "beta": None}


def _site(tmp_path, X, pid=0) -> tuple[FedviClient, dict]:
    path = tmp_path / f"site{pid}.npy"
    np.save(path, X)
    strategy = FedMerDel(n_sites=1, model=MODEL, n_components=8, seed=5, output_dir=str(tmp_path))
    config = strategy.base_config("local")
    config["data_paths"] = json.dumps([str(path)] * (pid + 1))
    return FedviClient({"partition-id": pid}, state=None), config


def _well_separated(n_rows: int, seed: int = 0) -> np.ndarray:
    """Three clusters whose profiles are far apart, so every N finds the same three."""
    rng = np.random.default_rng(seed)
    theta = np.array([[0.9] * 10 + [0.1] * 20, [0.1] * 10 + [0.9] * 10 + [0.1] * 10])
    theta = np.vstack([theta, [0.1] * 20 + [0.9] * 10])
    z = rng.integers(0, 3, n_rows)
    return (rng.random((n_rows, 30)) < theta[z]).astype(np.int8)


def test_uplink_is_exactly_the_summaries(tmp_path):
    X = simulate(500, 3, 25, seed=1).X
    client, config = _site(tmp_path, X, pid=2)
    arrays, n, metrics = client.fit([], config)
    spec = fedvi.shared_spec([X], "bernoulli")
    ref = fedvi.fit_site(X, spec, 8, seed=site_seed(5, 2), options=fedvi.FitOptions())
    expected = ref.summaries.to_arrays()
    assert n == 500
    assert len(arrays) == len(expected)
    for a, e in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(a, e)
    # Metrics: the summaries' metadata plus scalars (timings, ids); nothing per row.
    for key, value in ref.summaries.metadata().items():
        assert metrics[key] == value
    assert all(isinstance(v, (bool, int, float, str)) for v in metrics.values())
    assert set(metrics) - set(ref.summaries.metadata()) <= {
        "partition_id",
        "phase",
        "seconds",
        "load_seconds",
        "n_clusters",
        "n_iter",
    }


def test_uplink_size_does_not_depend_on_rows(tmp_path):
    small, big = _well_separated(300), _well_separated(3000, seed=1)
    out = []
    for X in (small, big):
        client, config = _site(tmp_path, X)
        arrays, n, metrics = client.fit([], config)
        assert n == len(X)
        out.append((arrays, metrics))
    (a_small, m_small), (a_big, m_big) = out
    assert m_small["n_clusters"] == m_big["n_clusters"] == 3
    assert [a.shape for a in a_small] == [a.shape for a in a_big]
    assert sum(a.nbytes for a in a_small) == sum(a.nbytes for a in a_big)
    assert all(len(a) != len(big) for a in a_big)


def test_label_phase_writes_rows_locally_and_sends_counts(tmp_path):
    X = _well_separated(400)
    client, config = _site(tmp_path, X)
    arrays, _, metrics = client.fit([], config)
    post = fedvi.global_merge([fedvi.Summaries.from_arrays(arrays, metrics)]).posterior
    label_config = {
        **config,
        "phase": "label",
        "label_mode": "posterior",
        "min_cluster_size": 150,
        **posterior_config(post),
    }
    counts, n, label_metrics = client.fit(post.to_arrays(), label_config)
    labels = read_labels(tmp_path / "labels_site0.csv")
    assert len(counts) == 1 and counts[0].shape == (post.n_clusters,)
    np.testing.assert_array_equal(labels, fedvi.label_rows(fedvi.encode(X, "bernoulli"), post))
    true_counts = np.bincount(labels, minlength=post.n_clusters)
    shown = counts[0]
    # Counts under the disclosure threshold are suppressed (-1), the others are exact.
    np.testing.assert_array_equal(shown[true_counts >= 150], true_counts[true_counts >= 150])
    assert (shown[(true_counts > 0) & (true_counts < 150)] == -1).all()
    assert label_metrics["labels_path"].endswith("labels_site0.csv")


def test_unreadable_file_names_site_and_file(tmp_path):
    client, config = _site(tmp_path, _well_separated(50))
    bad = tmp_path / "broken.csv"
    bad.write_text("a,b,c\n0,1,0\n1,yes,0\n")
    config["data_paths"] = json.dumps([str(bad)])
    with pytest.raises(RuntimeError, match=r"site 0 .*broken\.csv.*row 2.*'b'.*'yes'"):
        client.fit([], config)
