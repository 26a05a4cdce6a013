"""The FedMerDel strategy driven by Flower's own server loop, with the real site clients
(tests/flower_local.py): the whole protocol, its identity and pre-flight checks, and faults."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from flower_local import (  # noqa: E402
    LocalProxy,
    make_strategy,
    proxies_for,
    run_protocol,
    site_client,
    write_sites,
)
from flwr.common import Code, FitRes, Parameters, Status  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402

import fedvi  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.metrics import adjusted_rand_index  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.simulate import simulate, split_sites  # noqa: E402
from strategies.fedmerdel import SiteFailureError, SiteIdentityError  # noqa: E402
from strategies.options import StrategyOptions  # noqa: E402
from strategies.outputs import write_outputs  # noqa: E402

#: The sites here compare the protocol with federated_fit exactly: they opt out of DP noise
#: (by default a site's label counts and refinement statistics are noisy, issue 15).
NOISELESS = fedvi.SitePolicy(dp_epsilon=None)


def sites(likelihood="bernoulli", n_sites=3, seed=0, **kw):
    sim = simulate(900, 4, 15, likelihood=likelihood, n_levels=3, seed=seed, **kw)
    return [sim.X[p] for p in split_sites(sim.z, n_sites, "dirichlet", seed=seed)]


def labels_of(tmp_path, ids):
    return [read_labels(tmp_path / "labels" / f"labels_site{b}.csv") for b in ids]


class LosesDataProxy(LocalProxy):
    """A site whose data file (and cache) disappears after its local fit (fails mid-run)."""

    def __init__(self, node_id, client, path):
        super().__init__(node_id, client)
        self.path = path

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        if ins.config.get("fedvi.phase") == "local":
            self.path.unlink()
            for cached in (self.path.parent / "labels" / ".fedvi-cache").glob("*"):
                cached.unlink()
        return res


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
        make_strategy(paths, tmp_path, spec=spec, server=ServerOptions(**server)), proxies_for(3)
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
    strategy = run_protocol(make_strategy(paths, tmp_path, spec=spec), proxies_for(3))
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
    proxies = proxies_for(3)
    run_protocol(strategy, proxies)
    o = strategy.result
    assert o.status == "completed_with_failures"
    (fail,) = o.failures
    assert fail["phase"] == "preflight" and fail["site"] == 2
    assert "variables #[5] renamed" in fail["error"]
    assert proxies[2].rounds == 1  # no local fit on the excluded site
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
    proxies = proxies_for(3)
    with pytest.raises(SiteFailureError, match=r"preflight.*only 2 of 3.*site 1: schema differs"):
        run_protocol(strategy, proxies)
    assert "13 variables instead of 15" in strategy.result.failures[0]["error"]
    assert all(p.rounds == 1 for p in proxies)
    assert strategy.result.status == "failed"


def test_unreadable_file_is_named_and_run_continues(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    paths[2].write_bytes(b"not a numpy file")
    strategy = make_strategy(
        paths, tmp_path, options=StrategyOptions(wait_for_sites=5, min_sites=2)
    )
    run_protocol(strategy, proxies_for(3))
    o = strategy.result
    assert o.status == "completed_with_failures" and o.n_clusters >= 1
    (fail,) = o.failures
    assert fail["phase"] == "preflight" and fail["site"] == 2 and fail["node"] == "1002"
    assert "failed validation" in fail["error"]
    assert "site2.npy" not in fail["error"]  # no path crosses the wire
    ref = fedvi.federated_fit(tables[:2], n_components=12, seed=7, policy=NOISELESS)
    assert o.n_clusters == ref.n_clusters


def test_too_few_sites_stop_the_run_with_the_reasons(tmp_path):
    paths = write_sites(tmp_path, sites())
    paths[0].unlink()
    strategy = make_strategy(paths, tmp_path)
    with pytest.raises(SiteFailureError, match=r"only 2 of 3 sites.*site 0: "):
        run_protocol(strategy, proxies_for(3))


@pytest.mark.parametrize(("rounds", "phase"), [(0, "label"), (2, "refine")])
def test_site_failing_mid_run_is_named(tmp_path, rounds, phase):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    proxies = proxies_for(3)
    proxies[1] = LosesDataProxy(1001, proxies[1].client, paths[1])
    strategy = make_strategy(
        paths,
        tmp_path,
        server=ServerOptions(refine_rounds=rounds),
        options=StrategyOptions(wait_for_sites=5, min_sites=2),
    )
    run_protocol(strategy, proxies)
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
    extra = LocalProxy(1009, site_client(9))
    strategy = make_strategy(paths[:3], tmp_path)
    strategy.sim_paths["sim.data_paths"] = [str(p) for p in paths[:3]] + [""] * 6 + [str(paths[3])]
    proxies = [*proxies_for(3), extra]
    run_protocol(strategy, proxies)
    o = strategy.result
    assert o.status == "completed" and sorted(o.sites) == [0, 1, 2]
    assert extra.rounds == 1  # pre-flight only
    assert any("node 1009 claims site 9" in n for n in o.notes)
    ref = fedvi.federated_fit(tables, n_components=12, seed=7, policy=NOISELESS)
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)

    twin = LocalProxy(1010, site_client(1))
    dup = make_strategy(paths[:3], tmp_path)
    proxies = [*proxies_for(3), twin]
    with pytest.raises(SiteIdentityError, match=r"two nodes claim site 1.*1001 and 1010"):
        run_protocol(dup, proxies)
    assert all(p.rounds == 1 for p in proxies)


def test_aggregate_fit_names_failed_replies(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path, options=StrategyOptions(min_sites=2))
    proxies = proxies_for(3)
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
    config = strategy.request(strategy.phase(1)).config
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())
    assert json.loads(config["model.n_levels"]) == [3] * 15
    assert config["fit.moves"] == FitOptions().moves
    assert [p.value for p in strategy.phases] == ["preflight", "local", *["refine"] * 3, "label"]


def test_ndarrays_of_a_reply_are_exactly_the_summaries(tmp_path):
    """What the strategy decodes is bit for bit what the site's fit released."""
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strategy = run_protocol(make_strategy(paths, tmp_path), proxies_for(3))
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
    strategy = run_protocol(make_strategy(paths, tmp_path, spec=spec), proxies_for(3))
    o = strategy.result
    assert o.status == "completed" and not o.failures
    ref = fedvi.federated_fit(frames, likelihood, n_components=12, seed=7, policy=NOISELESS)
    assert o.n_clusters == ref.n_clusters
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)
    assert o.spec.feature_names == tuple(names)


