"""The FedMerDel strategy through its production runner (``PhaseFitWorkflow`` on Flower's
``DefaultWorkflow``), with the real site ClientApps on an in-process Grid (tests/flower_local.py):
the whole protocol, its identity and pre-flight checks, and faults."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from flower_local import (  # noqa: E402
    LocalProxy,
    grid_for,
    make_strategy,
    run_protocol,
    site_client,
    write_sites,
)
from flwr.common import Code, FitRes, Parameters, Status  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402

import fedvi  # noqa: E402
from fedvi.io import read_labels
from fedvi.label_files import latest_labels  # noqa: E402
from fedvi.metrics import adjusted_rand_index  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.protocol import Phase  # noqa: E402
from fedvi.simulate import simulate, split_sites  # noqa: E402
from strategies.fedmerdel import SiteFailureError, SiteIdentityError, fitins  # noqa: E402
from strategies.options import StrategyOptions  # noqa: E402
from strategies.outputs import write_outputs  # noqa: E402

#: The sites here compare the protocol with federated_fit exactly: they opt out of DP noise
#: (by default a site's label counts and refinement statistics are noisy, issue 15).
NOISELESS = fedvi.SitePolicy(dp_epsilon=None)


def sites(likelihood="bernoulli", n_sites=3, seed=0, **kw):
    sim = simulate(900, 4, 15, likelihood=likelihood, n_levels=3, seed=seed, **kw)
    return [sim.X[p] for p in split_sites(sim.z, n_sites, "dirichlet", seed=seed)]


def labels_of(tmp_path, ids):
    return [read_labels(latest_labels(tmp_path / "labels", b)) for b in ids]


def loses_data(path, node_id=1001):
    """A fault: site ``node_id``'s data file (and cache) disappears after its local fit."""

    def after(nid, phase):
        if nid == node_id and phase == "local":
            path.unlink()
            for cached in (path.parent / "labels" / ".fedvi-cache").glob("*"):
                cached.unlink()

    return after


CASES = [
    ("bernoulli", {"merge_mode": "paper", "label_mode": "map", "refine_rounds": 0}, {}),
    ("bernoulli", {"refine_rounds": 2}, {}),
    ("bernoulli", {"refine_rounds": 0}, {}),
    ("categorical", {}, {"variable_selection": True}),
]


@pytest.mark.parametrize(("likelihood", "server", "model"), CASES)
def test_protocol_reproduces_federated_fit(tmp_path, likelihood, server, model):
    tables = sites(likelihood, n_irrelevant=3)
    paths = write_sites(tmp_path, tables)
    spec = fedvi.MixtureSpec(likelihood, n_components=12, **model)
    strategy = run_protocol(
        make_strategy(paths, tmp_path, spec=spec, server=ServerOptions(**server)),
        grid_for(paths, tmp_path),
    )
    ref = fedvi.federated_fit(
        tables, likelihood, n_components=12, seed=7, **model, **server, policy=NOISELESS
    )
    o = strategy.result
    assert o.status == "completed" and not o.failures
    assert o.n_clusters == ref.n_clusters
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)
    assert o.elbo_history == pytest.approx(ref.elbo_history, rel=1e-10)
    np.testing.assert_allclose(o.cluster_profiles, ref.cluster_profiles, rtol=1e-10)
    got = labels_of(tmp_path, range(3))
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(got)) == 1.0
    assert o.label_mode == ref.label_mode
    for b in range(3):
        np.testing.assert_array_equal(o.sites[b].mapping, ref.sites[b].mapping)
        assert o.sites[b].n_rows == len(tables[b])
        assert o.sites[b].uplink_bytes["local"] == ref.sites[b].uplink_bytes["local"]
        np.testing.assert_array_equal(o.sites[b].counts, ref.sites[b].counts)
    # The run directory's files, as the ServerApp writes them.
    results = write_outputs(o, str(tmp_path / "out"), plots=True)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["n_clusters"] == ref.n_clusters and saved["status"] == "completed"
    assert saved == json.loads(json.dumps(results, default=float))
    model = fedvi.load_model(tmp_path / "out" / "model.npz")
    assert model.elbo == pytest.approx(ref.elbo, rel=1e-12)
    assert (tmp_path / "out" / "cluster_profiles.png").exists()
    if ref.variable_relevance is not None:
        np.testing.assert_allclose(saved["variable_relevance"], ref.variable_relevance)


