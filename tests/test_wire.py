"""What a site sends holds no rows: the site client's ``fit`` called directly with the rounds
the strategy sends (the protocol of :mod:`fedvi.protocol`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from flower_local import site_client  # noqa: E402

import fedvi  # noqa: E402
from fedvi.federated import shared_spec  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.protocol import decode_summaries, encode_request  # noqa: E402
from fedvi.simulate import simulate  # noqa: E402


def _site(tmp_path, X, pid=0, policy=None):
    path = tmp_path / f"site{pid}.npy"
    np.save(path, X)
    client = site_client(pid, policy=policy)
    sim = {"sim.data_paths": [str(path)] * (pid + 1), "sim.output_dir": str(tmp_path)}
    return client, sim


def _ask(client, phase, spec, sim, posterior=None, server=None):
    arrays, config = encode_request(
        phase,
        spec,
        FitOptions(),
        server or ServerOptions(),
        5,
        posterior=posterior,
        sim_paths=sim,
    )
    return client.fit(arrays, config)


def _well_separated(n_rows: int, seed: int = 0) -> np.ndarray:
    """Three clusters whose profiles are far apart, so every N finds the same three."""
    rng = np.random.default_rng(seed)
    theta = np.array([[0.9] * 10 + [0.1] * 20, [0.1] * 10 + [0.9] * 10 + [0.1] * 10])
    theta = np.vstack([theta, [0.1] * 20 + [0.9] * 10])
    z = rng.integers(0, 3, n_rows)
    return (rng.random((n_rows, 30)) < theta[z]).astype(np.int8)


def test_uplink_is_exactly_the_summaries(tmp_path):
    X = simulate(500, 3, 25, seed=1).X
    client, sim = _site(tmp_path, X, pid=2)
    spec, _ = shared_spec([X], fedvi.MixtureSpec(n_components=8))
    arrays, n, metrics = _ask(client, "local", spec, sim)
    ref = fedvi.fit_site(X, spec, seed=5 + 2)
    expected = ref.summaries.to_arrays()
    assert n == 500 and len(arrays) == len(expected)
    for a, e in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(a, e)
    got = decode_summaries(arrays, metrics, "summaries")
    assert got.spec == ref.summaries.spec and got.n_rows == 500
    # Metrics: scalars only; nothing per row.
    assert all(isinstance(v, (bool, int, float, str)) for v in metrics.values())
    assert metrics["fedvi.site"] == 2 and metrics["fedvi.phase"] == "local"


def test_uplink_size_does_not_depend_on_rows(tmp_path):
    small, big = _well_separated(300), _well_separated(3000, seed=1)
    spec, _ = shared_spec([small], fedvi.MixtureSpec(n_components=8))
    out = []
    for X in (small, big):
        client, sim = _site(tmp_path, X)
        arrays, n, metrics = _ask(client, "local", spec, sim)
        assert n == len(X)
        out.append((arrays, metrics))
    (a_small, m_small), (a_big, m_big) = out
    assert m_small["fit.n_clusters"] == m_big["fit.n_clusters"] == 3
    assert [a.shape for a in a_small] == [a.shape for a in a_big]
    assert sum(a.nbytes for a in a_small) == sum(a.nbytes for a in a_big)
    assert all(len(a) != len(big) for a in a_big)


def test_label_phase_writes_rows_locally_and_sends_counts(tmp_path):
    X = _well_separated(400)
    # Exact counts: the site opts out of DP noise (by default its counts are noisy).
    client, sim = _site(
        tmp_path, X, policy=fedvi.SitePolicy(allow_server_paths=True, dp_epsilon=None)
    )
    spec, _ = shared_spec([X], fedvi.MixtureSpec(n_components=8))
    arrays, _, metrics = _ask(client, "local", spec, sim)
    post = fedvi.global_merge([decode_summaries(arrays, metrics, "summaries")]).posterior
    (counts,), n, label_metrics = _ask(
        client, "label", post.spec, sim, posterior=post, server=ServerOptions(min_cluster_size=150)
    )
    labels = read_labels(tmp_path / "labels_site0.csv")
    assert counts.shape == (post.n_clusters,)
    np.testing.assert_array_equal(labels, fedvi.label_rows(fedvi.encode(X, post.spec), post))
    true_counts = np.bincount(labels, minlength=post.n_clusters)
    # Counts under the disclosure floor are suppressed (-1), the others are exact.
    big = true_counts >= 150
    np.testing.assert_array_equal(counts[big], true_counts[big])
    assert (counts[(true_counts > 0) & ~big] == -1).all()
    assert label_metrics["label.n_suppressed"] == int(((true_counts > 0) & ~big).sum())
