"""The local fitting loop: CAVI interleaved with merge/delete moves (docs/method.md).

Schedules (``FitOptions.moves``):

- ``"merdel"`` (default): every ``move_every`` iterations, one merge sweep that tries every
  pair whose summary-only gain is positive (best first; cheap, since the gain is an upper bound
  and only the entropy of a candidate needs the rows), then one delete proposal.
- ``"paper"``: the authors' schedule: one merge proposal and one delete proposal every
  ``move_every`` (5) iterations.
- ``"none"``: plain CAVI; only empty clusters vanish.

Delete candidates: the smallest cluster first (``delete_order``); measured against bnpy's
largest-first in ``benchmarks/bench_choices.py``: same or better ELBO, fewer wasted proposals.

The fit stops when the relative ELBO change stays below ``tol`` for ``n_stable`` iterations
in a row and a final round of moves accepts nothing; at ``max_iter`` it stops with a
:class:`ConvergenceWarning`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import numpy as np

from fedvi.init import kmodes_labels
from fedvi.moves import MoveLog, MoveMemory, delete_move, merge_sweep
from fedvi.options import FitOptions
from fedvi.vi import Problem, VIState, drop_clusters, initial_state, iterate, owned_rows


class ConvergenceWarning(UserWarning):
    """A fit stopped at ``max_iter`` before its ELBO settled."""


@dataclass
class FitTrace:
    """What happened during a fit: ELBO after every step, iterations, moves."""

    elbo_history: list[float] = field(default_factory=list)
    n_iter: int = 0
    moves: MoveLog = field(default_factory=MoveLog)
    converged: bool = False
    memory: MoveMemory = field(default_factory=MoveMemory)


def _stable(history: list[float], tol: float, n: int) -> bool:
    if len(history) <= n:
        return False
    recent = np.asarray(history[-(n + 1) :])
    return bool(np.all(np.abs(np.diff(recent)) <= tol * np.abs(recent[1:])))


def _step(problem: Problem, state: VIState, options: FitOptions) -> VIState:
    empty = state.counts < options.empty_threshold
    if empty.any() and not empty.all():
        return drop_clusters(problem, state, empty)
    return iterate(problem, state)


def run(problem: Problem, state: VIState, options: FitOptions, trace: FitTrace | None = None):
    """Iterate from ``state`` to convergence; returns ``(state, trace)``."""
    trace = trace or FitTrace(elbo_history=[state.elbo])
    max_pairs = 1 if options.moves == "paper" else None
    while trace.n_iter < options.max_iter:
        state = _step(problem, state, options)
        trace.n_iter += 1
        trace.elbo_history.append(state.elbo)
        stable = _stable(trace.elbo_history, options.tol, options.n_stable)
        due = trace.n_iter % options.move_every == 0
        if options.moves == "none" or not (due or stable):
            if stable:
                trace.converged = True
                break
            continue
        state, n_merged = merge_sweep(problem, state, trace.memory, trace.moves, max_pairs)
        if n_merged:
            trace.elbo_history.append(state.elbo)
        state, deleted = delete_move(
            problem, state, trace.memory, trace.moves, options.delete_iters, options.delete_order
        )
        trace.n_iter += options.delete_iters
        trace.elbo_history.append(state.elbo)
        if stable and not (n_merged or deleted):
            trace.converged = True
            break
    return state, trace


def prune(
    problem: Problem,
    state: VIState,
    min_owned: int,
    options: FitOptions,
    trace: FitTrace,
    min_count: float = 0.0,
):
    """Remove clusters that are the arg-max of fewer than ``min_owned`` rows (or whose count
    ``N_k`` is below ``min_count``), re-fit, repeat.

    Used to keep only clusters that own rows and, on a site, to hold back clusters below the
    disclosure floor (their rows go to the other clusters). A forced removal is not an
    ELBO-guarded move; what follows it is plain CAVI to convergence, so the returned state is
    a fixed point again, and its statistics are exactly those of its responsibilities.
    """
    plain = dataclasses.replace(options, moves="none")
    while state.n_clusters > 1:
        owned = owned_rows(problem, state.source)
        drop = (owned < min_owned) | (state.counts < min_count)
        if not drop.any():
            break
        if drop.all():
            drop[np.argmax(owned)] = False
        state = drop_clusters(problem, state, drop)
        trace.elbo_history.append(state.elbo)
        trace.n_iter += 1
        budget = FitTrace(elbo_history=trace.elbo_history, n_iter=0, moves=trace.moves)
        state, budget = run(problem, state, plain, budget)
        trace.n_iter += budget.n_iter
    return state, trace


def fit_problem(problem: Problem, options: FitOptions, seed: int | None, warn_label: str = ""):
    """k-modes initialisation then MerDel to convergence; returns ``(state, trace)``.

    Warns with :class:`ConvergenceWarning` when the fit stops at ``max_iter``.
    """
    rng = np.random.default_rng(seed)
    K = min(problem.prior_dim, problem.n_rows)
    labels = kmodes_labels(problem, K, rng)
    state = initial_state(problem, labels, K)
    state, trace = run(problem, state, options)
    if not trace.converged:
        warnings.warn(
            f"{warn_label or 'the fit'} stopped at max_iter={options.max_iter} before the "
            f"ELBO settled (relative tol {options.tol}); raise max_iter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return state, trace


def order_by_size(state: VIState) -> VIState:
    """The same state with clusters sorted by decreasing count (label 0 = largest)."""
    return state.reorder(np.argsort(-state.counts, kind="stable"))