def test_categorical_levels_are_agreed_in_preflight(tmp_path):
    tables = sites("categorical")
    tables[1] = np.minimum(tables[1], 1)  # this site never sees level 2
    paths = write_sites(tmp_path, tables)
    spec = fedvi.MixtureSpec("categorical", n_components=12)
    strategy = run_protocol(make_strategy(paths, tmp_path, spec=spec), grid_for(paths, tmp_path))
    assert strategy.agreed_spec.n_levels == (3,) * 15
    assert strategy.result.sites[1].schema["levels"] == [2] * 15
    ref = fedvi.federated_fit(tables, "categorical", n_components=12, seed=7, policy=NOISELESS)
    assert strategy.result.elbo == pytest.approx(ref.elbo, rel=1e-10)


def test_schema_mismatch_is_named_in_preflight_and_the_run_goes_on(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    names = [f"v{d}" for d in range(15)]
    for b, X in enumerate(tables):
        cols = list(names)
        if b == 2:
            cols[4] = "renamed"
        paths[b] = tmp_path / f"site{b}.npz"
        np.savez(paths[b], X=X, feature_names=np.array(cols))
    strategy = make_strategy(
        paths, tmp_path, options=StrategyOptions(wait_for_sites=5, min_sites=2)
    )
    grid = grid_for(paths, tmp_path)
    run_protocol(strategy, grid)
    o = strategy.result
    assert o.status == "completed_with_failures"
    (fail,) = o.failures
    assert fail["phase"] == "preflight" and fail["site"] == 2 and fail["cause"] == "schema"
    assert "variables #[5] renamed" in fail["error"]
    # The excluded site is asked once more, with the agreed variables, only so that it names
    # its odd column in its own log: it refuses before fitting and nothing of it is used.
    assert grid.asked(1002) == 2 and o.sites[2].summaries is None
    assert [f["site"] for f in o.failures] == [2]
    assert sorted(s for s, r in o.sites.items() if r.status == "ok") == [0, 1]
    ref = fedvi.federated_fit(
        tables[:2], n_components=12, seed=7, feature_names=names, policy=NOISELESS
    )
    assert o.n_clusters == ref.n_clusters
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)


def test_mismatch_below_min_sites_stops_before_any_fit(tmp_path):
    tables = sites()
    tables[1] = tables[1][:, :-2]
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path)
    grid = grid_for(paths, tmp_path)
    with pytest.raises(SiteFailureError, match=r"preflight.*only 2 of 3.*site 1: schema differs"):
        run_protocol(strategy, grid)
    assert "13 variables instead of 15" in strategy.result.failures[0]["error"]
    assert all(grid.asked(n) == 1 for n in (1000, 1001, 1002))
    assert strategy.result.status == "failed"


def test_unreadable_file_is_named_and_run_continues(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    paths[2].write_bytes(b"not a numpy file")
    strategy = make_strategy(
        paths, tmp_path, options=StrategyOptions(wait_for_sites=5, min_sites=2)
    )
    run_protocol(strategy, grid_for(paths, tmp_path))
    o = strategy.result
    assert o.status == "completed_with_failures"
    (fail,) = o.failures
    assert fail["phase"] == "preflight" and fail["site"] == 2 and fail["node"] == "1002"
    assert "failed validation" in fail["error"]
    assert "site2.npy" not in fail["error"]  # no path crosses the wire
    # The two remaining sites give the in-process fit of their tables (the same K and ELBO),
    # not just some clusters.
    ref = fedvi.federated_fit(tables[:2], n_components=12, seed=7, policy=NOISELESS)
    assert o.n_clusters == ref.n_clusters
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)


