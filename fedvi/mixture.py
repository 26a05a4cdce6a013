"""``MixtureVI``: the single-site estimator (scikit-learn style).

Its parameters are the fields of :class:`fedvi.MixtureSpec` and :class:`fedvi.FitOptions` plus
``seed``, as keyword arguments (``likelihood`` may also come first, positionally) with the
dataclasses' defaults; they are checked once, by those dataclasses, when ``fit`` is called.
``fit`` is :func:`fedvi.site.fit_site` with the single-site settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Sequence

import numpy as np

from fedvi.model import FittedModel
from fedvi.options import FitOptions
from fedvi.settings import field_names, numpydoc, split_options
from fedvi.site import fit_site
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import labels_of

#: What the estimator's parameters must be: every model and fit setting, plus ``seed``.
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

    # Every default is the dataclass field's own (a dataclass keeps a field's default as the
    # class attribute), so each is written once, in fedvi/spec.py or fedvi/options.py;
    # tests/test_settings.py checks that this signature lists every field of both.
    def __init__(
        self,
        likelihood: str = MixtureSpec.likelihood,
        *,
        n_components: int = MixtureSpec.n_components,
        alpha0: float = MixtureSpec.alpha0,
        beta: float | None = MixtureSpec.beta,
        n_levels: Sequence[int] | int | None = MixtureSpec.n_levels,
        variable_selection: bool = MixtureSpec.variable_selection,
        relevance_prior: tuple[float, float] = MixtureSpec.relevance_prior,
        relevance_update: str = MixtureSpec.relevance_update,
        missing: str = MixtureSpec.missing,
        feature_names: Sequence[str] | None = MixtureSpec.feature_names,
        moves: str = FitOptions.moves,
        move_every: int = FitOptions.move_every,
        delete_iters: int = FitOptions.delete_iters,
        delete_order: str = FitOptions.delete_order,
        max_iter: int = FitOptions.max_iter,
        tol: float = FitOptions.tol,
        n_stable: int = FitOptions.n_stable,
        empty_threshold: float = FitOptions.empty_threshold,
        backend: str = FitOptions.backend,
        device: str = FitOptions.device,
        block_rows: int = FitOptions.block_rows,
        precision: str = FitOptions.precision,
        seed: int | None = 0,
    ):
        # scikit-learn's convention: store the parameters as given; fit() checks them (through
        # MixtureSpec and FitOptions), so set_params(...) is checked the same way.
        params = dict(locals())
        del params["self"]
        for name, value in params.items():
            setattr(self, name, value)

    # -- scikit-learn conventions -------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> MixtureVI:
        for name, value in params.items():
            if name not in self._param_names():
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

    def fit_predict(self, X, y=None, source: str | None = None) -> np.ndarray:
        """Fit on ``X`` of shape ``(N, D)`` and return ``labels_``, ``(N,)``; ``y`` is ignored."""
        return self.fit(X, source=source).labels_

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
