"""The coordinator on its own, with no engine: scripted failures and poisoned replies.

Honest replies come from real sites (:class:`fedvi.site_agent.SiteAgent` over arrays); a test
then replaces one site's reply with a failure or a poisoned copy and checks that the bad site
is named, the run goes on without it, and the honest sites are not blamed. The reply rules
themselves are unit-tested at the end (:mod:`fedvi.reply_checks`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fedvi
from fedvi.coordinator import Coordinator, Failure, SiteIdentityError
from fedvi.federated import run_inprocess
from fedvi.options import FitOptions, ServerOptions
from fedvi.protocol import Phase, Preflight
from fedvi.reply_checks import (
    BadReply,
    check_label_counts,
    check_preflight,
    check_refinement,
    check_summaries,
)
from fedvi.simulate import simulate, split_sites
from fedvi.site_agent import SiteAgent

#: Sites that opt out of DP noise: exact replies, so that each poisoned value is the test's.
NOISELESS = fedvi.SitePolicy(dp_epsilon=None)


def tables(n_sites=3, seed=0):
    sim = simulate(900, 4, 15, seed=seed)
    return [sim.X[p] for p in split_sites(sim.z, n_sites, "iid", seed=seed)]


def drive(coordinator, agents, script=None):
    """Run to the end; ``script[phase][site](honest reply) -> reply or Failure``."""
    script = script or {}
    while (rnd := coordinator.next_round()) is not None:
        replies = {s: agents[s].handle(req) for s, req in rnd.requests.items() if s in agents}
        for s, change in script.get(rnd.phase, {}).items():
            replies[s] = change(replies.get(s))
        coordinator.accept(rnd, replies)
    return coordinator.result


def run(script=None, refine_rounds=2, n_components=8, min_sites=2, **server):
    data = tables()
    agents = {s: SiteAgent(s, X, NOISELESS) for s, X in enumerate(data)}
    spec = fedvi.MixtureSpec(n_components=n_components)
    srv = ServerOptions(refine_rounds=refine_rounds, **server)
    coordinator = Coordinator(spec, FitOptions(), srv, range(3), seed=3, min_sites=min_sites)
    return drive(coordinator, agents, script), data


def honest_run(**kw):
    return run(**kw)[0]


def blamed(result) -> list[tuple]:
    return [(f["phase"], f["site"], f["cause"]) for f in result.failures]


def local(change):
    """A poisoned copy of a local reply's summaries."""
    return lambda r: dataclasses.replace(r, summaries=change(r.summaries))


def nan_counts(s):
    counts = s.counts.copy()
    counts[0] = np.nan
    return dataclasses.replace(s, counts=counts)


def negative_counts(s):
    counts = s.counts.copy()
    counts[-1] = -3.0
    return dataclasses.replace(s, counts=counts)


def sums_above_counts(s):
    sums = s.sums.copy()
    sums[0, 0] = s.counts[0] + 10
    return dataclasses.replace(s, sums=sums)


def doubled(s):
    return dataclasses.replace(s, counts=2 * s.counts, sums=2 * s.sums, entropy=2 * s.entropy)


def too_many_clusters(s):
    return fedvi.Summaries.concat([s] * 9)  # at least 9 clusters


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (nan_counts, "non-finite"),
        (negative_counts, "negative"),
        (sums_above_counts, "sums exceed their counts"),
        (doubled, "not to the site's"),
        (too_many_clusters, "at most 8 were asked for"),
    ],
)
def test_a_poisoned_local_reply_is_refused_and_the_run_goes_on(poison, reason):
    ref, data = run()
    got, _ = run({Phase.LOCAL: {1: local(poison)}})
    assert blamed(got) == [("local", 1, "malformed")]
    assert reason in got.failures[0]["error"]
    assert got.status == "completed_with_failures"
    assert sorted(s for s, r in got.sites.items() if r.status == "ok") == [0, 2]
    assert got.sites[1].status == "failed" and got.sites[1].labels is None
    # The honest sites' run is that of the two of them alone.
    alone = fedvi.federated_fit(
        [data[0], data[2]],
        n_components=8,
        seed=3,
        refine_rounds=2,
        site_ids=[0, 2],
        policy=NOISELESS,
    )
    assert got.n_clusters == alone.n_clusters
    assert got.elbo == pytest.approx(alone.elbo, rel=1e-10)
    assert ref.status == "completed" and not ref.failures


