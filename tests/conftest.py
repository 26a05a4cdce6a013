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

from collections.abc import Callable

import pytest


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