def test_too_few_sites_stop_the_run_with_the_reasons(tmp_path):
    paths = write_sites(tmp_path, sites())
    paths[0].unlink()
    strategy = make_strategy(paths, tmp_path)
    with pytest.raises(SiteFailureError, match=r"only 2 of 3 sites.*site 0: "):
        run_protocol(strategy, grid_for(paths, tmp_path))


@pytest.mark.parametrize(("rounds", "phase"), [(0, "label"), (2, "refine")])
def test_site_failing_mid_run_is_named(tmp_path, rounds, phase):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    grid = grid_for(paths, tmp_path, after=loses_data(paths[1]))
    strategy = make_strategy(
        paths,
        tmp_path,
        server=ServerOptions(refine_rounds=rounds),
        options=StrategyOptions(wait_for_sites=5, min_sites=2),
    )
    run_protocol(strategy, grid)
    o = strategy.result
    assert o.status == "completed_with_failures"
    assert [(f["phase"], f["site"], f["node"]) for f in o.failures] == [(phase, 1, "1001")]
    assert o.sites[1].counts is None and o.sites[0].counts is not None
    if rounds:  # a round with a missing site is not applied, and refinement stops there
        assert len(o.elbo_history) == 2
        assert any("sites [1] did not answer" in n for n in o.notes)


def test_unexpected_node_is_not_used_and_duplicates_stop_the_run(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, [*tables, tables[0]])
    strategy = make_strategy(paths[:3], tmp_path)
    grid = grid_for(paths, tmp_path, pids=[0, 1, 2, 9])  # node 1003 says it is site 9
    run_protocol(strategy, grid)
    o = strategy.result
    assert o.status == "completed" and sorted(o.sites) == [0, 1, 2]
    assert grid.asked(1003) == 1  # pre-flight only
    assert any("node 1003 claims site 9" in n for n in o.notes)
    ref = fedvi.federated_fit(tables, n_components=12, seed=7, policy=NOISELESS)
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)

    dup = make_strategy(paths[:3], tmp_path)
    grid = grid_for([*paths[:3], paths[1]], tmp_path, pids=[0, 1, 2, 1])
    with pytest.raises(SiteIdentityError, match=r"two nodes claim site 1.*1001 and 1003"):
        run_protocol(dup, grid)
    assert all(grid.asked(n) == 1 for n in (1000, 1001, 1002, 1003))


def test_aggregate_fit_names_failed_replies(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path, options=StrategyOptions(min_sites=2))
    proxies = [LocalProxy(1000 + b, site_client(b, p, tmp_path)) for b, p in enumerate(paths)]
    # Pre-flight through the strategy itself, then a local round with one error reply and one
    # exception that names no site (a node that died).
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    ins = strategy.configure_fit(1, Parameters([], ""), manager)
    results = [(p, p.fit(i, None, None)) for p, i in ins]
    strategy.aggregate_fit(1, results, [])
    ins = strategy.configure_fit(2, Parameters([], ""), manager)
    results = [(p, p.fit(i, None, None)) for p, i in ins[:1]]
    bad = FitRes(
        Status(
            Code.FIT_NOT_IMPLEMENTED,
            "fedvi site error: site 1, phase local: "
            "refused by the site's policy (allow-refine): no",
        ),
        None,
        0,
        {},
    )
    with pytest.raises(SiteFailureError, match="only 1 of 3"):
        strategy.aggregate_fit(2, results, [(proxies[1], bad), RuntimeError("connection lost")])
    errors = {(f["site"], f["node"]): f["error"] for f in strategy.failures}
    assert errors[(1, "1001")].startswith("refused by the site's policy (allow-refine)")
    assert errors[(2, "1002")] == "no reply (the node died, left, or timed out)"


