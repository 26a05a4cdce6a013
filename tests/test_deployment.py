"""Real deployments: a SuperLink and SuperNodes as real processes on ports chosen at run time,
started with the recipe's own commands (the ``<!-- step: ... -->`` blocks of docs/deployment.md,
run as written).

1. The TLS recipe, every step in a fresh shell (only ``PATH``, ``HOME`` and ``FLWR_HOME``; the
   settings steps also get the variables the recipe marks *(test)*: ports, the checkout, a
   small federation). An unregistered node is refused; the run equals ``fedvi.federated_fit``
   on the files; each site's label file is the one ``results.json`` names.
2. Faults, on the trial recipe: a site with a bad value, a site with a renamed column and an
   unexpected extra node; the run goes on with the others (``min_sites``), names each one; the
   sites say what is wrong in one line of their own logs; no traceback anywhere.
3. A site killed (SIGKILL) during its local fit: named ``offline`` within the bound that
   docs/deployment.md states (90 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
DOC = ROOT / "docs" / "deployment.md"
STEPS = extract_steps(DOC.read_text())
SEED = 3
#: The bound on detecting a SIGKILLed SuperNode that docs/deployment.md (§9) states.
OFFLINE_BOUND_S = 90


def base_env(tmp: Path) -> dict:
    env = flower_env(tmp / "coordinator_flwr_home")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["FEDVI_CHECKOUT"] = str(ROOT)
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
    """The recipe's run step (``python -m strategies.submit``; it goes to the checkout)."""
    return run_step(STEPS[step], env, timeout=timeout, check=False)


def reference(files, **kw):
    tables = [read_table(f, label_column="y") for f in files]
    return fedvi.federated_fit(tables, seed=0, **kw), tables


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Exit Code: 800" not in text, text[-3000:]
        assert "Exit Code: 201" not in text, text[-3000:]