def test_a_site_requiring_secure_aggregation_is_not_asked_in_a_plain_run(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strict = fedvi.SitePolicy(
        allow_server_paths=True, require_secure_aggregation=True, dp_epsilon=None
    )
    proxies = proxies_for(3, policies=[None, strict, None])
    strategy = run_protocol(make_strategy(paths, tmp_path), proxies)
    o = strategy.result
    assert o.status == "completed" and not o.failures
    assert proxies[1].rounds == 2  # pre-flight and its local fit only
    assert o.sites[1].counts is None
    # Its one-shot statistics stay in every refinement round, as a site that does not refine.
    quiet = fedvi.SitePolicy(allow_refine=False, allow_labels=False, dp_epsilon=None)
    ref = fedvi.federated_fit(tables, n_components=12, seed=7, policy=[NOISELESS, quiet, NOISELESS])
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)
    assert o.elbo_history == pytest.approx(ref.elbo_history, rel=1e-10)


def test_waiting_names_the_connected_and_the_missing_sites(tmp_path):
    """A site that connects late: while waiting, a progress line every 10 s says which sites
    are connected (by partition id and node) and which are missing; the run then goes on."""
    import logging
    import threading

    tables = sites()
    paths = write_sites(tmp_path, tables)
    proxies = proxies_for(3)
    strategy = make_strategy(paths, tmp_path, options=StrategyOptions(wait_for_sites=60))
    manager = SimpleClientManager()
    for p in proxies[:2]:
        manager.register(p)
    late = threading.Timer(13, manager.register, args=(proxies[2],))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        late.start()
        from flwr.server import Server

        Server(client_manager=manager, strategy=strategy).fit(strategy.num_rounds, timeout=None)
    finally:
        late.cancel()
        logging.getLogger("flwr").removeHandler(handler)
    waiting = [x for x in lines if x.startswith("fedvi: waiting for sites")]
    assert waiting and "connected site 0 (node 1000), site 1 (node 1001); missing [2]" in waiting[0]
    assert strategy.result.status == "completed" and sorted(strategy.result.sites) == [0, 1, 2]