def test_round_config_is_scalars_only(tmp_path):
    paths = write_sites(tmp_path, sites())
    spec = fedvi.MixtureSpec("categorical", n_levels=(3,) * 15, relevance_prior=(2.0, 3.0))
    strategy = make_strategy(paths, tmp_path, spec=spec)
    config = fitins(strategy.coordinator.request(Phase.PREFLIGHT)).config
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())
    assert json.loads(config["model.n_levels"]) == [3] * 15
    assert config["fit.moves"] == FitOptions().moves
    assert [p.value for p in strategy.phases] == ["preflight", "local", *["refine"] * 3, "label"]


def test_ndarrays_of_a_reply_are_exactly_the_summaries(tmp_path):
    """What the strategy decodes is bit for bit what the site's fit released."""
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strategy = run_protocol(make_strategy(paths, tmp_path), grid_for(paths, tmp_path))
    for b, X in enumerate(tables):
        ref = fedvi.fit_site(X, strategy.agreed_spec, seed=7 + b)
        got = strategy.result.sites[b].summaries
        for a, e in zip(got.to_arrays(), ref.summaries.to_arrays(), strict=True):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical"])
def test_columns_in_another_order_are_matched_by_name(tmp_path, likelihood):
    """Pre-flight takes the first site's order of variables as the run's; a site whose
    columns come in another order aligns them by name (it gets the order as name hashes)."""
    tables = sites(likelihood)
    names = [f"v{d}" for d in range(15)]
    paths, frames = [], []
    for b, X in enumerate(tables):
        order = list(range(15))[::-1] if b == 1 else list(range(15))
        paths.append(tmp_path / f"site{b}.npz")
        np.savez(paths[-1], X=X[:, order], feature_names=np.array([names[j] for j in order]))
        frames.append(pd.DataFrame(X, columns=names))
    spec = fedvi.MixtureSpec(likelihood, n_components=12)
    strategy = run_protocol(make_strategy(paths, tmp_path, spec=spec), grid_for(paths, tmp_path))
    o = strategy.result
    assert o.status == "completed" and not o.failures
    ref = fedvi.federated_fit(frames, likelihood, n_components=12, seed=7, policy=NOISELESS)
    assert o.n_clusters == ref.n_clusters
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)
    assert o.spec.feature_names == tuple(names)


def test_a_site_requiring_secure_aggregation_is_not_asked_in_a_plain_run(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strict = fedvi.SitePolicy(require_secure_aggregation=True, dp_epsilon=None)
    grid = grid_for(paths, tmp_path, policies=[None, strict, None])
    strategy = run_protocol(make_strategy(paths, tmp_path), grid)
    o = strategy.result
    assert o.status == "completed" and not o.failures
    assert grid.asked(1001) == 2  # pre-flight and its local fit only
    assert o.sites[1].counts is None
    # Its one-shot statistics stay in every refinement round, as a site that does not refine.
    quiet = fedvi.SitePolicy(allow_refine=False, allow_labels=False, dp_epsilon=None)
    ref = fedvi.federated_fit(tables, n_components=12, seed=7, policy=[NOISELESS, quiet, NOISELESS])
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)
    assert o.elbo_history == pytest.approx(ref.elbo_history, rel=1e-10)


@pytest.mark.slow  # waits 13 s of wall-clock for a late site and a progress line
def test_waiting_names_the_connected_and_the_missing_sites(tmp_path):
    """A site that connects late: while waiting, a progress line every 10 s says which sites
    are connected (by partition id and node) and which are missing; the run then goes on."""
    import logging

    tables = sites()
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path, options=StrategyOptions(wait_for_sites=60))
    grid = grid_for(paths, tmp_path, joins_after={1002: 13})
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        run_protocol(strategy, grid)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    waiting = [x for x in lines if x.startswith("fedvi: waiting for sites")]
    assert waiting and "connected site 0 (node 1000), site 1 (node 1001); missing [2]" in waiting[0]
    assert strategy.result.status == "completed" and sorted(strategy.result.sites) == [0, 1, 2]


