"""SecAgg+ rounds a server cannot split (fedvi.flower.secure_round), through Flower's real
SecAgg+ workflow on the simulation engine with a hostile strategy (tests/secagg_attack.py, run
in a subprocess of its own as Ray wants).

Against the code before the request was bound into the masks (run once), in genuine SecAgg+
rounds of 3 sites: the ``split`` attack (other sites sent another SecAgg scale) recovered site
0's refinement statistics exactly, 54 of 54 values within 1e-9 of the scale (largest difference
2.8e-17); the ``posterior`` attack (other sites sent a posterior that sends all their rows to
cluster 0) recovered site 0's statistics of clusters 1 and 2 exactly, 37 of 54 values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedvi.flower.secure_round import check_stage, check_threshold
from fedvi.policy import PolicyRefusal, SitePolicy
from fedvi.request_binding import request_hash

ROOT = Path(__file__).resolve().parents[1]


def attack(tmp_path, *args, timeout=400) -> dict:
    out = tmp_path / "attack.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "secagg_attack.py"), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, dtype=float)) for a in arrays])


def close_entries(result: dict, truth) -> int:
    return int((np.abs(flat(result["captured"]) - flat(truth)) <= result["encoding_error"]).sum())


@pytest.mark.simulation
@pytest.mark.slow
def test_honest_secure_round_gives_the_exact_sum(tmp_path):
    r = attack(tmp_path, "--attack", "none")
    assert r["errors"] == [] and r["failures"] == []
    total = sum(flat(t) for t in r["truth"].values())
    assert np.abs(flat(r["captured"]) - total).max() <= r["encoding_error"]


@pytest.mark.simulation
@pytest.mark.slow
def test_a_site_dropping_out_after_the_key_exchange_leaves_the_others_exact_sum(tmp_path):
    # Site 2 fails at the masked-vector stage: the server rebuilds its key from shares and
    # removes its pairwise masks, which sites 0 and 1 keyed with their own request hashes.
    r = attack(tmp_path, "--attack", "drop")
    assert r["captured"] is not None, r
    assert len(r["errors"]) == 1 and "site 2" in r["errors"][0]
    total = flat(r["truth"]["0"]) + flat(r["truth"]["1"])
    assert np.abs(flat(r["captured"]) - total).max() <= r["encoding_error"]


@pytest.mark.simulation
@pytest.mark.slow
@pytest.mark.parametrize("how", ["split", "posterior"])
def test_per_node_requests_give_noise_not_a_site(tmp_path, how):
    r = attack(tmp_path, "--attack", how)
    assert r["captured"] is not None, r  # the round ran to its end: the server got a "sum"
    n = flat(r["captured"]).size
    for site, truth in r["truth"].items():
        # Not one value of any site's statistics (nor their total) within the encoding error;
        # the differences are of the order of the SecAgg scale, not of the encoding error.
        assert close_entries(r, truth) == 0, site
        assert np.abs(flat(r["captured"]) - flat(truth)).max() > 1e6 * r["encoding_error"]
    total = sum(flat(t) for t in r["truth"].values())
    assert (np.abs(flat(r["captured"]) - total) <= r["encoding_error"]).sum() == 0
    assert n == 54


@pytest.mark.simulation
@pytest.mark.slow
def test_a_round_below_the_sites_minimum_is_refused_by_rule(tmp_path):
    r = attack(tmp_path, "--attack", "none", "--node-config", "secagg-min-sites=4")
    assert r["captured"] is None
    assert r["errors"] and all("(secagg-min-sites)" in e for e in r["errors"])


# --- the site's checks and the request hash, without an engine ---------------------------------
def test_request_hash_covers_arrays_and_config_but_not_the_sites_own_mark():
    a = [np.arange(6.0).reshape(2, 3)]
    base = request_hash(a, {"phase": "refine", "secagg.scale": 1024.0})
    assert base == request_hash([a[0].copy()], {"secagg.scale": 1024.0, "phase": "refine"})
    assert base == request_hash(a, {"phase": "refine", "secagg.scale": 1024.0, "fedvi.secagg": 1})
    assert base != request_hash(a, {"phase": "refine", "secagg.scale": 2048.0})
    assert base != request_hash([a[0] + 1e-12], {"phase": "refine", "secagg.scale": 1024.0})
    assert base != request_hash([a[0].reshape(3, 2)], {"phase": "refine", "secagg.scale": 1024.0})
    assert base != request_hash(a, {"phase": "refine", "secagg.scale": 1024})  # int vs float


def test_threshold_must_be_a_strict_majority():
    policy = SitePolicy()
    check_threshold(policy, 2, 3)
    check_threshold(policy, 2, 2)
    for t, n in [(1, 2), (2, 4), (3, 6), (5, 4)]:
        with pytest.raises(PolicyRefusal, match="secagg-min-threshold"):
            check_threshold(policy, t, n)
    with pytest.raises(PolicyRefusal, match="secagg-min-threshold"):
        check_threshold(SitePolicy(secagg_min_threshold=0.9), 3, 4)


def test_unmask_lists_that_would_reveal_both_shares_are_refused():
    state = {"threshold": 2, "public_keys_dict:K": [1, 2, 3]}
    ok = {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []}
    check_stage(SitePolicy(), "unmask", ok, state, nid=1)
    both = {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]}
    with pytest.raises(PolicyRefusal, match="both active and dropped"):
        check_stage(SitePolicy(), "unmask", both, state, nid=1)
    stranger = {Key.ACTIVE_NODE_ID_LIST: [1, 2, 9], Key.DEAD_NODE_ID_LIST: []}
    with pytest.raises(PolicyRefusal, match="do not match"):
        check_stage(SitePolicy(), "unmask", stranger, state, nid=1)
    few = {Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]}
    with pytest.raises(PolicyRefusal, match="secagg-min-sites"):
        check_stage(SitePolicy(secagg_min_sites=3), "unmask", few, state, nid=1)
