"""The server's global merge of the sites' clusters, from summaries alone (docs/method.md).

Invariant: a global cluster holds at most one local cluster per site, so every merge joins
clusters with disjoint sets of sites and the assignment entropy is unchanged; the ELBO change
is then exact from ``N``, ``S``.

The merge can also start from an existing global model (:func:`fedvi.extend`): its clusters
enter as groups that already hold a set of sites, and the new sites' clusters join them under
the same rule.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import numpy as np

from fedvi.elbo import elbo
from fedvi.options import MERGE_MODES
from fedvi.pair_gain import BLOCK_CELLS, PairGain
from fedvi.summaries import Summaries
from fedvi.vi import relevance_step


class SchemaMismatchError(ValueError):
    """Sites do not share one schema or model."""


@dataclass(frozen=True)
class GlobalMerge:
    """Result of the global merge.

    posterior: :class:`Summaries` of the ``G`` global clusters (by decreasing size); its
        ``prior_dim`` is the sum of the sites' ``K0``. The global posterior is
        ``alpha_hat = alpha0 + counts``, ``beta_hat = beta + c * sums``.
    mapping: one ``(K_b,)`` array per site: the global cluster of each local cluster.
    membership: ``(G, n_sites)`` bool: which sites each global cluster holds a cluster of
        (columns in the order of ``site_ids``).
    site_ids: the sites, in the order of the mapping (and of the membership's columns, after
        any sites of the base model).
    elbo: global ELBO after merging. elbo_before: ELBO of the pooled, unmerged clusters.
    n_merges: merges accepted.
    base_map: with a ``base`` model (:func:`fedvi.extend`), ``(G_base,)`` new id of each of its
        clusters (the merge renumbers clusters by size); ``None`` otherwise.
    """

    posterior: Summaries
    mapping: list[np.ndarray]
    membership: np.ndarray
    site_ids: tuple[int, ...]
    elbo: float
    elbo_before: float
    n_merges: int
    base_map: np.ndarray | None = None  # old-to-new ids of the base model (extend)

    @property
    def n_clusters(self) -> int:
        return self.posterior.n_clusters


def check_compatible(sites: list[Summaries], names: list[str] | None = None) -> None:
    """Raise :class:`SchemaMismatchError` naming the sites whose schema or model differ."""
    if not sites:
        raise ValueError("no site summaries to merge")
    names = names or [f"site {b}" for b in range(len(sites))]
    ref = sites[0].spec
    for name, s in zip(names[1:], sites[1:], strict=True):
        if s.spec.schema_hash() != ref.schema_hash():
            raise SchemaMismatchError(
                f"{name} has a different data schema than {names[0]}: "
                f"{s.spec.likelihood}, {s.spec.n_features} variables, "
                f"levels {list(s.spec.n_levels)} vs {ref.likelihood}, {ref.n_features} "
                f"variables, levels {list(ref.n_levels)}"
            )
        if s.spec.model_hash() != ref.model_hash():
            diff = {
                k: (v, ref.to_dict()[k])
                for k, v in s.spec.to_dict().items()
                if v != ref.to_dict()[k]
            }
            raise SchemaMismatchError(
                f"{name} used a different model than {names[0]}: {diff} (theirs, reference)"
            )


#: Pooled clusters up to which best-first scores every admissible pair (the exact greedy).
#: Beyond, best-first runs on chunks of sites of at most this many clusters, then on the
#: chunks' groups (docs/method.md, the merge at many sites).
EXACT_LIMIT = 1024


class _Groups:
    """Mutable merge state: statistics of the current global clusters and their sites."""

    def __init__(self, pooled: Summaries, members: np.ndarray):
        self.pooled = pooled
        self.scorer = PairGain.from_summaries(pooled)
        self.relevance = pooled.relevance
        K = pooled.n_clusters
        self.sites = members.copy()
        self.group_of = np.arange(K)  # current group of each pooled cluster
        self.members = [[k] for k in range(K)]
        self.alive = np.ones(K, dtype=bool)
        self.n_merges = 0

    @property
    def counts(self) -> np.ndarray:
        return self.scorer.counts

    @property
    def sums(self) -> np.ndarray:
        return self.scorer.sums

    def stats(self) -> Summaries:
        """The current groups' statistics (all pooled slots; dead ones are unused)."""
        return replace(
            self.pooled,
            counts=self.scorer.counts,
            sums=self.scorer.sums,
            observed=self.scorer.observed,
            relevance=self.relevance,
        )

    def set_relevance(self, relevance) -> None:
        self.relevance = relevance
        self.scorer.set_relevance(relevance)

    def admissible(self, i: int, others: np.ndarray) -> np.ndarray:
        """``(M,)`` bool: ``others`` alive, not ``i``, with no site in common with ``i``."""
        return (
            self.alive[others] & (others != i) & ~(self.sites[others] & self.sites[i]).any(axis=1)
        )

    def merge(self, i: int, j: int) -> None:
        self.scorer.merge(i, j)
        self.sites[i] |= self.sites[j]
        self.alive[j] = False
        self.group_of[self.members[j]] = i
        self.members[i].extend(self.members[j])
        self.members[j] = []
        self.n_merges += 1


