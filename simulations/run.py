"""``python -m simulations.run``: a Flower simulation of FedMerDel from the Hydra config.

    python -m simulations.run                                  # default study, < 1 minute
    python -m simulations.run model=categorical federation.split=dirichlet
    python -m simulations.run -m model.alpha0=0.01,0.1 federation.sites=2,8
    python -m simulations.run data=files 'data.paths=[a.csv,b.csv]' data.label_column=y

Sites run as Flower ClientApps on the simulation engine (Ray), each reading its table from a
file; the outputs land in the Hydra run directory (see ``simulations.outputs``).
"""

from __future__ import annotations

import logging
import os
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simulations.data import load_sites, site_file_paths, write_site_files
from simulations.outputs import write_outputs
from strategies.server_app import build_strategy, components

log = logging.getLogger("fedvi")


def backend_config(fed_cfg) -> dict:
    """Ray resources per site; ``num_cpus`` is capped at the machine's cores (more hangs)."""
    cores = os.cpu_count() or 1
    num_cpus = float(fed_cfg.get("num_cpus", 1))
    if num_cpus > cores:
        log.warning("federation.num_cpus=%s > %d cores: using %d", num_cpus, cores, cores)
        num_cpus = float(cores)
    return {
        "client_resources": {
            "num_cpus": num_cpus,
            "num_gpus": float(fed_cfg.get("num_gpus", 0.0)),
        },
        "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": True},
    }


def run_federation(cfg: DictConfig, sites: list, data_paths: list[str], run_dir: str):
    """Run the Flower simulation; returns the strategy (its ``outcome`` holds the result)."""
    # Show every site's progress line; silence a Ray warning that does not apply here.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedvi.flower_client import app as client_app

    strategy = build_strategy(
        cfg, len(sites), data_paths=data_paths, output_dir=os.path.join(run_dir, "labels")
    )
    server_app = ServerApp(server_fn=lambda context: components(strategy, cfg))
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(sites),
        backend_config=backend_config(cfg.federation),
    )
    if not strategy.outcome.complete:
        raise RuntimeError(
            "the federation did not finish: "
            + ("; ".join(f"{f['site']}: {f['error']}" for f in strategy.failures) or "see log")
        )
    return strategy


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; returns the ARI when known labels exist (handy for sweeps)."""
    run_dir = HydraConfig.get().runtime.output_dir
    # Flower prints its own log lines; do not print them twice through Hydra's root logger.
    logging.getLogger("flwr").propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB set-up chatter
    wall = {}
    t = time.perf_counter()
    sites, truth, names = load_sites(cfg)
    paths = site_file_paths(cfg) or write_site_files(
        sites, os.path.join(run_dir, "site_data"), names
    )
    wall["data"] = time.perf_counter() - t
    log.info(
        "fedvi: %d sites, rows %s, %d variables, %s/%s -> %s",
        len(sites),
        [int(x.shape[0]) for x in sites],
        int(sites[0].shape[1]),
        cfg.data.source,
        cfg.federation.get("split", "-"),
        run_dir,
    )
    t = time.perf_counter()
    strategy = run_federation(cfg, sites, paths, run_dir)
    wall["simulation"] = time.perf_counter() - t
    t = time.perf_counter()
    results = write_outputs(
        strategy.outcome,
        run_dir,
        cfg=cfg,
        truth=truth,
        feature_names=names,
        plots=bool(cfg.get("plots", True)),
        wall_clock=wall,
    )
    wall["outputs"] = time.perf_counter() - t
    scores = ""
    if "ari" in results:
        scores = f", ARI {results['ari']:.4f}, NMI {results['nmi']:.4f}"
    log.info(
        "fedvi: %d global clusters, ELBO %.2f%s; uplink bytes %s; %.1f s; results in %s",
        results["n_clusters"],
        results["elbo"],
        scores,
        list(results["uplink_bytes"].values()),
        wall["simulation"],
        run_dir,
    )
    if results["failures"]:
        log.warning("fedvi: failures: %s", results["failures"])
    if cfg.get("comparators"):
        try:
            from simulations.compare import run_comparators
        except ImportError as exc:
            raise RuntimeError(
                f"comparators={cfg.comparators} needs simulations/compare.py "
                f"(run_comparators), which cannot be imported: {exc}"
            ) from exc
        run_comparators(cfg, sites, truth, results, run_dir)
    return results.get("ari")


if __name__ == "__main__":
    main()
