"""The Flower ``ServerApp`` (deployment: ``flwr run . <federation>``) and the strategy factory.

The run config (``[tool.flwr.app.config]``, scalars only) names a Hydra config and override
strings; the app composes them with Hydra's compose API, so a deployed run and a simulation
read the same ``configs/``. Run-config keys:

- ``config-name`` (``"config"``), ``overrides`` (e.g. ``"model=categorical strategy.merge=paper"``)
- ``num-sites``: sites to wait for (``0``: ``federation.sites`` of the config)
- ``output-dir``: where the server writes ``results.json`` and profiles
  (``""``: ``./fedvi-runs/run-<run id>`` in the ServerApp's working directory)
- ``data-dir``: single-machine trials only (the ``local-simulation`` federation): write the
  configured data source as one file per site there; the sites read them unless their node
  config names a ``data-path``. ``""`` (real deployments): every site brings ``data-path``.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from simulations.data import load_sites, site_file_paths, write_site_files
from strategies.fedmerdel import FedMerDel, FedMerDelOutcome

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(config_name: str = "config", overrides: list[str] | None = None):
    """The Hydra config ``config_name`` of ``configs/`` with ``overrides`` applied."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))


def model_dict(model_cfg) -> dict:
    """The model part of the round config (JSON-able) from ``cfg.model``."""
    n_levels = model_cfg.get("n_levels")
    if n_levels is not None and not isinstance(n_levels, int):
        n_levels = [int(v) for v in n_levels]
    return {
        "likelihood": str(model_cfg.likelihood),
        "n_levels": n_levels,
        "alpha0": float(model_cfg.alpha0),
        "beta": None if model_cfg.get("beta") is None else float(model_cfg.beta),
        "variable_selection": bool(model_cfg.get("variable_selection", False)),
        "relevance_prior": [float(v) for v in model_cfg.get("relevance_prior", (2.0, 2.0))],
        "use_feature_names": bool(model_cfg.get("use_feature_names", True)),
        "relevance_update": str(model_cfg.get("relevance_update", "collapsed")),
    }


def fit_options(model_cfg) -> dict:
    """Keyword arguments of ``fedvi.FitOptions`` from ``cfg.model``."""
    return {
        "moves": str(model_cfg.get("moves", "merdel")),
        "move_every": int(model_cfg.get("move_every", 5)),
        "delete_order": str(model_cfg.get("delete_order", "smallest")),
        "max_iter": int(model_cfg.get("max_iter", 1000)),
        "tol": float(model_cfg.get("tol", 1e-8)),
        "backend": str(model_cfg.get("backend", "numpy")),
        "device": str(model_cfg.get("device", "cpu")),
    }


def build_strategy(
    cfg,
    n_sites: int,
    data_paths: list[str] | None = None,
    output_dir: str = "",
    on_complete: Callable[[FedMerDelOutcome], None] | None = None,
) -> FedMerDel:
    """The FedMerDel strategy of a composed config."""
    s = cfg.strategy
    label_column = cfg.data.get("label_column") if cfg.data.get("source") == "files" else None
    return FedMerDel(
        n_sites=n_sites,
        model=model_dict(cfg.model),
        n_components=int(cfg.model.n_components),
        fit_options=fit_options(cfg.model),
        seed=int(cfg.seed),
        merge=str(s.merge),
        labels=str(s.labels),
        refine_rounds=int(s.get("refine_rounds", 0)),
        min_sites=s.get("min_sites"),
        min_cluster_size=int(s.get("min_cluster_size", 5)),
        data_paths=data_paths,
        label_column=label_column,
        output_dir=output_dir,
        wait_timeout=float(s.get("round_timeout", 600)),
        on_complete=on_complete,
    )


def components(strategy: FedMerDel, cfg) -> ServerAppComponents:
    """Strategy plus a server config with one round per phase."""
    timeout = cfg.strategy.get("round_timeout")
    return ServerAppComponents(
        strategy=strategy,
        config=ServerConfig(
            num_rounds=strategy.num_rounds,
            round_timeout=None if timeout is None else float(timeout),
        ),
    )


def server_fn(context: Context) -> ServerAppComponents:
    """Deployment entry: compose the config named in the run config and write the outputs."""
    rc = context.run_config
    cfg = compose_config(
        str(rc.get("config-name", "config")), shlex.split(str(rc.get("overrides", "")))
    )
    n_sites = int(rc.get("num-sites", 0)) or int(cfg.federation.sites)
    out_dir = str(rc.get("output-dir", "")) or os.path.join("fedvi-runs", f"run-{context.run_id}")
    out_dir = os.path.abspath(out_dir)
    t0 = time.perf_counter()

    def finish(outcome: FedMerDelOutcome) -> None:
        from simulations.outputs import write_outputs

        wall = {"total": time.perf_counter() - t0}
        write_outputs(
            outcome, out_dir, cfg=cfg, plots=bool(cfg.get("plots", True)), wall_clock=wall
        )
        log(INFO, "fedvi: %d clusters; results in %s", outcome.n_clusters, out_dir)

    data_paths: list[str] = []
    if str(cfg.data.source) == "files":
        data_paths = site_file_paths(cfg) or []
    elif str(rc.get("data-dir", "")):
        sites, _, names = load_sites(cfg)
        data_paths = write_site_files(sites, os.path.abspath(str(rc["data-dir"])), names)
    if data_paths and not int(rc.get("num-sites", 0)):
        n_sites = len(data_paths)
    strategy = build_strategy(
        cfg, n_sites, data_paths=data_paths, output_dir="", on_complete=finish
    )
    log(INFO, "fedvi ServerApp: %r, waiting for %d sites", strategy, n_sites)
    return components(strategy, cfg)


app = ServerApp(server_fn=server_fn)
