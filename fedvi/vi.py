"""Coordinate-ascent VI for the over-fitted mixture, streamed over blocks of rows.

One iteration is one pass over the table: for each block, one product ``X @ W.T`` plus a bias
(with missing cells, plus ``M @ E0.T``), a stable log-sum-exp, and one product ``X.T @ R``;
the statistics accumulate in float64. Then the closed-form global step and the ELBO from the
statistics (:class:`fedvi.Summaries`).

Responsibilities are never stored: a state keeps the small :class:`Source` they come from
(the local-step weights and, after merges, which columns were summed), and a pass recomputes
them block by block when a move needs them. Memory therefore grows with the block size, not
with the number of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import digamma, expit, xlogy

from fedvi.data import EncodedData
from fedvi.elbo import elbo, relevance_objective
from fedvi.options import FitOptions
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries


@dataclass(frozen=True)
class Problem:
    """A site's table with the model it is fitted under.

    data: the encoded table (read in blocks). spec: the resolved model. prior_dim: ``K0``,
    fixed for the whole fit. options: block size, precision and backend of the passes.
    accel: the local step on another backend (:class:`fedvi.backends.TorchLocalStep`).
    """

    data: EncodedData
    spec: MixtureSpec
    prior_dim: int
    options: FitOptions = field(default_factory=FitOptions)
    accel: Callable | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        data: EncodedData,
        spec: MixtureSpec,
        prior_dim: int | None = None,
        options: FitOptions | None = None,
    ) -> Problem:
        options = options or FitOptions()
        accel = None
        if options.backend != "numpy":
            from fedvi.backends import TorchLocalStep

            accel = TorchLocalStep(data, options.device)
        K0 = spec.n_components if prior_dim is None else int(prior_dim)
        return cls(data, spec, K0, options, accel)

    @property
    def n_rows(self) -> int:
        return self.data.n_rows

    @property
    def missing_bernoulli(self) -> bool:
        return self.data.has_missing and self.spec.likelihood == "bernoulli"

    def summaries(self, counts, sums, entropy, observed=None, relevance=None) -> Summaries:
        """Statistics of this table's rows as a :class:`Summaries`."""
        T, obs = self.data.totals
        return Summaries(
            counts=counts,
            sums=sums,
            entropy=entropy,
            column_totals=T,
            n_rows=self.n_rows,
            prior_dim=self.prior_dim,
            spec=self.spec,
            relevance=relevance,
            observed=observed if self.missing_bernoulli else None,
            column_observed=obs,
        )


@dataclass(frozen=True)
class Source:
    """Where a state's responsibilities come from: ``softmax(X W^T + bias) @ merge``.

    W: ``(K0, P)``; bias: ``(K0,)``; E0: ``(K0, D)`` for a Bernoulli table with missing cells
    (the bias then is ``M @ E0^T`` per row); merge: ``(K0, K)`` 0/1 matrix summing columns
    (accepted merges, reordering), or ``None`` (identity).
    """

    W: np.ndarray
    bias: np.ndarray
    E0: np.ndarray | None = None
    merge: np.ndarray | None = None

    @property
    def n_clusters(self) -> int:
        return self.W.shape[0] if self.merge is None else self.merge.shape[1]

    def then(self, matrix: np.ndarray) -> Source:
        """These responsibilities followed by ``@ matrix`` (``(K, K')``)."""
        merge = matrix if self.merge is None else self.merge @ matrix
        return replace(self, merge=merge)

    def subset(self, keep) -> Source:
        eye = np.eye(self.n_clusters)[:, keep]
        return self.then(eye)

    def to_arrays(self) -> list[np.ndarray]:
        """``[W, bias, merge]`` (the identity when none), then ``E0`` if any: what a site keeps
        between rounds to label its rows through its own local fit."""
        merge = np.eye(self.W.shape[0]) if self.merge is None else self.merge
        return [self.W, self.bias, merge] + ([] if self.E0 is None else [self.E0])

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> Source:
        """Inverse of :meth:`to_arrays`."""
        W, bias, merge = arrays[:3]
        return cls(W, bias, arrays[3] if len(arrays) > 3 else None, merge)


