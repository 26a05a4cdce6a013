"""``python -m simulations.run`` (Flower's simulation engine on Ray) reproduces
``fedvi.federated_fit``, runs secure aggregation, reports a failed run, and leaves a model file
that labels the sites' rows from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")

import fedvi  # noqa: E402
from fedvi.io import read_labels
from fedvi.label_files import latest_labels  # noqa: E402
from fedvi.metrics import adjusted_rand_index  # noqa: E402
from fedvi.settings import as_dict  # noqa: E402
from simulations.data import load_sites  # noqa: E402
from strategies.config import RunSettings, compose_config  # noqa: E402

pytestmark = [pytest.mark.simulation, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("flower", "inprocess")


def run(args: list[str], timeout: float = 300, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def reference(overrides: list[str]):
    cfg = compose_config("config", overrides)
    sites, truth, _ = load_sites(cfg)
    s = RunSettings.from_cfg(cfg)
    ref = fedvi.federated_fit(
        sites,
        seed=s.seed,
        policy=s.site,
        **as_dict(s.spec),
        **as_dict(s.fit),
        **as_dict(s.server),
    )
    return ref, truth, sites


def check_run_dir(run_dir: Path, overrides: list[str]) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    ref, truth, _ = reference(overrides)
    assert results["status"] == "completed" and not results["failures"]
    assert results["n_clusters"] == ref.n_clusters
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-10)
    labels = [read_labels(latest_labels(run_dir / "labels", b)) for b in range(len(truth))]
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(labels)) == 1.0
    expected_ari = adjusted_rand_index(np.concatenate(truth), np.concatenate(ref.labels))
    assert results["ari"] == pytest.approx(expected_ari)
    for b, lab in enumerate(ref.labels):
        site = results["sites"][f"site {b}"]
        assert site["n_rows"] == len(lab) and site["converged"] is True
        assert site["uplink_bytes_by_phase"]["local"] == ref.uplink_bytes[b]
        assert site["uplink_bytes"] == sum(site["uplink_bytes_by_phase"].values())
        assert site["label_file"] == Path(latest_labels(run_dir / "labels", b)).name
    return results


def label_cli(model: Path, data: Path, out: Path) -> None:
    """Label a site's table with ``python -m fedvi label``, as a site would after a run."""
    cmd = [sys.executable, "-m", "fedvi", "label", "--model", str(model), "--data", str(data)]
    label = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert label.returncode == 0, label.stderr


def test_default_style_run_matches_federated_fit(tmp_path):
    overrides = [
        "+experiment=small",
        "seed=2",
        "strategy.merge_mode=paper",
        "strategy.label_mode=map",
        "strategy.refine_rounds=0",
    ]
    proc = run([*overrides, f"hydra.run.dir={tmp_path}"])
    results = check_run_dir(tmp_path, overrides)
    assert results["label_mode"] == "map"
    wall = results["wall_clock"]
    assert set(wall) >= {"startup", "preflight", "local", "label", "data", "simulation"}
    # The engine's start-up is not counted as pre-flight work.
    assert wall["startup"] > wall["preflight"] and wall["startup"] < wall["simulation"]
    for name in (
        "cluster_profiles.csv",
        "cluster_profiles.png",
        "config_resolved.yaml",
        "model.npz",
        "run.log",
    ):
        assert (tmp_path / name).exists(), name
    profiles = np.loadtxt(tmp_path / "cluster_profiles.csv", delimiter=",", skiprows=1, ndmin=2)
    assert profiles.shape == (results["n_clusters"], 2 + 40)
    console = proc.stdout + proc.stderr
    assert "fedvi local: site 0" in console  # one line per site and phase
    assert "deprecated" not in console.lower()  # Flower's notice is kept out of the console
    # The model file of the run labels a site's table from the command line, on the site.
    site0 = tmp_path / "site_data" / "site0.npy"
    out = tmp_path / "relabel.csv"
    label_cli(tmp_path / "model.npz", site0, out)
    posterior_labels = fedvi.load_model(tmp_path / "model.npz").predict(np.load(site0))
    np.testing.assert_array_equal(read_labels(out), posterior_labels)


def test_secure_aggregation_gives_the_plain_runs_clusters(tmp_path):
    # Exact sums compared: the sites opt out of DP noise (on by default, issue 15).
    common = [
        "+experiment=small",
        "federation.sites=3",
        "strategy.refine_rounds=2",
        "site.dp_epsilon=null",
    ]
    run([*common, f"hydra.run.dir={tmp_path / 'plain'}"])
    run([*common, "strategy.secure_aggregation=true", f"hydra.run.dir={tmp_path / 'secure'}"])
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    secure = json.loads((tmp_path / "secure" / "results.json").read_text())
    assert secure["status"] == "completed" and secure["privacy"]["secure_aggregation"]
    assert secure["n_clusters"] == plain["n_clusters"]
    assert len(secure["elbo_history"]) == len(plain["elbo_history"]) == 4
    np.testing.assert_allclose(secure["elbo_history"], plain["elbo_history"], rtol=1e-9)
    assert secure["ari"] == plain["ari"]
    # The plain run's model file labels a site's table from the command line with the labels
    # that run wrote on the site (posterior labels).
    out = tmp_path / "relabel.csv"
    label_cli(tmp_path / "plain" / "model.npz", tmp_path / "plain" / "site_data" / "site1.npy", out)
    run_labels = read_labels(latest_labels(tmp_path / "plain" / "labels", 1))
    np.testing.assert_array_equal(read_labels(out), run_labels)
    # The server saw only the total label counts, not each site's.
    assert all(s["counts"] is None for s in secure["sites"].values())
    totals = np.sum([s["counts"] for s in plain["sites"].values()], axis=0)
    np.testing.assert_array_equal(secure["privacy"]["label_counts_total"], totals)


