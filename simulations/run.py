"""``python -m simulations.run``: a Flower simulation of FedMerDel from the Hydra config.

    python -m simulations.run                                  # default study, < 1 minute
    python -m simulations.run model=categorical federation.split=dirichlet
    python -m simulations.run -m model.alpha0=0.01,0.1 federation.sites=2,8
    python -m simulations.run data=files 'data.paths=[a.csv,b.parquet]' data.label_column=y

Sites run as Flower ClientApps on the simulation engine (Ray), each reading its table from its
file; the outputs land in the Hydra run directory (see ``strategies.outputs``). For sweeps,
``federation.engine=inprocess`` runs the same sites and settings as function calls in this
process (``simulations.inprocess``: same outputs, no engine start-up per job):

    python -m simulations.run -m federation.engine=inprocess seed=0,1,2,3 +experiment=small

The exit status is 0 when the run completed, 3 when it completed without some sites, 1 when it
failed; the console gets one line per site and phase (Flower), ``run.log`` the details.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simulations.data import load_sites, read_site_truth, site_file_paths, write_site_files
from simulations.inprocess import EngineRun, run_inprocess
from strategies.config import RunSettings, register
from strategies.outputs import exit_code, write_outputs
from strategies.server_app import build_strategy

log = logging.getLogger("fedvi")
TRACE = logging.getLogger("fedvi.trace")
register()


def backend_config(federation) -> dict:
    """Ray resources per site; ``num_cpus`` is capped at the machine's cores (more hangs).
    Sites' own logs stay in Ray (their failures reach the server as one line each)."""
    cores = os.cpu_count() or 1
    num_cpus = float(federation.num_cpus)
    if num_cpus > cores:
        log.warning("federation.num_cpus=%s > %d cores: using %d", num_cpus, cores, cores)
        num_cpus = float(cores)
    return {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": float(federation.num_gpus)},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": False},
    }


class _ConsoleLines(logging.Filter):
    """On the console: fedvi's own lines (one per site and phase) and warnings; not Flower's
    round-by-round chatter, nor its notice that ``run_simulation`` is deprecated (it is what
    this driver uses on purpose). Everything goes to run.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "deprecated" in text.lower():
            return False
        if text.startswith("fedvi"):
            return True
        # A site's failure reaches the console as fedvi's one line; Flower's (and Ray's)
        # multi-line tracebacks of it stay in run.log.
        return record.levelno >= logging.WARNING and "\n" not in text and "Traceback" not in text


class _RunLog(logging.FileHandler):
    """The job's ``run.log``; the previous job's is closed when a sweep starts the next."""


def _quiet_flower(run_dir: str) -> None:
    from flwr.common.logger import update_console_handler

    flwr = logging.getLogger("flwr")
    flwr.propagate = False
    update_console_handler(colored=sys.stdout.isatty())  # no ANSI codes in a redirected log
    for h in flwr.handlers:
        h.addFilter(_ConsoleLines())
    for logger in (flwr, TRACE):  # a sweep runs its jobs in this process, one after another
        for h in [h for h in logger.handlers if isinstance(h, _RunLog)]:
            logger.removeHandler(h)
            h.close()
    fh = _RunLog(os.path.join(run_dir, "run.log"))
    fh.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    flwr.addHandler(fh)
    # Tracebacks go to run.log only; the console gets the one-line reason.
    TRACE.propagate = False
    TRACE.addHandler(fh)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_federation(
    settings: RunSettings, paths: list[str], label_column, run_dir: str, resume=None
):
    """Run the Flower simulation; returns the strategy (its ``result`` holds the outcome).
    ``resume``: a fitted model the simulated sites join (they get the ids after its sites)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedvi.flower.client import make_client_app
    from strategies.workflow import run_strategy

    n = len(paths)
    offset = 0 if resume is None else max(resume.site_ids) + 1
    ids = tuple(range(offset, offset + n))
    settings = dataclasses.replace(
        settings, federation=dataclasses.replace(settings.federation, sites=n, site_ids=ids)
    )
    resources = backend_config(settings.federation)
    slots = max(
        1, int(resources["init_args"]["num_cpus"] // resources["client_resources"]["num_cpus"])
    )
    strategy = build_strategy(settings, resume=resume, site_slots=slots)
    # The simulation's own sites get their files from the ClientApp factory, per partition id
    # (as a deployed site gets them from its node config): the server never names a path.
    labels_dir = os.path.join(run_dir, "labels")

    def site_policy(pid: int):
        return dataclasses.replace(
            settings.site,
            data_path=str(paths[pid - offset]),
            label_column=settings.site.label_column or label_column,
            output_dir=labels_dir,
        )

    client_app = make_client_app(site_policy, partition_offset=offset)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        try:
            run_strategy(grid, context, strategy)
        except Exception as exc:  # reported in results.json and the exit status
            strategy.result.settle(exc)
            TRACE.error("the run failed", exc_info=exc)

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config=resources,
    )
    strategy.result.settle()
    return strategy


