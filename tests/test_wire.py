"""What a site sends holds no rows: the site client's ``fit`` called directly with the rounds
the strategy sends (the protocol of :mod:`fedvi.protocol`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from flower_local import site_client  # noqa: E402

import fedvi  # noqa: E402
from fedvi.federated import shared_spec  # noqa: E402
from fedvi.io import read_labels
from fedvi.label_files import latest_labels  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.protocol import decode_summaries, encode_request  # noqa: E402
from fedvi.simulate import simulate  # noqa: E402


def _site(tmp_path, X, pid=0, policy=None):
    """A site whose own policy names its file and output folder (``tmp_path/labels``)."""
    path = tmp_path / f"site{pid}.npy"
    np.save(path, X)
    return site_client(pid, path, tmp_path, policy)


def _ask(client, phase, spec, posterior=None, server=None):
    arrays, config = encode_request(
        phase, spec, FitOptions(), server or ServerOptions(), 5, posterior=posterior
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
    client = _site(tmp_path, X, pid=2)
    spec, _ = shared_spec([X], fedvi.MixtureSpec(n_components=8))
    arrays, n, metrics = _ask(client, "local", spec)
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
        client = _site(tmp_path, X)
        arrays, n, metrics = _ask(client, "local", spec)
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
    client = _site(tmp_path, X, policy=fedvi.SitePolicy(dp_epsilon=None))
    spec, _ = shared_spec([X], fedvi.MixtureSpec(n_components=8))
    arrays, _, metrics = _ask(client, "local", spec)
    post = fedvi.global_merge([decode_summaries(arrays, metrics, "summaries")]).posterior
    (counts,), n, label_metrics = _ask(
        client, "label", post.spec, posterior=post, server=ServerOptions(min_cluster_size=150)
    )
    labels = read_labels(latest_labels(tmp_path / "labels", 0))
    assert counts.shape == (post.n_clusters,)
    np.testing.assert_array_equal(labels, fedvi.label_rows(fedvi.encode(X, post.spec), post))
    true_counts = np.bincount(labels, minlength=post.n_clusters)
    # Counts under the disclosure floor are suppressed (-1), the others are exact.
    big = true_counts >= 150
    np.testing.assert_array_equal(counts[big], true_counts[big])
    assert (counts[(true_counts > 0) & ~big] == -1).all()
    assert label_metrics["label.n_suppressed"] == int(((true_counts > 0) & ~big).sum())


def test_each_run_writes_its_own_label_file_named_in_its_reply(tmp_path):
    from fedvi.label_files import model_hash
    from fedvi.model import FittedModel, load_model

    X = _well_separated(300)
    spec, _ = shared_spec([X], fedvi.MixtureSpec(n_components=8))
    client = _site(tmp_path, X)
    arrays, _, metrics = _ask(client, "local", spec)
    post = fedvi.global_merge([decode_summaries(arrays, metrics, "summaries")]).posterior
    names = []
    for run_id in (101, 102):
        client.run_id = run_id
        _, _, reply = _ask(client, "label", post.spec, posterior=post)
        names.append(reply["label.file"])
    digest = model_hash(post)
    assert names == [
        f"labels_site0_run101_{digest[:8]}.csv",
        f"labels_site0_run102_{digest[:8]}.csv",
    ]
    first = tmp_path / "labels" / names[0]
    text = first.read_text().splitlines()
    # 1-based data rows, the model's hash in every row; the second run left the first's file.
    assert text[0] == "row,cluster,model" and text[1].startswith("1,") and text[1].endswith(digest)
    assert text[-1].startswith(f"{len(X)},") and (tmp_path / "labels" / names[1]).exists()
    # The run's model.npz has the same hash as the posterior the site received.
    saved = load_model(FittedModel(post, (0,)).save(tmp_path / "model.npz"))
    assert model_hash(saved.posterior) == digest


def test_refinement_moves_travel_and_their_secure_sum_decodes():
    """A refine request with moves (pairs, split ids, a delete trial) survives the wire, and the
    sites' replies (statistics, pair entropies, second moments, the trial's statistics), summed
    as SecAgg+ sums them, decode as the sum of the replies."""
    from fedvi import secagg
    from fedvi.protocol import (
        Phase,
        RefineMoves,
        Request,
        decode_refine_reply,
        decode_reply,
        decode_request,
        encode_reply,
        encode_request_of,
    )
    from fedvi.site_agent import SiteAgent

    d = simulate(600, 3, 30, seed=0)
    tables = [d.X[:300], d.X[300:]]
    post = fedvi.federated_fit(tables, n_components=6, refine_rounds=0).model.posterior
    assert post.n_clusters >= 3
    moves = RefineMoves([[0, 1], [1, 2]], [0], (post.subset([0, 1]),))
    server = ServerOptions(refine_splits=1)
    req = Request(Phase.REFINE, post.spec, FitOptions(), server, 0, posterior=post, moves=moves)
    got = decode_request(*encode_request_of(req))
    np.testing.assert_array_equal(got.moves.pairs, moves.pairs)
    np.testing.assert_array_equal(got.moves.splits, moves.splits)
    np.testing.assert_array_equal(got.moves.trials[0].counts, post.counts[:2])
    # Sites that agreed this model in a local fit of the run (their gate refuses a refine
    # request otherwise), opted out of noise (moves need exact sums).
    agents = [SiteAgent(b, X, fedvi.SitePolicy(dp_epsilon=None)) for b, X in enumerate(tables)]
    for agent in agents:
        for phase in (Phase.PREFLIGHT, Phase.LOCAL):
            agent.handle(Request(phase, post.spec, FitOptions(), server, 0))
    replies = [agent.handle(got) for agent in agents]
    assert replies[0].second.shape == (1, 30, 30) and len(replies[0].trials) == 1
    wire = [encode_reply(r) for r in replies]
    one = decode_reply(Phase.REFINE, 0, wire[0][0], wire[0][1], req, 300)
    np.testing.assert_array_equal(one.pair_entropy, replies[0].pair_entropy)
    np.testing.assert_array_equal(one.trials[0].sums, replies[0].trials[0].sums)
    scale = secagg.secagg_scale(300 * np.log(post.n_clusters) + 1)
    limbs = [secagg.encode_limbs(a, scale) for a, _ in wire]
    averaged = [(x + y) / 2 for x, y in zip(*limbs, strict=True)]  # what SecAgg+ hands over
    total = decode_refine_reply(secagg.decode_limbs(averaged, 2, scale), req, 600)
    tol = dict(rtol=0, atol=1e-9)
    np.testing.assert_allclose(total.stats.counts, sum(r.stats.counts for r in replies), **tol)
    np.testing.assert_allclose(total.pair_entropy, sum(r.pair_entropy for r in replies), **tol)
    np.testing.assert_allclose(total.second, sum(r.second for r in replies), **tol)
    np.testing.assert_allclose(
        total.trials[0].entropy, sum(r.trials[0].entropy for r in replies), **tol
    )
    # A request asking for more than the run's settings allow is refused by the site.
    greedy = dataclasses.replace(req, moves=RefineMoves(moves.pairs, [0, 1], ()))
    with pytest.raises(fedvi.PolicyRefusal, match="refine-moves"):
        agents[0].handle(greedy)