def test_a_poisoned_refinement_reply_stops_refinement_and_names_the_site():
    def nan_stats(r):
        sums = r.stats.sums.copy()
        sums[0, 0] = np.nan
        return dataclasses.replace(r, stats=dataclasses.replace(r.stats, sums=sums))

    got = honest_run(script={Phase.REFINE: {2: nan_stats}})
    assert blamed(got) == [("refine", 2, "malformed")]
    assert len(got.elbo_history) == 2  # no refinement round applied
    assert any("site 2 sent malformed statistics" in n for n in got.notes)
    assert sorted(s for s, r in got.sites.items() if r.status == "ok") == [0, 1]


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (lambda r: dataclasses.replace(r, pair_entropy=None), "are missing"),
        (lambda r: dataclasses.replace(r, trials=()), "are missing"),
        (lambda r: dataclasses.replace(r, pair_entropy=-1.0 - r.pair_entropy), "negative"),
        (lambda r: dataclasses.replace(r, second=r.second[:, :1]), "wrong shape"),
    ],
)
def test_poisoned_move_statistics_stop_refinement_and_name_the_site(poison, reason):
    """Refinement moves (default on): a site whose pair entropies, second moments or trial
    statistics are missing or impossible is named, and no move is scored from them."""
    # From the sites' clusters side by side: pairs, a split and a delete trial in round 1.
    got = honest_run(
        script={Phase.REFINE: {1: poison}},
        refine_moves=True,
        refine_splits=1,
        refine_start="pooled",
    )
    assert blamed(got) == [("refine", 1, "malformed")]
    assert reason in next(f["error"] for f in got.failures)
    assert len(got.elbo_history) == 2 and got.rounds == []


def test_a_round_withheld_by_a_floor_is_not_applied_and_names_cluster_and_site():
    """A site whose reply withholds a cluster (zeros, as its floor does) makes the round lower
    the ELBO: it is not applied, the note names the cluster and the site, and the posterior
    kept is the best so far."""

    def withhold(r):  # cluster 0's rows given to cluster 1: a valid but poor assignment
        st = r.stats
        counts, sums, entropy = st.counts.copy(), st.sums.copy(), st.entropy.copy()
        counts[1] += counts[0]
        sums[1] += sums[0]
        counts[0], sums[0], entropy[0] = 0.0, 0.0, 0.0
        return dataclasses.replace(
            r, stats=dataclasses.replace(st, counts=counts, sums=sums, entropy=entropy)
        )

    sim = simulate(900, 3, 30, seed=0)  # clusters that the one-shot merge finds
    agents = {s: SiteAgent(s, sim.X[s::3], NOISELESS) for s in range(3)}
    srv = ServerOptions(refine_rounds=1, refine_moves=False)
    coordinator = Coordinator(fedvi.MixtureSpec(n_components=6), FitOptions(), srv, range(3))
    got = drive(coordinator, agents, {Phase.REFINE: {2: withhold}})
    assert got.merge.n_clusters >= 2
    assert got.rounds[0]["applied"] is False and got.rounds[0]["withheld"] == {0: [2]}
    assert any("round 1 not applied" in n and "cluster 0 at site(s) 2" in n for n in got.notes)
    assert len(got.elbo_history) == 2  # the merge's posterior is kept
    assert got.elbo == pytest.approx(got.elbo_history[-1])


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        (lambda c: np.where(np.arange(len(c)) == 0, 10_000, c), "outside 0.."),
        (lambda c: np.where(np.arange(len(c)) == 0, -7, c), "outside 0.."),
        (lambda c: c[:-1], "of shape"),
        (lambda c: c + 0.5, "whole numbers"),
    ],
)
def test_label_counts_out_of_range_are_refused(counts, reason):
    got = honest_run(
        script={Phase.LABEL: {0: lambda r: dataclasses.replace(r, counts=counts(r.counts))}}
    )
    assert blamed(got) == [("label", 0, "malformed")]
    assert reason in got.failures[0]["error"]
    assert got.sites[0].counts is None
    assert got.sites[1].counts is not None and got.sites[2].counts is not None


