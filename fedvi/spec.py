"""The model every site fits and the server checks: family, schema and priors (one dataclass).

A :class:`MixtureSpec` is built from user settings (``n_levels`` and ``feature_names`` may be
left to the data) and *resolved* against a table: :meth:`MixtureSpec.resolve` fixes the levels
per variable and the variable names. Summaries always carry a resolved spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from fedvi.likelihoods import Bernoulli, Categorical
from fedvi.settings import (
    Boolean,
    Interval,
    InvalidSetting,
    Levels,
    Names,
    OneOf,
    Optional,
    PositivePair,
    as_dict,
    check_fields,
    setting,
)

LIKELIHOODS = ("bernoulli", "categorical")
MISSING_MODES = ("error", "ignore")


@dataclass(frozen=True)
class MixtureSpec:
    """The over-fitted Bayesian mixture: likelihood family, priors and schema (docs/method.md).

    Every field is a setting of ``MixtureVI``, ``federated_fit`` and the ``model`` config group.
    """

    likelihood: str = setting(
        "bernoulli",
        "'bernoulli' (0/1 variables) or 'categorical' (integer codes 0..L_d-1 per variable)",
        OneOf(*LIKELIHOODS),
    )
    n_components: int = setting(
        20,
        "K_init: clusters at the start of a site's fit and dimension of the weights' Dirichlet "
        "prior (about 1.5-2x the expected number of clusters)",
        Interval(int, 1),
    )
    alpha0: float = setting(
        0.01,
        "concentration of the sparse Dirichlet prior on the mixture weights",
        Interval(float, 0, open_low=True),
    )
    beta: float | None = setting(
        None,
        "per-level concentration of the prior on each cluster's probabilities; None: 1/L_d "
        "(Beta(0.5, 0.5) for binary variables)",
        Optional(Interval(float, 0, open_low=True)),
    )
    n_levels: tuple[int, ...] | int | None = setting(
        None,
        "levels per variable (categorical): one integer for all, one per variable, or None "
        "to take the largest code seen + 1 (agreed across sites)",
        Levels(),
    )
    variable_selection: bool = setting(
        False, "learn a relevance c_d per variable (whether it separates clusters)", Boolean()
    )
    relevance_prior: tuple[float, float] = setting(
        (2.0, 2.0),
        "(a, b) of the Beta prior on the probability that a variable is relevant",
        PositivePair(),
    )
    relevance_update: str = setting(
        "collapsed",
        "update of c_d: 'collapsed' (ELBO maximised over c_d) or 'meanfield' (the paper's)",
        OneOf("collapsed", "meanfield"),
    )
    missing: str = setting(
        "error",
        "'error': a missing cell is an error; 'ignore': cells missing at random are left out "
        "of each row's likelihood (NaN in arrays, empty or NA cells in files)",
        OneOf(*MISSING_MODES),
    )
    feature_names: tuple[str, ...] | None = setting(
        None,
        "variable names, in model order; tables with names (DataFrame, CSV/Parquet header) are "
        "aligned to them by name. None: taken from the data",
        Names(),
    )

    def __post_init__(self):
        check_fields(self)
        if self.likelihood == "bernoulli" and self.n_levels is not None:
            levels = (self.n_levels,) if isinstance(self.n_levels, int) else self.n_levels
            if any(v != 2 for v in levels):
                raise InvalidSetting(
                    f"n_levels={self.n_levels!r} is not allowed with likelihood='bernoulli' "
                    "(2 levels per variable)"
                )
        if (
            isinstance(self.n_levels, tuple)
            and self.feature_names is not None
            and len(self.n_levels) != len(self.feature_names)
        ):
            raise InvalidSetting(
                f"{len(self.feature_names)} feature_names for {len(self.n_levels)} n_levels"
            )

    # -- resolution against data ----------------------------------------------------------
    @property
    def resolved(self) -> bool:
        """True when the levels of every variable are known."""
        return isinstance(self.n_levels, tuple)

    def resolve(self, n_levels, feature_names=None) -> MixtureSpec:
        """This spec with the levels ``(D,)`` and names of a table filled in."""
        levels = tuple(int(v) for v in np.asarray(n_levels).ravel())
        names = self.feature_names if self.feature_names is not None else feature_names
        return dataclasses.replace(
            self,
            n_levels=levels,
            feature_names=None if names is None else tuple(str(n) for n in names),
        )

    def _require_resolved(self) -> tuple[int, ...]:
        if not self.resolved:
            raise ValueError("the spec's levels are not known yet: resolve it against the data")
        return self.n_levels  # type: ignore[return-value]

    @property
    def n_features(self) -> int:
        return len(self._require_resolved())

    def family(self) -> Bernoulli | Categorical:
        levels = np.asarray(self._require_resolved(), dtype=np.int64)
        if self.likelihood == "bernoulli":
            b = 0.5 if self.beta is None else float(self.beta)
            return Bernoulli(len(levels), a=b, b=b)
        beta = 1.0 / levels if self.beta is None else np.full(len(levels), float(self.beta))
        return Categorical(levels, beta)

    # -- serialisation and hashes ------------------------------------------------------------
    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MixtureSpec:
        return cls(**d)

    def schema_hash(self) -> str:
        """Hash of the data schema only (family, levels per variable, variable names)."""
        payload = {
            "likelihood": self.likelihood,
            "n_levels": list(self._require_resolved()),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def model_hash(self) -> str:
        """Hash of the whole specification (schema and priors): sites must agree on it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