@dataclass(frozen=True)
class VIState:
    """Statistics of the current responsibilities, their source and the ELBO.

    stats: :class:`Summaries` (with the current ``c_d``); ids: ``(K,)`` stable cluster
    identifiers (for the moves' memory); elbo: at the optimal global factors; source: how to
    recompute the responsibilities.
    """

    stats: Summaries
    ids: np.ndarray
    elbo: float
    source: Source

    @property
    def n_clusters(self) -> int:
        return self.stats.n_clusters

    @property
    def counts(self) -> np.ndarray:
        return self.stats.counts

    @property
    def relevance(self) -> np.ndarray | None:
        return self.stats.relevance

    def reorder(self, order) -> VIState:
        order = np.asarray(order, dtype=np.int64)
        return replace(
            self,
            stats=self.stats.reorder(order),
            ids=self.ids[order],
            source=self.source.subset(order),
        )


def expected_log_weights(counts: np.ndarray, alpha0: float, prior_dim: int) -> np.ndarray:
    """``(K,)`` ``E_q log pi_k`` with the ``K0 - K`` empty components kept in the normaliser."""
    return digamma(alpha0 + counts) - digamma(prior_dim * alpha0 + counts.sum())


def source_of(problem: Problem, stats: Summaries, weight_counts=None) -> Source:
    """The local-step weights under the optimal global factors of ``stats``."""
    spec = problem.spec
    c = stats.relevance if spec.variable_selection else None
    W, bias, E0 = spec.family().log_likelihood_weights(stats.sums, stats.counts, c, stats.observed)
    wc = stats.counts if weight_counts is None else weight_counts
    logw = expected_log_weights(wc, spec.alpha0, problem.prior_dim)
    if problem.missing_bernoulli:
        # Per row: sum over observed cells of E0, plus the weights.
        return Source(W, logw, E0 + 0.0)
    return Source(W, bias + logw)


def normalise_with_log(logits: np.ndarray):
    """``(r, log r)``, both ``(N, K)``; ``logits`` is overwritten with ``log r``.

    Written as column passes because NumPy's row reductions over a short K are several times
    slower than K vectorised passes over N.
    """
    peak = logits[:, 0].copy()
    for k in range(1, logits.shape[1]):
        np.maximum(peak, logits[:, k], out=peak)
    logits -= peak[:, None]
    resp = np.exp(logits)
    total = resp @ np.ones(resp.shape[1])
    resp /= total[:, None]
    logits -= np.log(total)[:, None]
    return resp, logits


@dataclass
class Pass:
    """What one pass over the rows computed (only what was asked for)."""

    counts: np.ndarray | None = None
    sums: np.ndarray | None = None
    entropy: np.ndarray | None = None
    observed: np.ndarray | None = None
    owned: np.ndarray | None = None
    labels: np.ndarray | None = None
    resp: np.ndarray | None = None
    pair_entropy: np.ndarray | None = None
    peak: np.ndarray | None = None
    second: np.ndarray | None = None


def _block_resp(logits, source: Source):
    """Responsibilities (and ``log r`` when no merge is applied) of one block's logits (a
    block's ``(B, K)`` logits stay in cache across the log-sum-exp's passes)."""
    r, log_r = normalise_with_log(logits)
    if source.merge is not None:
        return r @ source.merge, None
    return r, log_r


