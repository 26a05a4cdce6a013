"""Sweeps: ``federation.engine=inprocess`` (``simulations.inprocess``) and the report of a
multirun folder (``simulations.report``: one column per overridden key, engine, ELBO)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
from omegaconf import OmegaConf  # noqa: E402

import fedvi  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.settings import InvalidSetting, as_dict  # noqa: E402
from simulations import report  # noqa: E402
from simulations.data import load_sites  # noqa: E402
from simulations.inprocess import run_inprocess  # noqa: E402
from strategies.config import RunSettings, compose_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- the report of a sweep ------------------------------------------------------------------
def fake_job(root: Path, num: int, overrides: list[str], elbo: float, k: int, ari: float):
    """A job folder as a Hydra multirun leaves it: its overrides and its results.json."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    results = {
        "engine": "inprocess",
        "status": "completed",
        "complete": True,
        "n_clusters": k,
        "elbo": elbo,
        "ari": ari,
        "nmi": ari,
        "n_rows": 100,
        "sites": {"site 0": {}, "site 1": {}},
        "uplink_bytes": {"site 0": 10, "site 1": 10},
        "wall_clock": {"data": 0.1, "inprocess": 0.5 + num},
    }
    (job / "results.json").write_text(json.dumps(results))


def test_report_has_a_column_per_overridden_key_and_one_figure_per_numeric_sweep(tmp_path):
    alphas, seeds = (0.01, 0.1, 1.0), (0, 1)
    for num, (a, s) in enumerate(itertools.product(alphas, seeds)):
        overrides = [f"model.alpha0={a}", f"seed={s}", "+experiment=small", "merge=paper"]
        fake_job(tmp_path, num, overrides, -1000.0 - num, 3 + num % 2, 0.5 + num / 100)
    assert report.main([str(tmp_path)]) == 0
    with open(tmp_path / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:5] == ["run", "model.alpha0", "seed", "experiment", "merge"]
    assert {"engine", "elbo", "k_found", "ari", "wall_s"} <= set(rows[0])
    for num, row in enumerate(rows):
        a, s = list(itertools.product(alphas, seeds))[num]
        assert row["run"] == str(num)
        assert float(row["model.alpha0"]) == a and int(row["seed"]) == s
        assert row["experiment"] == "small" and row["merge"] == "paper"
        assert float(row["elbo"]) == -1000.0 - num and int(row["k_found"]) == 3 + num % 2
        assert float(row["wall_s"]) == 0.5 + num and row["engine"] == "inprocess"
    # One numeric key swept (seeds are replicates): its figure.
    assert (tmp_path / "sweep_model.alpha0.png").stat().st_size > 0
    assert [p.name for p in tmp_path.glob("sweep_*.png")] == ["sweep_model.alpha0.png"]


def test_no_sweep_figure_for_two_numeric_keys_nor_for_a_single_run(tmp_path):
    two = tmp_path / "two"
    for num, (a, r) in enumerate(itertools.product((0.1, 1.0), (0, 3))):
        overrides = [f"model.alpha0={a}", f"strategy.refine_rounds={r}"]
        fake_job(two, num, overrides, -1.0, 3, 0.5)
    rows = report.make_report(str(two))
    assert [r["strategy.refine_rounds"] for r in rows] == [0, 3, 0, 3]
    assert not list(two.glob("sweep_*.png"))
    one = tmp_path / "one"
    fake_job(one, 0, ["seed=4"], -1.0, 3, 0.5)
    (one / "0" / ".hydra" / "overrides.yaml").unlink()  # a single run: no overrides
    (row,) = report.make_report(str(one / "0"))
    assert row["run"] == "." and row["elbo"] == -1.0 and row["engine"] == "inprocess"
    assert "seed" in row and row["seed"] is None  # no config saved: the setting is unknown
    assert not list((one / "0").glob("sweep_*.png"))


# -- the in-process engine ------------------------------------------------------------------
def test_engine_is_checked():
    with pytest.raises(InvalidSetting, match="engine"):
        RunSettings.from_cfg(compose_config("config", ["federation.engine=ray"]))


def test_a_bad_site_file_fails_the_in_process_run_with_its_reason(tmp_path):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("a,b\n" + "0,1\n1,0\n" * 20)
    bad.write_text("a,b\n0,1\n1,yes\n")
    cfg = compose_config(
        "config", ["data=files", f"data.paths=[{good},{bad}]", "federation.engine=inprocess"]
    )
    run = run_inprocess(cfg, RunSettings.from_cfg(cfg), str(tmp_path / "run"))
    assert run.result.status == "failed" and run.labels is None
    assert "bad.csv" in run.result.error and "yes" in run.result.error
    assert not (tmp_path / "run" / "labels").exists()


