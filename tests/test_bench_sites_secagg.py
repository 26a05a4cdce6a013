"""The SecAgg+ rows of ``benchmarks/bench_sites.py`` from its per-round and per-stage records."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sites.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sites", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _round(rnd, phase, s, secure, up=0, down=0):
    return {"round": rnd, "phase": phase, "s": s, "secure": secure, "bytes_up": up,
            "bytes_down": down}  # fmt: skip


def _stage(rnd, stage, s):
    return {"round": rnd, "stage": stage, "s": s}


def test_a_completed_run_gives_means_over_secure_rounds_and_bytes_per_site(bench):
    rec = {
        "sites": 4,
        "refine_rounds": 1,
        "secure": True,
        "status": "completed",
        "process_rc": 0,
        "wall": 30.0,
        "rounds": [
            _round(1, "preflight", 5.0, False, up=40, down=80),
            _round(2, "local", 2.0, False, up=400, down=40),
            _round(3, "refine", 6.0, True, up=800, down=1200),
            _round(4, "label", 10.0, True, up=400, down=1600),
        ],
        "stages": [
            _stage(3, "setup", 1.0),
            _stage(3, "share_keys", 2.0),
            _stage(4, "setup", 3.0),
            _stage(4, "share_keys", 6.0),
        ],
        "n_clusters": 6,
        "ari": 0.9,
    }
    row = bench.secure_summary(rec)
    assert row["completed"] is True
    assert row["secure_rounds"] == 2
    assert row["secure_round_s"] == pytest.approx(8.0)
    assert row["refine_s"] == 6.0 and row["label_s"] == 10.0 and row["preflight_s"] == 5.0
    assert row["setup_s"] == pytest.approx(2.0) and row["share_keys_s"] == pytest.approx(4.0)
    assert row["unmask_s"] is None  # no unmask stage recorded
    assert row["secure_up_B_per_site"] == pytest.approx(150.0)  # mean(800, 400) / 4
    assert row["secure_down_B_per_site"] == pytest.approx(350.0)  # mean(1200, 1600) / 4
    assert row["plain_up_B_per_site"] == pytest.approx(110.0)  # (40 + 400) / 4
    line = bench.secure_table([rec]).splitlines()[-1]
    assert line.startswith("| 4 | yes | 1 | yes | 30 |")


def test_a_run_stopped_at_its_timeout_is_not_completed(bench):
    rec = {
        "sites": 150,
        "refine_rounds": 0,
        "process_rc": "timeout",
        "process_wall": 840.0,
        "rounds": [_round(1, "preflight", 9.0, False)],
        "stages": [_stage(2, "setup", 0.5)],
    }
    row = bench.secure_summary(rec)
    assert row["completed"] is False and row["status"] == "timeout"
    assert row["wall"] == 840.0 and row["secure_round_s"] is None
    assert "| 150 | yes | 0 | timeout | 840 |" in bench.secure_table([rec])