def _exact_best_first(groups: _Groups, ids: np.ndarray) -> None:
    """Best-first on the groups ``ids`` (sorted): merge the admissible pair with the largest
    positive gain, rescore the pairs of the merged group, repeat until no gain is positive.

    The gains live in an upper-triangular ``(K, K)`` matrix scored in row blocks; a heap of
    each row's best entry, checked against the row's current best when popped (lazy
    invalidation), picks the largest gain, ties to the lowest row then column.
    """
    K = len(ids)
    if K < 2:
        return
    cols = np.flatnonzero(groups.sites[ids].any(axis=0))  # the sites these groups hold
    member = groups.sites[np.ix_(ids, cols)].astype(np.float32)
    disjoint = (member @ member.T) < 0.5
    G = np.full((K, K), -np.inf)
    step = max(1, BLOCK_CELLS // max(1, groups.sums.shape[1]) // K)
    for r0 in range(0, K, step):
        r1 = min(K, r0 + step)
        ii, jj = np.nonzero(np.triu(disjoint[r0:r1], k=r0 + 1))
        G[ii + r0, jj] = groups.scorer.gains(ids[ii + r0], ids[jj])
    alive = np.ones(K, dtype=bool)
    best = G.max(axis=1)
    arg = G.argmax(axis=1)
    heap = [(-best[x], x, int(arg[x])) for x in range(K) if best[x] > 0]
    heapq.heapify(heap)

    def push(rows):
        best[rows] = G[rows].max(axis=1)
        arg[rows] = G[rows].argmax(axis=1)
        for x in rows:
            if best[x] > 0:
                heapq.heappush(heap, (-best[x], int(x), int(arg[x])))

    while heap:
        g, x, y = heapq.heappop(heap)
        if not alive[x] or best[x] != -g or arg[x] != y:
            continue  # stale: the row changed since this entry was pushed
        groups.merge(int(ids[x]), int(ids[y]))
        alive[y] = False
        G[y, :] = G[:, y] = -np.inf
        disjoint[x] &= disjoint[y]  # the merged group holds the sites of both
        disjoint[:, x] = disjoint[x]
        others = np.flatnonzero(alive & disjoint[x])
        row = np.full(K, -np.inf)
        row[others] = groups.scorer.gains_against(int(ids[x]), ids[others])
        G[x, x + 1 :] = row[x + 1 :]
        G[:x, x] = row[:x]
        above = np.arange(x)
        stale = alive[:x] & ((arg[:x] == x) | (arg[:x] == y))
        between = np.flatnonzero(alive[x + 1 : y] & (arg[x + 1 : y] == y)) + x + 1
        push(np.concatenate([above[stale], between, [x]]).astype(np.int64))
        up = alive[:x] & ~stale & ((row[:x] > best[:x]) | ((row[:x] == best[:x]) & (x < arg[:x])))
        for r in np.flatnonzero(up):
            best[r], arg[r] = row[r], x
            if best[r] > 0:
                heapq.heappush(heap, (-best[r], int(r), x))


def _best_first(groups: _Groups, limit: int = EXACT_LIMIT) -> None:
    """Best-first over all alive groups; above ``limit`` groups, first within consecutive
    chunks of at most ``limit`` groups (by their first site, the pass order), then over the
    chunks' groups, until one chunk holds them all. Cost: about ``limit`` pair gains per
    pooled cluster, so linear in the number of sites."""
    while True:
        ids = np.flatnonzero(groups.alive)
        if len(ids) <= limit:
            _exact_best_first(groups, ids)
            return
        first_site = groups.sites[ids].argmax(axis=1)
        ids = ids[np.argsort(first_site, kind="stable")]
        before = groups.n_merges
        for s in range(0, len(ids), limit):
            _exact_best_first(groups, np.sort(ids[s : s + limit]))
        if groups.n_merges == before:
            limit *= 2  # nothing merged within chunks: wider chunks (at worst, all pairs)


def _paper(groups: _Groups, block_of: np.ndarray, n_blocks: int) -> None:
    """The authors' pass: sites in order; each cluster of site b tries the clusters of each
    later site m in decreasing correlation of their count profiles and merges with the first
    that raises the ELBO. Later sites are scored a window at a time (all their admissible
    candidates at once); the first site with a positive candidate decides, and the window
    restarts after it, since the group changed."""
    # Pooled clusters are in site order: site m's clusters are start[m]:start[m + 1].
    start = np.searchsorted(block_of, np.arange(n_blocks + 1))
    for b in range(n_blocks):
        for k in range(start[b], start[b + 1]):
            m0, width = b + 1, 4
            while m0 < n_blocks:
                g = int(groups.group_of[k])
                window = range(m0, min(n_blocks, m0 + width))
                cands = np.arange(start[window.start], start[window.stop])
                site_of = block_of[cands]
                targets = groups.group_of[cands]
                ok = groups.admissible(g, targets)
                pos = np.zeros(len(targets), dtype=bool)
                if ok.any():
                    pos[ok] = groups.scorer.gains_against(g, targets[ok]) > 0
                if not pos.any():
                    m0, width = window.stop, 2 * width
                    continue
                m = int(site_of[np.argmax(pos)])
                here = site_of == m
                t_m, pos_m = targets[here], pos[here]
                corr = _corr(groups.sums[g], groups.sums[t_m])
                order = np.argsort(-corr, kind="stable")
                t = int(t_m[order[np.argmax(pos_m[order])]])
                groups.merge(g, t)
                m0, width = m + 1, 4


def _corr(u: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``(M,)`` correlation of the profile ``u (P,)`` with each row of ``V (M, P)`` (0 where
    either is constant)."""
    su, sv = u.std(), V.std(axis=1)
    cov = ((u - u.mean()) * (V - V.mean(axis=1, keepdims=True))).mean(axis=1)
    ok = (su != 0) & (sv != 0)
    return np.divide(cov, su * sv, out=np.zeros(len(V)), where=ok)


def _refit_relevance(groups: _Groups, max_iter: int = 200) -> bool:
    """Update ``c_d`` on the pooled statistics until it settles; True if it moved."""
    if not groups.pooled.spec.variable_selection:
        return False
    c0 = groups.relevance.copy()
    c = c0
    alive = groups.stats().subset(groups.alive)
    for _ in range(max_iter):
        new = relevance_step(alive, c)
        if np.max(np.abs(new - c)) < 1e-10:
            c = new
            break
        c = new
    groups.set_relevance(c)
    return bool(np.max(np.abs(c - c0)) > 1e-6)


def global_merge(
    sites: list[Summaries],
    mode: str = "best_first",
    names: list[str] | None = None,
    site_ids: list[int] | None = None,
    base: tuple[Summaries, np.ndarray, list[int]] | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> GlobalMerge:
    """Pool the sites' clusters and merge across sites while the ELBO rises.

    ``mode="paper"``: the authors' single deterministic pass in site order. ``"best_first"``:
    repeatedly merge the admissible pair with the largest positive gain (independent of site
    order). With variable selection, ``c_d`` is updated on the pooled statistics between
    merge passes until neither changes.

    ``base``: an existing global model to extend, as ``(posterior, membership (G, S0),
    base_site_ids)``; its clusters enter as groups holding those sites, the new ``sites`` join.

    ``exact_limit``: up to this many pooled clusters best-first scores every admissible pair;
    beyond, it works on chunks of sites first (linear cost in the number of sites).
    """
    if exact_limit < 2:
        raise ValueError(f"exact_limit must be at least 2, got {exact_limit}")
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    site_ids = list(range(len(sites))) if site_ids is None else [int(s) for s in site_ids]
    names = names or [f"site {s}" for s in site_ids]
    parts, blocks, members = [], [], []
    all_ids = list(site_ids)
    if base is not None:
        base_post, base_members, base_ids = base
        overlap = sorted(set(base_ids) & set(site_ids))
        if overlap:
            raise ValueError(f"sites {overlap} are already in the model")
        check_compatible([base_post, *sites], ["the model", *names])
        all_ids = [*base_ids, *site_ids]
        parts.append(base_post)
        blocks.append(np.zeros(base_post.n_clusters, dtype=np.int64))
        m = np.zeros((base_post.n_clusters, len(all_ids)), dtype=bool)
        m[:, : len(base_ids)] = base_members
        members.append(m)
    else:
        check_compatible(sites, names)
    offset = len(all_ids) - len(site_ids)
    for b, s in enumerate(sites):
        parts.append(s)
        blocks.append(np.full(s.n_clusters, len(blocks)))
        m = np.zeros((s.n_clusters, len(all_ids)), dtype=bool)
        m[:, offset + b] = True
        members.append(m)
    pooled = Summaries.concat(parts)
    if base is not None and pooled.spec.variable_selection:
        pooled = replace(pooled, relevance=base[0].relevance.copy())
    block_of = np.concatenate(blocks)
    groups = _Groups(pooled, np.vstack(members))
    before = elbo(pooled)
    for _ in range(20):
        merges = groups.n_merges
        if mode == "paper":
            _paper(groups, block_of, len(parts))
        else:
            _best_first(groups, exact_limit)
        moved = _refit_relevance(groups)
        if groups.n_merges == merges and not moved:
            break
    alive = np.flatnonzero(groups.alive)
    order = alive[np.argsort(-groups.counts[alive], kind="stable")]
    new_id = np.full(len(groups.counts), -1)
    new_id[order] = np.arange(len(order))
    global_of = new_id[groups.group_of]
    posterior = replace(pooled.combine(global_of, len(order)), relevance=groups.relevance)
    membership = groups.sites[order]
    first = 1 if base is not None else 0
    mapping = [global_of[block_of == first + b] for b in range(len(sites))]
    base_map = global_of[block_of == 0] if base is not None else None
    return GlobalMerge(
        posterior,
        mapping,
        membership,
        tuple(all_ids),
        elbo(posterior),
        before,
        groups.n_merges,
        base_map,
    )
