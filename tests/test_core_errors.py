"""Bad input raises a clear error naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import fedvi

GOOD = (np.random.default_rng(0).random((30, 4)) < 0.5).astype(np.int8)


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (np.array([[0, 1], [2, 0]]), r"binary.*value 2 at row 1, column 0"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), r"NaN or inf.*row 1, column 0"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), r"NaN or inf.*row 0, column 1"),
        (np.zeros((0, 3)), r"empty"),
        (np.zeros((5, 0)), r"empty"),
        (np.array([[1, 0, 1]]), r"1 rows; at least 2"),
        (np.array([0, 1, 1]), r"2-D"),
        (np.array([["a", "b"], ["c", "d"]]), r"numeric"),
        (sp.csr_matrix(np.array([[0, 3], [1, 0]])), r"binary.*value 3.0 at row 0, column 1"),
    ],
)
def test_bernoulli_bad_input(X, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fedvi.MixtureVI().fit(X)


@pytest.mark.parametrize(
    ("X", "kwargs", "message"),
    [
        (np.array([[0, -1], [1, 2]]), {}, r"negative category code -1 at row 0, column 1"),
        (np.array([[0, 1.5], [1, 2]]), {}, r"integer category codes: value 1.5 at row 0"),
        (np.array([[0, 3], [1, 2]]), {"n_levels": 3}, r"code 3 at row 0, column 1.*3 levels"),
        (np.array([[0, 1], [1, 2]]), {"n_levels": [2, 3, 4]}, r"one entry per variable"),
        (sp.csr_matrix(np.eye(3)), {}, r"sparse input is supported for likelihood='bernoulli'"),
    ],
)
def test_categorical_bad_input(X, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fedvi.MixtureVI("categorical", **kwargs).fit(X)


def test_bad_parameters():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        fedvi.MixtureVI("gaussian").fit(GOOD)
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        fedvi.MixtureVI(n_components=0).fit(GOOD)
    with pytest.raises(ValueError, match="alpha0 must be > 0"):
        fedvi.MixtureVI(alpha0=-1).fit(GOOD)
    with pytest.raises(ValueError, match="moves must be one of"):
        fedvi.MixtureVI(moves="sometimes").fit(GOOD)


def test_predict_wrong_number_of_columns():
    m = fedvi.MixtureVI(seed=0).fit(GOOD)
    with pytest.raises(ValueError, match="has 3 columns but the model expects 4"):
        m.predict(GOOD[:, :3])
    with pytest.raises(RuntimeError, match="not fitted"):
        fedvi.MixtureVI().predict(GOOD)


def test_federated_mismatched_schemas():
    with pytest.raises(ValueError, match=r"mismatched schemas.*site 0: 4, site 1: 3"):
        fedvi.federated_fit([GOOD, GOOD[:, :3]])
    with pytest.raises(ValueError, match=r"X in site 1 must be binary.*value 2"):
        fedvi.federated_fit([GOOD, GOOD + 1])
    with pytest.raises(ValueError, match="at least one site"):
        fedvi.federated_fit([])


def test_federated_site_too_small():
    with pytest.raises(ValueError, match=r"X in site 1 has 3 rows; at least 5 are needed"):
        fedvi.federated_fit([GOOD, GOOD[:3]])


def test_global_merge_refuses_mismatched_sites():
    a = fedvi.MixtureVI(seed=0).fit(GOOD).summaries()
    b = fedvi.MixtureVI(seed=0, alpha0=0.5).fit(GOOD).summaries()
    c = fedvi.MixtureVI("categorical", seed=0).fit(GOOD).summaries()
    with pytest.raises(fedvi.SchemaMismatchError, match="site 1 used a different model"):
        fedvi.global_merge([a, b])
    with pytest.raises(fedvi.SchemaMismatchError, match="site 1 has a different data schema"):
        fedvi.global_merge([a, c])
