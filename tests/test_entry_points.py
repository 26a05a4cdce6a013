"""The command-line entry points that the quick tier otherwise reaches only through Flower's
simulation engine or real SuperNodes: their pure parts, in-process."""

from __future__ import annotations

import argparse
import os
import shlex

import pytest


def test_submit_builds_the_run_config_flwr_run_gets(tmp_path, monkeypatch):
    """``--output-dir``/``--resume`` become absolute (the ServerApp runs elsewhere), values are
    JSON-quoted for ``--run-config``, and unset keys are left out (the app's defaults hold)."""
    from strategies.submit import run_config

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(
        config_name="",
        overrides="federation.site_ids=[0,1] strategy.min_sites=2",
        output_dir="run1",
        resume="",
    )
    items = dict(item.split("=", 1) for item in shlex.split(run_config(args)))
    assert items == {
        "overrides": "federation.site_ids=[0,1] strategy.min_sites=2",
        "output-dir": os.path.join(str(tmp_path), "run1"),
    }


def test_submit_without_a_connection_exits_2(monkeypatch, capsys):
    """``flwr run`` exits 0 whatever happens; the wrapper says the run was not submitted."""
    from strategies import submit

    monkeypatch.setattr(submit, "_json", lambda args, timeout=120: {"success": False})
    assert submit.main(["no-such-connection"]) == submit.EXIT_SUBMIT == 2
    assert "the run was not submitted" in capsys.readouterr().err


def test_simulation_caps_each_sites_cpus_at_the_machines_cores(monkeypatch):
    pytest.importorskip("hydra", reason="Hydra configs: pip install -e .[app]")
    from simulations.run import backend_config
    from strategies.options import FederationOptions

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    got = backend_config(FederationOptions(num_cpus=8.0, num_gpus=0.5))
    assert got["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert got["init_args"]["num_cpus"] == 2
    assert backend_config(FederationOptions(num_cpus=1.0))["client_resources"]["num_cpus"] == 1.0
