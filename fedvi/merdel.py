"""The local fitting loop: CAVI interleaved with merge/delete moves (SPEC §3–4).

Schedules (``moves=``):

- ``"merdel"`` (default): every ``move_every`` iterations, one merge sweep that tries every
  pair whose summary-only gain is positive (best first; cheap, since the gain is an upper bound
  and only the entropy of a candidate needs the rows), then one delete proposal.
- ``"paper"``: the authors' schedule: one merge proposal and one delete proposal every
  ``move_every`` (5) iterations.
- ``"none"``: plain CAVI; only empty clusters vanish.

Delete candidates: the smallest cluster first (``delete_order``); measured against bnpy's
largest-first in ``benchmarks/bench_choices.py``: same or better ELBO, fewer wasted proposals.

The fit stops when the relative ELBO change stays below ``tol`` for ``n_stable`` iterations
in a row and a final round of moves accepts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedvi.moves import MoveLog, MoveMemory, delete_move, merge_sweep
from fedvi.vi import Problem, VIState, drop_clusters, iterate

MOVE_SCHEDULES = ("merdel", "paper", "none")


@dataclass(frozen=True)
class FitOptions:
    """Knobs of the local fit; see the module docstring."""

    moves: str = "merdel"
    move_every: int = 5
    delete_iters: int = 3
    delete_order: str = "smallest"
    max_iter: int = 1000
    tol: float = 1e-8
    n_stable: int = 3
    empty_threshold: float = 1e-6
    backend: str = "numpy"
    device: str = "cpu"

    def __post_init__(self):
        from fedvi.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.delete_order not in ("smallest", "largest"):
            raise ValueError(
                f"delete_order must be 'smallest' or 'largest', got {self.delete_order!r}"
            )
        if self.moves not in MOVE_SCHEDULES:
            raise ValueError(f"moves must be one of {MOVE_SCHEDULES}, got {self.moves!r}")
        for name in ("move_every", "delete_iters", "max_iter", "n_stable"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")


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


def prune(problem: Problem, state: VIState, min_count: float, options: FitOptions, trace: FitTrace):
    """Remove clusters that are the arg-max of fewer than ``min_count`` rows, re-fit, repeat.

    Used to keep only clusters that own rows (and, on a site, to hold back clusters below the
    disclosure threshold). A forced removal is not an ELBO-guarded move; what follows it is
    plain CAVI to convergence, so the returned state is a fixed point again.
    """
    plain = FitOptions(**{**options.__dict__, "moves": "none"})
    while state.n_clusters > 1:
        owned = np.bincount(np.argmax(state.resp, axis=1), minlength=state.n_clusters)
        drop = owned < min_count
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
