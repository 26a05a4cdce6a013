"""Real deployments: a SuperLink and SuperNodes as real processes on ports chosen at run time,
started with the README's own commands (the ``<!-- step: ... -->`` blocks of README.md, run as
written with their shell variables set here).

1. TLS with a CA and server certificate made here, SuperNode authentication with registered
   keys: an unregistered node is refused, the run equals ``fedvi.federated_fit`` on the files.
2. Faults, on the trial recipe: a site with a bad file, a site with a different schema and an
   unexpected extra node; the run goes on with the others (``min_sites``), names each one.
3. A site killed (SIGKILL) during its local fit: named, with its node, within two minutes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deploy_harness import (
    RESERVED_PORTS,
    Processes,
    extract_steps,
    flower_env,
    free_port,
    kill_tree,
    port_open,
    processes_using,
    run_step,
    wait_port,
)

import fedvi
from fedvi.io import read_labels, read_table
from fedvi.metrics import adjusted_rand_index
from fedvi.simulate import simulate, split_sites

pytestmark = pytest.mark.deployment

ROOT = Path(__file__).resolve().parents[1]
STEPS = extract_steps((ROOT / "README.md").read_text())
SEED = 3


def base_env(tmp: Path) -> dict:
    env = flower_env(tmp / "coordinator_flwr_home")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def write_csv_sites(tmp: Path, n_sites: int, n_rows=1200, n_features=20):
    """CSV files with a header and a label column ``y`` (used only to score)."""
    sim = simulate(n_rows, 4, n_features, seed=SEED)
    parts = split_sites(sim.z, n_sites, "dirichlet", seed=SEED, concentration=2.0)
    names = [f"v{d}" for d in range(n_features)]
    paths = []
    for b, rows in enumerate(parts):
        path = tmp / f"site{b}.csv"
        fedvi.io.write_table(path, sim.X[rows], feature_names=names, labels=sim.z[rows])
        paths.append(path)
    return paths


def site_env(env: dict, tmp: Path, b: int, data: Path, policy: str = 'label-column="y"') -> dict:
    e = dict(env)
    e.update(
        FLWR_HOME=str(tmp / f"site{b}_flwr_home"),
        FEDVI_SITE=f"site{b}",
        FEDVI_SITE_ID=str(b),
        FEDVI_DATA=str(data),
        FEDVI_OUT=str(tmp / f"site{b}_out"),
        FEDVI_SUPERNODE_PORT=str(free_port("127.0.0.1")),
        FEDVI_POLICY=policy,
    )
    return e


def supernodes_online(env: dict, connection: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["flwr", "supernode", "list", connection, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError:
            nodes = []
        if sum(1 for node in nodes if node.get("status") == "online") >= n:
            return
        time.sleep(2)
    raise AssertionError(f"fewer than {n} SuperNodes online: {out.stdout} {out.stderr}")


def submit(step: str, env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    """The README's run step (``python -m strategies.submit``) from the checkout."""
    return run_step(STEPS[step], env, cwd=ROOT, timeout=timeout, check=False)


def reference(files, **kw):
    tables = [read_table(f, label_column="y") for f in files]
    return fedvi.federated_fit(tables, seed=0, **kw), tables