def test_in_process_files_read_missing_cells_as_the_sites_do(tmp_path):
    """``data=files`` with ``model.missing=ignore``: a blank cell is missing (as the Flower
    sites read it), not an error."""
    rng = np.random.default_rng(0)
    paths = []
    for b in range(2):
        X = (rng.random((60, 4)) < 0.5).astype(int).astype(str)
        X[3, 1] = ""
        path = tmp_path / f"s{b}.csv"
        path.write_text("a,b,c,d\n" + "\n".join(",".join(r) for r in X) + "\n")
        paths.append(path)
    over = ["data=files", f"data.paths=[{paths[0]},{paths[1]}]", "model.n_components=3"]
    cfg = compose_config("config", [*over, "model.missing=ignore"])
    run = run_inprocess(cfg, RunSettings.from_cfg(cfg), str(tmp_path / "run"))
    assert run.result.status == "completed", run.result.error
    assert [len(lab) for lab in run.labels] == [60, 60]
    cfg = compose_config("config", over)  # missing=error: the blank cell is named
    run = run_inprocess(cfg, RunSettings.from_cfg(cfg), str(tmp_path / "run2"))
    assert run.result.status == "failed" and "s0.csv" in run.result.error


def test_the_console_says_why_a_run_was_not_refined(tmp_path, simulations_run):
    """The run's notes reach the console: simulated sites given a deployed site's default DP
    budget are too small to refine, and the summary says so instead of looking refined."""
    proc = simulations_run(
        [
            "federation.engine=inprocess",
            "+experiment=small",
            "site.dp_epsilon=1",
            "plots=false",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "fedvi: note: refinement stopped: no site refines (refine_rounds=3 asked" in out


@pytest.mark.slow
def test_in_process_sweep_and_its_report(tmp_path, simulations_run):
    """The issue's command: 8 jobs in process; the report lists each job's overridden keys
    with its ELBO, K, ARI, wall-clock and engine, as in the job's results.json."""
    sweep = tmp_path / "sweep"
    cmd = ["-m", "federation.engine=inprocess", "seed=0,1,2,3", "strategy.refine_rounds=0,3"]
    proc = simulations_run(
        [
            *cmd,
            "+experiment=small",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(sweep.glob("*/site_data"))  # the tables stayed in memory
    out = subprocess.run(
        [sys.executable, "-m", "simulations.report", str(sweep)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    header = out.stdout.splitlines()[0]
    for col in ("seed", "strategy.refine_rounds", "elbo", "k_found", "ari", "wall_s", "engine"):
        assert f"| {col} |" in header, header
    with open(sweep / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    for row in rows:
        job = sweep / row["run"]
        res = json.loads((job / "results.json").read_text())
        cfg = OmegaConf.load(job / "config_resolved.yaml")
        assert res["status"] == "completed" and res["engine"] == row["engine"] == "inprocess"
        assert int(row["seed"]) == cfg.seed
        assert int(row["strategy.refine_rounds"]) == cfg.strategy.refine_rounds
        assert float(row["elbo"]) == res["elbo"] and int(row["k_found"]) == res["n_clusters"]
        assert float(row["ari"]) == res["ari"]
        assert float(row["wall_s"]) == res["wall_clock"]["inprocess"]
        # The override reached the fit: refinement rounds after the merge, or none.
        rounds = len(res["elbo_history"]) - 2
        assert rounds == 0 if cfg.strategy.refine_rounds == 0 else rounds > 0
    assert {(int(r["seed"]), int(r["strategy.refine_rounds"])) for r in rows} == set(
        itertools.product(range(4), (0, 3))
    )
    assert (sweep / "sweep_strategy.refine_rounds.png").exists()
    # A job is fedvi.federated_fit on the simulation's sites under the run's settings.
    job = next(r for r in rows if r["seed"] == "1" and r["strategy.refine_rounds"] == "3")
    cfg = compose_config("config", ["+experiment=small", "seed=1", "strategy.refine_rounds=3"])
    s = RunSettings.from_cfg(cfg)
    sites, _, _ = load_sites(cfg)
    ref = fedvi.federated_fit(
        sites, seed=1, policy=s.site, **as_dict(s.spec), **as_dict(s.fit), **as_dict(s.server)
    )
    res = json.loads((sweep / job["run"] / "results.json").read_text())
    assert res["elbo_history"] == ref.elbo_history
    for b, lab in enumerate(ref.labels):
        labels_file = sweep / job["run"] / "labels" / res["sites"][f"site {b}"]["label_file"]
        np.testing.assert_array_equal(read_labels(labels_file), lab)


@pytest.mark.slow
def test_a_failing_job_of_an_in_process_sweep_is_reported_in_its_own_folder(
    tmp_path, simulations_run
):
    """Job 1 asks for more clusters than the sites' policy allows: it fails (results.json says
    why, its run.log has the traceback); job 0 completed and its run.log stays its own."""
    proc = simulations_run(
        [
            "-m",
            "+experiment=small",
            "federation.engine=inprocess",
            "model.n_components=3,200",
            "plots=false",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # a sweep goes on past a failed job
    ok, failed = (json.loads((tmp_path / j / "results.json").read_text()) for j in "01")
    assert ok["status"] == "completed" and ok["engine"] == "inprocess"
    assert failed["status"] == "failed" and "max-components" in failed["error"]
    assert "SiteFailureError" in (tmp_path / "1" / "run.log").read_text()
    assert "SiteFailureError" not in (tmp_path / "0" / "run.log").read_text()
