"""``MixtureVI``: the single-site estimator (scikit-learn style).

Its parameters are the fields of :class:`fedvi.MixtureSpec` and :class:`fedvi.FitOptions` plus
``seed``; they are checked once, by those dataclasses, when ``fit`` is called. ``fit`` is
:func:`fedvi.site.fit_site` with the single-site settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import numpy as np

from fedvi.model import FittedModel
from fedvi.options import FitOptions
from fedvi.settings import field_names, numpydoc, split_options
from fedvi.site import fit_site
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import labels_of

#: The estimator's parameters: every model and fit setting, plus ``seed``.
PARAMS = (*field_names(MixtureSpec), *field_names(FitOptions), "seed")


class MixtureVI:
    __doc__ = f"""Over-fitted Bayesian mixture of Bernoulli or categorical variables, fitted by
    mean-field VI with merge/delete moves (MerDel). The number of clusters is learned.

    Parameters
    ----------
    likelihood : str, default "bernoulli"
        May be given positionally.
    seed : int or None, default 0
        Seed of the k-modes initialisation; the same seed gives the same fit.
{numpydoc(MixtureSpec, FitOptions, skip=("likelihood",))}

    Attributes
    ----------
    labels_ : (N,) cluster of each training row, ``0..n_clusters_-1`` by decreasing size.
    n_clusters_ : number of clusters found.
    elbo_, elbo_history_ : final ELBO and its value after each iteration and accepted move.
    n_iter_, converged_, moves_ : iterations run, convergence, moves tried/accepted.
    weights_ : (K,) posterior mean weights of the found clusters (renormalised).
    cluster_profiles_ : (K, P) posterior mean ``E[phi]`` (``P = D`` or ``sum L_d``).
    variable_relevance_ : (D,) ``c_d`` when ``variable_selection=True``.
    spec_ : the fitted :class:`fedvi.MixtureSpec` (levels and variable names resolved).
    model_ : the fitted :class:`fedvi.FittedModel` (``save``, ``predict``).
    """

    def __init__(self, likelihood: str = "bernoulli", **params):
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise TypeError(
                f"MixtureVI got unknown parameter(s) {unknown}; allowed: {sorted(PARAMS)}"
            )
        self.likelihood = likelihood
        defaults = {f.name: f.default for f in dataclasses.fields(MixtureSpec)}
        defaults.update({f.name: f.default for f in dataclasses.fields(FitOptions)})
        defaults["seed"] = 0
        for name in PARAMS:
            if name != "likelihood":
                setattr(self, name, params.get(name, defaults[name]))

    # -- scikit-learn conventions -------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in PARAMS}

    def set_params(self, **params) -> MixtureVI:
        for name, value in params.items():
            if name not in PARAMS:
                raise ValueError(f"MixtureVI has no parameter {name!r}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = MixtureVI().get_params()
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return f"MixtureVI({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def _settings(self) -> tuple[MixtureSpec, FitOptions]:
        params = {k: v for k, v in self.get_params().items() if k != "seed"}
        return tuple(split_options(params, (MixtureSpec, FitOptions), "MixtureVI"))

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None, source: str | None = None) -> MixtureVI:
        """Fit on ``X`` of shape ``(N, D)``; ``y`` is ignored."""
        spec, options = self._settings()
        fit = fit_site(X, spec, options, self.seed, min_cluster_size=1, source=source)
        state = fit.state
        self.spec_ = fit.summaries.spec
        self.model_ = FittedModel(fit.summaries, info={"fitted_by": "MixtureVI"})
        self.labels_ = labels_of(fit.problem, state.source)
        self.n_clusters_ = state.n_clusters
        self.elbo_ = float(state.elbo)
        self.elbo_history_ = np.asarray(fit.trace.elbo_history)
        self.n_iter_ = fit.trace.n_iter
        self.converged_ = fit.trace.converged
        self.moves_ = fit.trace.moves.as_dict()
        self.weights_ = self.model_.weights
        self.cluster_profiles_ = fit.summaries.profiles()
        if spec.variable_selection:
            self.variable_relevance_ = state.relevance.copy()
        self._options = options
        return self

    # -- using the fit ---------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this MixtureVI is not fitted yet: call fit(X) first")

    def predict_proba(self, X) -> np.ndarray:
        """``(N, K)`` responsibilities of new rows under the fitted posterior (columns of a
        DataFrame are matched by name to the fitted variables)."""
        self._check_fitted()
        return self.model_.predict_proba(X, self._options)

    def predict(self, X) -> np.ndarray:
        """``(N,)`` most probable cluster of each row."""
        self._check_fitted()
        return self.model_.predict(X, self._options)

    def summaries(self) -> Summaries:
        """The per-cluster sufficient statistics of the training rows (what a site sends)."""
        self._check_fitted()
        s = self.model_.posterior
        return dataclasses.replace(s, counts=s.counts.copy(), sums=s.sums.copy())

    def save(self, path: str | os.PathLike) -> str:
        """Write the fitted model to one file (see :func:`fedvi.load_model`)."""
        self._check_fitted()
        return self.model_.save(path)


MixtureVI.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if name == "likelihood"
            else inspect.Parameter.KEYWORD_ONLY,
            default=MixtureVI().get_params()[name],
        )
        for name in PARAMS
    ]
)
