"""The core's public surface: one version, the estimator's signature (every model and fit
setting as a real keyword), ``fit_predict``, and cross-field checks raising InvalidSetting."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import fedvi
from fedvi.options import FitOptions, ServerOptions
from fedvi.settings import Interval, InvalidSetting, field_names, setting
from fedvi.simulate import simulate
from fedvi.spec import MixtureSpec

ROOT = Path(__file__).resolve().parents[1]


# -- one version -----------------------------------------------------------------------------
def test_version_is_the_installed_distributions():
    """pyproject.toml is the only place the version is written, so the installed metadata
    says the same (a stale install, e.g. an editable install made before the version changed,
    fails here: reinstall with ``pip install -e .``)."""
    try:
        installed = importlib.metadata.version("fedvi")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fedvi is not installed (imported from a checkout on PYTHONPATH)")
    assert fedvi.__version__ == installed


def test_the_version_is_written_once_in_pyproject():
    """Flower's app configuration needs a static ``[project] version``: it is the one place,
    and fedvi/_version.py reads it (no second, hand-written version in the package)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["version"] == fedvi.__version__
    assert "version" not in meta["project"].get("dynamic", [])
    assert not re.search(r"\d+\.\d+\.\d+", (ROOT / "fedvi" / "_version.py").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", fedvi.__version__)


# -- the estimator's signature ---------------------------------------------------------------
def missing_from_signature(estimator, *groups) -> list[str]:
    """Fields of the settings dataclasses ``groups`` that are not keyword parameters of
    ``estimator`` with the field's default (or whose default differs), by name."""
    params = inspect.signature(estimator).parameters
    missing = []
    for cls in groups:
        for f in dataclasses.fields(cls):
            p = params.get(f.name)
            if p is None or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                missing.append(f.name)
            elif p.default != f.default:
                missing.append(f"{f.name} (default {p.default!r}, field says {f.default!r})")
    return missing


def test_signature_lists_every_model_and_fit_parameter():
    sig = inspect.signature(fedvi.MixtureVI)
    assert missing_from_signature(fedvi.MixtureVI, MixtureSpec, FitOptions) == []
    expected = [*field_names(MixtureSpec), *field_names(FitOptions), "seed"]
    assert list(sig.parameters) == expected  # and nothing else (no **params)
    kinds = {name: p.kind for name, p in sig.parameters.items()}
    assert kinds.pop("likelihood") == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}
    assert sig.parameters["seed"].default == 0
    # The docstring is generated from the same fields: one entry per parameter.
    for name in expected:
        assert re.search(rf"^\s*{name} : ", fedvi.MixtureVI.__doc__, re.M), name


def test_a_new_field_missing_from_the_signature_is_caught():
    """A field added to a settings dataclass but not to ``MixtureVI.__init__`` fails the check
    above (which reads the dataclasses, not a copy of their fields)."""

    @dataclasses.dataclass(frozen=True)
    class WithNewField(FitOptions):
        warm_start: int = setting(0, "a new setting", Interval(int, 0))

    assert missing_from_signature(fedvi.MixtureVI, MixtureSpec, WithNewField) == ["warm_start"]

    @dataclasses.dataclass(frozen=True)
    class NewDefault(FitOptions):
        max_iter: int = setting(50, "a changed default", Interval(int, 1))

    (problem,) = missing_from_signature(fedvi.MixtureVI, MixtureSpec, NewDefault)
    assert problem.startswith("max_iter (default 1000")


def test_parameters_are_checked_by_the_dataclasses_at_fit():
    X = simulate(200, 2, 6, seed=0).X
    with pytest.raises(InvalidSetting, match=r"MixtureVI: unknown parameter|n_components=0"):
        fedvi.MixtureVI(n_components=0).fit(X)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_compnents'"):
        fedvi.MixtureVI(n_compnents=5)
    with pytest.raises(TypeError, match="positional"):
        fedvi.MixtureVI("bernoulli", 5)  # only likelihood may be positional
    m = fedvi.MixtureVI("categorical", n_levels=3).set_params(max_iter=7)
    assert m.get_params()["max_iter"] == 7 and m.likelihood == "categorical"
    assert repr(m) == "MixtureVI(likelihood='categorical', n_levels=3, max_iter=7)"


def test_fit_predict_returns_the_training_labels():
    d = simulate(600, 3, 20, seed=4)
    labels = fedvi.MixtureVI(n_components=6, seed=1).fit_predict(d.X)
    ref = fedvi.MixtureVI(n_components=6, seed=1).fit(d.X)
    assert labels.shape == (600,)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_array_equal(labels, ref.predict(d.X))  # well separated: same as MAP


# -- cross-field checks ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MixtureSpec(n_levels=3), r"n_levels=3 is not allowed with likelihood='bernoulli'"),
        (
            lambda: MixtureSpec("categorical", n_levels=(3, 3), feature_names=("a", "b", "c")),
            "3 feature_names for 2 n_levels",
        ),
        (lambda: FitOptions(device="cuda"), "backend='numpy' runs on the CPU only"),
        (lambda: ServerOptions(label_mode="map"), "label_mode='map' labels rows through"),
    ],
)
def test_cross_field_checks_raise_invalid_setting(make, message):
    with pytest.raises(InvalidSetting, match=message):
        make()


# -- the README's core example ---------------------------------------------------------------
def test_the_readmes_python_example_runs(tmp_path, monkeypatch):
    """The front door's example, on small stand-ins for the tables it names."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    d = simulate(1200, 3, 20, seed=0)
    parts = np.array_split(np.random.default_rng(0).permutation(1200), 4)
    names = {
        "X": d.X,
        "X_new": d.X[:10],
        "X_cat": simulate(600, 3, 10, likelihood="categorical", n_levels=3, seed=1).X,
        **{f"X_site{i + 1}": d.X[p] for i, p in enumerate(parts)},
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), names)  # noqa: S102 - our own README
    assert names["later"].model.site_ids == (0, 1, 2, 3)
    assert (tmp_path / "model.npz").exists()
