"""``python -m simulations.run`` (Flower's simulation engine on Ray) reproduces
``fedvi.federated_fit`` on the same sites and seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("hydra")

import fedvi  # noqa: E402
from fedvi.io import read_labels  # noqa: E402
from fedvi.metrics import adjusted_rand_index  # noqa: E402
from simulations.data import load_sites  # noqa: E402
from strategies.server_app import compose_config  # noqa: E402

pytestmark = [pytest.mark.simulation, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def reference(overrides: list[str]) -> tuple[fedvi.FederatedResult, list]:
    cfg = compose_config("config", overrides)
    sites, truth, _ = load_sites(cfg)
    m, s = cfg.model, cfg.strategy
    ref = fedvi.federated_fit(
        sites,
        m.likelihood,
        n_components=m.n_components,
        alpha0=m.alpha0,
        merge=s.merge,
        labels=s.labels,
        refine_rounds=s.refine_rounds,
        min_cluster_size=s.min_cluster_size,
        seed=cfg.seed,
    )
    return ref, truth


def check_run_dir(run_dir: Path, overrides: list[str]) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    ref, truth = reference(overrides)
    assert results["complete"] and not results["failures"]
    assert results["n_clusters"] == ref.n_clusters
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-10)
    labels = [read_labels(run_dir / "labels" / f"labels_site{b}.csv") for b in range(len(truth))]
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(labels)) == 1.0
    expected_ari = adjusted_rand_index(np.concatenate(truth), np.concatenate(ref.labels))
    assert results["ari"] == pytest.approx(expected_ari)
    for b, lab in enumerate(ref.labels):
        site = results["sites"][f"site {b}"]
        assert site["n_rows"] == len(lab)
        assert site["uplink_bytes"] == ref.uplink_bytes[b]
    return results


def test_default_style_run_matches_federated_fit(tmp_path):
    overrides = ["+experiment=small", "seed=2", "strategy.merge=paper", "strategy.labels=map"]
    proc = run([*overrides, f"hydra.run.dir={tmp_path}"])
    results = check_run_dir(tmp_path, overrides)
    assert results["label_mode"] == "map"
    assert set(results["wall_clock"]) >= {"local", "label", "data", "simulation"}
    for name in ("cluster_profiles.csv", "cluster_profiles.png", "config_resolved.yaml"):
        assert (tmp_path / name).exists(), name
    profiles = np.loadtxt(tmp_path / "cluster_profiles.csv", delimiter=",", skiprows=1, ndmin=2)
    assert profiles.shape == (results["n_clusters"], 2 + 40)
    assert "global clusters" in proc.stdout + proc.stderr  # progress on the terminal


def test_multirun_sweep(tmp_path):
    run(
        [
            "-m",
            "+experiment=small",
            "model.alpha0=0.01,0.5",
            "plots=false",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        timeout=400,
    )
    for num, alpha0 in enumerate(("0.01", "0.5")):
        check_run_dir(tmp_path / str(num), ["+experiment=small", f"model.alpha0={alpha0}"])
