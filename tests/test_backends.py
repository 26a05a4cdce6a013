"""The torch backend (SPEC §9) gives the NumPy backend's results in float64."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import fedvi
from fedvi.simulate import simulate

torch = pytest.importorskip(
    "torch", reason="optional backend: pip install torch==2.13.0 (CPU build) to test it"
)


@pytest.mark.parametrize(
    ("likelihood", "sparse", "selection"),
    [("bernoulli", False, False), ("bernoulli", True, True), ("categorical", False, False)],
)
def test_torch_cpu_matches_numpy(likelihood, sparse, selection):
    data = simulate(1500, 4, 30, likelihood=likelihood, n_levels=3, n_irrelevant=5, seed=4)
    X = sp.csr_matrix(data.X) if sparse else data.X
    kw = dict(likelihood=likelihood, variable_selection=selection, seed=1)
    ref = fedvi.MixtureVI(**kw).fit(X)
    fast = fedvi.MixtureVI(**kw, backend="torch", device="cpu").fit(X)
    np.testing.assert_array_equal(ref.labels_, fast.labels_)
    assert len(ref.elbo_history_) == len(fast.elbo_history_)
    np.testing.assert_allclose(fast.elbo_history_, ref.elbo_history_, rtol=1e-8)
    np.testing.assert_allclose(fast.cluster_profiles_, ref.cluster_profiles_, rtol=1e-8, atol=1e-10)
    assert ref.moves_ == fast.moves_


def test_federated_fit_on_torch_matches_numpy():
    data = simulate(2000, 4, 30, seed=5)
    sites = [data.X[:700], data.X[700:1300], data.X[1300:]]
    ref = fedvi.federated_fit(sites, seed=0)
    fast = fedvi.federated_fit(sites, seed=0, backend="torch")
    assert fast.n_clusters == ref.n_clusters
    assert fast.elbo == pytest.approx(ref.elbo, rel=1e-8)
    for a, b in zip(ref.labels, fast.labels, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_backend_names_the_problem():
    with pytest.raises(ValueError, match="backend=.jax. is not allowed: expected one of"):
        fedvi.MixtureVI(backend="jax").fit(np.eye(4, dtype=int))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            fedvi.MixtureVI(backend="torch", device="cuda").fit(np.eye(4, dtype=int))
