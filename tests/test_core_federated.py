"""The federated pipeline in one process: global merge, labelling, refinement, recovery."""

from __future__ import annotations

import numpy as np
import pytest

import fedvi
from fedvi.data import encode
from fedvi.elbo import elbo, merge_gain
from fedvi.federated import shared_spec
from fedvi.metrics import adjusted_rand_index
from fedvi.summaries import Summaries

WEIGHTS = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.07])
# Each site misses two of the seven clusters (clusters 6 is on every site).
MISSING = {0: (0, 3), 1: (1, 4), 2: (2, 5)}


def well_separated(likelihood: str, seed: int, N: int = 3000, D: int = 30):
    """Seven clusters of unequal sizes with profiles from Beta(0.5, 0.5) / Dirichlet(0.5)."""
    rng = np.random.default_rng(seed)
    z = rng.choice(len(WEIGHTS), size=N, p=WEIGHTS)
    if likelihood == "bernoulli":
        theta = rng.beta(0.5, 0.5, size=(len(WEIGHTS), D))
        X = (rng.random((N, D)) < theta[z]).astype(np.int8)
    else:
        phi = rng.dirichlet(np.full(3, 0.5), size=(len(WEIGHTS), D))
        X = np.minimum((rng.random((N, D, 1)) > np.cumsum(phi[z], axis=2)).sum(axis=2), 2)
    site = rng.integers(0, 3, size=N)
    parts = []
    for b, miss in MISSING.items():
        parts.append(np.flatnonzero((site == b) & ~np.isin(z, miss)))
    return [X[p] for p in parts], [z[p] for p in parts]


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical"])
@pytest.mark.parametrize("seed", [0, 3])
def test_federated_recovers_true_k_and_matches_pooled(likelihood, seed):
    """Thresholds: over seeds 0-4 both likelihoods gave K = 7 and ARI >= 0.997 federated and
    pooled, with |difference| <= 0.0005."""
    sites, truth = well_separated(likelihood, seed)
    res = fedvi.federated_fit(sites, likelihood=likelihood, n_components=20, seed=0)
    z = np.concatenate(truth)
    ari_fed = adjusted_rand_index(z, np.concatenate(res.labels))
    pooled = fedvi.MixtureVI(likelihood, n_components=20, seed=0).fit(np.vstack(sites))
    ari_pooled = adjusted_rand_index(z, pooled.labels_)
    assert res.n_clusters == 7
    assert ari_fed >= 0.95
    assert abs(ari_fed - ari_pooled) <= 0.02
    # Every site misses clusters, so at least one site sent fewer than 7.
    assert min(s.n_clusters for s in res.site_summaries) <= 5
    assert [len(lab) for lab in res.labels] == [len(x) for x in sites]


def test_paper_mode_and_map_labels_also_recover():
    sites, truth = well_separated("bernoulli", 1)
    res = fedvi.federated_fit(sites, merge_mode="paper", label_mode="map", refine_rounds=0, seed=0)
    assert res.n_clusters == 7
    assert adjusted_rand_index(np.concatenate(truth), np.concatenate(res.labels)) >= 0.95


def sufficient_stats(X, resp):
    """Statistics of rows ``X`` under ``resp``, written out by hand."""
    X = X.toarray() if hasattr(X, "toarray") else X
    return resp.sum(axis=0), resp.T @ X, -(resp * np.log(resp)).sum(axis=0)


def _random_site_stats(X, K, seed, spec, K0):
    rng = np.random.default_rng(seed)
    matrix, _ = encode(X, spec).design()
    resp = rng.dirichlet(np.full(K, 0.3), size=len(X))
    counts, sums, entropy = sufficient_stats(matrix, resp)
    s = Summaries(counts, sums, entropy, np.asarray(matrix.sum(axis=0)).ravel(), len(X), K0, spec)
    return s, resp, matrix


