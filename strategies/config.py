"""Hydra configs derived from the settings dataclasses, and the run's settings from a config.

The config groups' schemas are generated from the dataclasses (nothing is re-typed here) and
registered in Hydra's ConfigStore, so a typo in a key is an error and every value is checked by
the dataclass it belongs to:

- ``model``: :class:`fedvi.MixtureSpec` and :class:`fedvi.FitOptions` (the model and its fit);
- ``strategy``: :class:`fedvi.ServerOptions` and :class:`StrategyOptions`;
- ``federation``: :class:`FederationOptions`;
- ``site``: :class:`fedvi.SitePolicy` of the simulation's built-in sites (a deployed site's
  policy is its own node config, never the run's).

Both the ServerApp (``flwr run``) and ``python -m simulations.run`` compose ``configs/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvi.options import FitOptions, ServerOptions
from fedvi.policy import SitePolicy
from fedvi.settings import InvalidSetting, split_options
from fedvi.spec import MixtureSpec
from strategies.options import FederationOptions, StrategyOptions

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

#: Config group -> the dataclasses whose fields it holds.
GROUPS: dict[str, tuple[type, ...]] = {
    "model": (MixtureSpec, FitOptions),
    "strategy": (ServerOptions, StrategyOptions),
    "federation": (FederationOptions,),
    "site": (SitePolicy,),
}


def _schema_type(f: dataclasses.Field):
    """The OmegaConf type of a field: scalars keep theirs (``Optional`` when they may be
    None), anything else (tuples, int-or-list) is ``Any`` and checked by the dataclass."""
    for kind in (bool, int, float, str):
        if f.type in (kind.__name__, kind):
            return kind
        if f.type in (f"{kind.__name__} | None",):
            return kind | None
    return Any


def schema(group: str) -> type:
    """The structured-config dataclass of a config group, generated from its dataclasses."""
    fields = []
    for cls in GROUPS[group]:
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, tuple):
                value = dataclasses.field(default_factory=lambda d=default: list(d))
            else:
                value = dataclasses.field(default=default)
            fields.append((f.name, _schema_type(f), value))
    return dataclasses.make_dataclass(f"{group.title()}Schema", fields)


def register() -> None:
    """Store every group's schema (as ``<group>/schema``) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group in GROUPS:
        cs.store(group=group, name="schema", node=schema(group))


def compose_config(config_name: str = "config", overrides: list[str] | None = None):
    """The Hydra config ``config_name`` of ``configs/`` with ``overrides`` applied."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def group_settings(cfg, group: str) -> list:
    """One instance of each dataclass of ``group`` from ``cfg.<group>`` (checked)."""
    return split_options(_plain(cfg.get(group)), GROUPS[group], group)


@dataclass(frozen=True)
class RunSettings:
    """Everything a run is configured with, as the dataclasses (one source of truth)."""

    spec: MixtureSpec
    fit: FitOptions
    server: ServerOptions
    strategy: StrategyOptions
    federation: FederationOptions
    site: SitePolicy
    seed: int

    @classmethod
    def from_cfg(cls, cfg) -> RunSettings:
        spec, fit = group_settings(cfg, "model")
        server, strategy = group_settings(cfg, "strategy")
        (federation,) = group_settings(cfg, "federation")
        (site,) = group_settings(cfg, "site") if cfg.get("site") is not None else (SitePolicy(),)
        seed = cfg.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidSetting(f"seed={seed!r} is not allowed: expected an integer")
        return cls(spec, fit, server, strategy, federation, site, int(seed))
