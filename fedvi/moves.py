"""Merge and delete moves on one site, each accepted only when the ELBO rises.

Merge proposals are ranked by their summary-only gain (the exact gain without the entropy
change). Merging two clusters can only lower the assignment entropy, so that gain is an upper
bound: a pair whose bound is not positive is never tried, and the exact gain needs the rows
only for the entropy of the merged column, which one pass computes for a batch of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedvi.elbo import elbo, merge_gain
from fedvi.vi import Problem, VIState, drop_clusters, iterate, run_pass

#: Candidate pairs whose merged-column entropy one pass computes.
PAIR_BATCH = 32


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
    stats = state.stats
    j, k = np.triu_indices(K, 1)
    bound = merge_gain(stats, j, k)
    order = [int(m) for m in np.argsort(-bound, kind="stable") if bound[m] > 0]
    # Candidates in the order the sweep would try them (used clusters are skipped later).
    candidates = []
    for m in order:
        a, b = int(j[m]), int(k[m])
        if memory.merge_blocked(
            int(state.ids[a]), int(state.ids[b]), stats.counts[a], stats.counts[b]
        ):
            continue
        candidates.append(m)
    used = np.zeros(K, dtype=bool)
    accepted: list[tuple[int, int, float]] = []
    tried = 0
    pos = 0
    while pos < len(candidates) and (max_pairs is None or tried < max_pairs):
        batch = [m for m in candidates[pos:] if not (used[j[m]] or used[k[m]])]
        if max_pairs is not None:
            batch = batch[: max_pairs - tried]
        batch = batch[:PAIR_BATCH]
        if not batch:
            break
        pairs = np.column_stack([j[batch], k[batch]])
        h = run_pass(problem, state.source, stats=False, pairs=pairs).pair_entropy
        for m, hm in zip(batch, h, strict=True):
            a, b = int(j[m]), int(k[m])
            if used[a] or used[b]:
                continue
            tried += 1
            if bound[m] + hm - stats.entropy[a] - stats.entropy[b] > 0:
                accepted.append((a, b, float(hm)))
                used[a] = used[b] = True
            else:
                memory.failed_merges[(int(state.ids[a]), int(state.ids[b]))] = (
                    stats.counts[a],
                    stats.counts[b],
                )
        pos = candidates.index(batch[-1]) + 1
    log.merge_tried += tried
    log.merge_accepted += len(accepted)
    if not accepted:
        return state, 0
    # Each cluster's group: b joins a; groups numbered in the order of the kept clusters.
    drop = np.zeros(K, dtype=bool)
    target = np.arange(K)
    for a, b, _ in accepted:
        target[b] = a
        drop[b] = True
    kept = np.flatnonzero(~drop)
    new_index = np.full(K, -1)
    new_index[kept] = np.arange(len(kept))
    group_of = new_index[target]
    entropy = stats.entropy[kept].copy()
    for a, _, h in accepted:
        entropy[new_index[a]] = h
    merged = stats.combine(group_of, len(kept), entropy=entropy)
    G = np.zeros((K, len(kept)))
    G[np.arange(K), group_of] = 1.0
    new = VIState(merged, state.ids[kept], elbo(merged), state.source.then(G))
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
    eligible cluster; run ``n_iters`` VI iterations on the proposal and on the current model
    and keep the better. Either way the returned state has advanced ``n_iters`` iterations and
    its ELBO is at least the current one."""
    K = state.n_clusters
    if K < 2:
        return state, False
    counts = state.counts
    ranked = np.argsort(counts if order == "smallest" else -counts, kind="stable")
    for k in ranked:
        if not memory.delete_blocked(int(state.ids[k]), counts[k]):
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
    memory.failed_deletes[int(state.ids[k])] = float(counts[k])
    return baseline, False
