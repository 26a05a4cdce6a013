"""Settings of the Flower server that the in-process pipeline does not have (one dataclass each).

:class:`StrategyOptions` (with :class:`fedvi.ServerOptions`, the ``strategy`` config group):
which sites to expect and how long to wait for them, timeouts, secure aggregation.
:class:`FederationOptions` (the ``federation`` config group): how many sites, their partition
ids, and, for simulations only, how simulated rows are split, Ray's resources per site and
which engine runs the sites.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedvi.settings import (
    Boolean,
    Interval,
    IntList,
    OneOf,
    Optional,
    check_fields,
    setting,
)


@dataclass(frozen=True)
class StrategyOptions:
    """How the FedMerDel server runs a federation (Flower only)."""

    min_sites: int | None = setting(
        None,
        "rounds go on while at least this many sites answer (None: every expected site)",
        Optional(Interval(int, 1)),
    )
    wait_for_sites: float = setting(
        300.0,
        "seconds to wait for the expected sites to connect before starting with those present",
        Interval(float, 0),
    )
    round_timeout: float | None = setting(
        None,
        "seconds a site has to answer a round; None: derived per phase from the data size "
        "(the pre-flight row counts)",
        Optional(Interval(float, 1)),
    )
    preflight_timeout: float = setting(
        300.0, "seconds a site has to check its table in pre-flight", Interval(float, 1)
    )
    secure_aggregation: bool = setting(
        False,
        "sum the refinement statistics and label counts with Flower's SecAgg+, so the server "
        "sees only the sum over sites (needs at least 2 sites per round)",
        Boolean(),
    )

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class FederationOptions:
    """The sites of a federation; ``split`` and the rest are read by simulations only."""

    sites: int = setting(5, "number of sites (simulations: how many to make)", Interval(int, 1))
    site_ids: tuple[int, ...] | None = setting(
        None,
        "partition ids of the expected sites (None: 0..sites-1); nodes claiming another id are "
        "not used",
        IntList(),
    )
    split: str = setting(
        "dirichlet",
        "simulations: iid | dirichlet (skewed cluster mix per site) | exclusive (some clusters "
        "on one site only) | random | by_digit (digits data)",
        OneOf("iid", "dirichlet", "exclusive", "random", "by_digit"),
    )
    concentration: float = setting(
        0.5,
        "simulations: Dirichlet concentration of the dirichlet split",
        Interval(float, 0, open_low=True),
    )
    n_exclusive: int | None = setting(
        None,
        "simulations: clusters living on one site only (exclusive split; None: one per site)",
        Optional(Interval(int, 0)),
    )
    num_cpus: float = setting(
        1.0,
        "simulations: Ray CPUs per site (at most the machine's cores; more hangs)",
        Interval(float, 0, open_low=True),
    )
    num_gpus: float = setting(0.0, "simulations: Ray GPUs per site", Interval(float, 0))
    engine: str = setting(
        "flower",
        "simulations: flower (each site a ClientApp on Flower's simulation engine, the faithful "
        "path) | inprocess (fedvi.federated_fit in this process: same settings, policies and "
        "outputs, no engine start-up; for sweeps). A deployment always runs on Flower",
        OneOf("flower", "inprocess"),
    )

    def __post_init__(self):
        check_fields(self)

    def expected(self) -> tuple[int, ...]:
        """The partition ids of the expected sites."""
        if self.site_ids is not None:
            return self.site_ids
        return tuple(range(self.sites))