def run_pass(
    problem: Problem,
    source: Source,
    *,
    stats: bool = True,
    owned: bool = False,
    labels: bool = False,
    resp: bool = False,
    pairs: np.ndarray | None = None,
    peak: bool = False,
    second: np.ndarray | None = None,
) -> Pass:
    """One pass over the rows under ``source``: the statistics (``counts``, ``sums``,
    ``entropy``, observed counts) and, on request, rows owned per cluster (arg-max), the
    arg-max labels ``(N,)``, the responsibilities ``(N, K)`` or the entropy of merged columns
    ``pairs (M, 2)`` (``-sum_n (r_a + r_b) log(r_a + r_b)``) and ``peak``: the largest
    responsibility of each cluster ``(K,)`` (the disclosure floor, :mod:`fedvi.floor`), and
    ``second``: for clusters ``second (M,)``, ``sum_n r_nk x_n x_n^T`` ``(M, P, P)`` (split
    moves, :mod:`fedvi.refine_moves`; numpy backend only)."""
    data, opts = problem.data, problem.options
    dtype = np.float32 if opts.precision == "float32" else np.float64
    K, N = source.n_clusters, problem.n_rows
    out = Pass()
    if stats:
        out.counts, out.entropy = np.zeros(K), np.zeros(K)
        out.sums = np.zeros((K, data.n_columns))
        if problem.missing_bernoulli:
            out.observed = np.zeros((K, data.n_features))
    if owned:
        out.owned = np.zeros(K, dtype=np.int64)
    if labels:
        out.labels = np.empty(N, dtype=np.int64)
    if resp:
        out.resp = np.empty((N, K))
    if pairs is not None:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        out.pair_entropy = np.zeros(len(pairs))
    if peak:
        out.peak = np.zeros(K)
    if second is not None:
        second = np.asarray(second, dtype=np.int64).ravel()
        out.second = np.zeros((len(second), data.n_columns, data.n_columns))
        if problem.accel is not None:
            raise ValueError("second moments need the numpy backend")
    if problem.accel is not None and not data.has_missing:
        blocks = [(0, N, None, None)]
    else:
        blocks = data.blocks(opts.block_rows, dtype)
    W = source.W.astype(dtype, copy=False)
    E0t = None if source.E0 is None else source.E0.T.astype(dtype)
    for start, stop, X, mask in blocks:
        if X is None:  # the torch backend: the whole table at once, on its device
            r, counts, sums, entropy = problem.accel(source.W, source.bias)
            if source.merge is not None:
                r = r @ source.merge
                entropy = -xlogy(r, r).sum(axis=0)
                counts, sums = r.sum(axis=0), problem.accel.sums(r)
            if stats:
                out.counts += counts
                out.sums += sums
                out.entropy += entropy
        else:
            logits = np.asarray(X @ W.T, dtype=np.float64)
            if E0t is not None:  # missing cells: each row's own observed variables
                logits += np.asarray(mask @ E0t, dtype=np.float64)
            logits += source.bias
            r, log_r = _block_resp(logits, source)
            if stats:
                out.counts += r.sum(axis=0)
                # (X.T @ R).T, not R.T @ X: the latter hits a slow BLAS path for tall R.
                out.sums += np.asarray(X.T @ r.astype(dtype, copy=False)).T
                if log_r is not None:
                    out.entropy -= np.einsum("nk,nk->k", r, log_r)
                else:
                    out.entropy -= xlogy(r, r).sum(axis=0)
                if out.observed is not None:
                    out.observed += np.asarray(mask.T @ r.astype(dtype, copy=False)).T
        if owned or labels:
            am = np.argmax(r, axis=1)
            if owned:
                out.owned += np.bincount(am, minlength=K)
            if labels:
                out.labels[start:stop] = am
        if resp:
            out.resp[start:stop] = r
        if peak and len(r):
            np.maximum(out.peak, r.max(axis=0), out=out.peak)
        if second is not None:
            for i, k in enumerate(second):
                weighted = (
                    X.multiply(r[:, k : k + 1]) if hasattr(X, "multiply") else X * r[:, k, None]
                )
                out.second[i] += np.asarray(
                    (X.T @ weighted).todense() if hasattr(weighted, "tocsr") else X.T @ weighted
                )
        if pairs is not None and len(pairs):
            col = r[:, pairs[:, 0]] + r[:, pairs[:, 1]]
            out.pair_entropy -= xlogy(col, col).sum(axis=0)
    return out