# -- 1. TLS + registered SuperNodes: the README's recipe ----------------------------------------
def test_tls_recipe_from_the_readme(tmp_path):
    files = write_csv_sites(tmp_path, 2)
    env = base_env(tmp_path)
    port = free_port()
    assert port not in RESERVED_PORTS
    env.update(
        FEDVI_CERTS=str(tmp_path / "certs"),
        FEDVI_KEYS=str(tmp_path / "keys"),
        FEDVI_SAN="DNS:localhost,IP:127.0.0.1",
        FEDVI_SUPERLINK_HOST="127.0.0.1",
        FEDVI_SUPERLINK_PORT=str(port),
        FEDVI_RESULTS=str(tmp_path / "results"),
        FEDVI_SITES="[0,1]",
        # Secure aggregation for the sum-only rounds, one refinement round (each SecAgg+ round
        # is four message exchanges, ~30 s here).
        FEDVI_OVERRIDES="strategy.secure_aggregation=true strategy.refine_rounds=1",
    )
    sites = [site_env(env, tmp_path, b, files[b]) for b in range(2)]
    intruder = site_env(env, tmp_path, 2, files[0])
    intruder["FEDVI_SITE_ID"] = "1"
    with Processes(tmp_path / "logs", sweep_dir=tmp_path) as procs:
        run_step(STEPS["coordinator-certs"], env)
        for e in [*sites, intruder]:
            run_step(STEPS["site-key"], e)
        superlink = procs.step("superlink", STEPS["coordinator-superlink"], env)
        wait_port("127.0.0.1", port, 60, superlink)
        run_step(STEPS["coordinator-connection"], env)
        for e in sites:  # the intruder's key is never registered
            run_step(STEPS["coordinator-register"], e | {"FLWR_HOME": env["FLWR_HOME"]})
        for b, e in enumerate(sites):
            procs.step(f"site{b}", STEPS["site-supernode"], e)
        refused = procs.step("intruder", STEPS["site-supernode"], intruder)
        assert refused.wait(timeout=120) == 1
        log = (procs.log("intruder")).read_text()
        assert "Failed to activate SuperNode" in log
        supernodes_online(env, "fedvi", 2)
        t0 = time.perf_counter()
        done = submit("coordinator-run", env)
        took = time.perf_counter() - t0
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + procs.logs()
        pids = [p.pid for p in procs.procs.values()]
    assert not port_open("127.0.0.1", port)
    assert processes_using(tmp_path) == [] and all(not _alive(p) for p in pids)
    assert not (tmp_path / "site2_out").exists()

    results = json.loads((tmp_path / "results" / "results.json").read_text())
    ref, tables = reference(files, refine_rounds=1)
    assert results["status"] == "completed" and not results["failures"], results["notes"]
    assert results["privacy"]["secure_aggregation"] is True
    assert results["n_clusters"] == ref.n_clusters
    # Sums recovered through SecAgg+'s fixed point: the plain in-process ELBO to 1e-9.
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-9)
    assert len(results["elbo_history"]) == 3  # the refinement round was applied
    assert all(s["counts"] is None for s in results["sites"].values())  # only the total
    labels = [read_labels(tmp_path / f"site{b}_out" / f"labels_site{b}.csv") for b in range(2)]
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(labels)) == 1.0
    # The data as the sites reported it, not a default study.
    cfg = (tmp_path / "results" / "config_resolved.yaml").read_text()
    assert "sites (deployment)" in cfg and "n_rows: 1200" in cfg
    assert results["data"]["n_variables"] == 20
    assert "y" not in ref.spec.feature_names  # the label column was never fitted
    print(f"TLS deployment: {results['n_clusters']} clusters, run in {took:.1f} s")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# -- 2 and 3: faults, on the trial recipe ----------------------------------------------------
def start_trial(procs, env, site_envs):
    port = int(env["FEDVI_SUPERLINK_PORT"])
    superlink = procs.step("superlink", STEPS["trial-superlink"], env)
    wait_port("127.0.0.1", port, 60, superlink)
    run_step(STEPS["trial-connection"], env)
    for name, e in site_envs.items():
        procs.step(name, STEPS["trial-supernode"], e)
    # Without SuperNode authentication `flwr supernode list` lists none: wait for each
    # SuperNode's own line saying it joined.
    deadline = time.monotonic() + 120
    while not all("SuperNode ID:" in procs.log(n).read_text() for n in site_envs):
        assert time.monotonic() < deadline, procs.logs()
        time.sleep(1)