def test_scripted_failures_are_named_with_their_cause():
    got = honest_run(
        script={
            Phase.PREFLIGHT: {
                2: lambda r: Failure("site_error", "refused by the site's policy (x)")
            },
            Phase.LOCAL: {1: lambda r: Failure("timeout")},
        },
        min_sites=1,
    )
    assert blamed(got) == [("preflight", 2, "site_error"), ("local", 1, "timeout")]
    assert got.failures[0]["error"] == "refused by the site's policy (x)"
    assert got.status == "completed_with_failures" and got.n_clusters >= 1


def test_a_site_that_does_not_answer_is_offline_and_too_few_sites_stop_the_run():
    data = tables()
    agents = {0: SiteAgent(0, data[0]), 1: SiteAgent(1, data[1])}  # site 2 never answers
    c = Coordinator(fedvi.MixtureSpec(n_components=8), FitOptions(), ServerOptions(), range(3))
    with pytest.raises(fedvi.SiteFailureError, match=r"only 2 of 3 sites.*site 2: not connected"):
        drive(c, agents)
    assert c.result.status == "failed" and "only 2 of 3" in c.result.error
    assert c.roster[2]["state"] == "left out" and c.roster[0]["state"] == "taking part"


def test_duplicate_ids_stop_the_run_and_strangers_are_noted():
    data = tables()
    agents = {s: SiteAgent(s, X, NOISELESS) for s, X in enumerate(data)}
    c = Coordinator(fedvi.MixtureSpec(n_components=8), FitOptions(), ServerOptions(), range(3))
    rnd = c.next_round()
    replies = {s: agents[s].handle(r) for s, r in rnd.requests.items()}
    replies[7] = dataclasses.replace(replies[0], site=7)
    c.accept(rnd, replies, nodes={7: "n7"})
    assert any("node n7 claims site 7" in n for n in c.result.notes) and not c.result.failures

    c = Coordinator(fedvi.MixtureSpec(n_components=8), FitOptions(), ServerOptions(), range(3))
    rnd = c.next_round()
    with pytest.raises(SiteIdentityError, match="two nodes claim site 1"):
        c.accept(rnd, {1: Failure("duplicate_id", "a and b")})


def test_a_site_with_another_schema_is_left_out():
    data = tables()
    data[1] = data[1][:, :-1]
    agents = {s: SiteAgent(s, X, NOISELESS) for s, X in enumerate(data)}
    c = Coordinator(
        fedvi.MixtureSpec(n_components=8), FitOptions(), ServerOptions(), range(3), min_sites=2
    )
    got = drive(c, agents)
    assert blamed(got) == [("preflight", 1, "schema")]
    assert "14 variables instead of 15" in got.failures[0]["error"]
    assert got.status == "completed_with_failures"


def test_failure_causes_are_a_closed_set():
    with pytest.raises(ValueError, match="not one of"):
        Failure("whatever")


# -- the reply rules --------------------------------------------------------------------------
def _summaries():
    X = simulate(600, 3, 40, seed=1).X
    return fedvi.fit_site(X, fedvi.MixtureSpec(n_components=6), seed=0).summaries


