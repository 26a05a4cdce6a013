"""docs/results.md documents every key that ``results.json`` holds (runs in process, with and
without variable selection and DP, and through the Flower strategy with a failed site)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import fedvi
from fedvi.simulate import simulate, split_sites
from strategies.outputs import write_outputs

DOC = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
DOCUMENTED = set(re.findall(r"`([a-z_<>.]+)`", DOC))


def key_paths(d: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every key, site keys (``site 3``) written ``<site>``."""
    out = set()
    for k, v in d.items():
        path = prefix + ("<site>" if re.fullmatch(r"site -?\d+", k) else k)
        out.add(path)
        if isinstance(v, dict):
            out |= key_paths(v, path + ".")
    return out


def _sites(seed=0):
    sim = simulate(600, 3, 10, seed=seed)
    parts = split_sites(sim.z, 3, "iid", seed=seed)
    return [sim.X[p] for p in parts], [sim.z[p] for p in parts]


def _written(tmp_path, name, result, **kw) -> dict:
    write_outputs(result, str(tmp_path / name), plots=False, **kw)
    return json.loads((tmp_path / name / "results.json").read_text())


def test_every_key_of_results_json_is_documented(tmp_path):
    tables, truth = _sites()
    noiseless = fedvi.SitePolicy(dp_epsilon=None)  # so that the refinement keys are written
    plain = fedvi.federated_fit(tables, seed=0, refine_rounds=1, policy=noiseless)
    assert plain.rounds
    keys = key_paths(
        _written(tmp_path, "plain", plain, labels=plain.labels, truth=truth, wall_clock={"t": 1})
    )
    selected = fedvi.federated_fit(
        tables, seed=0, variable_selection=True, refine_rounds=1, dp_epsilon=8.0
    )
    keys |= key_paths(_written(tmp_path, "vs", selected))
    keys.discard("wall_clock.t")
    missing = sorted(k for k in keys if k not in DOCUMENTED)
    assert not missing, f"results.json keys not documented in docs/results.md: {missing}"


def test_the_strategy_writes_only_documented_keys(tmp_path):
    pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
    from flower_local import grid_for, make_strategy, run_protocol, write_sites

    from strategies.options import StrategyOptions

    tables, _ = _sites(1)
    paths = write_sites(tmp_path, tables)
    paths[2].write_text("not a table")  # a failed site: failures, errors
    strategy = make_strategy(
        paths, tmp_path, options=StrategyOptions(wait_for_sites=5, min_sites=2)
    )
    run_protocol(strategy, grid_for(paths, tmp_path))
    strategy.result.settle()
    res = _written(tmp_path, "run", strategy.result, wall_clock={"total": 1.0})
    assert res["failures"] and res["sites"]["site 0"]["policy"]
    keys = key_paths(res)
    missing = sorted(k for k in keys if k not in DOCUMENTED)
    assert not missing, f"results.json keys not documented in docs/results.md: {missing}"
    for f in res["failures"]:
        assert set(f) <= {"phase", "site", "node", "error", "cause"}
    total = res["uplink_bytes_total"]
    assert (
        total
        == sum(res["uplink_bytes_by_phase"].values())
        == sum(v for v in res["uplink_bytes"].values() if v)
    )
    assert (
        np.isfinite(total)
        and res["uplink_bytes"]["site 0"] > res["sites"]["site 0"]["uplink_bytes_by_phase"]["local"]
    )
