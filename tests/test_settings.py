"""Every setting is defined once (a dataclass field) and reaches every place from there: the
Hydra config, the wire, the site's fit, the estimator and ``federated_fit``.

The table below gives one allowed, non-default value per field; a field added to a dataclass
without a value here fails ``test_every_field_has_a_test_value``, so a new setting cannot skip
these checks.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

import fedvi  # noqa: E402
import fedvi.flower.client as client_module  # noqa: E402
import fedvi.site_agent as site_agent  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.policy import SitePolicy  # noqa: E402
from fedvi.protocol import Phase, decode_request  # noqa: E402
from fedvi.settings import numpydoc  # noqa: E402
from fedvi.spec import MixtureSpec  # noqa: E402
from strategies.config import GROUPS, RunSettings, compose_config  # noqa: E402
from strategies.fedmerdel import fitins  # noqa: E402
from strategies.options import FederationOptions, StrategyOptions  # noqa: E402
from strategies.server_app import build_strategy  # noqa: E402

#: One allowed value per field that differs from its default: (python value, Hydra override).
VALUES = {
    MixtureSpec: {
        "likelihood": ("categorical", "categorical"),
        "n_components": (7, "7"),
        "alpha0": (0.5, "0.5"),
        "beta": (0.25, "0.25"),
        "n_levels": ((3, 3, 4), "[3,3,4]"),
        "variable_selection": (True, "true"),
        "relevance_prior": ((1.0, 3.0), "[1.0,3.0]"),
        "relevance_update": ("meanfield", "meanfield"),
        "missing": ("ignore", "ignore"),
        "feature_names": (("a", "b", "c"), "[a,b,c]"),
    },
    FitOptions: {
        "moves": ("paper", "paper"),
        "move_every": (3, "3"),
        "delete_iters": (2, "2"),
        "delete_order": ("largest", "largest"),
        "max_iter": (77, "77"),
        "tol": (1e-6, "1e-6"),
        "n_stable": (4, "4"),
        "empty_threshold": (1e-3, "1e-3"),
        "backend": ("torch", "torch"),
        "device": ("cpu", None),  # the only device here; "cuda" needs a GPU
        "block_rows": (4096, "4096"),
        "precision": ("float32", "float32"),
    },
    ServerOptions: {
        "merge_mode": ("paper", "paper"),
        "label_mode": ("map", "map"),
        "refine_rounds": (2, "2"),
        "refine_moves": (True, "true"),
        "refine_max_pairs": (8, "8"),
        "refine_deletes": (0, "0"),
        "refine_splits": (2, "2"),
        "refine_tol": (1e-6, "1e-6"),
        "refine_start": ("pooled", "pooled"),
        "min_cluster_size": (9, "9"),
        "dp_epsilon": (2.0, "2.0"),
        "dp_delta": (1e-6, "1e-6"),
    },
    StrategyOptions: {
        "min_sites": (2, "2"),
        "wait_for_sites": (12.0, "12"),
        "round_timeout": (99.0, "99"),
        "preflight_timeout": (33.0, "33"),
        "secure_aggregation": (True, "true"),
    },
    FederationOptions: {
        "sites": (3, "3"),
        "site_ids": ((2, 5, 7), "[2,5,7]"),
        "split": ("iid", "iid"),
        "concentration": (2.0, "2.0"),
        "n_exclusive": (1, "1"),
        "num_cpus": (2.0, "2.0"),
        "num_gpus": (0.5, "0.5"),
        "engine": ("inprocess", "inprocess"),
    },
    SitePolicy: {
        "min_cluster_size": (10, "10"),
        "max_components": (50, "50"),
        "allow_refine": (False, "false"),
        "allow_labels": (False, "false"),
        "allow_refine_moves": (False, "false"),
        "require_secure_aggregation": (True, "true"),
        "secagg_min_sites": (3, "3"),
        "secagg_min_threshold": (0.75, "0.75"),
        "dp_epsilon": (4.0, "4.0"),
        "dp_delta": (1e-7, "1e-7"),
        "dp_epsilon_period": (6.0, "6.0"),
        "max_aggregate_releases": (9, "9"),
        "max_runs": (3, "3"),
        "max_local_fits": (4, "4"),
        "period_days": (7.0, "7.0"),
        "state_dir": ("/data/state", "/data/state"),
        "data_path": ("/data/site.csv", "/data/site.csv"),
        "label_column": ("y", "y"),
        "output_dir": ("/data/out", "/data/out"),
        "cache_dir": ("/data/cache", "/data/cache"),
        "backend": ("torch", "torch"),
        "device": ("cuda", "cuda"),
    },
}
GROUP_OF = {cls: group for group, classes in GROUPS.items() for cls in classes}


def fields_of(cls):
    return [f for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", list(VALUES), ids=lambda c: c.__name__)
def test_every_field_has_a_test_value(cls):
    assert {f.name for f in fields_of(cls)} == set(VALUES[cls])
    for f in fields_of(cls):
        value, _ = VALUES[cls][f.name]
        assert value != f.default or f.name == "device", f.name
        assert f.metadata["doc"], f.name  # documented once, where it is defined


CASES = [(cls, f.name) for cls in VALUES for f in fields_of(cls) if VALUES[cls][f.name][1]]


@pytest.mark.parametrize(("cls", "name"), CASES, ids=lambda x: getattr(x, "__name__", x))
def test_every_field_can_be_set_from_the_config(cls, name):
    value, text = VALUES[cls][name]
    group = GROUP_OF[cls]
    overrides = [f"{group}.{name}={text}"]
    if cls is MixtureSpec and name in ("n_levels", "feature_names"):
        overrides.append("model.likelihood=categorical")
    if cls is ServerOptions and name == "label_mode":
        overrides.append("strategy.refine_rounds=0")  # map labels are for one-shot runs
    cfg = compose_config("config", overrides)
    settings = RunSettings.from_cfg(cfg)
    holder = {
        MixtureSpec: settings.spec,
        FitOptions: settings.fit,
        ServerOptions: settings.server,
        StrategyOptions: settings.strategy,
        FederationOptions: settings.federation,
        SitePolicy: settings.site,
    }[cls]
    assert getattr(holder, name) == value


def test_a_typo_in_a_config_key_is_an_error():
    from hydra.errors import ConfigCompositionException

    for bad in ("model.n_compnents=3", "strategy.merge=paper", "site.min_clustr_size=3"):
        with pytest.raises(ConfigCompositionException):
            compose_config("config", [bad])


WIRE = [(cls, f.name) for cls in (MixtureSpec, FitOptions, ServerOptions) for f in fields_of(cls)]


@pytest.mark.parametrize(("cls", "name"), WIRE, ids=lambda x: getattr(x, "__name__", x))
def test_every_model_fit_and_server_field_reaches_the_sites_fit(tmp_path, monkeypatch, cls, name):
    """config -> RunSettings -> the strategy's round -> the wire -> the site's decoded request
    -> the arguments of the site's fit (captured where the site calls the core)."""
    value, _ = VALUES[cls][name]
    base = RunSettings.from_cfg(compose_config("config", []))
    attr = {MixtureSpec: "spec", FitOptions: "fit", ServerOptions: "server"}[cls]
    change = {name: value}
    if cls is MixtureSpec and name in ("n_levels", "feature_names"):
        change["likelihood"] = "categorical"
    if cls is ServerOptions and name == "label_mode":
        change["refine_rounds"] = 0
    changed = dataclasses.replace(getattr(base, attr), **change)
    settings = dataclasses.replace(base, **{attr: changed})
    strategy = build_strategy(settings)
    coordinator = strategy.coordinator
    coordinator.agreed_spec = settings.spec if settings.spec.resolved else None
    ins = fitins(coordinator.request(Phase.LOCAL))  # the local round
    from flwr.common import parameters_to_ndarrays

    req = decode_request(parameters_to_ndarrays(ins.parameters), ins.config)
    assert getattr({"spec": req.spec, "fit": req.fit, "server": req.server}[attr], name) == value
    # ... and on into the site's fit.
    X = (np.random.default_rng(0).random((40, 3)) < 0.5).astype(np.int8)
    path = tmp_path / "site.npy"
    np.save(path, X)
    seen = {}

    def capture(data, spec, options, seed, min_cluster_size, source):
        seen.update(spec=spec, fit=options, floor=min_cluster_size)
        raise RuntimeError("captured")

    monkeypatch.setattr(site_agent, "fit_site", capture)
    site = client_module.FedviClient(
        {"partition-id": 0, "data-path": str(path), "max-components": 1000}
    )
    if attr == "server" or (cls is MixtureSpec and name in ("n_levels", "feature_names")):
        # Server options reach the site's rounds (the floor, the DP plan, the label mode):
        # checked on the decoded request above; the fit only sees the floor.
        if name == "min_cluster_size":
            with pytest.raises(fedvi.protocol.SiteError):
                site.fit(parameters_to_ndarrays(ins.parameters), ins.config)
            assert seen["floor"] == value
        return
    with pytest.raises(fedvi.protocol.SiteError):
        site.fit(parameters_to_ndarrays(ins.parameters), ins.config)
    got = {"spec": seen["spec"], "fit": seen["fit"]}[attr]
    assert getattr(got, name) == value


