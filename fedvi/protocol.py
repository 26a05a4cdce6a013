"""The wire protocol between the FedMerDel server and its sites, in one place.

Both sides use this module (the site's ClientApp in :mod:`fedvi.flower`, the strategy in
``strategies/``); neither imports the other. It needs no Flower: a round is a list of NumPy
arrays plus a flat dict of scalars (Flower's ``FitIns``/``FitRes`` carry exactly that), and the
reply the same. Settings travel as their dataclass fields under a prefix (``model.alpha0``,
``fit.moves``, ``server.min_cluster_size``), encoded and decoded generically from the
dataclasses, so a new setting reaches the site without touching this module; a decoded value is
checked by the dataclass like any other.

Phases (one per round): ``preflight`` (the site checks its file and policy and returns its
schema and row count, no fit), ``local`` (local MerDel fit; returns :class:`Summaries`),
``refine`` (statistics per global cluster under the broadcast posterior) and ``label`` (labels
written on the site; counts per global cluster returned).

Errors: a site never lets an exception's text cross the wire. It raises :class:`SiteError`,
whose message is built here from the phase, the site and a rule or category
(:func:`site_error_message`), and keeps the full message in its own log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from fedvi.label_files import is_label_file_name
from fedvi.options import FitOptions, ServerOptions
from fedvi.settings import IntList, Levels, Names, PositivePair
from fedvi.spec import MixtureSpec
from fedvi.summaries import ARRAY_FIELDS, Summaries

PROTOCOL_VERSION = 2


class Phase(str, Enum):
    PREFLIGHT = "preflight"
    LOCAL = "local"
    REFINE = "refine"
    LABEL = "label"


PHASES = tuple(p.value for p in Phase)

# -- keys ---------------------------------------------------------------------------------
K_PROTOCOL = "fedvi.protocol"
K_PHASE = "fedvi.phase"
K_SEED = "fedvi.seed"
K_SITE = "fedvi.site"
K_SECONDS = "fedvi.seconds"
K_SECAGG = "fedvi.secagg"  # set by the site's own mod, never trusted from the server

#: Constraints whose tuple values travel as JSON text (Flower configs hold scalars only).
_JSON_CONSTRAINTS = (Levels, Names, PositivePair, IntList)


class ProtocolError(ValueError):
    """A round or reply does not follow this protocol (wrong version, key or shape)."""


class SiteError(RuntimeError):
    """The only exception a site lets reach the server: its message is safe to send."""


# -- settings on the wire --------------------------------------------------------------------
def encode_settings(obj: Any, prefix: str) -> dict[str, Any]:
    """The fields of a settings dataclass as flat scalar entries ``<prefix>.<field>``
    (``None`` is left out; tuples become JSON lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        if isinstance(v, tuple | list):
            v = json.dumps(list(v))
        elif isinstance(v, np.generic):
            v = v.item()
        out[f"{prefix}.{f.name}"] = v
    return out


def decode_settings(cls, config: Mapping[str, Any], prefix: str, **override):
    """Rebuild a settings dataclass from ``<prefix>.<field>`` entries (missing ones take the
    default); unknown ``<prefix>.*`` keys are a :class:`ProtocolError`. The dataclass checks
    every value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    head = prefix + "."
    for key, v in config.items():
        if not key.startswith(head):
            continue
        name = key[len(head) :]
        if name not in fields:
            raise ProtocolError(f"unknown setting {key!r} in the round config")
        if isinstance(v, str) and isinstance(fields[name].metadata.get("check"), _JSON_CONSTRAINTS):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise ProtocolError(f"setting {key!r} is not valid JSON") from None
        values[name] = v
    values.update(override)
    return cls(**values)


def encode_summaries(s: Summaries, prefix: str) -> tuple[list[np.ndarray], dict[str, Any]]:
    """A :class:`Summaries` as arrays plus scalar metadata under ``prefix``."""
    meta = {f"{prefix}.n_rows": int(s.n_rows), f"{prefix}.prior_dim": int(s.prior_dim)}
    meta.update(encode_settings(s.spec, f"{prefix}.spec"))
    return s.to_arrays(), meta


def decode_summaries(arrays, config: Mapping[str, Any], prefix: str) -> Summaries:
    spec = decode_settings(MixtureSpec, config, f"{prefix}.spec")
    if not spec.resolved:
        raise ProtocolError(f"{prefix}: the model's levels are missing")
    try:
        n_rows, prior_dim = int(config[f"{prefix}.n_rows"]), int(config[f"{prefix}.prior_dim"])
        return Summaries.from_arrays(list(arrays), spec, n_rows, prior_dim)
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"{prefix}: malformed statistics ({exc})") from None


# -- requests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One round as the site reads it (after :func:`decode_request`)."""

    phase: Phase
    spec: MixtureSpec
    fit: FitOptions
    server: ServerOptions
    seed: int
    posterior: Summaries | None = None
    mapping: np.ndarray | None = None
    secagg_scale: float | None = None
    variable_order: tuple[str, ...] | None = None
    moves: RefineMoves | None = None


@dataclass(frozen=True)
class RefineMoves:
    """What a refinement round asks beside the statistics, to score moves exactly
    (:mod:`fedvi.refine_moves`): ``pairs (M, 2)`` candidate merges of global clusters (one
    merged-column entropy each), ``splits (S,)`` clusters whose second moments are asked for,
    and ``trials``: delete-trial posteriors, each refined beside the posterior (one more set of
    statistics each)."""

    pairs: np.ndarray
    splits: np.ndarray
    trials: tuple[Summaries, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "pairs", np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2))
        object.__setattr__(self, "splits", np.asarray(self.splits, dtype=np.int64).ravel())
        object.__setattr__(self, "trials", tuple(self.trials))


