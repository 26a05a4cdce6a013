"""The site runs the app it reviewed (fedvi.flower.app_pin), on a real SuperLink and SuperNodes
over loopback (ports chosen at run time, FLWR_HOME in the test's folder).

Two sites run ``python -m fedvi site --app-sha256 <hash of the published app>`` (the SuperNode
with process isolation, each ClientApp started by the site with the pin). The coordinator
submits a modified copy of the app (one line added to the ClientApp's module): every site
refuses it with one line in its log and the run fails; then it submits the published app and
the run completes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_harness import Processes, exe, flower_env, free_port, run_step, wait_port
from test_deployment import STEPS, write_csv_sites

from fedvi.flower.app_pin import PIN_ERROR, app_hash

pytestmark = pytest.mark.deployment

ROOT = Path(__file__).resolve().parents[1]


def copy_app(dest: Path) -> Path:
    """The checkout's app files (what git tracks or does not ignore) in ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


def submit(env, app: Path, results: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "strategies.submit",
            "fedvi-trial",
            "--app",
            str(app),
            "--output-dir",
            str(results),
            "--overrides",
            "federation.site_ids=[0,1] strategy.refine_rounds=0 strategy.preflight_timeout=120",
            "--timeout",
            "400",
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=450,
    )


def test_app_hash_is_the_hash_of_flowers_fab(tmp_path):
    app = copy_app(tmp_path / "fedvi")
    pin = app_hash(app)
    out = subprocess.run(
        [sys.executable, "-m", "fedvi", "app-hash", str(app)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == pin
    env = flower_env(tmp_path / "home")
    subprocess.run(
        [exe("flwr"), "build", "--app", str(app)], cwd=tmp_path, env=env, check=True, timeout=120
    )
    (fab,) = tmp_path.glob("*.fab")
    assert hashlib.sha256(fab.read_bytes()).hexdigest() == pin
    (app / "fedvi" / "flower" / "client.py").open("a").write("\n# changed\n")
    assert app_hash(app) != pin


def test_a_pinned_site_refuses_a_modified_app_and_runs_the_published_one(tmp_path):
    published = copy_app(tmp_path / "published" / "fedvi")
    modified = copy_app(tmp_path / "modified" / "fedvi")
    client = modified / "fedvi" / "flower" / "client.py"
    client.write_text(client.read_text() + "\n# the coordinator's change\n")
    pin = app_hash(published)
    assert app_hash(modified) != pin
    files = write_csv_sites(tmp_path, 2, n_rows=600, n_features=12)
    env = flower_env(tmp_path / "coordinator_flwr_home")
    port = free_port("127.0.0.1")
    env.update(FEDVI_SUPERLINK_PORT=str(port))
    with Processes(tmp_path / "logs", sweep_dir=tmp_path) as procs:
        superlink = procs.step("superlink", STEPS["trial-superlink"], env)
        wait_port("127.0.0.1", port, 60, superlink)
        run_step(STEPS["trial-connection"], env)
        for b in range(2):
            site_env = flower_env(tmp_path / f"site{b}_flwr_home", env)
            node_config = (
                f'partition-id={b} data-path="{files[b]}" '
                f'output-dir="{tmp_path / f"site{b}_out"}" label-column="y"'
            )
            procs.start(
                f"site{b}",
                [
                    sys.executable,
                    "-m",
                    "fedvi",
                    "site",
                    "--app-sha256",
                    pin,
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port("127.0.0.1")),
                    "--node-config",
                    node_config,
                ],
                site_env,
            )
        deadline = time.monotonic() + 120
        while not all("SuperNode ID:" in procs.log(f"site{b}").read_text() for b in range(2)):
            assert time.monotonic() < deadline, procs.logs()
            time.sleep(1)

        refused = submit(env, modified, tmp_path / "refused")
        logs = [procs.log(f"site{b}").read_text() for b in range(2)]
        assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
        results = json.loads((tmp_path / "refused" / "results.json").read_text())
        assert results["status"] == "failed"
        # The server is told why (each node's error reply), and no site took part.
        assert sum("refused app" in f["error"] for f in results["failures"]) == 2
        assert not any(r["status"] == "ok" for r in results["sites"].values())
        for log in logs:
            lines = [line for line in log.splitlines() if line.startswith(PIN_ERROR)]
            assert lines and pin in lines[0], log[-3000:]
        assert not list(tmp_path.glob("site*_out/labels_site*.csv"))

        done = submit(env, published, tmp_path / "accepted")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + procs.logs()
    results = json.loads((tmp_path / "accepted" / "results.json").read_text())
    assert results["status"] == "completed" and not results["failures"]
    for b in range(2):
        assert len(list((tmp_path / f"site{b}_out").glob(f"labels_site{b}_run*_*.csv"))) == 1
        assert sum(line.startswith(PIN_ERROR) for line in procs.log(f"site{b}").open()) == 1