def _site_labels(run_dir: str, result) -> list | None:
    """The label files the simulated sites wrote in this run (named in their replies)."""
    from fedvi.io import read_labels

    out = []
    for sid in sorted(result.sites):
        name = result.sites[sid].label_file
        if result.sites[sid].status != "ok" or name is None:
            return None
        path = os.path.join(run_dir, "labels", name)
        if not os.path.exists(path):
            return None
        out.append(read_labels(path))
    return out


def run_flower(cfg, settings: RunSettings, run_dir: str, resume=None) -> EngineRun:
    """The Flower engine: the sites' files (written first for in-memory sources), the
    simulation, the labels the sites wrote."""
    wall = {}
    t = time.perf_counter()
    sites = truth = None
    paths = site_file_paths(cfg)
    label_column = cfg.data.get("label_column") if paths else None
    if paths is None:
        sites, truth, names = load_sites(cfg)
        paths = write_site_files(sites, os.path.join(run_dir, "site_data"), names)
    wall["data"] = time.perf_counter() - t
    log.info(
        "fedvi: %d sites, %s/%s -> %s",
        len(paths),
        cfg.data.source,
        cfg.federation.get("split", "-"),
        run_dir,
    )
    t = time.perf_counter()
    strategy = run_federation(settings, paths, label_column, run_dir, resume)
    wall["simulation"] = time.perf_counter() - t
    result = strategy.result
    if truth is None and label_column:
        truth = read_site_truth(paths, label_column)
    return EngineRun(result, _site_labels(run_dir, result), sites, truth, wall)


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; returns the ARI when known labels exist (handy for sweeps)."""
    run_dir = HydraConfig.get().runtime.output_dir
    _quiet_flower(run_dir)
    settings = RunSettings.from_cfg(cfg)
    resume = None
    if cfg.get("resume"):
        from fedvi.model import load_model

        resume = load_model(str(cfg.resume))
    engine = settings.federation.engine
    run = (run_inprocess if engine == "inprocess" else run_flower)(cfg, settings, run_dir, resume)
    result, sites, truth, wall = run.result, run.sites, run.truth, run.wall
    comparators = bool(cfg.get("comparators")) and result.status != "failed"
    if comparators and sites is None:  # the comparators need the rows: one read for both
        sites, truth, _ = load_sites(cfg)
    results = write_outputs(
        result,
        run_dir,
        cfg=cfg,
        labels=run.labels,
        truth=truth,
        plots=bool(cfg.get("plots", True)),
        wall_clock=wall,
        engine=engine,
    )
    scores = ""
    if "ari" in results:
        scores = f", ARI {results['ari']:.4f}, NMI {results['nmi']:.4f}"
    if result.status == "failed":
        log.error(
            "fedvi: the run failed: %s (details in %s)",
            result.error,
            os.path.join(run_dir, "run.log"),
        )
    else:
        log.info(
            "fedvi: %s: %d global clusters, ELBO %.2f%s; uplink bytes %s; %.1f s; results in %s",
            result.status,
            results["n_clusters"],
            results["elbo"],
            scores,
            list(results["uplink_bytes"].values()),
            wall.get("simulation", wall.get("inprocess", 0.0)),
            run_dir,
        )
    for note in result.notes:  # what the run decided on the way (results.json "notes")
        log.info("fedvi: note: %s", note)
    for f in result.failures:
        log.warning(
            "fedvi: site %s (node %s) failed in %s: %s",
            f["site"],
            f["node"],
            f["phase"],
            f["error"],
        )
    if comparators:
        from simulations.tables import run_comparators

        run_comparators(cfg, sites, truth, results, run_dir)
    code = exit_code(result)
    if code and not HydraConfig.get().mode.name == "MULTIRUN":
        sys.exit(code)
    return results.get("ari")


if __name__ == "__main__":
    main()