@pytest.mark.parametrize("name", [f.name for f in fields_of(SitePolicy)])
def test_every_policy_field_is_read_from_the_node_config(name):
    value, _ = VALUES[SitePolicy][name]
    key = name.replace("_", "-")
    policy = SitePolicy.from_node_config({"partition-id": 0, key: value})
    assert getattr(policy, name) == value


def test_estimator_and_federated_fit_take_every_model_and_fit_field():
    """Their parameters are the dataclasses' fields (no re-typed signature to drift)."""
    m = fedvi.MixtureVI()
    params = m.get_params()
    for cls in (MixtureSpec, FitOptions):
        for f in fields_of(cls):
            assert params[f.name] == f.default
            assert f.name in fedvi.MixtureVI.__doc__
            assert f.name in fedvi.federated_fit.__doc__
    for f in fields_of(ServerOptions):
        assert f.name in fedvi.federated_fit.__doc__
    assert "n_components" in numpydoc(MixtureSpec)


def test_the_comparator_uses_the_run_settings():
    """The in-process comparator gets the same settings the Flower run does (it once dropped
    relevance_update, delete_order, delete_iters, backend and device)."""
    from simulations.comparators import run_settings

    cfg = compose_config(
        "config", ["model.relevance_update=meanfield", "model.delete_iters=2", "site.dp_epsilon=3"]
    )
    s = run_settings(cfg)
    assert s.spec.relevance_update == "meanfield" and s.fit.delete_iters == 2
    assert s.site.dp_epsilon == 3.0
    assert json.dumps(dataclasses.asdict(s.spec))  # plain values, ready for the core
