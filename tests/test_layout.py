"""The import direction holds: the core imports no Flower or Hydra, the server imports no
simulation driver, the site's client and the server's strategy do not import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", sorted((ROOT / "fedvi").glob("*.py")), ids=lambda p: p.name)
def test_core_modules_import_no_flower_or_hydra(path):
    assert not top(imports(path)) & {
        "flwr",
        "hydra",
        "omegaconf",
        "ray",
        "strategies",
        "simulations",
    }


@pytest.mark.parametrize("path", sorted((ROOT / "strategies").glob("*.py")), ids=lambda p: p.name)
def test_the_server_does_not_depend_on_the_simulation_driver(path):
    assert "simulations" not in top(imports(path))
    assert not any(n.startswith("fedvi.flower") for n in imports(path))


def test_the_site_client_does_not_import_the_server():
    for path in (ROOT / "fedvi" / "flower").glob("*.py"):
        assert "strategies" not in top(imports(path)), path


def test_the_core_fits_without_flower_or_hydra_installed():
    """``import fedvi`` and a fit on an array in a process where flwr, hydra and omegaconf
    cannot be imported."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('flwr', 'hydra', 'omegaconf', 'ray'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, fedvi\n"
        "X = (np.random.default_rng(0).random((300, 8)) < 0.4).astype(np.int8)\n"
        "m = fedvi.MixtureVI(n_components=5).fit(X)\n"
        "r = fedvi.federated_fit([X[:150], X[150:]], n_components=5)\n"
        "print(m.n_clusters_, r.n_clusters)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 2


def test_the_flower_strategy_is_a_thin_adapter_of_the_coordinator():
    """The run's rules live once, in fedvi.coordinator: the Flower strategy stays an adapter
    (≤ 250 lines) that neither merges, refines nor labels by itself."""
    path = ROOT / "strategies" / "fedmerdel.py"
    assert len(path.read_text().splitlines()) <= 250
    used = imports(path)
    assert "fedvi.coordinator" in used
    for rule in ("fedvi.global_merge", "fedvi.labels", "fedvi.elbo", "fedvi.refine_moves"):
        assert rule not in used, rule
