"""Merge and delete moves on one site (SPEC §4), each accepted only when the ELBO rises.

Merge proposals are ranked by their summary-only gain (the exact gain without the entropy
change). Merging two clusters can only lower the assignment entropy, so that gain is an upper
bound: a pair whose bound is not positive is never tried, and the exact gain needs the rows
only for the entropy of the merged column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import xlogy

from fedvi.elbo import merge_gain
from fedvi.vi import Problem, VIState, drop_clusters, elbo_of, iterate


@dataclass
class MoveLog:
    """How many moves were tried and accepted during a fit."""

    merge_tried: int = 0
    merge_accepted: int = 0
    delete_tried: int = 0
    delete_accepted: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _changed(old: float, new: float) -> bool:
    return abs(new - old) > max(1.0, 0.01 * old)


@dataclass
class MoveMemory:
    """Failed proposals, not retried until one of their clusters changes (as bnpy does).

    A cluster has changed when its count moved by more than one row or 1 %.
    """

    failed_merges: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    failed_deletes: dict[int, float] = field(default_factory=dict)

    def merge_blocked(self, ia: int, ib: int, na: float, nb: float) -> bool:
        seen = self.failed_merges.get((ia, ib))
        return seen is not None and not (_changed(seen[0], na) or _changed(seen[1], nb))

    def delete_blocked(self, i: int, n: float) -> bool:
        seen = self.failed_deletes.get(i)
        return seen is not None and not _changed(seen, n)


def merge_sweep(
    problem: Problem,
    state: VIState,
    memory: MoveMemory,
    log: MoveLog,
    max_pairs: int | None = None,
) -> tuple[VIState, int]:
    """Try merges best first, each cluster in at most one accepted merge; returns the new
    state and the number accepted. ``max_pairs`` caps the proposals tried (paper: 1)."""
    K = state.n_clusters
    if K < 2:
        return state, 0
    j, k = np.triu_indices(K, 1)
    bound = merge_gain(problem.spec, state.counts, state.sums, j, k, state.relevance)
    order = np.argsort(-bound, kind="stable")
    used = np.zeros(K, dtype=bool)
    accepted: list[tuple[int, int, float]] = []
    tried = 0
    for m in order:
        if bound[m] <= 0 or (max_pairs is not None and tried >= max_pairs):
            break
        a, b = int(j[m]), int(k[m])
        if used[a] or used[b]:
            continue
        ia, ib = int(state.ids[a]), int(state.ids[b])
        if memory.merge_blocked(ia, ib, state.counts[a], state.counts[b]):
            continue
        tried += 1
        col = state.resp[:, a] + state.resp[:, b]
        h = float(-xlogy(col, col).sum())
        if bound[m] + h - state.entropy[a] - state.entropy[b] > 0:
            accepted.append((a, b, h))
            used[a] = used[b] = True
        else:
            memory.failed_merges[(ia, ib)] = (state.counts[a], state.counts[b])
    log.merge_tried += tried
    log.merge_accepted += len(accepted)
    if not accepted:
        return state, 0
    resp = state.resp.copy()
    counts, sums, entropy = state.counts.copy(), state.sums.copy(), state.entropy.copy()
    drop = np.zeros(K, dtype=bool)
    for a, b, h in accepted:
        resp[:, a] += resp[:, b]
        counts[a] += counts[b]
        sums[a] += sums[b]
        entropy[a] = h
        drop[b] = True
    keep = ~drop
    counts, sums, entropy = counts[keep], sums[keep], entropy[keep]
    new = VIState(
        np.ascontiguousarray(resp[:, keep]),
        counts,
        sums,
        entropy,
        state.relevance,
        state.ids[keep],
        elbo_of(problem, counts, sums, entropy, state.relevance),
    )
    return new, len(accepted)


def delete_move(
    problem: Problem,
    state: VIState,
    memory: MoveMemory,
    log: MoveLog,
    n_iters: int = 3,
    order: str = "smallest",
) -> tuple[VIState, bool]:
    """Propose deleting the smallest (or, ``order="largest"``, bnpy's rule: the largest)
    eligible cluster; run ``n_iters`` VI iterations on the
    proposal and on the current model and keep the better (SPEC §4). Either way the returned
    state has advanced ``n_iters`` iterations and its ELBO is at least the current one."""
    K = state.n_clusters
    if K < 2:
        return state, False
    ranked = np.argsort(state.counts if order == "smallest" else -state.counts, kind="stable")
    for k in ranked:
        if not memory.delete_blocked(int(state.ids[k]), state.counts[k]):
            break
    else:
        return state, False
    log.delete_tried += 1
    mask = np.zeros(K, dtype=bool)
    mask[k] = True
    proposal = drop_clusters(problem, state, mask)
    baseline = iterate(problem, state)
    for _ in range(n_iters - 1):
        proposal = iterate(problem, proposal)
        baseline = iterate(problem, baseline)
    if proposal.elbo > baseline.elbo:
        log.delete_accepted += 1
        return proposal, True
    memory.failed_deletes[int(state.ids[k])] = float(state.counts[k])
    return baseline, False
