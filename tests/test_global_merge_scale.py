"""The global merge at many sites (issue 20): pair gains from the two clusters' statistics,
the same decisions as the quadratic merge it replaced, and a 500-site federation."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
import pytest

import fedvi
from fedvi.elbo import elbo, merge_gain
from fedvi.global_merge import global_merge
from fedvi.metrics import adjusted_rand_index
from fedvi.pair_gain import PairGain
from fedvi.simulate import add_missing, simulate, split_sites
from fedvi.summaries import Summaries
from fedvi.vi import relevance_step


# -- the merge of commit d71145c, kept as the oracle: every gain recomputed over whole arrays -
def _reference(sites: list[Summaries], mode: str = "best_first") -> tuple[np.ndarray, float]:
    """``(global_of, elbo)``: the pooled clusters' groups (numbered by their lowest pooled
    cluster) and the ELBO, by the quadratic pass of d71145c."""
    pooled = Summaries.concat(sites)
    K = pooled.n_clusters
    block = np.concatenate([np.full(s.n_clusters, b) for b, s in enumerate(sites)])
    sites_of = np.zeros((K, len(sites)), dtype=bool)
    sites_of[np.arange(K), block] = True
    st = {"counts": pooled.counts.copy(), "sums": pooled.sums.copy(), "rel": pooled.relevance}
    obs = None if pooled.observed is None else pooled.observed.copy()
    group_of, alive = np.arange(K), np.ones(K, dtype=bool)

    def stats():
        return replace(
            pooled, counts=st["counts"], sums=st["sums"], observed=obs, relevance=st["rel"]
        )

    def gain(i, others):
        g = np.full(len(others), -np.inf)
        ok = alive[others] & ~(sites_of[others] & sites_of[i]).any(axis=1) & (others != i)
        if alive[i] and ok.any():
            g[ok] = merge_gain(stats(), np.full(ok.sum(), i), others[ok])
        return g

    def merge(i, j):
        st["counts"][i] += st["counts"][j]
        st["sums"][i] += st["sums"][j]
        if obs is not None:
            obs[i] += obs[j]
        sites_of[i] |= sites_of[j]
        alive[j] = False
        group_of[group_of == j] = i

    def corr(u, v):
        su, sv = u.std(), v.std()
        return 0.0 if su == 0 or sv == 0 else ((u - u.mean()) * (v - v.mean())).mean() / (su * sv)

    idx = np.arange(K)
    for _ in range(20):
        n_alive = alive.sum()
        if mode == "paper":
            for b in range(len(sites)):
                for k in np.flatnonzero(block == b):
                    for m in range(b + 1, len(sites)):
                        g = group_of[k]
                        targets = group_of[np.flatnonzero(block == m)]
                        c = np.array([corr(st["sums"][g], st["sums"][t]) for t in targets])
                        for t in targets[np.argsort(-c, kind="stable")]:
                            if t != g and not (sites_of[g] & sites_of[t]).any():
                                if gain(g, np.array([t]))[0] > 0:
                                    merge(g, t)
                                    break
        else:
            G = np.vstack([gain(i, idx) for i in range(K)])
            G[np.tril_indices(K)] = -np.inf
            while True:
                i, j = divmod(int(np.argmax(G)), K)
                if not G[i, j] > 0:
                    break
                merge(i, j)
                G[j, :] = G[:, j] = -np.inf
                row = gain(i, idx)
                G[i, :] = np.where(idx > i, row, -np.inf)
                G[:, i] = np.where(idx < i, row, -np.inf)
        moved = False
        if pooled.spec.variable_selection:
            c0 = c = st["rel"]
            live = stats().subset(alive)
            for _ in range(200):
                new = relevance_step(live, c)
                done = np.max(np.abs(new - c)) < 1e-10
                c = new
                if done:
                    break
            st["rel"] = c
            moved = np.max(np.abs(c - c0)) > 1e-6
        if alive.sum() == n_alive and not moved:
            break
    _, first = np.unique(group_of, return_inverse=True)
    final = pooled.combine(first)
    return group_of, elbo(replace(final, relevance=st["rel"]))


def _canonical(result) -> np.ndarray:
    """The new merge's groups of the pooled clusters, numbered by their lowest cluster."""
    global_of = np.concatenate(result.mapping)
    lowest = np.full(global_of.max() + 1, len(global_of))
    np.minimum.at(lowest, global_of, np.arange(len(global_of)))
    return lowest[global_of]


