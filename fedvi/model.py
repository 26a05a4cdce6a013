"""The fitted global model: predict, save to one versioned file, load, extend.

A model file is a NumPy ``.npz`` archive (no pickle; ``numpy.load(path)`` reads it) holding the
global statistics (:class:`fedvi.Summaries` arrays), which sites each global cluster holds
(what :func:`fedvi.extend` needs to merge a new site's clusters exactly), and one JSON string
``meta``: the format and its version, fedvi's version, the model specification (schema,
variable names, levels, priors), the schema and model hashes, the prior dimension and the
number of rows. The per-row data and the sites' own summaries are not in it.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field

import numpy as np

from fedvi._version import __version__
from fedvi.data import encode
from fedvi.elbo import elbo
from fedvi.labels import global_responsibilities
from fedvi.options import FitOptions
from fedvi.spec import MixtureSpec
from fedvi.summaries import ARRAY_FIELDS, Summaries

FORMAT = "fedvi-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A file is not a fedvi model file this version can read."""


@dataclass(frozen=True)
class FittedModel:
    """A global model: the posterior's statistics, and which sites each cluster holds.

    posterior: :class:`Summaries` of the ``G`` global clusters.
    site_ids: the sites whose clusters it holds, ``(S,)``.
    membership: ``(G, S)`` bool, ``True`` where global cluster ``g`` holds a cluster of site ``s``.
    info: free metadata kept in the file (e.g. how it was fitted).
    """

    posterior: Summaries
    site_ids: tuple[int, ...] = (0,)
    membership: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.membership is None:
            object.__setattr__(
                self,
                "membership",
                np.ones((self.posterior.n_clusters, len(self.site_ids)), dtype=bool),
            )
        if self.membership.shape != (self.posterior.n_clusters, len(self.site_ids)):
            raise ValueError(
                f"membership has shape {self.membership.shape}, expected "
                f"({self.posterior.n_clusters}, {len(self.site_ids)})"
            )

    @property
    def spec(self) -> MixtureSpec:
        return self.posterior.spec

    @property
    def n_clusters(self) -> int:
        return self.posterior.n_clusters

    @property
    def elbo(self) -> float:
        return elbo(self.posterior)

    @property
    def variable_relevance(self) -> np.ndarray | None:
        return self.posterior.relevance

    @property
    def weights(self) -> np.ndarray:
        """``(G,)`` posterior mean weights of the global clusters (renormalised over them)."""
        a = self.spec.alpha0 + self.posterior.counts
        return a / a.sum()

    def profiles(self) -> np.ndarray:
        """``(G, P)`` posterior mean ``P(x_d = l | cluster g)``."""
        return self.posterior.profiles()

    # -- using it ----------------------------------------------------------------------------
    def encode(self, X, source: str | None = None):
        """Validate new rows against the model's schema (names aligned where ``X`` has them)."""
        return encode(X, self.spec, source=source)

    def predict_proba(self, X, options: FitOptions | None = None) -> np.ndarray:
        """``(N, G)`` responsibilities of new rows under the global posterior."""
        return global_responsibilities(self.encode(X), self.posterior, options)

    def predict(self, X, options: FitOptions | None = None) -> np.ndarray:
        """``(N,)`` most probable global cluster of each row."""
        from fedvi.labels import label_rows

        return label_rows(self.encode(X), self.posterior, options)

    # -- the file ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write the model to ``path`` (``.npz`` is appended when missing); returns the path."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        p = self.posterior
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fedvi_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "spec": p.spec.to_dict(),
            "schema_hash": p.spec.schema_hash(),
            "model_hash": p.spec.model_hash(),
            "prior_dim": int(p.prior_dim),
            "n_rows": int(p.n_rows),
            "n_clusters": int(p.n_clusters),
            "elbo": float(self.elbo),
            "info": self.info,
        }
        arrays = dict(zip(ARRAY_FIELDS, p.to_arrays(), strict=True))
        arrays["membership"] = self.membership.astype(np.bool_)
        arrays["site_ids"] = np.asarray(self.site_ids, dtype=np.int64)
        arrays["meta"] = np.array(json.dumps(meta, default=json_default))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path


def json_default(v):
    """``json.dumps(..., default=json_default)``: NumPy scalars and arrays as plain values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v)}")


def load_model(path: str | os.PathLike) -> FittedModel:
    """Read a model written by :meth:`FittedModel.save` (NumPy only, no pickle)."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable model file ({exc})") from None
    with archive:
        if "meta" not in archive.files:
            raise ModelFileError(f"{path}: not a fedvi model file (no 'meta')")
        meta = json.loads(str(archive["meta"]))
        if meta.get("format") != FORMAT:
            raise ModelFileError(f"{path}: not a fedvi model file (format {meta.get('format')!r})")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: model format version {meta['format_version']} is newer than this "
                f"fedvi reads ({FORMAT_VERSION}); upgrade fedvi"
            )
        missing = [k for k in (*ARRAY_FIELDS, "membership", "site_ids") if k not in archive.files]
        if missing:
            raise ModelFileError(f"{path}: model file lacks arrays {missing}")
        posterior = Summaries.from_arrays(
            [archive[k] for k in ARRAY_FIELDS],
            MixtureSpec.from_dict(meta["spec"]),
            meta["n_rows"],
            meta["prior_dim"],
        )
        model = FittedModel(
            posterior,
            tuple(int(s) for s in archive["site_ids"]),
            np.asarray(archive["membership"], dtype=bool),
            dict(meta.get("info") or {}),
        )
    if model.spec.schema_hash() != meta["schema_hash"]:
        raise ModelFileError(f"{path}: the schema hash does not match the stored model")
    return model
