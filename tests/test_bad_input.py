"""Bad input gets a clear error that names the problem: one case per row of each table.

One numbering convention everywhere: a row is the 1-based data row, a column its name and
1-based position (``column 'b' (#2)``) or its position alone for unnamed arrays (``column #2``).
The readers' own table (files) is in tests/test_io.py; the Flower layer's in
tests/test_privacy.py and tests/test_strategy.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import fedvi
from fedvi.simulate import simulate

GOOD = (np.random.default_rng(0).random((30, 4)) < 0.5).astype(np.int8)

BERNOULLI_CASES = [
    (np.array([[0, 1], [2, 0]]), r"binary.*row 2, column #1: value 2\b"),
    (
        np.array([[0.0, 1.0], [np.nan, 0.0]]),
        r"row 2, column #1: missing value; pass missing='ignore'",
    ),
    (np.array([[0.0, np.inf], [1.0, 0.0]]), r"row 1, column #2: value inf is not an integer code"),
    (np.array([[0.0, 1e300], [1.0, 0.0]]), r"binary.*row 1, column #2: value 1e\+300"),
    (np.array([[0.0, 0.5], [1.0, 0.0]]), r"row 1, column #2: value 0.5 is not an integer code"),
    (np.zeros((0, 3)), r"empty"),
    (np.zeros((5, 0)), r"empty"),
    (np.array([[1, 0, 1]]), r"1 rows; at least 2"),
    (np.array([0, 1, 1]), r"2-D"),
    (np.array([["a", "b"], ["c", "d"]]), r"must hold numbers"),
    (sp.csr_matrix(np.array([[0, 3], [1, 0]])), r"binary.*row 1, column #2: value 3.0"),
    (
        pd.DataFrame({"a": [0, 1, 1], "b": [1, 0, 2]}),
        r"binary.*row 3, column 'b' \(#2\): value 2\b",
    ),
    (pd.DataFrame({"a": [0, 1], "b": ["yes", "no"]}), r"column 'b' \(#2\) holds .* values"),
    (pd.DataFrame({"a": [], "b": []}), r"empty: shape \(0, 2\)"),
]


@pytest.mark.parametrize(("X", "message"), BERNOULLI_CASES)
def test_bernoulli_bad_input(X, message):
    with pytest.raises(fedvi.DataError, match=message):
        fedvi.MixtureVI().fit(X)


CATEGORICAL_CASES = [
    (np.array([[0, -1], [1, 2]]), {}, r"row 1, column #2: negative category code -1"),
    (np.array([[0, 1.5], [1, 2]]), {}, r"row 1, column #2: value 1.5 is not an integer code"),
    (np.array([[0, 3], [1, 2]]), {"n_levels": 3}, r"row 1, column #2: category code 3 .*3 levels"),
    (
        np.array([[0, 1], [1, 2]]),
        {"n_levels": [2, 3, 4]},
        r"X has 2 columns but the model expects 3",
    ),
    (sp.csr_matrix(np.eye(3)), {}, r"sparse input is supported for likelihood='bernoulli' only"),
    (
        np.array([[0, 1], [1, 10**9]]),
        {},
        r"row 2, column #2: category code too large 1000000000",
    ),
    (
        np.array([[0, 1], [1, 5000]]),
        {},
        r"row 2, column #2: code 5000 would make 5001 levels.*pass n_levels",
    ),
    (np.array([[0.0, 1e300], [1.0, 0.0]]), {}, r"category code too large 1e\+300"),
]


@pytest.mark.parametrize(("X", "kwargs", "message"), CATEGORICAL_CASES)
def test_categorical_bad_input(X, kwargs, message):
    with pytest.raises(fedvi.DataError, match=message):
        fedvi.MixtureVI("categorical", **kwargs).fit(X)


# -- parameters: checked once (by the settings dataclasses) at every entry point ----------
PARAMETER_CASES = [
    ({"n_components": 0}, r"n_components=0 is not allowed: expected an integer >= 1"),
    ({"n_components": 2.5}, r"n_components=2.5 is not allowed: expected an integer"),
    ({"n_components": True}, r"n_components=True is not allowed"),
    ({"alpha0": -1}, r"alpha0=-1 is not allowed: expected a number > 0"),
    ({"alpha0": float("nan")}, r"alpha0=nan is not allowed"),
    ({"beta": 0}, r"beta=0 is not allowed: expected None or a number > 0"),
    ({"likelihood": "gaussian"}, r"likelihood='gaussian' is not allowed: expected one of"),
    ({"moves": "sometimes"}, r"moves='sometimes' is not allowed: expected one of 'merdel'"),
    ({"max_iter": 0}, r"max_iter=0 is not allowed"),
    ({"tol": 0}, r"tol=0 is not allowed: expected a number > 0"),
    ({"relevance_prior": (2, -1)}, r"relevance_prior=\(2, -1\) is not allowed"),
    ({"n_levels": 1}, r"n_levels=1 is not allowed"),
    ({"missing": "drop"}, r"missing='drop' is not allowed: expected one of 'error', 'ignore'"),
    ({"backend": "jax"}, r"backend='jax' is not allowed"),
    ({"device": "gpu"}, r"device='gpu' is not allowed"),
]
#: A misspelt name: the estimator's signature is explicit, so Python names it; federated_fit
#: (``**params``) lists the allowed ones.
MISSPELT = {"n_compnents": 5}

SERVER_CASES = [
    ({"min_cluster_size": -1}, r"min_cluster_size=-1 is not allowed: expected an integer >= 1"),
    ({"refine_rounds": -2}, r"refine_rounds=-2 is not allowed: expected an integer >= 0"),
    ({"merge_mode": "greedy"}, r"merge_mode='greedy' is not allowed"),
    ({"label_mode": "hard"}, r"label_mode='hard' is not allowed"),
    ({"dp_epsilon": 0}, r"dp_epsilon=0 is not allowed"),
    ({"dp_delta": 1.5}, r"dp_delta=1.5 is not allowed"),
    ({"merge": "paper"}, r"unknown parameter.*'merge'"),
]


@pytest.mark.parametrize(
    ("params", "message"),
    [*PARAMETER_CASES, (MISSPELT, r"unexpected keyword argument 'n_compnents'")],
)
def test_estimator_rejects_bad_parameters(params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fedvi.MixtureVI(**params).fit(GOOD)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        *PARAMETER_CASES,
        *SERVER_CASES,
        (MISSPELT, r"unknown parameter.*'n_compnents'.*allowed"),
    ],
)
def test_federated_fit_rejects_bad_parameters(params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fedvi.federated_fit([GOOD, GOOD], **params)


def test_predict_checks_the_table():
    m = fedvi.MixtureVI(seed=0).fit(GOOD)
    with pytest.raises(fedvi.DataError, match="has 3 columns but the model expects 4"):
        m.predict(GOOD[:, :3])
    with pytest.raises(RuntimeError, match="not fitted"):
        fedvi.MixtureVI().predict(GOOD)


# -- several sites -----------------------------------------------------------------------
def test_federated_site_list_errors():
    with pytest.raises(TypeError, match=r"one table per site, got a single ndarray; pass \[X\]"):
        fedvi.federated_fit(GOOD)
    with pytest.raises(TypeError, match=r"single DataFrame"):
        fedvi.federated_fit(pd.DataFrame(GOOD))
    with pytest.raises(ValueError, match="at least one site"):
        fedvi.federated_fit([])
    # A site with another schema is left out and named (the same rule on Flower); with every
    # site required, the run stops there.
    with pytest.raises(
        fedvi.SiteFailureError,
        match=r"only 1 of 2 sites.*site 1: schema differs from the reference: 3 variables "
        r"instead of 4",
    ):
        fedvi.federated_fit([GOOD, GOOD[:, :3]])
    with pytest.raises(fedvi.DataError, match=r"X in site 1 must be binary.*value 2"):
        fedvi.federated_fit([GOOD, GOOD + 1])
    with pytest.raises(
        fedvi.SiteFailureError, match=r"site 1: refused by the site's policy \(min-cluster-size\)"
    ):
        fedvi.federated_fit([GOOD, GOOD[:3]])


def _frames(seed=3):
    d = simulate(1500, 3, 12, seed=seed)
    names = [f"cond_{j}" for j in range(12)]
    return [pd.DataFrame(d.X[i::3], columns=names) for i in range(3)], d


def test_dataframe_columns_are_matched_by_name_across_sites():
    """Sites whose columns come in another order give the same fit as aligned ones (before,
    they were silently mis-aligned: K 4 instead of 3)."""
    frames, _ = _frames()
    shuffled = [frames[0], frames[1][frames[1].columns[::-1]], frames[2]]
    ref = fedvi.federated_fit(frames, n_components=8, seed=0)
    got = fedvi.federated_fit(shuffled, n_components=8, seed=0)
    assert got.n_clusters == ref.n_clusters
    assert got.elbo == pytest.approx(ref.elbo, rel=1e-12)
    for a, b in zip(ref.labels, got.labels, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got.spec.feature_names == tuple(frames[0].columns)


def test_different_variable_sets_are_named():
    frames, _ = _frames()
    frames[2] = frames[2].rename(columns={"cond_3": "cond_x"})
    with pytest.raises(
        fedvi.SiteFailureError,
        match=r"site 2: schema differs from the reference: variables #\[4\] renamed",
    ):
        fedvi.federated_fit(frames, n_components=8)
    # With min_sites, the run goes on without it and names it.
    got = fedvi.federated_fit(frames, n_components=8, min_sites=2)
    assert got.status == "completed_with_failures" and len(got.labels) == 2
    assert [(f["site"], f["cause"]) for f in got.failures] == [(2, "schema")]


def test_predict_matches_columns_by_name():
    frames, _ = _frames()
    X = pd.concat(frames, ignore_index=True)
    m = fedvi.MixtureVI(n_components=8, seed=0).fit(X)
    reordered = X[list(X.columns[::-1])]
    np.testing.assert_array_equal(m.predict(reordered), m.labels_)
    with pytest.raises(fedvi.DataError, match=r"missing \['cond_0'\]"):
        m.predict(X.drop(columns=["cond_0"]))


def test_global_merge_refuses_mismatched_sites():
    a = fedvi.MixtureVI(seed=0).fit(GOOD).summaries()
    b = fedvi.MixtureVI(seed=0, alpha0=0.5).fit(GOOD).summaries()
    c = fedvi.MixtureVI("categorical", seed=0).fit(GOOD).summaries()
    with pytest.raises(fedvi.SchemaMismatchError, match="site 1 used a different model"):
        fedvi.global_merge([a, b])
    with pytest.raises(fedvi.SchemaMismatchError, match="site 1 has a different data schema"):
        fedvi.global_merge([a, c])


# -- the other entry points: a config (the strategy's) and the wire (the site's) -------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_components=0", r"n_components=0 is not allowed"),
        ("strategy.refine_rounds=-2", r"refine_rounds=-2 is not allowed"),
        ("strategy.min_cluster_size=0", r"min_cluster_size=0 is not allowed"),
        ("site.max_components=0", r"max_components=0 is not allowed"),
        ("federation.site_ids=[1,1]", r"site_ids=\[1, 1\] is not allowed"),
        ("seed=1.5", r"seed=1.5 is not allowed"),
    ],
)
def test_config_values_are_checked_by_the_dataclasses(override, message):
    pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
    from strategies.config import RunSettings, compose_config

    with pytest.raises(ValueError, match=message):
        RunSettings.from_cfg(compose_config("config", [override]))


def test_a_scalar_n_levels_in_the_config_is_one_level_count_per_variable():
    pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
    from strategies.config import RunSettings, compose_config

    s = RunSettings.from_cfg(compose_config("config", ["model=categorical", "model.n_levels=3"]))
    X = np.random.default_rng(1).integers(0, 3, size=(200, 4))
    m = fedvi.MixtureVI(**{**s.spec.to_dict(), "n_components": 4}).fit(X)
    assert m.spec_.n_levels == (3, 3, 3, 3)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.n_components", 0, r"invalid request: n_components=0 is not allowed"),
        ("fit.moves", "sometimes", r"invalid request: moves='sometimes' is not allowed"),
        ("server.min_cluster_size", -1, r"invalid request: min_cluster_size=-1 is not allowed"),
        ("model.bogus", 1, r"invalid request: unknown setting 'model.bogus'"),
        ("fedvi.phase", "exfiltrate", r"phase unknown: invalid request: unknown phase"),
    ],
)
def test_the_site_checks_every_value_it_receives(tmp_path, key, value, message):
    pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
    from fedvi.flower.client import FedviClient
    from fedvi.protocol import SiteError, encode_request

    np.save(tmp_path / "x.npy", GOOD)
    client = FedviClient({"partition-id": 0, "data-path": str(tmp_path / "x.npy")})
    arrays, config = encode_request(
        "local", fedvi.MixtureSpec(), fedvi.FitOptions(), fedvi.ServerOptions(), 0
    )
    config[key] = value
    with pytest.raises(SiteError, match=message):
        client.fit(arrays, config)