def test_a_failed_run_exits_non_zero_and_writes_results(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n0,1\n1,yes\n")
    good = tmp_path / "good.csv"
    good.write_text("a,b\n" + "0,1\n1,0\n" * 20)
    out = tmp_path / "run"
    proc = run(
        [
            "data=files",
            f"data.paths=[{good},{bad}]",
            "model.n_components=3",
            f"hydra.run.dir={out}",
        ],
        expect=1,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed"
    (fail,) = results["failures"]
    assert fail["site"] == 1 and fail["phase"] == "preflight" and fail["node"]
    assert "failed validation (bad-value)" in fail["error"]
    assert "yes" not in fail["error"] and "bad.csv" not in fail["error"]
    assert "the run failed" in proc.stdout + proc.stderr


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


def test_a_site_joins_a_saved_model_through_the_app(tmp_path):
    """``resume=<model file>``: the new site fits locally and is merged into the model by the
    same summary-only merge as ``fedvi.extend`` (same K, same ELBO)."""
    _, _, sites = reference(["+experiment=sim4", "federation.split=iid"])
    four = fedvi.federated_fit(sites[:4], n_components=15, seed=0)
    model_path = four.model.save(tmp_path / "four_sites.npz")
    np.save(tmp_path / "site4.npy", sites[4])
    out = tmp_path / "run"
    run(
        [
            "data=files",
            f"data.paths=[{tmp_path / 'site4.npy'}]",
            f"resume={model_path}",
            f"hydra.run.dir={out}",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    ref = fedvi.extend(fedvi.load_model(model_path), [sites[4]], seed=0)
    assert results["status"] == "completed" and list(results["sites"]) == ["site 4"]
    assert results["n_clusters"] == ref.model.n_clusters
    assert results["elbo"] == pytest.approx(ref.model.elbo, rel=1e-10)
    model = fedvi.load_model(out / "model.npz")
    assert model.site_ids == (0, 1, 2, 3, 4)
    # The old-to-new ids of the saved model's clusters, as extend gives them.
    assert results["id_map"] == ref.id_map.tolist() == model.info["id_map"]["map"]
    np.testing.assert_array_equal(read_labels(latest_labels(out / "labels", 4)), ref.labels[0])


def test_the_in_process_engine_gives_the_flower_runs_outputs(tmp_path):
    """``federation.engine=inprocess`` and the Flower engine on one run (DP off, refinement
    on): same K, ELBO history, labels on every site, profiles and model."""
    common = ["+experiment=small", "federation.sites=3", "seed=5", "strategy.refine_rounds=2"]
    run([*common, f"hydra.run.dir={tmp_path / 'flower'}"])
    run([*common, "federation.engine=inprocess", f"hydra.run.dir={tmp_path / 'inprocess'}"])
    out = {e: json.loads((tmp_path / e / "results.json").read_text()) for e in ENGINES}
    flower, inproc = out["flower"], out["inprocess"]
    assert flower["engine"] == "flower" and inproc["engine"] == "inprocess"
    assert flower["status"] == inproc["status"] == "completed"
    assert inproc["n_clusters"] == flower["n_clusters"]
    assert len(inproc["elbo_history"]) == len(flower["elbo_history"]) > 2
    np.testing.assert_allclose(inproc["elbo_history"], flower["elbo_history"], rtol=1e-9)
    assert inproc["ari"] == pytest.approx(flower["ari"], abs=1e-12)
    for b in range(3):
        files = {e: out[e]["sites"][f"site {b}"]["label_file"] for e in ENGINES}
        assert files["inprocess"].endswith(files["flower"].rsplit("_", 1)[1])  # same model hash
        np.testing.assert_array_equal(
            read_labels(tmp_path / "inprocess" / "labels" / files["inprocess"]),
            read_labels(tmp_path / "flower" / "labels" / files["flower"]),
        )
        assert inproc["sites"][f"site {b}"]["counts"] == flower["sites"][f"site {b}"]["counts"]
    for name in ("cluster_profiles.csv", "cluster_profiles.png", "model.npz"):
        assert (tmp_path / "inprocess" / name).exists(), name
    assert (tmp_path / "inprocess" / "cluster_profiles.csv").read_text() == (
        tmp_path / "flower" / "cluster_profiles.csv"
    ).read_text()
    models = {e: fedvi.load_model(tmp_path / e / "model.npz") for e in ENGINES}
    assert models["inprocess"].site_ids == models["flower"].site_ids
    np.testing.assert_allclose(
        models["inprocess"].posterior.sums, models["flower"].posterior.sums, rtol=1e-9
    )