def test_check_summaries_accepts_an_honest_fit_and_names_each_rule():
    s = _summaries()
    check_summaries(s, s.n_rows, 6)
    assert s.n_clusters >= 2
    with pytest.raises(BadReply, match=f"at most {s.n_clusters - 1} were asked"):
        check_summaries(s, s.n_rows, s.n_clusters - 1)
    with pytest.raises(BadReply, match="pre-flight reported"):
        check_summaries(s, s.n_rows + 1, 6)
    with pytest.raises(BadReply, match="non-finite"):
        check_summaries(nan_counts(s), s.n_rows, 6)
    with pytest.raises(BadReply, match="negative"):
        check_summaries(negative_counts(s), s.n_rows, 6)
    with pytest.raises(BadReply, match="sums exceed"):
        check_summaries(sums_above_counts(s), s.n_rows, 6)


def test_check_refinement_bounds_counts_by_the_rows():
    s = _summaries()
    check_refinement(s, s, s.n_rows)
    with pytest.raises(BadReply, match="exceeds the site's rows"):
        check_refinement(s, s, s.n_rows // 10)
    with pytest.raises(BadReply, match="wrong shape"):
        check_refinement(s.subset(np.arange(s.n_clusters) > 0), s, s.n_rows)
    # With noise, sums may pass the counts (clamped per value): only finite, non-negative.
    check_refinement(sums_above_counts(s), s, s.n_rows, noisy=True)
    with pytest.raises(BadReply, match="negative"):
        check_refinement(negative_counts(s), s, s.n_rows, noisy=True)


def test_check_label_counts():
    assert check_label_counts(np.array([3, -1, 0]), 3, 5).tolist() == [3, -1, 0]
    with pytest.raises(BadReply, match="add up to 8"):
        check_label_counts(np.array([4, 4, 0]), 3, 5)
    check_label_counts(np.array([4, 4, 0]), 3, 5, noisy=True)
    with pytest.raises(BadReply, match="outside"):
        check_label_counts(np.array([6, 0, 0]), 3, 5)


def test_check_preflight():
    good = Preflight(0, 10, 2, (2, 2), None, None, False, {})
    check_preflight(good)
    for bad in (
        dataclasses.replace(good, n_rows=0),
        dataclasses.replace(good, levels=(2,)),
        dataclasses.replace(good, variable_hashes=("a",)),
    ):
        with pytest.raises(BadReply):
            check_preflight(bad)


def test_a_site_that_refuses_a_refinement_round_by_its_policy_still_labels():
    """A site's cap on aggregate releases refuses the second refinement round: refinement
    stops there (the round is not applied), and the site, which refused by its own rule rather
    than failed, keeps its one-shot statistics and labels its rows."""
    data = tables()
    capped = fedvi.SitePolicy(dp_epsilon=None, max_aggregate_releases=2)
    agents = {s: SiteAgent(s, X, capped) for s, X in enumerate(data)}
    srv = ServerOptions(refine_rounds=3, refine_moves=False)
    coordinator = Coordinator(fedvi.MixtureSpec(n_components=8), FitOptions(), srv, range(3))
    got = run_inprocess(coordinator, agents)  # the in-process engine: a refusal is a failure
    assert {(f["phase"], f["cause"]) for f in got.failures} == {("refine", "site_error")}
    assert all("max-aggregate-releases" in f["error"] for f in got.failures)
    assert len(got.elbo_history) == 3  # the first round only
    assert all(r.status == "ok" and r.counts is not None for r in got.sites.values())
    assert [len(y) for y in got.labels] == [len(X) for X in data]


def test_an_offline_or_silent_node_is_named_in_the_round_runners_words():
    """The round runner knows which node went offline and when: its words are the failure's
    message; without them the cause's own text stands."""
    said = "node 7 offline: the SuperLink stopped receiving its heartbeat (50 s into the round)"
    assert Failure("offline", said, "7").message == said
    assert Failure("offline").message.startswith("node offline")
    assert Failure("timeout").message.startswith("no reply within the round timeout")
    assert Failure("no_reply").message.startswith("no reply (the node died")
