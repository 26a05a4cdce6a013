"""Shared, session-scoped set-up: each experiment preset's site tables are generated once.

Test tiers (markers declared in pyproject.toml):

- the quick loop, ``python -m pytest -m "not slow and not simulation and not deployment"``:
  every module on small data;
- ``slow``: full-size preset fits (10^4-5x10^4 rows), every comparator on every preset, tests
  that wait on wall-clock timers;
- ``simulation``: Flower's simulation engine (Ray); ``deployment``: real SuperLink/SuperNode
  processes.

``python -m pytest -q`` (the README's test command, run by ``.ci/run``) runs all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# One BLAS/OpenMP thread per test process unless the caller chose otherwise: the tables here are
# small, and on a shared 2-core machine two threads per process oversubscribe the cores (the
# quick tier's test_backends.py + test_regression.py under load 11-13: 65 s with the default
# threads, 18 s with one). Set before NumPy/torch are imported (they read these at import);
# subprocesses (simulations, SuperNodes) inherit them. Results do not depend on it: the
# regression pins (labels hashed, ELBO to 1e-9) hold either way.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def simulations_run() -> Callable[..., subprocess.CompletedProcess]:
    """``simulations_run(args, timeout=600)``: ``python -m simulations.run *args`` from the
    project root (on ``PYTHONPATH``), as a user types it; its output captured as text."""

    def run(args, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "simulations.run", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def preset_sites() -> Callable:
    """``preset_sites(*overrides) -> (sites, truth, RunSettings)`` of ``configs/config.yaml``
    with those Hydra overrides (e.g. ``"+experiment=sim4", "federation.split=iid"``).

    Generated once per set of overrides for the whole session (several modules fit the same
    presets). Callers must not modify the returned arrays.
    """
    pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
    from simulations.data import load_sites
    from strategies.config import RunSettings, compose_config

    cache: dict[tuple[str, ...], tuple] = {}

    def get(*overrides: str):
        key = tuple(overrides)
        if key not in cache:
            cfg = compose_config("config", list(overrides))
            sites, truth, _ = load_sites(cfg)
            for X in sites:  # shared between tests: make accidental writes fail loudly
                if hasattr(X, "flags"):
                    X.flags.writeable = False
            cache[key] = (sites, truth, RunSettings.from_cfg(cfg))
        return cache[key]

    return get


@pytest.fixture
def ghost_cluster(monkeypatch) -> Callable[[], None]:
    """Call it to give the coordinator's merge a near-empty copy of cluster 0 (a global
    cluster that owns no row: what the end-of-run settle must remove, on either engine)."""
    import dataclasses

    import numpy as np

    import fedvi
    import fedvi.coordinator as coordinator

    merge = coordinator.global_merge

    def with_ghost(*args, **kwargs):
        m = merge(*args, **kwargs)
        p = m.posterior
        ghost = dataclasses.replace(
            p.subset([0]), counts=p.counts[:1] * 1e-4, sums=p.sums[:1] * 1e-4
        )
        post = dataclasses.replace(
            fedvi.Summaries.concat([p, ghost]),
            prior_dim=p.prior_dim,
            column_totals=p.column_totals,
            n_rows=p.n_rows,
            relevance=p.relevance,
            column_observed=p.column_observed,
        )
        members = np.vstack([m.membership, m.membership[:1]])
        return dataclasses.replace(m, posterior=post, membership=members)

    return lambda: monkeypatch.setattr(coordinator, "global_merge", with_ghost)
