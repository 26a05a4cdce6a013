"""The Flower ``ServerApp`` of a real federation (``flwr run . <connection>``).

The run config (``[tool.flwr.app.config]``, scalars only) names a Hydra config of ``configs/``
and override strings; the app composes them, so a deployed run and a simulation read the same
configs. Run-config keys:

- ``config-name`` (``"config"``) and ``overrides`` (e.g. ``"federation.sites=3
  strategy.secure_aggregation=true"``);
- ``output-dir``: where the server writes ``results.json``, ``model.npz`` and the profiles
  (``""``: ``./fedvi-runs/run-<run id>`` in the ServerApp's working directory);
- ``resume``: a model file to extend with the sites of this run (:func:`fedvi.extend`'s merge).

The sites read their own tables (their node config's ``data-path``); the server never names a
file to a deployed site. ``results.json`` is written for every run, completed or failed; a failed
run also raises, so that ``flwr list <connection> --run-id <id>`` reports ``finished:failed``.
"""

from __future__ import annotations

import os
import shlex
import time
import traceback
from logging import ERROR, INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.server import ServerApp

from fedvi.model import load_model
from strategies.config import RunSettings, compose_config
from strategies.console import ExpectedFailure, quiet_flower
from strategies.fedmerdel import FedMerDel, SiteFailureError
from strategies.outputs import write_outputs
from strategies.workflow import run_strategy


class RunFailed(RuntimeError):
    """The run did not complete (the reason is in ``results.json``)."""


class ExpectedRunFailure(RunFailed, ExpectedFailure):
    """The run did not complete for a reason fedvi expects (too few sites, two nodes with one
    partition id): said in one line, without a traceback."""


#: Failures of a run that fedvi explains in one line (the others keep their traceback).
EXPECTED_RUN_FAILURES = (SiteFailureError,)


def _log_traceback(out_dir: str, exc: BaseException) -> None:
    """Append an unexpected error's traceback to ``<out_dir>/fedvi_server.log``."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "fedvi_server.log"), "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} the run failed unexpectedly:\n")
            fh.write("".join(traceback.format_exception(exc)))
    except OSError:
        pass


def build_strategy(settings: RunSettings, resume=None, site_slots=None):
    """The FedMerDel strategy of a run's settings."""
    return FedMerDel(
        settings.spec,
        settings.fit,
        settings.server,
        settings.strategy,
        settings.federation.expected(),
        seed=settings.seed,
        resume=resume,
        site_slots=site_slots,
    )


def run_and_report(grid, context: Context, strategy: FedMerDel, out_dir: str, cfg, **outputs):
    """Run ``strategy`` on ``grid`` and write the run directory whatever happens; raises
    :class:`RunFailed` when the run did not complete."""
    t0 = time.perf_counter()
    error = None
    try:
        run_strategy(grid, context, strategy)
    except Exception as exc:  # the run's outcome is reported, then re-raised
        error = exc
        strategy.result.settle(exc)
        log(ERROR, "fedvi: the run failed: %s", strategy.result.error)
        if not isinstance(exc, EXPECTED_RUN_FAILURES):
            _log_traceback(out_dir, exc)
    strategy.result.settle()
    wall = {"total": time.perf_counter() - t0, **outputs.pop("wall_clock", {})}
    write_outputs(strategy.result, out_dir, cfg=cfg, wall_clock=wall, **outputs)
    r = strategy.result
    log(
        INFO,
        "fedvi: %s; %d clusters; %d failures; results in %s",
        r.status,
        r.n_clusters,
        len(r.failures),
        out_dir,
    )
    if r.status == "failed":
        expected = error is None or isinstance(error, EXPECTED_RUN_FAILURES)
        raise (ExpectedRunFailure if expected else RunFailed)(r.error) from error


app = ServerApp()


@app.main()
def main(grid, context: Context) -> None:
    """Deployment entry: compose the config named in the run config, run, write the outputs."""
    quiet_flower()
    rc = context.run_config
    cfg = compose_config(
        str(rc.get("config-name", "config")), shlex.split(str(rc.get("overrides", "")))
    )
    settings = RunSettings.from_cfg(cfg)
    out_dir = str(rc.get("output-dir", "")) or os.path.join("fedvi-runs", f"run-{context.run_id}")
    out_dir = os.path.abspath(out_dir)
    resume = load_model(str(rc["resume"])) if str(rc.get("resume", "")) else None
    strategy = build_strategy(settings, resume=resume)
    log(INFO, "fedvi ServerApp: %r; outputs in %s", strategy, out_dir)
    run_and_report(
        grid, context, strategy, out_dir, cfg, plots=bool(cfg.get("plots", True)), deployment=True
    )
