"""A real Flower deployment on 127.0.0.1: one SuperLink, three SuperNodes, ``flwr run``.

The result must equal ``fedvi.federated_fit`` on the same files and seed. Every process runs
in its own session and is killed with ``os.killpg`` whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fedvi
from fedvi.io import read_labels, read_table
from fedvi.metrics import adjusted_rand_index
from fedvi.simulate import simulate, split_sites

pytestmark = pytest.mark.deployment

ROOT = Path(__file__).resolve().parents[1]
SUPERLINK = ("127.0.0.1", 8000)
BIN = Path(sys.executable).parent
N_SITES = 3
SEED = 3


def _exe(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 10
    for p in reversed(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=5)


def _write_sites(tmp: Path) -> tuple[list[Path], list[str]]:
    """Three CSV files with a header and a label column ``y`` (scoring only)."""
    sim = simulate(1200, 4, 20, seed=SEED)
    parts = split_sites(sim.z, N_SITES, "dirichlet", seed=SEED, concentration=2.0)
    names = [f"v{d}" for d in range(sim.X.shape[1])]
    paths = []
    for b, rows in enumerate(parts):
        path = tmp / f"site{b}.csv"
        with open(path, "w") as fh:
            fh.write(",".join([*names[:5], "y", *names[5:]]) + "\n")
            for x, z in zip(sim.X[rows], sim.z[rows], strict=True):
                cells = [str(int(v)) for v in x]
                fh.write(",".join([*cells[:5], str(int(z)), *cells[5:]]) + "\n")
        paths.append(path)
    return paths, names


@pytest.fixture
def federation(tmp_path):
    """A SuperLink and three SuperNodes; yields ``(env, site_files, site_output_dirs, logs)``."""
    if _port_open(*SUPERLINK):
        pytest.fail(f"port {SUPERLINK[1]} is busy: the deployment test needs it for its SuperLink")
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr_home"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    files, _ = _write_sites(tmp_path)
    outs = [tmp_path / f"site{b}_out" for b in range(N_SITES)]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        fh = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                args,
                cwd=tmp_path,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        fh.close()

    try:
        start("superlink", [_exe("flower-superlink"), "--insecure"])
        deadline = time.monotonic() + 60
        while not _port_open(*SUPERLINK):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail("SuperLink did not start:\n" + (logs / "superlink.log").read_text())
            time.sleep(0.3)
        for b in range(N_SITES):
            node_config = (
                f'partition-id={b} data-path="{files[b]}" label-column="y" output-dir="{outs[b]}"'
            )
            start(
                f"supernode{b}",
                [
                    _exe("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"{SUPERLINK[0]}:{SUPERLINK[1]}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    node_config,
                ],
            )
        yield env, files, outs, logs
    finally:
        _kill(procs)


def _copy_app(dest: Path) -> Path:
    """A copy of the app: ``flwr run`` rewrites the ``pyproject.toml`` it is given (it moves
    ``[tool.flwr.federations]`` into ``$FLWR_HOME``), and must not touch the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fedvi", "strategies", "simulations", "configs"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def _flwr(args: list[str], env: dict, timeout: float, cwd: Path = ROOT):
    return subprocess.run(
        [_exe("flwr"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))


def _wait_for_run(run_id: int, env: dict, logs: Path, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        args = ["list", "local-deployment", "--run-id", str(run_id), "--format", "json"]
        out = _flwr(args, env, 60)
        if out.returncode == 0:
            status = json.loads(out.stdout)["runs"][0]
            if str(status.get("status", "")).startswith("finished"):
                return status
        time.sleep(2)
    pytest.fail(f"run {run_id} did not finish in {timeout} s: {status}\n{_logs(logs)}")


def test_flwr_run_matches_federated_fit(federation, tmp_path):
    env, files, outs, logs = federation
    out_dir = tmp_path / "server_out"
    overrides = f"seed={SEED} model.n_components=10 strategy.min_cluster_size=5"
    run_config = tmp_path / "run_config.toml"
    run_config.write_text(
        f'num-sites = {N_SITES}\noutput-dir = "{out_dir}"\noverrides = "{overrides}"\n'
    )
    app = _copy_app(tmp_path / "app")
    t0 = time.perf_counter()
    started = _flwr(
        ["run", ".", "local-deployment", "--run-config", str(run_config), "--format", "json"],
        env,
        180,
        cwd=app,
    )
    assert started.returncode == 0, started.stdout + started.stderr + _logs(logs)
    run_id = int(json.loads(started.stdout)["run-id"])
    status = _wait_for_run(run_id, env, logs)
    took = time.perf_counter() - t0
    assert status["status"] == "finished:completed", f"{status}\n{_logs(logs)}"

    results = json.loads((out_dir / "results.json").read_text())
    labels = [read_labels(o / f"labels_site{b}.csv") for b, o in enumerate(outs)]
    tables = [read_table(f, label_column="y") for f in files]
    ref = fedvi.federated_fit(
        [t.X for t in tables],
        n_components=10,
        seed=SEED,
        min_cluster_size=5,
        feature_names=tables[0].feature_names,
    )
    assert results["complete"] and not results["failures"]
    assert results["n_clusters"] == ref.n_clusters
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-10)
    for b in range(N_SITES):
        assert len(labels[b]) == len(ref.labels[b])
        assert results["sites"][f"site {b}"]["n_rows"] == len(ref.labels[b])
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(labels)) == 1.0
    # The known labels were never fitted: the sites' schema has the 20 variables only.
    assert "y" not in tables[0].feature_names
    assert (out_dir / "cluster_profiles.csv").exists()
    print(f"deployment run {run_id}: {results['n_clusters']} clusters in {took:.1f} s")