def encode_request(
    phase: Phase | str,
    spec: MixtureSpec,
    fit: FitOptions,
    server: ServerOptions,
    seed: int,
    posterior: Summaries | None = None,
    mapping: np.ndarray | None = None,
    secagg_scale: float | None = None,
    variable_order=None,
    moves: RefineMoves | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``(arrays, config)`` of a round: the phase, every setting, the posterior (refine,
    label), the site's local-to-global map (map labelling) and the agreed order of the
    variables (their name hashes, :func:`variable_hashes`: a site whose columns come in another
    order aligns them by name) and, in a refinement round with moves, their
    :class:`RefineMoves` (the trial posteriors' arrays after the posterior's, then the pairs and
    the split ids; the trials share the posterior's scalars). No path: a site reads and writes
    only what its own node config (or, in a simulation, its ClientApp factory) names."""
    phase = Phase(phase)
    config: dict[str, Any] = {K_PROTOCOL: PROTOCOL_VERSION, K_PHASE: phase.value, K_SEED: seed}
    config.update(encode_settings(spec, "model"))
    config.update(encode_settings(fit, "fit"))
    config.update(encode_settings(server, "server"))
    arrays: list[np.ndarray] = []
    if posterior is not None:
        arrays, meta = encode_summaries(posterior, "posterior")
        config.update(meta)
    if moves is not None:
        for t in moves.trials:
            arrays = [*arrays, *t.to_arrays()]
        arrays = [*arrays, moves.pairs, moves.splits]
        config["refine.moves"] = len(moves.trials)
    if mapping is not None:
        arrays = [*arrays, np.asarray(mapping, dtype=np.int64)]
        config["label.mapping"] = True
    if secagg_scale is not None:
        config["secagg.scale"] = float(secagg_scale)
    if variable_order is not None:
        config["schema.variable_order"] = json.dumps(list(variable_order))
    return arrays, config


def encode_request_of(req: Request) -> tuple[list[np.ndarray], dict[str, Any]]:
    """:func:`encode_request` of a typed :class:`Request`."""
    return encode_request(
        req.phase,
        req.spec,
        req.fit,
        req.server,
        req.seed,
        posterior=req.posterior,
        mapping=req.mapping,
        secagg_scale=req.secagg_scale,
        variable_order=req.variable_order,
        moves=req.moves,
    )


def _json_strings(config: Mapping[str, Any], key: str) -> list[str]:
    """``config[key]``, a JSON list, as strings."""
    try:
        return [str(v) for v in json.loads(str(config[key]))]
    except (json.JSONDecodeError, TypeError):
        raise ProtocolError(f"{key} is not a JSON list") from None


def decode_request(arrays, config: Mapping[str, Any]) -> Request:
    """The round a site received, every value checked; a :class:`ProtocolError` (or a settings
    error) when it does not follow the protocol."""
    version = config.get(K_PROTOCOL)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r}; this site speaks version {PROTOCOL_VERSION}"
        )
    try:
        phase = Phase(config.get(K_PHASE))
    except ValueError:
        raise ProtocolError(f"unknown phase {config.get(K_PHASE)!r}") from None
    known = (
        "model.",
        "fit.",
        "server.",
        "posterior.",
        "secagg.",
        "label.",
        "fedvi.",
        "schema.",
        "refine.",
    )
    stray = sorted(k for k in config if not k.startswith(known))
    if stray:
        raise ProtocolError(f"unknown round-config keys {stray}")
    seed = config.get(K_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ProtocolError("the round config carries no integer seed")
    arrays = list(arrays)
    mapping = None
    if config.get("label.mapping"):
        if not arrays:
            raise ProtocolError("label.mapping announced but no array sent")
        mapping = np.asarray(arrays.pop(), dtype=np.int64)
    moves = None
    if "refine.moves" in config:
        moves = _decode_moves(arrays, config, phase)
    posterior = None
    if phase in (Phase.REFINE, Phase.LABEL):
        posterior = decode_summaries(arrays, config, "posterior")
    elif arrays:
        raise ProtocolError(f"phase {phase.value!r} takes no arrays, got {len(arrays)}")
    scale = config.get("secagg.scale")
    order = None
    if "schema.variable_order" in config:
        order = tuple(_json_strings(config, "schema.variable_order"))
    return Request(
        phase=phase,
        spec=decode_settings(MixtureSpec, config, "model"),
        fit=decode_settings(FitOptions, config, "fit"),
        server=decode_settings(ServerOptions, config, "server"),
        seed=seed,
        posterior=posterior,
        mapping=mapping,
        secagg_scale=None if scale is None else float(scale),
        variable_order=order,
        moves=moves,
    )


def _decode_moves(arrays: list, config: Mapping[str, Any], phase: Phase) -> RefineMoves:
    """The :class:`RefineMoves` at the end of ``arrays`` (removed from it); shapes checked here,
    values (ids within the posterior, how many) by the site (:mod:`fedvi.site_agent`)."""
    n = config["refine.moves"]
    if phase is not Phase.REFINE or not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ProtocolError("refine.moves: a count of trial posteriors, in a refine round only")
    width = len(ARRAY_FIELDS)
    if len(arrays) < 2 + width * (n + 1):
        raise ProtocolError(f"refine.moves announces {n} trial posteriors; too few arrays sent")
    splits, pairs = np.asarray(arrays.pop()), np.asarray(arrays.pop())
    if pairs.ndim != 2 or pairs.shape[1:] != (2,) or splits.ndim != 1:
        raise ProtocolError("refine.moves: pairs must be (M, 2) and splits (S,)")
    if not (_integral(pairs) and _integral(splits)):
        raise ProtocolError("refine.moves: pairs and splits must be whole numbers")
    trials = []
    for i in range(n):
        start = width * (i + 1)
        trials.append(decode_summaries(arrays[start : start + width], config, "posterior"))
    del arrays[width:]
    return RefineMoves(pairs, splits, tuple(trials))


def _integral(a: np.ndarray) -> bool:
    a = np.asarray(a, dtype=np.float64)
    return bool(np.isfinite(a).all() and (a == np.rint(a)).all())


# -- replies ----------------------------------------------------------------------------------
def names_hash(names) -> str | None:
    if names is None:
        return None
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()[:16]


def variable_hashes(names) -> list[str] | None:
    """A short hash per variable name: enough for the server to say which variables differ
    between sites without the site sending a header the run has not agreed on."""
    if names is None:
        return None
    return [hashlib.sha256(str(n).encode()).hexdigest()[:10] for n in names]


@dataclass(frozen=True)
class Preflight:
    """A site's pre-flight answer: its schema, row count and policy; nothing else."""

    site: int
    n_rows: int
    n_features: int
    levels: tuple[int, ...]
    names_hash: str | None
    variable_hashes: tuple[str, ...] | None
    has_missing: bool
    policy: dict

    def to_metrics(self) -> dict[str, Any]:
        m = {
            "schema.n_rows": self.n_rows,
            "schema.n_features": self.n_features,
            "schema.levels": json.dumps(list(self.levels)),
            "schema.has_missing": self.has_missing,
        }
        if self.names_hash is not None:
            m["schema.names_hash"] = self.names_hash
            m["schema.variable_hashes"] = json.dumps(list(self.variable_hashes))
        for k, v in self.policy.items():
            if v is not None:
                m[f"policy.{k}"] = v
        return m

    @classmethod
    def from_metrics(cls, site: int, m: Mapping[str, Any]) -> Preflight:
        try:
            hashes = m.get("schema.variable_hashes")
            return cls(
                site=site,
                n_rows=int(m["schema.n_rows"]),
                n_features=int(m["schema.n_features"]),
                levels=tuple(int(v) for v in json.loads(str(m["schema.levels"]))),
                names_hash=m.get("schema.names_hash"),
                variable_hashes=None if hashes is None else tuple(json.loads(str(hashes))),
                has_missing=bool(m.get("schema.has_missing", False)),
                policy={k[len("policy.") :]: v for k, v in m.items() if k.startswith("policy.")},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed pre-flight reply ({exc})") from None


def reply_metrics(site: int, phase: Phase | str, seconds: float, **extra) -> dict[str, Any]:
    """The scalars every reply carries: the protocol, the site, the phase, the seconds."""
    out = {
        K_PROTOCOL: PROTOCOL_VERSION,
        K_SITE: int(site),
        K_PHASE: Phase(phase).value,
        K_SECONDS: float(seconds),
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def reply_site(metrics: Mapping[str, Any]) -> int:
    """The partition id a reply claims (checked against the pre-flight roster by the server)."""
    if metrics.get(K_PROTOCOL) != PROTOCOL_VERSION or K_SITE not in metrics:
        raise ProtocolError("the reply does not follow the fedvi protocol")
    return int(metrics[K_SITE])


# -- refinement and labels: fixed layouts (so that secure aggregation can sum them) ----------
def refine_layout(spec: MixtureSpec) -> tuple[str, ...]:
    """The statistics a refinement reply carries, in order: counts, sums, entropies and, for a
    Bernoulli model that allows missing cells, observed counts. Same shapes at every site."""
    base = ("counts", "sums", "entropy")
    if spec.likelihood == "bernoulli" and spec.missing == "ignore":
        return (*base, "observed")
    return base


def encode_refine(stats: Summaries) -> list[np.ndarray]:
    out = []
    for name in refine_layout(stats.spec):
        if name == "observed":
            out.append(np.asarray(stats.variable_observed(), dtype=np.float64))
        else:
            out.append(np.asarray(getattr(stats, name), dtype=np.float64))
    return out


def decode_refine(arrays, posterior: Summaries, n_rows: int) -> Summaries:
    """A site's (or the securely summed) refinement statistics as a :class:`Summaries`."""
    layout = refine_layout(posterior.spec)
    if len(arrays) != len(layout):
        raise ProtocolError(f"a refinement reply has {len(layout)} arrays, got {len(arrays)}")
    a = dict(zip(layout, (np.asarray(x, dtype=np.float64) for x in arrays), strict=True))
    G = posterior.n_clusters
    try:
        return dataclasses.replace(
            posterior,
            counts=a["counts"].reshape(G),
            sums=a["sums"].reshape(posterior.sums.shape),
            entropy=a["entropy"].reshape(G),
            observed=a["observed"].reshape(G, -1) if "observed" in a else None,
            n_rows=int(n_rows),
        )
    except ValueError as exc:
        raise ProtocolError(f"refinement statistics of the wrong shape ({exc})") from None


def decode_refine_reply(arrays, request: Request, n_rows: int) -> RefineReply:
    """A site's refinement reply to ``request`` (or the secure sum of several: ``n_rows`` the
    contributing sites' rows), in the layout of :meth:`RefineReply.to_arrays`."""
    arrays = list(arrays)
    post, moves = request.posterior, request.moves
    width = len(refine_layout(post.spec))
    n_trials = 0 if moves is None else len(moves.trials)
    expected = width if moves is None else width * (1 + n_trials) + 2
    if len(arrays) != expected:
        raise ProtocolError(f"a refinement reply has {expected} arrays, got {len(arrays)}")
    stats = decode_refine(arrays[:width], post, n_rows)
    if moves is None:
        return RefineReply(stats)
    P = post.sums.shape[1]
    try:
        pair_h = np.asarray(arrays[width], dtype=np.float64).reshape(len(moves.pairs))
        second = np.asarray(arrays[width + 1], dtype=np.float64)
        second = second.reshape(len(moves.splits), P, P)
    except ValueError as exc:
        raise ProtocolError(f"move statistics of the wrong shape ({exc})") from None
    trials = tuple(
        decode_refine(arrays[width * (i + 1) + 2 : width * (i + 2) + 2], t, n_rows)
        for i, t in enumerate(moves.trials)
    )
    return RefineReply(stats, pair_entropy=pair_h, second=second, trials=trials)


# -- errors -------------------------------------------------------------------------------
_ERROR_PREFIX = "fedvi site error"
_ERROR_RE = re.compile(rf"{_ERROR_PREFIX}: site (-?\d+), phase (\w+): (.*?)(?='>|\n|$)")


def site_error_message(site: int | None, phase: str, reason: str) -> str:
    """The text a site may send about a failure: site, phase and a reason built only from
    fixed words, rule names and numbers the server already knows."""
    sid = -1 if site is None else int(site)
    return f"{_ERROR_PREFIX}: site {sid}, phase {phase}: {reason}"


def parse_site_error(text: str) -> tuple[int | None, str | None, str]:
    """``(site, phase, reason)`` of a site's error found in ``text`` (Flower wraps it), or
    ``(None, None, text)`` when the text holds none (a node that died, a timeout)."""
    found = list(_ERROR_RE.finditer(text))
    if not found:
        return None, None, text.strip()
    m = found[-1]
    site = int(m.group(1))
    return (None if site < 0 else site), m.group(2), m.group(3).strip()


# -- typed replies ----------------------------------------------------------------------------
#: What a site's reply says about itself besides its phase's payload: seconds it took and, with
#: differential privacy, its spending (``privacy.epsilon_spent``, ``privacy.releases``).
_PRIVACY_KEYS = ("privacy.epsilon_spent", "privacy.releases")


@dataclass(frozen=True)
class LocalReply:
    """The ``local`` phase's answer: the released one-shot summaries and the fit's trace."""

    summaries: Summaries
    n_iter: int
    converged: bool
    seconds: float = 0.0
    load_seconds: float = 0.0


@dataclass(frozen=True)
class RefineReply:
    """A ``refine`` answer: statistics per global cluster (``G`` rows) under the posterior and,
    when the request carried :class:`RefineMoves`, under the same responsibilities:
    ``pair_entropy (M,)`` one merged-column entropy per pair, ``second (S, P, P)`` the second
    moments of the split candidates; ``trials``: statistics under each trial posterior. All
    sums over rows, so a secure sum of replies decodes like one reply
    (:func:`decode_refine_reply`)."""

    stats: Summaries
    seconds: float = 0.0
    privacy: dict | None = None
    pair_entropy: np.ndarray | None = None
    second: np.ndarray | None = None
    trials: tuple[Summaries, ...] = ()

    def to_arrays(self) -> list[np.ndarray]:
        """The reply's arrays in the order :func:`decode_refine_reply` reads (the statistics,
        then, with moves: pair entropies, second moments, each trial's statistics)."""
        out = encode_refine(self.stats)
        if self.pair_entropy is not None:
            out += [np.asarray(self.pair_entropy, dtype=np.float64)]
            out += [np.asarray(self.second, dtype=np.float64)]
            for t in self.trials:
                out += encode_refine(t)
        return out


@dataclass(frozen=True)
class LabelReply:
    """A ``label`` answer: ``counts (G,)`` rows per global cluster, ``marker`` where the
    site's floor suppressed a count; ``n_suppressed`` of them (``None`` under SecAgg+);
    ``file``: the name (no folder) of the label file the site wrote, if any."""

    counts: np.ndarray
    n_suppressed: int | None = None
    seconds: float = 0.0
    privacy: dict | None = None
    file: str | None = None


#: The pre-flight answer is :class:`Preflight` (its schema, row count and policy).
PreflightReply = Preflight
Reply = Preflight | LocalReply | RefineReply | LabelReply


def encode_reply(reply: Reply) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``(arrays, metrics)`` of a typed reply (without the scalars every reply carries,
    :func:`reply_metrics`)."""
    if isinstance(reply, Preflight):
        return [], reply.to_metrics()
    if isinstance(reply, LocalReply):
        arrays, meta = encode_summaries(reply.summaries, "summaries")
        meta.update(
            {
                "fit.n_iter": int(reply.n_iter),
                "fit.converged": bool(reply.converged),
                "fit.load_seconds": float(reply.load_seconds),
                "fit.n_clusters": reply.summaries.n_clusters,
            }
        )
        return arrays, meta
    privacy = {f"privacy.{k}": v for k, v in (reply.privacy or {}).items()}
    if isinstance(reply, RefineReply):
        return reply.to_arrays(), privacy
    if isinstance(reply, LabelReply):
        meta = dict(privacy)
        if reply.n_suppressed is not None:
            meta["label.n_suppressed"] = int(reply.n_suppressed)
        if reply.file is not None:
            meta["label.file"] = str(reply.file)  # the run id and model hash: nothing of rows
        return [np.asarray(reply.counts)], meta
    raise TypeError(f"not a reply: {type(reply).__name__}")


def label_file_of(metrics: Mapping[str, Any]) -> str | None:
    """The label file a site says it wrote (``label.file``), only when it is a name of the form
    :func:`fedvi.label_files.label_file_name` (a base name, no folder); else ``None``."""
    name = metrics.get("label.file")
    return name if is_label_file_name(name) else None


def privacy_of(metrics: Mapping[str, Any]) -> dict | None:
    """A reply's privacy spending (``epsilon_spent``, ``releases``), or ``None``."""
    got = {k.split(".", 1)[1]: metrics[k] for k in _PRIVACY_KEYS if k in metrics}
    return got or None


def decode_reply(
    phase: Phase,
    site: int,
    arrays,
    metrics: Mapping[str, Any],
    request: Request | None = None,
    n_rows: int | None = None,
) -> Reply:
    """The typed reply of ``site`` to ``request`` from what crossed the wire; a
    :class:`ProtocolError` when it does not have the phase's layout (its values are checked by
    :mod:`fedvi.reply_checks`)."""
    arrays = list(arrays)
    seconds = float(metrics.get(K_SECONDS, 0.0))
    try:
        if phase is Phase.PREFLIGHT:
            return Preflight.from_metrics(site, metrics)
        if phase is Phase.LOCAL:
            return LocalReply(
                decode_summaries(arrays, metrics, "summaries"),
                int(metrics.get("fit.n_iter", 0)),
                bool(metrics.get("fit.converged", False)),
                seconds,
                float(metrics.get("fit.load_seconds", 0.0)),
            )
        if phase is Phase.REFINE:
            reply = decode_refine_reply(arrays, request, n_rows)
            return dataclasses.replace(reply, seconds=seconds, privacy=privacy_of(metrics))
        if len(arrays) != 1:
            raise ProtocolError(f"a label reply has 1 array, got {len(arrays)}")
        n_supp = metrics.get("label.n_suppressed")
        return LabelReply(
            np.asarray(arrays[0]),
            None if n_supp is None else int(n_supp),
            seconds,
            privacy_of(metrics),
            label_file_of(metrics),
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"malformed {phase.value} reply ({exc})") from None
