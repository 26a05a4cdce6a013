"""The FedMerDel strategy driven by Flower's own server loop, with the real site clients.

``LocalProxy`` hands each round's ``FitIns`` to a real :class:`FedviClient` in-process (what
the simulation engine does across processes), so the whole protocol runs in a second.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import RecordDict  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402

import fedvi  # noqa: E402
from fedvi.global_merge import SchemaMismatchError  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.metrics import adjusted_rand_index  # noqa: E402
from fedvi.simulate import simulate, split_sites  # noqa: E402
from simulations.outputs import write_outputs  # noqa: E402
from strategies.fedmerdel import FedMerDel, SiteFailureError, short_error  # noqa: E402


class LocalProxy(ClientProxy):
    """Runs a real site client in this process; exceptions reach the server as failures."""

    def __init__(self, cid: str, client: fedvi.flower_client.FedviClient):
        super().__init__(cid)
        self.client = client
        self.rounds = 0

    def fit(self, ins, timeout, group_id):
        self.rounds += 1
        arrays, n, metrics = self.client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class LosesDataProxy(LocalProxy):
    """A site whose data file disappears after its local fit (fails mid-run)."""

    def __init__(self, cid, client, path):
        super().__init__(cid, client)
        self.path = path

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        self.path.unlink()
        return res


def run_protocol(strategy: FedMerDel, proxies: list[LocalProxy]) -> FedMerDel:
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    Server(client_manager=manager, strategy=strategy).fit(strategy.num_rounds, timeout=None)
    return strategy


def write_sites(tmp_path, tables) -> list:
    paths = []
    for b, X in enumerate(tables):
        paths.append(tmp_path / f"site{b}.npy")
        np.save(paths[-1], X)
    return paths


def proxies_for(paths, cls=LocalProxy) -> list[LocalProxy]:
    return [
        cls(f"node{b}", fedvi.flower_client.FedviClient({"partition-id": b}, RecordDict()))
        for b in range(len(paths))
    ]


def make_strategy(paths, tmp_path, model, **kw) -> FedMerDel:
    return FedMerDel(
        n_sites=len(paths),
        model=model,
        n_components=12,
        seed=7,
        data_paths=[str(p) for p in paths],
        output_dir=str(tmp_path / "labels"),
        wait_timeout=5,
        **kw,
    )


BERNOULLI = {"likelihood": "bernoulli", "n_levels": None, "alpha0": 0.01, "beta": None}


def sites(likelihood="bernoulli", n_sites=3, seed=0, **kw):
    sim = simulate(900, 4, 15, likelihood=likelihood, n_levels=3, seed=seed, **kw)
    return [sim.X[p] for p in split_sites(sim.z, n_sites, "dirichlet", seed=seed)]


def labels_of(tmp_path, n):
    return [read_labels(tmp_path / "labels" / f"labels_site{b}.csv") for b in range(n)]


@pytest.mark.parametrize(
    ("likelihood", "options", "ref_options"),
    [
        ("bernoulli", {"merge": "paper", "labels": "map"}, {"merge": "paper", "labels": "map"}),
        ("bernoulli", {"refine_rounds": 2}, {"refine_rounds": 2}),
        ("categorical", {}, {"variable_selection": True}),
    ],
)
def test_protocol_reproduces_federated_fit(tmp_path, likelihood, options, ref_options):
    tables = sites(likelihood, n_irrelevant=3)
    paths = write_sites(tmp_path, tables)
    model = {**BERNOULLI, "likelihood": likelihood}
    if ref_options.get("variable_selection"):
        model["variable_selection"] = True
    strategy = run_protocol(make_strategy(paths, tmp_path, model, **options), proxies_for(paths))
    if likelihood == "categorical":
        assert strategy.phases[0] == "schema"  # levels agreed in a schema round
    ref = fedvi.federated_fit(tables, likelihood, n_components=12, seed=7, **ref_options)
    o = strategy.outcome
    assert o.complete and not o.failures
    assert o.n_clusters == ref.n_clusters
    assert o.elbo == pytest.approx(ref.elbo, rel=1e-10)
    np.testing.assert_allclose(o.cluster_profiles, ref.cluster_profiles, rtol=1e-10)
    got = labels_of(tmp_path, len(tables))
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(got)) == 1.0
    for b, m in enumerate(ref.mapping):
        np.testing.assert_array_equal(o.mapping[b], m)
        assert o.n_rows[b] == len(tables[b])
        assert o.uplink_bytes[b]["local"] == ref.uplink_bytes[b]
    # The run directory's files, as the ServerApp writes them.
    results = write_outputs(o, str(tmp_path / "out"), plots=True)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["n_clusters"] == ref.n_clusters and saved == json.loads(json.dumps(results))
    assert (tmp_path / "out" / "cluster_profiles.png").exists()
    if ref.variable_relevance is not None:
        np.testing.assert_allclose(saved["variable_relevance"], ref.variable_relevance)
        rel = np.genfromtxt(tmp_path / "out" / "variable_relevance.csv", delimiter=",", names=True)
        np.testing.assert_allclose(rel["relevance"], ref.variable_relevance, rtol=1e-5)
        assert (tmp_path / "out" / "variable_relevance.png").exists()


def test_mismatched_schemas_are_refused_naming_the_site(tmp_path):
    tables = sites()
    tables[1] = tables[1][:, :-2]
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path, BERNOULLI)
    with pytest.raises(SchemaMismatchError, match=r"site 1 .*13 variables.* 15 variables"):
        run_protocol(strategy, proxies_for(paths))


def test_mismatched_categorical_widths_fail_in_the_schema_round(tmp_path):
    tables = sites("categorical")
    tables[2] = tables[2][:, :-1]
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path, {**BERNOULLI, "likelihood": "categorical"})
    with pytest.raises(SchemaMismatchError, match="site 2: 14"):
        run_protocol(strategy, proxies_for(paths))


def test_mismatched_headers_are_refused(tmp_path):
    paths = []
    for b, X in enumerate(sites()):
        names = [f"{'w' if b == 2 else 'v'}{d}" for d in range(X.shape[1])]
        paths.append(tmp_path / f"site{b}.npz")
        np.savez(paths[-1], X=X, feature_names=np.array(names))
    strategy = make_strategy(paths, tmp_path, BERNOULLI)
    with pytest.raises(SchemaMismatchError, match="site 2 has a different data schema"):
        run_protocol(strategy, proxies_for(paths))


def test_unreadable_file_is_reported_and_run_continues(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    paths[2].write_bytes(b"not a numpy file")
    strategy = make_strategy(paths, tmp_path, BERNOULLI, min_sites=2)
    run_protocol(strategy, proxies_for(paths))
    o = strategy.outcome
    assert o.complete and o.n_clusters >= 1
    assert sorted(o.site_summaries) == [0, 1]
    failed = [f for f in o.failures if f["phase"] == "local"]
    assert len(failed) == 1 and failed[0]["site"] == "site 2"
    assert "site2.npy" in failed[0]["error"]
    ref = fedvi.federated_fit(tables[:2], n_components=12, seed=7)
    assert o.n_clusters == ref.n_clusters


def test_too_few_sites_stop_the_run_with_the_reasons(tmp_path):
    paths = write_sites(tmp_path, sites())
    paths[0].unlink()
    strategy = make_strategy(paths, tmp_path, BERNOULLI)
    with pytest.raises(SiteFailureError, match=r"only 2 of 3 sites answered.*site0\.npy"):
        run_protocol(strategy, proxies_for(paths))


def test_site_failing_mid_run_is_reported(tmp_path):
    tables = sites()
    paths = write_sites(tmp_path, tables)
    proxies = proxies_for(paths)
    proxies[1] = LosesDataProxy("node1", proxies[1].client, paths[1])
    strategy = make_strategy(paths, tmp_path, BERNOULLI, min_sites=2)
    run_protocol(strategy, proxies)
    o = strategy.outcome
    assert o.complete
    assert [f["phase"] for f in o.failures] == ["label"]
    assert "site 1 failed in phase 'label'" in o.failures[0]["error"]
    assert sorted(o.counts) == [0, 2]


def test_aggregate_fit_reports_failed_replies(tmp_path):
    """``aggregate_fit`` with ``FitRes`` objects: an error reply counts as a failure."""
    tables = sites()
    paths = write_sites(tmp_path, tables)
    strategy = make_strategy(paths, tmp_path, BERNOULLI, min_sites=2)
    proxies = proxies_for(paths)
    config = strategy.base_config("local")
    results = []
    for p in proxies[:2]:
        arrays, n, metrics = p.client.fit([], config)
        results.append((p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)))
    bad = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "site 2: out of memory"), None, 0, {})
    strategy.aggregate_fit(1, results, [(proxies[2], bad), RuntimeError("connection lost")])
    assert [f["error"] for f in strategy.failures] == [
        "FIT_NOT_IMPLEMENTED: site 2: out of memory",
        "RuntimeError: connection lost",
    ]
    ref = fedvi.federated_fit(tables[:2], n_components=12, seed=7)
    assert strategy.outcome.n_clusters == ref.n_clusters
    with pytest.raises(SiteFailureError, match="only 1 of 3"):
        make_strategy(paths, tmp_path, BERNOULLI, min_sites=2).aggregate_fit(1, results[:1], [])


def test_short_error_finds_the_site_in_a_wrapped_reply():
    wrapped = (
        "ValueError: Message contains an Error (reason: <'ray::ClientAppActor.run()\n"
        "  File x.py\nRuntimeError: site 3 failed in phase 'local': bad.csv: row 2\n\n"
        "Exception ClientAppException occurred. Message: site 3 failed in phase 'local': "
        "bad.csv: row 2'>). It originated during client-side execution of a message."
    )
    assert short_error(wrapped) == (3, "site 3 failed in phase 'local': bad.csv: row 2")
    assert short_error("connection lost") == (None, "connection lost")


def test_round_config_is_scalars_only(tmp_path):
    paths = write_sites(tmp_path, sites())
    strategy = make_strategy(paths, tmp_path, {**BERNOULLI, "likelihood": "categorical"})
    config = strategy.base_config("local")
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())
    assert json.loads(config["data_paths"]) == [str(p) for p in paths]
    assert strategy.phases == ["schema", "local", "label"]
