"""The model specification a site fits and the server checks: family, schema and priors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from fedvi.data import check_likelihood
from fedvi.likelihoods import Bernoulli, Categorical


@dataclass(frozen=True)
class MixtureSpec:
    """Everything that defines the model, shared by all sites (SPEC §2, §8).

    likelihood: ``"bernoulli"`` or ``"categorical"``.
    n_levels: ``(D,)`` levels per variable (2 for Bernoulli).
    alpha0: Dirichlet concentration of the mixture weights (sparse: 0.01).
    beta: per-level concentration of the ``phi`` prior; ``None`` means ``1 / L_d``
        (Beta(0.5, 0.5) for binary), the authors' default.
    variable_selection: learn a relevance weight ``c_d`` per variable (SPEC §8).
    relevance_prior: ``(a, b)`` of the Beta prior on ``delta_d``; ``(2, 2)`` gives prior
        probability 0.5 that a variable is relevant (the paper's ``a_gamma = 2``).
    feature_names: optional variable names; part of the schema hash.
    relevance_update: ``"collapsed"`` (default) or ``"meanfield"`` (the paper's); see
        :func:`fedvi.vi.relevance_step`.
    """

    likelihood: str
    n_levels: tuple[int, ...]
    alpha0: float = 0.01
    beta: float | None = None
    variable_selection: bool = False
    relevance_prior: tuple[float, float] = (2.0, 2.0)
    feature_names: tuple[str, ...] | None = field(default=None)
    relevance_update: str = "collapsed"

    def __post_init__(self):
        check_likelihood(self.likelihood)
        object.__setattr__(self, "n_levels", tuple(int(v) for v in self.n_levels))
        if self.feature_names is not None:
            object.__setattr__(self, "feature_names", tuple(str(v) for v in self.feature_names))
            if len(self.feature_names) != len(self.n_levels):
                raise ValueError(
                    f"{len(self.feature_names)} feature names for {len(self.n_levels)} variables"
                )
        object.__setattr__(self, "relevance_prior", tuple(float(v) for v in self.relevance_prior))
        if not self.alpha0 > 0:
            raise ValueError(f"alpha0 must be > 0, got {self.alpha0}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if min(self.relevance_prior) <= 0:
            raise ValueError(f"relevance_prior must be positive, got {self.relevance_prior}")
        if self.relevance_update not in ("collapsed", "meanfield"):
            raise ValueError(
                "relevance_update must be 'collapsed' or 'meanfield', "
                f"got {self.relevance_update!r}"
            )
        if self.likelihood == "bernoulli" and any(v != 2 for v in self.n_levels):
            raise ValueError("a Bernoulli model has 2 levels per variable")

    @property
    def n_features(self) -> int:
        return len(self.n_levels)

    def family(self) -> Bernoulli | Categorical:
        levels = np.asarray(self.n_levels, dtype=np.int64)
        if self.likelihood == "bernoulli":
            b = 0.5 if self.beta is None else float(self.beta)
            return Bernoulli(self.n_features, a=b, b=b)
        beta = 1.0 / levels if self.beta is None else np.full(len(levels), float(self.beta))
        return Categorical(levels, beta)

    def to_dict(self) -> dict:
        return {
            "likelihood": self.likelihood,
            "n_levels": list(self.n_levels),
            "alpha0": float(self.alpha0),
            "beta": None if self.beta is None else float(self.beta),
            "variable_selection": bool(self.variable_selection),
            "relevance_prior": list(self.relevance_prior),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "relevance_update": self.relevance_update,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MixtureSpec:
        d = dict(d)
        d["n_levels"] = tuple(d["n_levels"])
        d["relevance_prior"] = tuple(d.get("relevance_prior", (2.0, 2.0)))
        if d.get("feature_names") is not None:
            d["feature_names"] = tuple(d["feature_names"])
        return cls(**d)

    def schema_hash(self) -> str:
        """Hash of the data schema only (family, variables, levels, names)."""
        payload = {
            "likelihood": self.likelihood,
            "n_levels": list(self.n_levels),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def model_hash(self) -> str:
        """Hash of the whole specification (schema and priors): sites must agree on it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