def _elbo(spec, counts, sums, entropy, K0):
    return elbo(Summaries(counts, sums, entropy, sums.sum(axis=0), 0, K0, spec))


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical"])
def test_global_merge_elbo_from_summaries_equals_pooled_rows(likelihood):
    """Merge across sites from summaries, then rebuild the pooled responsibilities (each site's
    block, columns summed as the mapping says) and recompute the ELBO from the rows."""
    sites, _ = well_separated(likelihood, 2, N=600)
    levels = (2,) * 30 if likelihood == "bernoulli" else (3,) * 30
    spec = fedvi.MixtureSpec(likelihood, n_levels=levels)
    stats = [_random_site_stats(X, 4, b, spec, 6) for b, X in enumerate(sites)]
    summaries = [s for s, _, _ in stats]
    # Single merge: gain from summaries vs recomputation.
    pooled = Summaries.concat(summaries)
    j, k = 0, len(summaries[0].counts)  # cluster 0 of site 0 and cluster 0 of site 1
    gain = merge_gain(pooled, [j], [k])[0]
    merged_counts = np.delete(pooled.counts, k)
    merged_counts[j] += pooled.counts[k]
    merged_sums = np.delete(pooled.sums, k, axis=0)
    merged_sums[j] += pooled.sums[k]
    merged_entropy = np.delete(pooled.entropy, k)
    merged_entropy[j] += pooled.entropy[k]
    after = _elbo(spec, merged_counts, merged_sums, merged_entropy, pooled.prior_dim)
    assert after - fedvi.elbo(pooled) == pytest.approx(gain, rel=1e-9, abs=1e-7)

    # Full global merge: its ELBO equals the ELBO of the pooled rows under merged resp.
    result = fedvi.global_merge(summaries)
    G = result.n_clusters
    blocks = []
    for (_, resp, _), mapping in zip(stats, result.mapping, strict=True):
        R = np.zeros((resp.shape[0], G))
        for local, glob in enumerate(mapping):
            R[:, glob] += resp[:, local]
        blocks.append(R)
    R = np.vstack(blocks)
    Xall = np.vstack([m.toarray() if hasattr(m, "toarray") else m for _, _, m in stats])
    counts, sums, entropy = sufficient_stats(Xall, R)
    # Entropy of the merged columns is the sum of the sites' (disjoint rows).
    np.testing.assert_allclose(entropy, result.posterior.entropy, rtol=1e-10)
    recomputed = _elbo(spec, counts, sums, entropy, pooled.prior_dim)
    assert result.elbo == pytest.approx(recomputed, rel=1e-10)
    assert result.elbo >= result.elbo_before
    # The invariant: a global cluster holds at most one local cluster per site.
    for mapping in result.mapping:
        assert len(set(mapping.tolist())) == len(mapping)
        assert mapping.min() >= 0


@pytest.mark.parametrize("seed", range(4))
def test_global_merge_keeps_every_row_and_the_invariant(seed):
    """Regression: a second best-first pass once merged a cluster that was already absorbed,
    losing its rows. Fitted sites on a skewed categorical split."""
    from fedvi.simulate import simulate, split_sites

    data = simulate(900, 4, 15, likelihood="categorical", n_levels=3, seed=seed)
    parts = split_sites(data.z, 3, "dirichlet", seed=seed)
    sites = [data.X[p] for p in parts]
    spec, _ = shared_spec(sites, fedvi.MixtureSpec("categorical", n_components=12))
    summaries = [fedvi.fit_site(X, spec, seed=7 + b).summaries for b, X in enumerate(sites)]
    for mode in ("best_first", "paper"):
        result = fedvi.global_merge(summaries, mode=mode)
        assert result.posterior.counts.sum() == pytest.approx(900)
        assert result.n_clusters >= max(s.n_clusters for s in summaries)
        for mapping in result.mapping:
            assert mapping.min() >= 0 and len(set(mapping.tolist())) == len(mapping)
        refined = fedvi.federated_fit(
            sites,
            "categorical",
            n_components=12,
            seed=7,
            merge_mode=mode,
            refine_rounds=2,
            policy=fedvi.SitePolicy(dp_epsilon=None),  # noiseless: the ELBO decides the rounds
        )
        assert len(refined.rounds) == 2
        h = np.asarray(refined.elbo_history)
        assert np.all(np.diff(h) >= -1e-10 * np.abs(h[1:]))


def test_best_first_is_independent_of_site_order_and_beats_nothing():
    sites, _ = well_separated("bernoulli", 4)
    spec, _ = shared_spec(sites, fedvi.MixtureSpec())
    fits = [fedvi.fit_site(X, spec, seed=b) for b, X in enumerate(sites)]
    forward = fedvi.global_merge([f.summaries for f in fits])
    backward = fedvi.global_merge([f.summaries for f in fits[::-1]])
    paper = fedvi.global_merge([f.summaries for f in fits], mode="paper")
    assert forward.elbo == pytest.approx(backward.elbo, rel=1e-12)
    assert forward.n_clusters == backward.n_clusters
    assert forward.elbo >= paper.elbo - 1e-9 * abs(paper.elbo)
    assert forward.elbo > forward.elbo_before


def test_refinement_rounds_never_lower_the_elbo():
    sites, truth = well_separated("categorical", 5)
    # Exact statistics (the sites opt out of DP noise): a noisy round is accepted regardless.
    res = fedvi.federated_fit(
        sites,
        likelihood="categorical",
        refine_rounds=3,
        seed=0,
        policy=fedvi.SitePolicy(dp_epsilon=None),
    )
    h = np.asarray(res.elbo_history)
    assert len(h) == 2 + 3
    assert np.all(np.diff(h) >= -1e-10 * np.abs(h[1:]))
    assert adjusted_rand_index(np.concatenate(truth), np.concatenate(res.labels)) >= 0.95


def test_federated_fit_is_reproducible():
    sites, _ = well_separated("bernoulli", 6)
    a = fedvi.federated_fit(sites, seed=1)
    b = fedvi.federated_fit(sites, seed=1)
    assert a.elbo == b.elbo
    for x, y in zip(a.labels, b.labels, strict=True):
        np.testing.assert_array_equal(x, y)


def test_min_cluster_size_holds_back_small_clusters():
    sites, _ = well_separated("bernoulli", 7)
    res = fedvi.federated_fit(sites, min_cluster_size=50, seed=0)
    for s, X in zip(res.site_summaries, sites, strict=True):
        assert s.counts.min() >= 40  # soft counts of clusters owning >= 50 rows
        assert s.counts.sum() == pytest.approx(len(X))
