"""The server's global merge of the sites' clusters, from summaries alone (docs/method.md).

Invariant: a global cluster holds at most one local cluster per site, so every merge joins
clusters with disjoint sets of sites and the assignment entropy is unchanged; the ELBO change
is then exact from ``N``, ``S``.

The merge can also start from an existing global model (:func:`fedvi.extend`): its clusters
enter as groups that already hold a set of sites, and the new sites' clusters join them under
the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedvi.elbo import elbo, merge_gain
from fedvi.options import MERGE_MODES
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
    base_map: np.ndarray | None = None  # [h19] old-to-new ids for extend

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


class _Groups:
    """Mutable merge state: statistics of the current global clusters and their sites."""

    def __init__(self, pooled: Summaries, members: np.ndarray):
        self.pooled = pooled
        self.counts = pooled.counts.copy()
        self.sums = pooled.sums.copy()
        self.observed = None if pooled.observed is None else pooled.observed.copy()
        self.relevance = pooled.relevance
        K = len(self.counts)
        self.sites = members.copy()
        self.group_of = np.arange(K)  # current group of each pooled cluster
        self.alive = np.ones(K, dtype=bool)
        self.n_merges = 0

    def stats(self) -> Summaries:
        """The current groups' statistics (all pooled slots; dead ones are unused)."""
        return replace(
            self.pooled,
            counts=self.counts,
            sums=self.sums,
            observed=self.observed,
            relevance=self.relevance,
        )

    def gain(self, i: int, others: np.ndarray) -> np.ndarray:
        """Gain of merging group ``i`` with each of ``others``; ``-inf`` where not admissible."""
        g = np.full(len(others), -np.inf)
        if not self.alive[i]:
            return g
        ok = self.alive[others] & ~(self.sites[others] & self.sites[i]).any(axis=1) & (others != i)
        if ok.any():
            idx = others[ok]
            g[ok] = merge_gain(self.stats(), np.full(len(idx), i), idx)
        return g

    def merge(self, i: int, j: int) -> None:
        self.counts[i] += self.counts[j]
        self.sums[i] += self.sums[j]
        if self.observed is not None:
            self.observed[i] += self.observed[j]
        self.sites[i] |= self.sites[j]
        self.alive[j] = False
        self.group_of[self.group_of == j] = i
        self.n_merges += 1


def _best_first(groups: _Groups) -> None:
    K = len(groups.counts)
    all_idx = np.arange(K)
    gains = np.vstack([groups.gain(i, all_idx) for i in range(K)]) if K else np.zeros((0, 0))
    gains[np.tril_indices(K)] = -np.inf
    while K > 1:
        flat = int(np.argmax(gains))
        i, j = divmod(flat, K)
        if not gains[i, j] > 0:
            break
        groups.merge(i, j)
        gains[j, :] = gains[:, j] = -np.inf
        row = groups.gain(i, all_idx)
        gains[i, :] = np.where(all_idx > i, row, -np.inf)
        gains[:, i] = np.where(all_idx < i, row, -np.inf)


def _paper(groups: _Groups, block_of: np.ndarray, n_blocks: int) -> None:
    for b in range(n_blocks):
        for k in np.flatnonzero(block_of == b):
            for m in range(b + 1, n_blocks):
                g = groups.group_of[k]
                cands = np.flatnonzero(block_of == m)
                targets = groups.group_of[cands]
                corr = np.array([_corr(groups.sums[g], groups.sums[t]) for t in targets])
                for t in targets[np.argsort(-corr, kind="stable")]:
                    if t == g or (groups.sites[g] & groups.sites[t]).any():
                        continue
                    if groups.gain(g, np.array([t]))[0] > 0:
                        groups.merge(g, t)
                        break


def _corr(u: np.ndarray, v: np.ndarray) -> float:
    su, sv = u.std(), v.std()
    if su == 0 or sv == 0:
        return 0.0
    return float(((u - u.mean()) * (v - v.mean())).mean() / (su * sv))


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
    groups.relevance = c
    return bool(np.max(np.abs(c - c0)) > 1e-6)


def global_merge(
    sites: list[Summaries],
    mode: str = "best_first",
    names: list[str] | None = None,
    site_ids: list[int] | None = None,
    base: tuple[Summaries, np.ndarray, list[int]] | None = None,
) -> GlobalMerge:
    """Pool the sites' clusters and merge across sites while the ELBO rises.

    ``mode="paper"``: the authors' single deterministic pass in site order. ``"best_first"``:
    repeatedly merge the admissible pair with the largest positive gain (independent of site
    order). With variable selection, ``c_d`` is updated on the pooled statistics between
    merge passes until neither changes.

    ``base``: an existing global model to extend, as ``(posterior, membership (G, S0),
    base_site_ids)``; its clusters enter as groups holding those sites, the new ``sites`` join.
    """
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
            _best_first(groups)
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
    base_map = global_of[block_of == 0] if base is not None else None  # [h19]
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