def test_secure_rounds_run_through_the_workflow(tmp_path):
    """SecAgg+ refinement and label rounds (PhaseFitWorkflow's secure path, the sites' own
    secagg mod): the server sees only sums, and the run is the plain run's."""
    tables = sites()
    paths = write_sites(tmp_path, tables)
    options = StrategyOptions(wait_for_sites=5, secure_aggregation=True)
    strategy = run_protocol(
        make_strategy(paths, tmp_path, options=options), grid_for(paths, tmp_path)
    )
    o = strategy.result
    assert o.status == "completed" and not o.failures
    ref = fedvi.federated_fit(tables, n_components=12, seed=7, policy=NOISELESS)
    assert o.n_clusters == ref.n_clusters
    assert o.elbo_history == pytest.approx(ref.elbo_history, rel=1e-9)
    assert all(o.sites[b].counts is None for b in range(3))  # no site's counts, only the sum
    total = sum(np.where(ref.sites[b].counts > 0, ref.sites[b].counts, 0) for b in range(3))
    assert o.privacy["label_counts_total"] == total.tolist()
    assert o.privacy["secure_aggregation"] is True


def test_timeouts_grow_with_the_waves_of_a_simulations_sites(tmp_path):
    """Many virtual sites on few CPU slots take turns: every phase's timeout, pre-flight
    included, grows with the number of waves (1,000 sites on 2 slots needed about 2 s a wave
    of engine time besides the work); a deployment (no slots) keeps the base timeouts."""
    from strategies.workflow import WAVE_OVERHEAD, phase_timeout

    paths = [tmp_path / f"s{b}.npy" for b in range(1000)]
    many = make_strategy(paths, tmp_path, site_slots=2)
    deployed = make_strategy(paths, tmp_path)
    base = StrategyOptions().preflight_timeout
    assert phase_timeout(deployed, Phase.PREFLIGHT) == base
    assert phase_timeout(many, Phase.PREFLIGHT) == base + 500 * WAVE_OVERHEAD
    assert phase_timeout(many, Phase.LOCAL) >= 120.0 + 500 * WAVE_OVERHEAD
    assert phase_timeout(deployed, Phase.LOCAL) < 200.0


def test_secure_stage_timeouts_grow_with_the_share_split(tmp_path):
    """A secure round's stages wait for every site's Shamir split, O(N²) per site: measured,
    the 100-site share-keys stage took 136 s in simulation (2 slots) and the 150-site one was
    stopped at its linear timeout of 287 s with 66 of 150 sites' shares. The secure bound must
    cover the 150-site stage extrapolated as N³ from 100 sites (136 x 1.5³ = 459 s) and stay
    the plain bound for plain rounds; a deployment's sites split in parallel."""
    from strategies.workflow import phase_timeout

    sim150 = make_strategy([tmp_path / f"s{b}.npy" for b in range(150)], tmp_path, site_slots=2)
    plain = phase_timeout(sim150, Phase.REFINE)
    assert phase_timeout(sim150, Phase.LABEL, secure=True) >= 136 * 1.5**3
    assert phase_timeout(sim150, Phase.REFINE, secure=False) == plain
    sim100 = make_strategy([tmp_path / f"s{b}.npy" for b in range(100)], tmp_path, site_slots=2)
    assert phase_timeout(sim100, Phase.LABEL, secure=True) >= 136
    # A deployment of 1,000 sites: each splits in about 1.4e-4 x 1000² = 140 s, in parallel.
    dep = make_strategy([tmp_path / f"s{b}.npy" for b in range(1000)], tmp_path)
    assert 140 <= phase_timeout(dep, Phase.LABEL, secure=True) - phase_timeout(dep, Phase.LABEL)
