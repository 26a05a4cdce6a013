"""The server's global merge of the sites' clusters, from summaries alone (SPEC §6).

Invariant: a global cluster holds at most one local cluster per site, so every merge joins
clusters with disjoint sets of sites and the assignment entropy is unchanged; the ELBO change
is then exact from ``N``, ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedvi.elbo import elbo, merge_gain
from fedvi.summaries import Summaries
from fedvi.vi import relevance_step

MERGE_MODES = ("best_first", "paper")


class SchemaMismatchError(ValueError):
    """Sites do not share one schema or model."""


@dataclass(frozen=True)
class GlobalMerge:
    """Result of the global merge.

    posterior: :class:`Summaries` of the ``G`` global clusters (by decreasing size); its
        ``prior_dim`` is the sum of the sites' ``K0``. The global posterior is
        ``alpha_hat = alpha0 + counts``, ``beta_hat = beta + c * sums``.
    mapping: one ``(K_b,)`` array per site: the global cluster of each local cluster.
    elbo: global ELBO after merging. elbo_before: ELBO of the pooled, unmerged clusters.
    n_merges: merges accepted.
    """

    posterior: Summaries
    mapping: list[np.ndarray]
    elbo: float
    elbo_before: float
    n_merges: int

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
            raise SchemaMismatchError(
                f"{name} used a different model than {names[0]}: "
                f"{s.spec.to_dict()} vs {ref.to_dict()}"
            )


def pool(sites: list[Summaries]) -> tuple[Summaries, np.ndarray]:
    """All sites' clusters side by side, and ``(K,)`` the site of each cluster."""
    spec = sites[0].spec
    n_rows = sum(s.n_rows for s in sites)
    relevance = None
    if spec.variable_selection:
        # Start from the sites' own c_d, weighted by their size; refined on the pooled stats.
        relevance = sum(s.n_rows * s.relevance for s in sites) / n_rows
    pooled = Summaries(
        counts=np.concatenate([s.counts for s in sites]),
        sums=np.vstack([s.sums for s in sites]),
        entropy=np.concatenate([s.entropy for s in sites]),
        column_totals=np.sum([s.column_totals for s in sites], axis=0),
        n_rows=n_rows,
        prior_dim=sum(s.prior_dim for s in sites),
        spec=spec,
        relevance=relevance,
    )
    site_of = np.concatenate([np.full(s.n_clusters, b) for b, s in enumerate(sites)])
    return pooled, site_of


class _Groups:
    """Mutable merge state: statistics of the current global clusters and their sites."""

    def __init__(self, pooled: Summaries, site_of: np.ndarray, n_sites: int):
        self.spec = pooled.spec
        self.counts = pooled.counts.copy()
        self.sums = pooled.sums.copy()
        self.entropy = pooled.entropy.copy()
        self.relevance = pooled.relevance
        K = len(self.counts)
        self.sites = np.zeros((K, n_sites), dtype=bool)
        self.sites[np.arange(K), site_of] = True
        self.group_of = np.arange(K)  # global cluster of each pooled local cluster
        self.alive = np.ones(K, dtype=bool)
        self.n_merges = 0

    def gain(self, i: int, others: np.ndarray) -> np.ndarray:
        """Gain of merging group ``i`` with each of ``others``; ``-inf`` where not admissible."""
        g = np.full(len(others), -np.inf)
        if not self.alive[i]:
            return g
        ok = self.alive[others] & ~(self.sites[others] & self.sites[i]).any(axis=1) & (others != i)
        if ok.any():
            idx = others[ok]
            g[ok] = merge_gain(
                self.spec, self.counts, self.sums, np.full(len(idx), i), idx, self.relevance
            )
        return g

    def merge(self, i: int, j: int) -> None:
        self.counts[i] += self.counts[j]
        self.sums[i] += self.sums[j]
        self.entropy[i] += self.entropy[j]
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


def _paper(groups: _Groups, site_of: np.ndarray, n_sites: int) -> None:
    for b in range(n_sites):
        for k in np.flatnonzero(site_of == b):
            for m in range(b + 1, n_sites):
                g = groups.group_of[k]
                cands = np.flatnonzero(site_of == m)
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


def _refit_relevance(groups: _Groups, pooled: Summaries, max_iter: int = 200) -> bool:
    """Update ``c_d`` on the pooled statistics until it settles; True if it moved."""
    if not groups.spec.variable_selection:
        return False
    alive = groups.alive
    c0 = groups.relevance.copy()
    c = c0
    for _ in range(max_iter):
        new = relevance_step(
            pooled.spec,
            pooled.column_totals,
            pooled.n_rows,
            groups.counts[alive],
            groups.sums[alive],
            c,
        )
        if np.max(np.abs(new - c)) < 1e-10:
            c = new
            break
        c = new
    groups.relevance = c
    return bool(np.max(np.abs(c - c0)) > 1e-6)


def global_merge(
    sites: list[Summaries], mode: str = "best_first", names: list[str] | None = None
) -> GlobalMerge:
    """Pool the sites' clusters and merge across sites while the ELBO rises.

    ``mode="paper"``: the authors' single deterministic pass in site order. ``"best_first"``:
    repeatedly merge the admissible pair with the largest positive gain (independent of site
    order). With variable selection, ``c_d`` is updated on the pooled statistics between
    merge passes until neither changes.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    check_compatible(sites, names)
    pooled, site_of = pool(sites)
    groups = _Groups(pooled, site_of, len(sites))
    before = elbo(pooled)
    for _ in range(20):
        merges = groups.n_merges
        if mode == "paper":
            _paper(groups, site_of, len(sites))
        else:
            _best_first(groups)
        moved = _refit_relevance(groups, pooled)
        if groups.n_merges == merges and not moved:
            break
    alive = np.flatnonzero(groups.alive)
    order = alive[np.argsort(-groups.counts[alive], kind="stable")]
    new_id = np.full(len(groups.counts), -1)
    new_id[order] = np.arange(len(order))
    posterior = replace(
        pooled,
        counts=groups.counts[order],
        sums=groups.sums[order],
        entropy=groups.entropy[order],
        relevance=groups.relevance,
    )
    global_of = new_id[groups.group_of]
    mapping = [global_of[site_of == b] for b in range(len(sites))]
    return GlobalMerge(posterior, mapping, elbo(posterior), before, groups.n_merges)
