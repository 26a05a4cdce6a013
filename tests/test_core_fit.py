"""Single-site fitting: monotone ELBO, moves, sparse = dense, reproducibility, API."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import fedvi
from fedvi.data import encode
from fedvi.metrics import adjusted_rand_index
from fedvi.moves import MoveLog, MoveMemory, delete_move, merge_sweep
from fedvi.options import FitOptions
from fedvi.simulate import simulate
from fedvi.vi import Problem, initial_state, iterate, run_pass

# Relative slack for "never decreases": float64 round-off on ELBOs of ~1e5 nats.
MONO_TOL = 1e-10


def _monotone(history) -> bool:
    h = np.asarray(history)
    return bool(np.all(np.diff(h) >= -MONO_TOL * np.abs(h[1:])))


@pytest.fixture(scope="module")
def binary():
    return simulate(2000, 5, 40, weights=[0.4, 0.2, 0.2, 0.1, 0.1], seed=11)


@pytest.fixture(scope="module")
def categorical():
    return simulate(1500, 4, 30, likelihood="categorical", n_levels=4, seed=12)


@pytest.mark.parametrize("moves", ["merdel", "paper", "none"])
@pytest.mark.parametrize("selection", [False, True])
def test_elbo_never_decreases_binary(binary, moves, selection):
    m = fedvi.MixtureVI(moves=moves, variable_selection=selection, seed=0).fit(binary.X)
    assert len(m.elbo_history_) > 5
    assert _monotone(m.elbo_history_)


@pytest.mark.parametrize("selection", [False, True])
def test_elbo_never_decreases_categorical(categorical, selection):
    m = fedvi.MixtureVI("categorical", variable_selection=selection, seed=0).fit(categorical.X)
    assert _monotone(m.elbo_history_)


def _problem(X, K=12, likelihood="bernoulli"):
    spec = fedvi.MixtureSpec(likelihood, n_components=K)
    data = encode(X, spec)
    return Problem.build(data, spec.resolve(data.n_levels))


def _elbo_from_resp(problem, resp):
    """The ELBO of responsibilities ``resp (N, K)``, statistics computed here by hand."""
    X, _ = problem.data.design()
    X = X.toarray() if hasattr(X, "toarray") else X
    s = problem.summaries(
        resp.sum(axis=0), resp.T @ X, -(resp * np.log(np.maximum(resp, 1e-300))).sum(axis=0)
    )
    return fedvi.elbo(s)


def test_accepted_merge_raises_elbo_by_the_exact_amount(binary):
    """Split one true cluster in two: the merge must be accepted, raise the ELBO, and the new
    ELBO must equal the ELBO recomputed from the merged responsibilities."""
    problem = _problem(binary.X, K=6)
    labels = binary.z.copy()
    half = (labels == 0) & (np.arange(len(labels)) % 2 == 0)
    labels[half] = 5  # cluster 0 split in two halves: 0 and 5
    state = initial_state(problem, labels, 6)
    for _ in range(3):
        state = iterate(problem, state)
    log = MoveLog()
    new, n = merge_sweep(problem, state, MoveMemory(), log)
    assert n >= 1 and log.merge_accepted == n
    assert new.elbo > state.elbo
    resp = run_pass(problem, new.source, stats=False, resp=True).resp
    assert resp.shape == (len(labels), new.n_clusters)
    assert new.elbo == pytest.approx(_elbo_from_resp(problem, resp), rel=1e-12)
    assert new.n_clusters == state.n_clusters - n


def test_rejected_merge_leaves_state_unchanged(binary):
    """On the true partition no merge raises the ELBO, and the sweep returns the same state."""
    problem = _problem(binary.X, K=5)
    state = initial_state(problem, binary.z, 5)
    log = MoveLog()
    new, n = merge_sweep(problem, state, MoveMemory(), log)
    assert n == 0 and new is state


def test_accepted_delete_raises_elbo(binary):
    """A spurious cluster of 10 random rows is deleted, and the ELBO rises above the current
    model run for the same number of iterations."""
    problem = _problem(binary.X, K=6)
    labels = binary.z.copy()
    labels[np.random.default_rng(0).choice(len(labels), 10, replace=False)] = 5
    state = initial_state(problem, labels, 6)
    log = MoveLog()
    new, accepted = delete_move(problem, state, MoveMemory(), log, n_iters=3)
    baseline = state
    for _ in range(3):
        baseline = iterate(problem, baseline)
    assert accepted and log.delete_accepted == 1
    assert new.n_clusters == 5
    assert new.elbo > baseline.elbo > state.elbo


def test_moves_are_counted_and_empty_clusters_vanish(binary):
    m = fedvi.MixtureVI(n_components=20, seed=0).fit(binary.X)
    assert m.n_clusters_ == 5
    assert m.moves_["merge_accepted"] + m.moves_["delete_accepted"] > 0
    assert m.moves_["merge_tried"] >= m.moves_["merge_accepted"]
    assert m.moves_["delete_tried"] >= m.moves_["delete_accepted"]
    assert set(np.unique(m.labels_)) == set(range(m.n_clusters_))
    # D=40 Beta(1, 5) profiles overlap: 0.803 for seeds 0-4 here, the same partition each time.
    assert adjusted_rand_index(binary.z, m.labels_) > 0.78


def test_sparse_and_dense_give_the_same_fit(binary):
    dense = fedvi.MixtureVI(seed=3).fit(binary.X)
    sparse = fedvi.MixtureVI(seed=3).fit(sp.csr_matrix(binary.X))
    np.testing.assert_array_equal(dense.labels_, sparse.labels_)
    assert dense.elbo_ == pytest.approx(sparse.elbo_, rel=1e-10)
    np.testing.assert_allclose(dense.cluster_profiles_, sparse.cluster_profiles_, rtol=1e-8)


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical"])
def test_same_seed_same_result(binary, categorical, likelihood):
    X = binary.X if likelihood == "bernoulli" else categorical.X
    a = fedvi.MixtureVI(likelihood, seed=7).fit(X)
    b = fedvi.MixtureVI(likelihood, seed=7).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.elbo_history_, b.elbo_history_)


def test_predict_matches_training_labels(categorical):
    m = fedvi.MixtureVI("categorical", seed=0).fit(categorical.X)
    np.testing.assert_array_equal(m.predict(categorical.X), m.labels_)
    proba = m.predict_proba(categorical.X)
    assert proba.shape == (len(categorical.X), m.n_clusters_)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    # Dirichlet(1..4) profiles overlap: 0.822 for seeds 0-2, the same partition each time.
    assert adjusted_rand_index(categorical.z, m.labels_) > 0.8


def test_summaries_hold_no_rows(binary):
    m = fedvi.MixtureVI(seed=0).fit(binary.X)
    s = m.summaries()
    K, D = m.n_clusters_, binary.X.shape[1]
    assert [a.shape for a in s.to_arrays()] == [(K,), (K, D), (K,), (D,), (0,), (0,), (0,)]
    assert s.counts.sum() == pytest.approx(len(binary.X))
    np.testing.assert_allclose(s.sums.sum(axis=0), binary.X.sum(axis=0))
    assert fedvi.elbo(s) == pytest.approx(m.elbo_, rel=1e-12)
    back = fedvi.Summaries.from_arrays(s.to_arrays(), s.spec, s.n_rows, s.prior_dim)
    assert fedvi.elbo(back) == pytest.approx(m.elbo_, rel=1e-12)


def test_fit_options_paper_schedule_tries_one_merge_per_sweep(binary):
    paper = fedvi.MixtureVI(moves="paper", seed=0).fit(binary.X)
    n_sweeps = paper.n_iter_ // (paper.move_every + paper.delete_iters) + 1
    assert paper.moves_["merge_tried"] <= n_sweeps
    assert FitOptions(moves="paper").move_every == 5


def test_dataframe_columns_name_the_variables(binary):
    pd = pytest.importorskip("pandas", reason="pandas is not a dependency of fedvi")
    frame = pd.DataFrame(binary.X, columns=[f"cond_{d}" for d in range(binary.X.shape[1])])
    m = fedvi.MixtureVI(seed=0).fit(frame)
    assert m.spec_.feature_names[:2] == ("cond_0", "cond_1")
    np.testing.assert_array_equal(m.labels_, fedvi.MixtureVI(seed=0).fit(binary.X).labels_)