def relevance_step(stats: Summaries, relevance: np.ndarray) -> np.ndarray:
    """``(D,)`` new ``c_d``, a function of summaries only, so the server can run it.

    ``spec.relevance_update``:

    - ``"meanfield"``: the paper's update, ``logit c_d = sum_kl S E log phi - sum_l T log phi0
      + psi(c + a) - psi(1 - c + b)`` with ``q(phi)``, ``q(delta)`` from the current ``c``.
    - ``"collapsed"`` (default): maximise the ELBO over each ``c_d`` in ``[0, 1]`` with
      ``q(phi)`` and ``q(delta)`` re-optimised (the ELBO is a sum of one-dimensional terms,
      :func:`fedvi.elbo.relevance_objective`). Also an ascent step, but it escapes the mean-field
      fixed point at ``c_d = 1`` that a noise variable is stuck in when started there (the
      mean-field step sees the fit of ``q(phi)`` but not its KL cost, which grows like log N).
    """
    spec = stats.spec
    if spec.relevance_update == "meanfield":
        a, b = spec.relevance_prior
        data = spec.family().relevance_data_term(
            stats.sums,
            stats.counts,
            stats.column_totals,
            stats.column_observed_or_rows(),
            relevance,
            stats.observed,
        )
        return expit(data + digamma(relevance + a) - digamma(1.0 - relevance + b))

    def f(c):
        return relevance_objective(stats, c)

    D = len(relevance)
    grid = np.linspace(0.0, 1.0, 33)
    values = np.array([f(np.full(D, g)) for g in grid])  # (33, D)
    best = np.argmax(values, axis=0)
    lo = grid[np.maximum(best - 1, 0)]
    hi = grid[np.minimum(best + 1, len(grid) - 1)]
    # Golden-section search in each variable's bracket, all variables at once.
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(40):
        left = f1 >= f2
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        x2n = np.where(left, x1, lo + ratio * (hi - lo))
        x1n = np.where(left, hi - ratio * (hi - lo), x2)
        fx = f(np.where(left, x1n, x2n))
        f2 = np.where(left, f1, fx)
        f1 = np.where(left, fx, f2)
        x1, x2 = x1n, x2n
    cand = np.stack([grid[best], 0.5 * (lo + hi), relevance])
    cand_values = np.stack([values[best, np.arange(D)], f(cand[1]), f(relevance)])
    return cand[np.argmax(cand_values, axis=0), np.arange(D)]


def finish(
    problem: Problem, p: Pass, relevance, ids, source: Source, update_relevance: bool = True
) -> VIState:
    """The global step from a pass's statistics: the ``c`` update (variable selection) and the
    ELBO at the optimal global factors."""
    stats = problem.summaries(p.counts, p.sums, p.entropy, p.observed, relevance)
    if problem.spec.variable_selection and update_relevance:
        stats = replace(stats, relevance=relevance_step(stats, relevance))
    return VIState(stats, np.asarray(ids), elbo(stats), source)


def local_step(problem: Problem, stats: Summaries, weight_counts=None, **want):
    """The local update under the optimal global factors of ``stats``: ``(source, pass)``."""
    source = source_of(problem, stats, weight_counts)
    return source, run_pass(problem, source, **want)


def iterate(problem: Problem, state: VIState) -> VIState:
    """One full CAVI iteration; the ELBO never decreases."""
    source, p = local_step(problem, state.stats)
    return finish(problem, p, state.relevance, state.ids, source)


def drop_clusters(problem: Problem, state: VIState, drop: np.ndarray) -> VIState:
    """Remove clusters ``drop`` (mask) and give their rows to the others by a local step."""
    keep = ~np.asarray(drop, dtype=bool)
    source, p = local_step(problem, state.stats.subset(keep))
    return finish(problem, p, state.relevance, state.ids[keep], source)


def hard_stats(problem: Problem, labels: np.ndarray, K: int, relevance=None) -> Summaries:
    """Statistics of hard assignments ``labels (N,)`` in ``0..K-1``."""
    data, opts = problem.data, problem.options
    counts = np.bincount(labels, minlength=K).astype(np.float64)
    sums = np.zeros((K, data.n_columns))
    observed = np.zeros((K, data.n_features)) if problem.missing_bernoulli else None
    eye = np.eye(K)
    for start, stop, X, mask in data.blocks(opts.block_rows):
        onehot = eye[labels[start:stop]]
        sums += np.asarray(X.T @ onehot).T
        if observed is not None:
            observed += (mask.T @ onehot).T
    return problem.summaries(counts, sums, np.zeros(K), observed, relevance)


def initial_state(problem: Problem, labels: np.ndarray, n_components: int) -> VIState:
    """State after one local step from hard labels, with ``alpha_hat = alpha0``."""
    relevance = np.ones(problem.spec.n_features) if problem.spec.variable_selection else None
    hard = hard_stats(problem, labels, n_components, relevance)
    source, p = local_step(problem, hard, weight_counts=np.zeros(n_components))
    return finish(problem, p, relevance, np.arange(n_components), source)


def owned_rows(problem: Problem, source: Source) -> np.ndarray:
    """``(K,)`` rows whose most probable cluster is each cluster (one pass)."""
    return run_pass(problem, source, stats=False, owned=True).owned


def labels_of(problem: Problem, source: Source) -> np.ndarray:
    """``(N,)`` most probable cluster of each row (one pass)."""
    return run_pass(problem, source, stats=False, labels=True).labels