# -- 1. TLS + registered SuperNodes: the recipe, each step from a fresh shell -----------------
def fresh_env(home: Path, **settings) -> dict:
    """A fresh shell's environment: ``PATH`` (this Python's ``bin`` first), ``HOME``,
    ``FLWR_HOME`` and nothing else but ``settings`` (the variables the recipe marks *(test)*).
    ``PYTHONPATH`` is passed on when set, so that a development checkout imports its own code
    rather than another installed copy (it sets no recipe variable)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "FLWR_HOME": str(home / ".flwr"),
    }
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update({k: str(v) for k, v in settings.items()})
    return env


def test_tls_recipe_runs_step_by_step_from_fresh_shells(tmp_path):
    files = write_csv_sites(tmp_path, 2)
    port = free_port()
    assert port not in RESERVED_PORTS
    coord = tmp_path / "coordinator"
    homes = {name: tmp_path / name for name in ("site0", "site1", "intruder")}
    # Only the settings steps get variables, those the recipe marks (test).
    coord_settings = fresh_env(
        coord,
        FEDVI_CHECKOUT=ROOT,
        FEDVI_SUPERLINK_PORT=port,
        FEDVI_SITES="[0,1]",
        FEDVI_MIN_SITES=2,
        # Secure aggregation for the sum-only rounds, one refinement round (each SecAgg+ round
        # is four message exchanges, ~30 s here).
        FEDVI_OVERRIDES="strategy.secure_aggregation=true strategy.refine_rounds=1",
    )
    ids = {"site0": 0, "site1": 1, "intruder": 1}
    data = {"site0": files[0], "site1": files[1], "intruder": files[0]}
    cenv = fresh_env(coord)
    senv = {name: fresh_env(home) for name, home in homes.items()}
    with Processes(tmp_path / "logs", sweep_dir=tmp_path) as procs:
        run_step(STEPS["coordinator-settings"], coord_settings)
        for name, home in homes.items():
            run_step(
                STEPS["site-settings"],
                fresh_env(
                    home,
                    FEDVI_SITE_ID=ids[name],
                    FEDVI_DATA=data[name],
                    FEDVI_POLICY='label-column="y"',
                    FEDVI_SUPERLINK=f"127.0.0.1:{port}",
                    FEDVI_SUPERNODE_PORT=free_port("127.0.0.1"),
                ),
            )
        run_step(STEPS["coordinator-certs"], cenv)
        for name, home in homes.items():  # the CA certificate, sent to each site
            shutil.copy(coord / "fedvi-certs" / "ca.crt", home / "fedvi-ca.crt")
            run_step(STEPS["site-key"], senv[name])
        for name in ("site0", "site1"):  # their public keys, sent to the coordinator
            key = homes[name] / "fedvi-keys" / f"site{ids[name]}.pub"
            shutil.copy(key, coord / "fedvi-site-keys" / f"{name}.pub")
        superlink = procs.step("superlink", STEPS["coordinator-superlink"], cenv)
        wait_port("127.0.0.1", port, 60, superlink)
        run_step(STEPS["coordinator-connection"], cenv)
        run_step(STEPS["coordinator-register"], cenv)
        for name in ("site0", "site1"):
            procs.step(name, STEPS["site-supernode"], senv[name])
        refused = procs.step("intruder", STEPS["site-supernode"], senv["intruder"])
        assert refused.wait(timeout=120) == 1
        assert "Failed to activate SuperNode" in procs.log("intruder").read_text()
        supernodes_online(cenv, "fedvi", 2)
        t0 = time.perf_counter()
        done = run_step(STEPS["coordinator-run"], cenv, cwd=tmp_path, timeout=420, check=False)
        took = time.perf_counter() - t0
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + procs.logs()
        pids = [p.pid for p in procs.procs.values()]
        site_logs = {n: procs.log(n).read_text() for n in ("site0", "site1")}
    assert not port_open("127.0.0.1", port)
    assert processes_using(tmp_path) == [] and all(not _alive(p) for p in pids)
    assert not list((homes["intruder"] / "fedvi-out").iterdir())  # the refused node wrote nothing
    assert "\x1b[" not in done.stdout  # not a terminal: no colour codes
    for noise in ("History (metrics", "[SUMMARY]", "completed N/A", "Evaluation returned no"):
        assert noise not in done.stdout, noise

    results = json.loads((coord / "fedvi-runs" / "run1" / "results.json").read_text())
    ref, tables = reference(files, refine_rounds=1)
    assert results["status"] == "completed" and not results["failures"], results["notes"]
    assert results["privacy"]["secure_aggregation"] is True
    assert results["n_clusters"] == ref.n_clusters
    # Sums recovered through SecAgg+'s fixed point: the plain in-process ELBO to 1e-9.
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-9)
    # The recipe's sites keep the DP default (epsilon 1 a run): too small for it to give a
    # useful refinement release, they decline refinement in pre-flight (their one-shot
    # statistics stand); the label round still runs under SecAgg+.
    assert len(results["elbo_history"]) == 2
    assert all(s["policy"]["allow_refine"] is False for s in results["sites"].values())
    assert all(s["policy"]["dp_epsilon"] == 1.0 for s in results["sites"].values())
    assert all(s["counts"] is None for s in results["sites"].values())  # only the total
    labels = []
    for b, name in enumerate(("site0", "site1")):
        (path,) = (homes[name] / "fedvi-out").glob(f"labels_site{b}_run*_*.csv")
        assert results["sites"][f"site {b}"]["label_file"] == path.name
        labels.append(read_labels(path))
        assert "Traceback" not in site_logs[name]
    assert adjusted_rand_index(np.concatenate(ref.labels), np.concatenate(labels)) == 1.0
    # The data as the sites reported it, not a default study.
    cfg = (coord / "fedvi-runs" / "run1" / "config_resolved.yaml").read_text()
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


def test_bad_value_renamed_column_and_extra_node_are_named_and_the_run_goes_on(tmp_path):
    files = write_csv_sites(tmp_path, 4)
    bad = tmp_path / "site2_bad.csv"
    bad.write_text(files[2].read_text().replace("\n1,", "\n7,", 1))  # 7: not binary
    bad_line = next(i + 1 for i, t in enumerate(bad.read_text().splitlines()) if t.startswith("7,"))
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
        logs = {n: procs.log(n).read_text() for n in sites}
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["status"] == "completed_with_failures"
    fails = {f["site"]: f for f in results["failures"]}
    assert set(fails) == {2, 3}
    assert fails[2]["phase"] == "preflight" and "failed validation (bad-value)" in fails[2]["error"]
    assert "value 7" not in fails[2]["error"] and "site2_bad" not in fails[2]["error"]
    assert "renamed" in fails[3]["error"] and fails[2]["node"] and fails[3]["node"]
    assert any("claims site 9, which is not an expected site" in n for n in results["notes"])
    assert not list((tmp_path / "site9_out").glob("labels_site9*.csv"))
    ok = [s for s, r in results["sites"].items() if r["status"] == "ok"]
    assert ok == ["site 0", "site 1"]
    ref, _ = reference(files[:2])
    assert results["n_clusters"] == ref.n_clusters
    assert results["elbo"] == pytest.approx(ref.elbo, rel=1e-10)
    # The wrapper printed each failure with its site and node.
    assert re.search(r"site 2 \(node \d+\) failed in preflight", done.stdout)
    # The bad site says, in one line of its own log, the file, the line, the row and the value.
    (line,) = [t for t in logs["site2"].splitlines() if "site 2: phase preflight failed" in t]
    assert f"{bad}, line {bad_line}:" in line and f"row {bad_line - 1}," in line
    assert "'v0' (#1): value 7" in line
    # No traceback, at the server or at a site, for these expected failures.
    no_traceback(done.stdout, done.stderr, *logs.values())
    # The site whose column was renamed names it, by its own name, in its own log (the
    # coordinator sends it the local request with the agreed variables, which it refuses).
    assert "renamed: 'v7b' (#8)" in logs["site3"], logs["site3"][-3000:]


def test_a_site_killed_during_its_local_fit_is_named_offline_within_the_documented_bound(
    tmp_path,
):
    assert f"within {OFFLINE_BOUND_S} s" in DOC.read_text().replace("**", "")
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
    assert fail["error"].startswith(f"node {fail['node']} offline"), fail
    assert results["status"] == "completed_with_failures"
    assert results["sites"]["site 2"]["status"] == "failed"
    found = re.search(r"detected after ([0-9.]+) s", out)
    assert found and float(found.group(1)) < OFFLINE_BOUND_S, out[-3000:]
    no_traceback(out)
    ref, _ = reference(files[:2])
    assert results["n_clusters"] == ref.n_clusters
    print(f"killed site detected (node offline) after {found.group(1)} s")
