"""A Hydra sweep of a small preset, in process against the Flower simulation: the measurement
behind ``federation.engine=inprocess`` for sweeps.

    python benchmarks/bench_sweep.py              # 20 jobs: seed=0..9 x refine_rounds=0,3
    python benchmarks/bench_sweep.py --jobs 4     # a quick check: seed=0,1 x refine_rounds=0,3

Runs the same ``python -m simulations.run -m +experiment=small seed=... strategy.refine_rounds=0,3``
sweep twice, once with ``federation.engine=inprocess`` and once with ``federation.engine=flower``
(one command each, one run each), into a temporary folder, and prints each sweep's total
wall-clock (the whole command: start-up, every job, its outputs), the seconds per job, whether
every job completed with the same K and ELBO under both engines, and the ratio Flower/in-process.
The machine's load average is printed after each sweep: on a shared machine, compare the
ratio with the load under which each sweep ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = (0, 3)


def sweep(engine: str, n_seeds: int, out: Path, preset: str) -> float:
    """Run the sweep with ``engine`` into ``out``; its wall-clock in seconds."""
    seeds = ",".join(str(s) for s in range(n_seeds))
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "-m",
        f"+experiment={preset}",
        f"seed={seeds}",
        f"strategy.refine_rounds={','.join(map(str, ROUNDS))}",
        f"federation.engine={engine}",
        f"hydra.sweep.dir={out}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{engine} sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


def outcomes(out: Path, n_jobs: int) -> list[tuple]:
    """``(status, K, ELBO)`` of each job of a sweep."""
    rows = []
    for j in range(n_jobs):
        res = json.loads((out / str(j) / "results.json").read_text())
        rows.append((res["status"], res["n_clusters"], res["elbo"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--jobs", type=int, default=20, help="jobs per sweep: an even number, 2..20 (default 20)"
    )
    ap.add_argument("--preset", default="small", help="configs/experiment preset (small)")
    args = ap.parse_args(argv)
    if args.jobs < 2 or args.jobs % 2 or args.jobs > 20:
        ap.error(f"--jobs {args.jobs}: give an even number from 2 to 20 (seeds x refine 0,3)")
    n_seeds = args.jobs // len(ROUNDS)
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        walls, done = {}, {}
        for engine in ("inprocess", "flower"):
            out = Path(tmp) / engine
            walls[engine] = sweep(engine, n_seeds, out, args.preset)
            done[engine] = outcomes(out, args.jobs)
            print(
                f"{engine:>9}: {args.jobs} jobs in {walls[engine]:8.1f} s "
                f"({walls[engine] / args.jobs:6.2f} s a job; load average after it "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
                flush=True,
            )
    same = all(
        a[0] == b[0] == "completed" and a[1] == b[1] and abs(a[2] - b[2]) <= 1e-9 * abs(b[2])
        for a, b in zip(done["inprocess"], done["flower"], strict=True)
    )
    print(f"every job completed with the same K and ELBO under both engines: {same}")
    print(
        f"sweep of {args.jobs} jobs (+experiment={args.preset}, seed=0..{n_seeds - 1} x "
        f"strategy.refine_rounds=0,3): flower / inprocess = "
        f"{walls['flower'] / walls['inprocess']:.1f}x"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
