"""Structure after the merge (issue 19): the soft disclosure floor of refinement rounds, global
merge/delete moves scored exactly from sums, one meaning of K, and extend's old-to-new ids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import xlogy

import fedvi
from fedvi.__main__ import main as cli
from fedvi.coordinator import refusal_note
from fedvi.data import encode
from fedvi.elbo import elbo
from fedvi.floor import covering_rows, floored_release, releasable
from fedvi.io import read_labels, write_labels
from fedvi.labels import global_responsibilities
from fedvi.metrics import adjusted_rand_index
from fedvi.refine_moves import (
    apply_merges,
    apply_splits,
    exact_gains,
    pair_entropies,
    propose_pairs,
    split_gains,
)
from fedvi.settle import settle_clusters
from fedvi.simulate import simulate, split_sites
from fedvi.summaries import Summaries
from fedvi.vi import Problem

#: These tests measure the method itself: sites that opt out of DP noise (with noise, by
#: default, moves are off and the ELBO cannot decide a round).
NOISELESS = fedvi.SitePolicy(dp_epsilon=None)


def stats_of(data, spec, resp, prior_dim) -> Summaries:
    """Statistics of explicit responsibilities ``resp (N, K)`` (the test's own sums)."""
    X = np.asarray(data.dense() if hasattr(data, "dense") else data, dtype=np.float64)
    problem = Problem.build(encode(X, spec), spec, prior_dim=prior_dim)
    return problem.summaries(
        resp.sum(axis=0), resp.T @ X, -xlogy(resp, resp).sum(axis=0), None, None
    )


# -- the floor ------------------------------------------------------------------------------
def test_covering_rows_is_mass_over_the_largest_share():
    # Hard clusters: the number of rows. Soft: 1,288 rows of 0.48 cover 2,683 rows.
    assert covering_rows(np.array([5.0]), np.array([1.0]))[0] == 5.0
    assert covering_rows(np.array([1288 * 0.48]), np.array([0.48]))[0] == pytest.approx(1288)
    # A hostile posterior: one row at 1, 1.24 rows of weight spread thin. The order-2 effective
    # number (N^2 / sum r^2) is about 5, yet that row holds 45 % of the statistic: not released.
    counts, peak = np.array([2.24]), np.array([1.0])
    assert not releasable(counts, peak, 5)[0]
    assert releasable(np.array([5.0, 4.99]), np.array([1.0, 1.0]), 5).tolist() == [True, False]


def _two_site_posterior(seed=0):
    d = simulate(600, 3, 30, seed=seed)  # seeds 0, 3, 4 give 3 global clusters
    res = fedvi.federated_fit(
        [d.X[:300], d.X[300:]], n_components=6, refine_rounds=0, policy=NOISELESS
    )
    return d, res.model.posterior


def test_soft_clusters_are_released_where_the_arg_max_rule_withheld_them():
    """Two identical global clusters share every row at 0.5: neither owns a row by arg-max for
    certain (the old rule withheld one at every site), but each covers all the site's rows."""
    d, post = _two_site_posterior()
    twin = Summaries.concat([post.subset([0]), post.subset([0])])
    twin = dataclasses.replace(twin, prior_dim=post.prior_dim, column_totals=post.column_totals)
    rel = floored_release(encode(d.X[:300], post.spec), twin, floor=5)
    assert not rel.withheld.any()
    np.testing.assert_allclose(rel.stats.counts, [150, 150], rtol=1e-9)


def test_a_cluster_aimed_at_one_row_is_withheld():
    d, post = _two_site_posterior()
    x0 = d.X[0].astype(float)
    spike = dataclasses.replace(post.subset([0]), counts=np.array([1e4]), sums=1e4 * x0[None])
    hostile = Summaries.concat([post.subset([0]), spike])
    hostile = dataclasses.replace(hostile, prior_dim=post.prior_dim)
    data = encode(d.X[:300], post.spec)
    r = global_responsibilities(data, hostile)
    assert r[0, 1] > 0.9 and covering_rows(r.sum(0), r.max(0))[1] < 5  # the attack works...
    rel = floored_release(data, hostile, floor=5)
    assert rel.withheld.tolist() == [False, True]  # ... and the floor stops it
    assert rel.stats.counts[1] == 0 and rel.stats.counts[0] == pytest.approx(300)
    # Floor 1 releases it (the floor is what protects).
    assert not floored_release(data, hostile, floor=1).withheld.any()


def test_a_round_refused_names_the_clusters_and_sites():
    text = refusal_note(4, {2: [0, 3], 5: [1]})
    assert "round 4" in text and "cluster 2 at site(s) 0, 3" in text
    assert "cluster 5 at site(s) 1" in text
    assert "no site's floor" in refusal_note(1, {})


def test_a_requested_floor_below_the_site_policy_warns():
    d = simulate(400, 2, 10, seed=1)
    with pytest.warns(UserWarning, match=r"min_cluster_size=1 is below .*site\(s\) \[0, 1\]"):
        fedvi.federated_fit(
            [d.X[:200], d.X[200:]], min_cluster_size=1, refine_rounds=0, policy=NOISELESS
        )
    pol = fedvi.SitePolicy(min_cluster_size=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fedvi.federated_fit([d.X[:200], d.X[200:]], min_cluster_size=1, policy=pol, refine_rounds=0)


def test_asked_refinement_that_the_sites_decline_is_said_not_silent():
    """Small sites under the default DP policy decline refinement: ``refine_rounds`` passed
    explicitly then warns and the notes say why, so the result never looks refined; a site
    that declines turns the exact moves off, and that is said too."""
    d = simulate(400, 2, 10, seed=1)
    sites = [d.X[:200], d.X[200:]]
    with pytest.warns(UserWarning, match=r"refine_rounds=3: refinement stopped: no site refines"):
        res = fedvi.federated_fit(sites, refine_rounds=3)  # default policy: DP at epsilon 1
    assert res.rounds == []
    assert any("too small for their privacy budget" in n for n in res.notes)
    mixed = [NOISELESS, fedvi.SitePolicy(allow_refine=False)]
    with pytest.warns(UserWarning, match=r"refine_moves=True: refinement moves off"):
        res = fedvi.federated_fit(
            sites, refine_rounds=2, refine_moves=True, policy=mixed, min_cluster_size=5
        )
    assert "sites [1] do not refine" in " ".join(res.notes)
    assert len(res.rounds) == 2  # site 0 still refines
    assert sum(r["merges"] + r["deletes"] + r["splits"] for r in res.rounds) == 0


def test_a_site_that_refuses_move_statistics_turns_the_moves_off():
    """``allow_refine_moves=False``: the coordinator asks no moves (and says why), the rounds
    run without them; a coordinator that ignores the site's pre-flight and asks anyway is
    refused by the site, which sends nothing for that round and still labels."""
    import dataclasses as dc

    from fedvi.coordinator import Coordinator
    from fedvi.federated import agents_for, run_inprocess
    from fedvi.options import FitOptions, ServerOptions
    from fedvi.protocol import Preflight

    d = simulate(900, 3, 15, seed=4)
    sites = [d.X[:300], d.X[300:600], d.X[600:]]
    no_moves = dc.replace(NOISELESS, allow_refine_moves=False)
    pols = [NOISELESS, no_moves, NOISELESS]
    with pytest.warns(UserWarning, match=r"refinement moves off: sites \[1\] do not send"):
        res = fedvi.federated_fit(sites, refine_rounds=2, refine_moves=True, policy=pols)
    assert len(res.rounds) == 2 and all(r["candidates"] == 0 for r in res.rounds)
    assert res.sites[1].policy["allow_refine_moves"] is False

    # A hostile coordinator: site 1's pre-flight is read as if it allowed moves.
    agents = agents_for(sites, [0, 1, 2], pols, None)
    honest = agents[1].handle

    def lying(req, secure=False, sha=None):
        reply = honest(req, secure, sha)
        if isinstance(reply, Preflight):
            reply = dc.replace(reply, policy={**reply.policy, "allow_refine_moves": True})
        return reply

    agents[1].handle = lying
    server = ServerOptions(refine_rounds=2, refine_moves=True)
    got = run_inprocess(Coordinator(fedvi.MixtureSpec(), FitOptions(), server, [0, 1, 2]), agents)
    refusals = [f for f in got.failures if f["phase"] == "refine"]
    assert [f["site"] for f in refusals] == [1]
    assert "allow-refine-moves" in refusals[0]["error"]
    assert got.sites[1].labels is not None  # a refusal by policy: the site still labels
    refine = [e for e in agents[1].gate.ledger.entries() if e.get("phase") == "refine"]
    assert refine and all(e["decision"] == "refused" for e in refine)  # logged, nothing sent
    assert refine[0]["rule"] == "allow-refine-moves"
    # A site that sends move statistics logs what they were, beside the statistics.
    sent = [e for e in agents[0].gate.ledger.entries() if e.get("phase") == "refine"]
    assert sent and all("more sets under delete proposals" in e["released"] for e in sent)


# -- exact merges from sums -----------------------------------------------------------------
def test_pair_entropies_are_the_merged_column_entropies():
    d, post = _two_site_posterior(3)
    data = encode(d.X[:300], post.spec)
    pairs = np.array([[0, 1], [0, 2], [1, 2]])
    r = global_responsibilities(data, post)
    want = [-xlogy(r[:, a] + r[:, b], r[:, a] + r[:, b]).sum() for a, b in pairs]
    opts = fedvi.FitOptions(block_rows=64)  # several blocks
    np.testing.assert_allclose(pair_entropies(data, post, pairs, opts), want, rtol=1e-10)


def test_merge_gain_from_sums_is_the_elbo_of_the_merged_responsibilities():
    """The server's exact gain equals the ELBO of the summed responsibility columns, computed
    here from the rows (two sites: the sums add up)."""
    d, post = _two_site_posterior(4)
    X = d.X[:600]
    R = np.vstack(
        [
            global_responsibilities(encode(X[s], post.spec), post)
            for s in (slice(0, 300), slice(300, 600))
        ]
    )
    K0 = post.prior_dim
    here = stats_of(X, post.spec, R, K0)
    pairs = np.array([[0, 1], [1, 2]])
    h = sum(
        pair_entropies(encode(X[s], post.spec), post, pairs)
        for s in (slice(0, 300), slice(300, 600))
    )
    gains = exact_gains(here, pairs, h)
    for (a, b), g in zip(pairs, gains, strict=True):
        merged = np.delete(R, b, axis=1)
        merged[:, a] = R[:, a] + R[:, b]
        assert g == pytest.approx(elbo(stats_of(X, post.spec, merged, K0)) - elbo(here), rel=1e-9)
    # Applying merges raises the ELBO by exactly the accepted gains.
    out = apply_merges(here, pairs, h)
    assert elbo(out.posterior) == pytest.approx(elbo(here) + out.gains.sum(), rel=1e-12)


def test_proposals_have_a_positive_bound_and_respect_the_cap():
    d = simulate(900, 2, 20, seed=4)
    # Five copies of two clusters: many positive-bound pairs.
    res = fedvi.federated_fit(
        [d.X[i::5] for i in range(5)], n_components=4, refine_rounds=0, policy=NOISELESS
    )
    post = res.model.posterior
    assert post.n_clusters == 2
    four = Summaries.concat([post, post, post])  # 6 pairs of copies have a positive bound
    four = dataclasses.replace(four, prior_dim=3 * post.prior_dim)
    pairs = propose_pairs(four, 3)
    assert len(pairs) == 3 and (pairs[:, 0] < pairs[:, 1]).all()
    from fedvi.elbo import merge_gain

    assert (merge_gain(four, pairs[:, 0], pairs[:, 1]) > 0).all()


def test_moves_remove_duplicate_global_clusters_and_raise_the_elbo():
    """Refinement from a posterior with every cluster duplicated: merges (exact) bring K back
    and the ELBO only rises."""
    d = simulate(1500, 3, 25, seed=5)
    parts = split_sites(d.z, 3, "iid", seed=5)
    sites = [d.X[p] for p in parts]
    with_moves = fedvi.federated_fit(
        sites, n_components=8, refine_rounds=4, refine_moves=True, policy=NOISELESS
    )
    without = fedvi.federated_fit(
        sites, n_components=8, refine_rounds=4, refine_moves=False, policy=NOISELESS
    )
    assert with_moves.elbo >= without.elbo - 1e-6 * abs(without.elbo)
    assert np.all(np.diff(with_moves.elbo_history[1:]) >= -1e-8 * abs(with_moves.elbo))
    assert with_moves.n_clusters == 3


# -- one meaning of K ------------------------------------------------------------------------
def test_settle_removes_clusters_no_site_uses():
    d, post = _two_site_posterior()
    G = post.n_clusters
    a, b = np.zeros(G, int), np.zeros(G, int)
    a[0], b[0], b[1] = 40, 7, -1  # cluster 1: a suppressed count (1..floor-1 rows) at site b
    s = settle_clusters(post, [a, b])
    assert s.keep.tolist() == [True, True] + [False] * (G - 2)
    assert s.relabel(np.array([1, 0, 1])).tolist() == [1, 0, 1]
    # A site that reported nothing: only the mass decides.
    light = dataclasses.replace(post, counts=np.r_[post.counts[:-1], 0.5])
    assert settle_clusters(light, [a, None]).keep.tolist() == [True] * (G - 1) + [False]


def test_n_clusters_is_the_number_of_distinct_labels():
    from simulations.real_data import load_digit_table, split_digits

    X, y, _ = load_digit_table("digits")
    idx = split_digits(y, 5, "by_digit", seed=0, sites_per_digit=2)
    res = fedvi.federated_fit(
        [X[i] for i in idx], n_components=20, refine_rounds=3, policy=NOISELESS
    )
    labels = np.concatenate(res.labels)
    assert res.n_clusters == len(np.unique(labels)) == labels.max() + 1


# -- extend's id map -------------------------------------------------------------------------
def test_extend_returns_and_records_the_old_to_new_ids(tmp_path):
    d = simulate(6000, 3, 100, weights=[0.4, 0.35, 0.25], seed=6)
    old_rows = np.arange(1200)
    # The new site holds only the smallest cluster, which becomes the largest: renumbered.
    rest = np.arange(1200, 6000)
    new_rows = rest[d.z[rest] == 2]
    first = fedvi.federated_fit(
        [d.X[old_rows[:600]], d.X[old_rows[600:]]], n_components=8, policy=NOISELESS
    )
    later = fedvi.extend(first.model, [d.X[new_rows]], policy=NOISELESS)
    id_map = later.id_map
    assert id_map.shape == (first.model.n_clusters,)
    assert not np.array_equal(id_map, np.arange(len(id_map)))  # the ids did change
    old_labels = first.model.predict(d.X[old_rows])
    now = later.model.predict(d.X[old_rows])
    np.testing.assert_array_equal(id_map[old_labels], now)
    assert np.mean(old_labels == now) < 0.5  # without the map, stale ids
    # The model file keeps it, and the label command renumbers an old labels file.
    path = later.model.save(tmp_path / "extended.npz")
    assert fedvi.load_model(path).info["id_map"]["map"] == id_map.tolist()
    write_labels(tmp_path / "old.csv", old_labels)
    args = ["label", "--model", path, "--relabel", str(tmp_path / "old.csv")]
    assert cli([*args, "--out", str(tmp_path / "new.csv")]) == 0
    np.testing.assert_array_equal(read_labels(tmp_path / "new.csv"), id_map[old_labels])
    # A model that was not extended has no map: a clear refusal.
    plain = first.model.save(tmp_path / "plain.npz")
    assert (
        cli(
            [
                "label",
                "--model",
                plain,
                "--relabel",
                str(tmp_path / "old.csv"),
                "--out",
                str(tmp_path / "x.csv"),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("rounds", [0, 2])
def test_a_global_cluster_that_owns_no_rows_is_removed(ghost_cluster, rounds):
    """The merge's posterior gets a copy of cluster 0 with almost no weight: it owns no row, so
    the run ends with the clusters that do (with refinement, after one more exact round)."""
    d = simulate(900, 3, 30, seed=0)
    sites = [d.X[:450], d.X[450:]]
    plain = fedvi.federated_fit(
        sites, n_components=6, refine_rounds=rounds, refine_moves=False, policy=NOISELESS
    )
    ghost_cluster()
    res = fedvi.federated_fit(
        sites, n_components=6, refine_rounds=rounds, refine_moves=False, policy=NOISELESS
    )
    labels = np.concatenate(res.labels)
    assert res.n_clusters == len(np.unique(labels)) == plain.n_clusters
    assert any("own no rows" in n for n in res.notes)
    assert adjusted_rand_index(labels, np.concatenate(plain.labels)) > 0.99


def test_split_gain_from_second_moments_is_the_elbo_of_the_split_responsibilities():
    d, post = _two_site_posterior(4)
    X = d.X[:600].astype(float)
    halves = (slice(0, 300), slice(300, 600))
    R = np.vstack([global_responsibilities(encode(d.X[s], post.spec), post) for s in halves])
    here = stats_of(X, post.spec, R, post.prior_dim)
    k = 0
    rel = [floored_release(encode(d.X[s], post.spec), post, 1, None, None, [k]) for s in halves]
    moment = sum(r.second[0] for r in rel)
    np.testing.assert_allclose(moment, (X * R[:, [k]]).T @ X, rtol=1e-10, atol=1e-9)
    gains = split_gains(here, k, moment)
    for col in (0, 7, 19):
        split = np.column_stack([R, R[:, k] * (1 - X[:, col])])
        split[:, k] = R[:, k] * X[:, col]
        want = elbo(stats_of(X, post.spec, split, post.prior_dim)) - elbo(here)
        assert gains[col] == pytest.approx(want, rel=1e-9, abs=1e-6)
    out = apply_splits(here, [k], [moment])
    if out.split:
        assert elbo(out.posterior) == pytest.approx(elbo(here) + out.gains[0], rel=1e-12)
        assert out.posterior.n_clusters == here.n_clusters + 1


def test_splits_add_a_cluster_the_one_shot_merged():
    """Four sites of 60 rows, each too small to support more than one cluster; the pooled rows
    support two (MixtureVI on them finds 2). Split moves add the second one (an exact gain);
    without them refinement cannot. (Seed 3 of this design; single-column splits do not find
    the structure for every seed.)"""
    d = simulate(240, 3, 20, seed=3)
    sites = [d.X[i * 60 : (i + 1) * 60] for i in range(4)]
    kw = {"n_components": 6, "refine_rounds": 10, "refine_moves": True}
    plain = fedvi.federated_fit(sites, **kw, policy=NOISELESS)
    split = fedvi.federated_fit(sites, refine_splits=2, **kw, policy=NOISELESS)
    assert plain.n_clusters == 1 and split.n_clusters == 2
    assert split.elbo > plain.elbo + 1.0
    assert sum(r["splits"] for r in split.rounds) >= 1


def test_a_pooled_start_ends_no_lower_than_the_one_shot_merge():
    """refine_start='pooled': refinement starts from every site's clusters side by side and the
    exact merges of the rounds join them; the result is never below the one-shot merge."""
    d = simulate(1500, 3, 25, seed=5)
    parts = split_sites(d.z, 3, "dirichlet", seed=5)
    sites = [d.X[p] for p in parts]
    one_shot = fedvi.federated_fit(sites, n_components=8, refine_rounds=0, policy=NOISELESS)
    pooled = fedvi.federated_fit(
        sites,
        n_components=8,
        refine_rounds=6,
        refine_start="pooled",
        refine_moves=True,
        policy=NOISELESS,
    )
    assert pooled.elbo >= one_shot.elbo
    assert sum(r["merges"] for r in pooled.rounds) > 0  # the rounds did the merging
    labels = np.concatenate(pooled.labels)
    assert pooled.n_clusters == len(np.unique(labels)) == 3
