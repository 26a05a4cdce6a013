"""``MixtureVI``: the single-site estimator (scikit-learn style)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedvi.data import EncodedData, check_likelihood, encode
from fedvi.init import kmodes_labels
from fedvi.labels import global_responsibilities
from fedvi.merdel import FitOptions, FitTrace, prune, run
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import Problem, VIState, initial_state, summaries_of


def order_by_size(state: VIState) -> VIState:
    """The same state with clusters sorted by decreasing count (label 0 = largest)."""
    order = np.argsort(-state.counts, kind="stable")
    return VIState(
        np.ascontiguousarray(state.resp[:, order]),
        state.counts[order],
        state.sums[order],
        state.entropy[order],
        state.relevance,
        state.ids[order],
        state.elbo,
    )


class MixtureVI:
    """Over-fitted Bayesian mixture of Bernoulli or categorical variables, fitted by mean-field
    VI with merge/delete moves (MerDel). The number of clusters is learned from the data.

    Parameters
    ----------
    likelihood : {"bernoulli", "categorical"}
        Bernoulli: 0/1 data, dense or ``scipy.sparse``. Categorical: integer codes
        ``0..L_d-1`` per column (levels inferred from the data unless ``n_levels`` is given).
    n_components : int, default 20
        ``K_init``: clusters at the start and dimension of the weights' Dirichlet prior.
    alpha0 : float, default 0.01
        Concentration of the sparse Dirichlet prior on the weights.
    beta : float or None
        Per-level concentration of the ``phi`` prior; ``None`` = ``1 / L_d`` (Beta(0.5, 0.5)).
    n_levels : int or array of shape (D,), optional
        Levels per variable (categorical).
    variable_selection : bool, default False
        Learn per-variable relevance ``c_d`` (SPEC §8); see ``variable_relevance_``.
    relevance_prior : (float, float), default (2, 2)
        Beta prior on the probability that a variable is relevant (mean 0.5).
    relevance_update : {"collapsed", "meanfield"}, default "collapsed"
        How ``c_d`` is updated (see :func:`fedvi.vi.relevance_step`); "meanfield" is the
        paper's fixed-point step.
    moves : {"merdel", "paper", "none"}, default "merdel"
        Move schedule (see :mod:`fedvi.merdel`).
    move_every, delete_iters, delete_order, max_iter, tol : see :class:`fedvi.merdel.FitOptions`.
    backend : {"numpy", "torch"}, default "numpy"; device : str, default "cpu"
        Where the local step runs (SPEC §9); torch is optional, same results in float64.
    seed : int, default 0
        Seed of the k-modes initialisation; the same seed gives the same fit.
    feature_names : sequence of str, optional
        Variable names, recorded in the schema (a DataFrame's columns when not given).

    Attributes
    ----------
    labels_ : (N,) cluster of each training row, ``0..n_clusters_-1`` by decreasing size.
    n_clusters_ : number of clusters found.
    elbo_, elbo_history_ : final ELBO and its value after each iteration and accepted move.
    n_iter_, converged_, moves_ : iterations run, convergence, moves tried/accepted.
    weights_ : (K,) posterior mean weights of the found clusters (renormalised).
    cluster_profiles_ : (K, P) posterior mean ``E[phi]`` (``P = D`` or ``sum L_d``).
    variable_relevance_ : (D,) ``c_d`` when ``variable_selection=True``.
    spec_ : :class:`fedvi.MixtureSpec` of the fitted model.
    """

    def __init__(
        self,
        likelihood: str = "bernoulli",
        n_components: int = 20,
        alpha0: float = 0.01,
        beta: float | None = None,
        n_levels=None,
        variable_selection: bool = False,
        relevance_prior: tuple[float, float] = (2.0, 2.0),
        relevance_update: str = "collapsed",
        moves: str = "merdel",
        move_every: int = 5,
        delete_iters: int = 3,
        delete_order: str = "smallest",
        backend: str = "numpy",
        device: str = "cpu",
        max_iter: int = 1000,
        tol: float = 1e-8,
        seed: int | None = 0,
        feature_names=None,
    ):
        self.likelihood = likelihood
        self.n_components = n_components
        self.alpha0 = alpha0
        self.beta = beta
        self.n_levels = n_levels
        self.variable_selection = variable_selection
        self.relevance_prior = relevance_prior
        self.relevance_update = relevance_update
        self.moves = moves
        self.move_every = move_every
        self.delete_iters = delete_iters
        self.delete_order = delete_order
        self.backend = backend
        self.device = device
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.feature_names = feature_names

    # -- fitting ---------------------------------------------------------------------------
    def _options(self) -> FitOptions:
        return FitOptions(
            moves=self.moves,
            move_every=self.move_every,
            delete_iters=self.delete_iters,
            delete_order=self.delete_order,
            backend=self.backend,
            device=self.device,
            max_iter=self.max_iter,
            tol=self.tol,
        )

    def _check_params(self) -> None:
        check_likelihood(self.likelihood)
        if not isinstance(self.n_components, int | np.integer) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {self.n_components!r}")

    def fit(self, X, y=None, source: str | None = None) -> MixtureVI:
        """Fit on ``X`` of shape ``(N, D)``; ``y`` is ignored."""
        self._check_params()
        options = self._options()
        names = self.feature_names
        if names is None and hasattr(X, "columns"):  # a pandas DataFrame names its variables
            names = [str(c) for c in X.columns]
        data = encode(X, self.likelihood, self.n_levels, min_rows=2, source=source)
        self.spec_ = self._spec(data, names)
        problem = Problem.build(
            data.matrix, self.spec_, int(self.n_components), options.backend, options.device
        )
        state, trace = fit_problem(problem, options, self.seed)
        state, trace = prune(problem, state, 1, options, trace)
        self._store(problem, order_by_size(state), trace)
        return self

    def _spec(self, data: EncodedData, names=None) -> MixtureSpec:
        return MixtureSpec(
            likelihood=self.likelihood,
            n_levels=tuple(int(v) for v in data.n_levels),
            alpha0=float(self.alpha0),
            beta=self.beta,
            variable_selection=bool(self.variable_selection),
            relevance_prior=tuple(self.relevance_prior),
            relevance_update=self.relevance_update,
            feature_names=None if names is None else tuple(names),
        )

    def _store(self, problem: Problem, state: VIState, trace: FitTrace) -> None:
        self._summaries = summaries_of(problem, state)
        self.labels_ = np.argmax(state.resp, axis=1)
        self.n_clusters_ = state.n_clusters
        self.elbo_ = float(state.elbo)
        self.elbo_history_ = np.asarray(trace.elbo_history)
        self.n_iter_ = trace.n_iter
        self.converged_ = trace.converged
        self.moves_ = trace.moves.as_dict()
        alpha = self.alpha0 + state.counts
        self.weights_ = alpha / alpha.sum()
        self.cluster_profiles_ = self._summaries.profiles()
        if self.variable_selection:
            self.variable_relevance_ = state.relevance.copy()

    # -- using the fit ---------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "spec_"):
            raise RuntimeError("this MixtureVI is not fitted yet: call fit(X) first")

    def predict_proba(self, X) -> np.ndarray:
        """``(N, K)`` responsibilities of new rows under the fitted posterior."""
        self._check_fitted()
        data = encode(X, self.likelihood, self.spec_.n_levels, n_features=self.spec_.n_features)
        return global_responsibilities(data, self._summaries)

    def predict(self, X) -> np.ndarray:
        """``(N,)`` most probable cluster of each row."""
        return np.argmax(self.predict_proba(X), axis=1)

    def summaries(self) -> Summaries:
        """The per-cluster sufficient statistics of the training rows (what a site sends)."""
        self._check_fitted()
        s = self._summaries
        return replace(
            s,
            counts=s.counts.copy(),
            sums=s.sums.copy(),
            entropy=s.entropy.copy(),
            column_totals=s.column_totals.copy(),
            relevance=None if s.relevance is None else s.relevance.copy(),
        )


def fit_problem(problem: Problem, options: FitOptions, seed: int | None):
    """k-modes initialisation then MerDel to convergence; returns ``(state, trace)``."""
    rng = np.random.default_rng(seed)
    K = min(problem.prior_dim, problem.n_rows)
    labels = kmodes_labels(problem.X, K, problem.spec.family(), rng)
    state = initial_state(problem, labels, K)
    return run(problem, state, options)