@cache  # the fits are reused by several tests; callers do not mutate them
def _sites(
    likelihood="bernoulli", n_sites=8, rows=2400, missing=False, vs=False, seed=3, split="dirichlet"
):
    sim = simulate(rows, 5, 12, likelihood=likelihood, n_levels=3, seed=seed)
    X = add_missing(sim.X, sim.z, 0.2, seed=seed) if missing else sim.X
    parts = split_sites(sim.z, n_sites, split, seed=seed)
    res = fedvi.federated_fit(
        [X[p] for p in parts],
        likelihood,
        n_components=8,
        variable_selection=vs,
        refine_rounds=0,
        seed=seed,
        **({"missing": "ignore"} if missing else {}),
    )
    return tuple(res.site_summaries)


VARIANTS = {
    "bernoulli": {},
    "missing": {"missing": True},
    "categorical": {"likelihood": "categorical"},
    "varsel": {"vs": True},
    "categorical_missing_varsel": {"likelihood": "categorical", "missing": True, "vs": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pair_gain_is_the_elbo_change_of_merging_two_sites_clusters(variant):
    sites = _sites(**VARIANTS[variant])
    pooled = Summaries.concat(sites)
    if pooled.spec.variable_selection:
        pooled = replace(pooled, relevance=np.linspace(0.1, 0.9, pooled.spec.family().n_features))
    assert variant != "missing" or pooled.observed is not None
    i, j = 0, sites[0].n_clusters  # clusters of sites 0 and 1
    group_of = np.arange(pooled.n_clusters)
    group_of[j] = i
    group_of[j + 1 :] -= 1
    merged = replace(pooled.combine(group_of), relevance=pooled.relevance)
    truth = elbo(merged) - elbo(pooled)
    scorer = PairGain.from_summaries(pooled)
    assert scorer.gains([i], [j])[0] == pytest.approx(truth, rel=1e-9, abs=1e-6)
    # After a merge the scorer holds the merged statistics: the next gain is the formula's on
    # them.
    scorer.merge(i, j)
    k = j + 1
    stats = replace(pooled, counts=scorer.counts, sums=scorer.sums, observed=scorer.observed)
    assert scorer.counts[i] == pytest.approx(pooled.counts[i] + pooled.counts[j])
    assert scorer.gains([i], [k])[0] == pytest.approx(merge_gain(stats, [i], [k])[0], rel=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["best_first", "paper"])
def test_same_decisions_as_the_quadratic_merge(variant, mode):
    sites = _sites(**VARIANTS[variant])
    ref_groups, ref_elbo = _reference(sites, mode)
    new = global_merge(sites, mode)
    assert (_canonical(new) == ref_groups).all()
    assert new.elbo == pytest.approx(ref_elbo, rel=1e-12)


def test_chunked_best_first_keeps_the_invariant_and_an_elbo_as_high():
    # 24 sites, chunks of at most 12 clusters: best-first within chunks of sites first.
    sites = _sites(n_sites=24, rows=12000, seed=5, split="iid")
    exact = global_merge(sites)
    chunked = global_merge(sites, exact_limit=12)
    assert sum(s.n_clusters for s in sites) > 24
    assert chunked.elbo >= exact.elbo - 1e-9 * abs(exact.elbo)
    assert chunked.n_clusters == exact.n_clusters
    for g in range(chunked.n_clusters):
        holds = [int((m == g).sum()) for m in chunked.mapping]
        assert max(holds) <= 1  # at most one local cluster per site


def _uniform_sites(n_sites: int, rows: int, n_features: int, n_true: int, seed: int = 0):
    """Sites of ``rows`` rows each; ``theta ~ Beta(1, 1)`` (clusters a Bayes classifier
    separates: ARI about 0.99 at D 50)."""
    theta = np.random.default_rng([seed, 0]).beta(1.0, 1.0, size=(n_true, n_features))
    X, Z = [], []
    for b in range(n_sites):
        rng = np.random.default_rng([seed, 1, b])
        z = rng.integers(0, n_true, size=rows)
        X.append((rng.random((rows, n_features)) < theta[z]).astype(np.int8))
        Z.append(z)
    return X, Z


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [
        ["+experiment=sim4", "federation.split=iid"],
        ["+experiment=sim4", "federation.split=exclusive"],
        ["+experiment=sim5"],
        ["+experiment=sim7"],
        ["+experiment=categorical", "setting=a"],
        ["+experiment=varsel", "setting=a"],
        ["+experiment=missing"],
        ["+experiment=small"],
        ["+experiment=shards"],
    ],
    ids=lambda p: "_".join(x.split("=")[-1] for x in p),
)
def test_presets_merge_as_the_quadratic_merge(preset):
    pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
    from simulations.data import load_sites
    from strategies.config import RunSettings, compose_config

    cfg = compose_config("config", preset)
    tables, _, _ = load_sites(cfg)
    s = RunSettings.from_cfg(cfg)
    res = fedvi.federated_fit(
        tables,
        likelihood=s.spec.likelihood,
        n_components=s.spec.n_components,
        variable_selection=s.spec.variable_selection,
        seed=s.seed,
        refine_rounds=0,
        **({"missing": s.spec.missing} if s.spec.missing != "error" else {}),
    )
    for mode in ("best_first", "paper"):
        ref_groups, ref_elbo = _reference(res.site_summaries, mode)
        new = global_merge(res.site_summaries, mode)
        assert (_canonical(new) == ref_groups).all(), mode
        assert new.elbo == pytest.approx(ref_elbo, rel=1e-12)


@pytest.mark.slow
def test_500_sites_recover_the_six_clusters():
    X, Z = _uniform_sites(500, 1000, 50, 6)
    res = fedvi.federated_fit(X, "bernoulli", n_components=20, refine_rounds=0)
    assert res.n_clusters == 6
    assert adjusted_rand_index(np.concatenate(Z), np.concatenate(res.labels)) >= 0.99
    # Chunked best-first (the default beyond EXACT_LIMIT pooled clusters) against best-first
    # over every pair.
    summaries = res.site_summaries
    assert sum(s.n_clusters for s in summaries) > 2000
    exact = global_merge(summaries, exact_limit=10**6)
    assert res.merge.elbo >= exact.elbo - 1e-9 * abs(exact.elbo)


def _synthetic_sites(n_sites=30, per_site=4, n_types=8, seed=0) -> list[Summaries]:
    """Statistics a site would send for clusters of ``n_types`` nearby profiles with sizes
    from 5 to 400 rows: many positive gains of similar size, so the order of merges matters."""
    rng = np.random.default_rng(seed)
    like = _sites(n_sites=2, rows=400)[0]
    D = like.spec.family().n_features
    base = rng.beta(1.0, 1.0, size=D)
    types = np.clip(base + rng.normal(0, 0.15, size=(n_types, D)), 0.02, 0.98)
    out = []
    for _ in range(n_sites):
        n = rng.integers(5, 400, size=per_site).astype(float)
        t = rng.choice(n_types, size=per_site, replace=False)
        S = rng.binomial(n.astype(int)[:, None], types[t]).astype(float)
        out.append(
            replace(
                like,
                counts=n,
                sums=S,
                entropy=np.zeros(per_site),
                column_totals=S.sum(axis=0),
                n_rows=int(n.sum()),
            )
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_merges_as_the_quadratic_merge_where_order_matters(seed):
    sites = _synthetic_sites(seed=seed)
    ref_groups, ref_elbo = _reference(sites)
    new = global_merge(sites)
    assert new.n_merges > 50
    assert (_canonical(new) == ref_groups).all()
    assert new.elbo == pytest.approx(ref_elbo, rel=1e-12)
