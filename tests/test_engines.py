"""One coordinator, two engines: the same data, settings, policies and seed give the same run
in process (:func:`fedvi.federated_fit`) and on Flower (the strategy through
``PhaseFitWorkflow``, the production runner, with the real site ClientApps on an in-process
Grid: tests/flower_local.py), with differential privacy off and on, and with a failing site.

With DP on, each site's noise comes from its own generator; the test pins it by giving the
same generator to the site on both engines (never through the request)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")

from flower_local import grid_for, run_protocol, write_sites  # noqa: E402

import fedvi  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.settings import as_dict  # noqa: E402
from simulations.data import load_sites  # noqa: E402
from strategies.config import RunSettings, compose_config  # noqa: E402
from strategies.fedmerdel import FedMerDel  # noqa: E402
from strategies.options import StrategyOptions  # noqa: E402

PRESETS = {
    "small": ["+experiment=small", "strategy.refine_rounds=2"],
    "small_categorical": [
        "+experiment=small",
        "model=categorical",
        "federation.sites=3",
        "federation.split=dirichlet",
        "data.n_rows=900",
    ],
    # Refinement with moves from every site's clusters side by side: the exact merges of the
    # rounds join them (3 accepted in round 1), with split candidates' second moments and a
    # delete trial's statistics on the wire in every round.
    "small_moves": [
        "+experiment=small",
        "strategy.refine_rounds=3",
        "strategy.refine_moves=true",
        "strategy.refine_start=pooled",
        "strategy.refine_splits=2",
    ],
}


#: A site's budget large enough for these small sites to refine with noise (per run and period).
LARGE_BUDGET = fedvi.SitePolicy(dp_epsilon=100.0, dp_epsilon_period=100.0)


def rngs(n: int, seed: int = 11) -> list[np.random.Generator]:
    """The sites' noise generators (the same seeds on both engines)."""
    return [np.random.default_rng([seed, b]) for b in range(n)]


def both_engines(tmp_path, preset: str, dp: float | None = None, broken: int | None = None):
    cfg = compose_config("config", PRESETS[preset])
    tables, _, _ = load_sites(cfg)
    s = RunSettings.from_cfg(cfg)
    server = s.server
    # The site decides its noise (its policy's dp_epsilon; None: it opts out). A large epsilon
    # so that these small sites still refine (a site too small for its budget declines).
    site = dataclasses.replace(s.site, dp_epsilon=dp, dp_epsilon_period=dp or 4.0)
    n = len(tables)
    if broken is not None:  # a site whose codes are not whole numbers: it fails pre-flight
        tables = list(tables)
        tables[broken] = np.asarray(tables[broken], dtype=np.float64) + 0.5
    min_sites = n - 1 if broken is not None else None
    inproc = fedvi.federated_fit(
        tables,
        seed=s.seed,
        policy=site,
        min_sites=min_sites,
        rng=rngs(n),
        **as_dict(s.spec),
        **as_dict(s.fit),
        **as_dict(server),
    )
    paths = write_sites(tmp_path, tables)
    options = StrategyOptions(wait_for_sites=5, min_sites=min_sites)
    strategy = FedMerDel(s.spec, s.fit, server, options, range(n), seed=s.seed)
    run_protocol(strategy, grid_for(paths, tmp_path, policies=[site] * n, rngs=rngs(n)))
    return inproc, strategy.result


def assert_same_run(tmp_path, a: fedvi.FederatedResult, b: fedvi.FederatedResult) -> None:
    assert a.status == b.status
    assert [(f["phase"], f["site"], f["cause"], f["error"]) for f in a.failures] == [
        (f["phase"], f["site"], f["cause"], f["error"]) for f in b.failures
    ]
    assert a.n_clusters == b.n_clusters
    assert b.elbo == pytest.approx(a.elbo, rel=1e-9)
    assert b.elbo_history == pytest.approx(a.elbo_history, rel=1e-9)
    assert a.label_mode == b.label_mode
    ok = [s for s in sorted(a.sites) if a.sites[s].status == "ok"]
    assert ok == [s for s in sorted(b.sites) if b.sites[s].status == "ok"]
    for s, labels in zip(ok, a.labels, strict=True):
        on_site = read_labels(tmp_path / "labels" / b.sites[s].label_file)
        np.testing.assert_array_equal(on_site, labels)
        np.testing.assert_array_equal(a.sites[s].counts, b.sites[s].counts)


@pytest.mark.parametrize("preset", ["small", "small_categorical"])
@pytest.mark.parametrize("dp", [None, 100.0], ids=["dp-off", "dp-on"])
def test_both_engines_give_the_same_run(tmp_path, preset, dp):
    inproc, flower = both_engines(tmp_path, preset, dp)
    assert inproc.status == "completed" and inproc.n_clusters >= 2
    if dp is None:
        assert len(inproc.elbo_history) > 2  # refinement rounds were applied
    else:
        assert inproc.sites[0].privacy["epsilon_spent"] > 0
    assert_same_run(tmp_path, inproc, flower)


def test_both_engines_leave_out_the_same_failing_site(tmp_path):
    inproc, flower = both_engines(tmp_path, "small_categorical", broken=1)
    assert inproc.status == "completed_with_failures"
    assert [(f["phase"], f["site"], f["cause"]) for f in inproc.failures] == [
        ("preflight", 1, "site_error")
    ]
    assert "failed validation" in inproc.failures[0]["error"]
    assert_same_run(tmp_path, inproc, flower)


def test_the_noise_is_the_sites_not_the_requests(tmp_path):
    """Same request, same seed: two runs with DP differ unless the sites' generators are the
    same (the request cannot pin the noise)."""
    cfg = compose_config("config", PRESETS["small"])
    tables, _, _ = load_sites(cfg)
    kw = dict(n_components=10, seed=0, refine_rounds=2, policy=LARGE_BUDGET)
    first = fedvi.federated_fit(tables, **kw)
    second = fedvi.federated_fit(tables, **kw)
    assert first.elbo_history[:2] == second.elbo_history[:2]  # the one-shot part: no noise
    assert first.elbo_history[2:] != second.elbo_history[2:]
    pinned = [fedvi.federated_fit(tables, rng=rngs(len(tables)), **kw) for _ in range(2)]
    assert pinned[0].elbo_history == pinned[1].elbo_history


def test_both_engines_apply_the_same_refinement_moves(tmp_path):
    inproc, flower = both_engines(tmp_path, "small_moves")
    assert sum(r["merges"] for r in inproc.rounds) >= 1  # a move was accepted
    assert inproc.rounds == flower.rounds
    assert inproc.sites[0].uplink_bytes["refine_moves"] > 0
    assert flower.sites[0].uplink_bytes == inproc.sites[0].uplink_bytes
    assert_same_run(tmp_path, inproc, flower)


def test_both_engines_remove_a_cluster_that_owns_no_rows(tmp_path, ghost_cluster):
    """The merge gets a near-empty copy of cluster 0 (it owns no row): both engines remove it
    after labelling, refine once more without it and label again (the settle rounds)."""
    ghost_cluster()
    inproc, flower = both_engines(tmp_path, "small")
    assert any("own no rows" in n for n in inproc.notes)
    labels = np.concatenate(inproc.labels)
    assert inproc.n_clusters == len(np.unique(labels)) == labels.max() + 1
    assert_same_run(tmp_path, inproc, flower)