def test_bad_file_other_schema_and_extra_node_are_named_and_the_run_goes_on(tmp_path):
    files = write_csv_sites(tmp_path, 4)
    bad = tmp_path / "site2_bad.csv"
    bad.write_text(files[2].read_text().replace("\n1,", "\nyes,", 1))
    other = tmp_path / "site3_other.csv"
    text = files[3].read_text().splitlines()
    other.write_text("\n".join([text[0].replace("v7", "v7b"), *text[1:]]) + "\n")
    env = base_env(tmp_path)
    env.update(
        FEDVI_RESULTS=str(tmp_path / "results"),
        FEDVI_SITES="[0,1,2,3]",
        FEDVI_MIN_SITES="2",
        FEDVI_SUPERLINK_PORT=str(free_port("127.0.0.1")),
    )
    sites = {
        "site0": site_env(env, tmp_path, 0, files[0]),
        "site1": site_env(env, tmp_path, 1, files[1]),
        "site2": site_env(env, tmp_path, 2, bad),
        "site3": site_env(env, tmp_path, 3, other),
        "extra": site_env(env, tmp_path, 9, files[3]),
    }
    with Processes(tmp_path / "logs", sweep_dir=tmp_path) as procs:
        start_trial(procs, env, sites)
        done = submit("trial-run", env)
        assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:] + procs.logs()
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["status"] == "completed_with_failures"
    fails = {f["site"]: f for f in results["failures"]}
    assert set(fails) == {2, 3}
    assert fails[2]["phase"] == "preflight" and "failed validation (bad-value)" in fails[2]["error"]
    assert "yes" not in fails[2]["error"] and "site2_bad" not in fails[2]["error"]
    assert "renamed" in fails[3]["error"] and fails[2]["node"] and fails[3]["node"]
    assert any("claims site 9, which is not an expected site" in n for n in results["notes"])
    assert not (tmp_path / "site9_out" / "labels_site9.csv").exists()
    ok = [s for s, r in results["sites"].items() if r["status"] == "ok"]
    assert ok == ["site 0", "site 1"]
    ref, _ = reference(files[:2])
    assert results["n_clusters"] == ref.n_clusters
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-10)
    # The wrapper printed each failure with its site and node.
    assert re.search(r"site 2 \(node \d+\) failed in preflight", done.stdout)


def test_a_site_killed_during_its_local_fit_is_named_within_two_minutes(tmp_path):
    files = write_csv_sites(tmp_path, 3)
    big = tmp_path / "site2_big.parquet"
    rng = np.random.default_rng(0)
    X = (rng.random((600_000, 20)) < 0.3).astype(np.int8)  # a slow local fit
    fedvi.io.write_table(big, X, feature_names=[f"v{d}" for d in range(20)])
    env = base_env(tmp_path)
    env.update(
        FEDVI_RESULTS=str(tmp_path / "results"),
        FEDVI_SITES="[0,1,2]",
        FEDVI_MIN_SITES="2",
        FEDVI_SUPERLINK_PORT=str(free_port("127.0.0.1")),
    )
    sites = {
        "site0": site_env(env, tmp_path, 0, files[0]),
        "site1": site_env(env, tmp_path, 1, files[1]),
        "site2": site_env(env, tmp_path, 2, big, policy=""),
    }
    with Processes(tmp_path / "logs", sweep_dir=tmp_path) as procs:
        start_trial(procs, env, sites)
        run = subprocess.Popen(
            ["bash", "-c", STEPS["trial-run"]],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.adopt("submit", run)
        lines, killed_at, detected = [], None, None
        for line in run.stdout:
            lines.append(line)
            if killed_at is None and "phase local on sites" in line:
                time.sleep(2)  # the sites are fitting now
                kill_tree(procs.procs["site2"], signal.SIGKILL, grace=0)
                killed_at = time.monotonic()
            if killed_at and detected is None and re.search(r"site 2 \(node \d+\) failed", line):
                detected = time.monotonic() - killed_at
                lines.append(f"detected after {detected:.1f} s\n")
        code = run.wait(timeout=400)
    out = "".join(lines)
    assert killed_at is not None, out
    assert code == 3, out[-4000:]
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    (fail,) = results["failures"]
    assert fail["site"] == 2 and fail["phase"] == "local" and fail["node"]
    assert results["status"] == "completed_with_failures"
    assert results["sites"]["site 2"]["status"] == "failed"
    found = re.search(r"detected after ([0-9.]+) s", out)
    assert found and float(found.group(1)) < 120, out[-3000:]
    ref, _ = reference(files[:2])
    assert results["n_clusters"] == ref.n_clusters
    print(f"killed site detected after {found.group(1)} s")
