"""Comparators run on the same data, in the same command, as the Flower federation.

:func:`compare` fits each comparator named by ``cfg.comparators`` (a list of the names below,
or ``all``) on the run's own site tables and scores it against the known labels; one
:class:`MethodResult` per method. The table, provenance and figures are written by
:func:`simulations.tables.run_comparators`. Methods:

- ``fedmerdel``: the Flower run itself (taken from ``results``; ARI/NMI/K/uplink/wall-clock).
- ``fedmerdel_core``: :func:`fedvi.federated_fit` in-process on the same sites and options:
  the same algorithm without Flower's transport, a check that the app matches the core and a
  fair wall-clock against in-process comparators (sites run one after the other, so it is an
  upper bound of the deployed time, where sites run in parallel).
- ``merdel_central``: :class:`fedvi.MixtureVI` on the pooled rows (what pooling would give).
- ``stepmix``: latent class analysis by EM with the true K on the pooled rows (PyPI
  ``stepmix``, binary or categorical measurement model).
- ``stepmix_nan``: the same with StepMix's missing-value measurement models (``binary_nan``,
  ``categorical_nan``: full-information maximum likelihood, a row's likelihood is the product
  over its observed cells), on the pooled rows with their NaN cells; see
  :func:`fit_stepmix_nan`.
- ``kmodes``: k-modes (Huang init) with the true K on the pooled rows (PyPI ``kmodes``).
- ``kfed``: a k-FED-style one-shot federated clustering; see :func:`fit_kfed`.

Missing values are NaN cells of the site tables (float arrays). When the data hold any,
``stepmix``, ``kmodes`` and ``kfed``, which have no missing-value model, are reported as
``skipped: data have missing values (...)``; without any, ``stepmix_nan`` is reported as
``skipped: no missing values``.

Comparators that need the true K use the number of distinct known labels (or
``data.n_clusters``). A comparator whose package is not installed is reported as
``missing (pip install 'fedvi[experiments]')`` in the table and on the terminal; one that
fails is reported with its error. Neither stops the run.

Options per comparator come from ``cfg.comparator_options.<name>`` (e.g.
``comparator_options.kmodes.n_init=1``); every comparator is seeded with ``cfg.seed``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from typing import Any

import numpy as np
import scipy.sparse as sp

from fedvi.metrics import agreement

log = logging.getLogger("fedvi")

#: Every comparator, in table order (``fedmerdel`` is the Flower run itself).
METHODS = (
    "fedmerdel",
    "fedmerdel_core",
    "merdel_central",
    "stepmix",
    "stepmix_nan",
    "kmodes",
    "kfed",
)
#: Methods that never pool rows; their uplink bytes are reported.
FEDERATED = ("fedmerdel", "fedmerdel_core", "fedmerdel_plain", "kfed")
#: With a variable-selection model, each MerDel fit is also run without selection, next to it.
PLAIN = {"fedmerdel_core": "fedmerdel_plain", "merdel_central": "merdel_central_plain"}
#: Methods given the true number of clusters.
NEEDS_K = ("stepmix", "stepmix_nan", "kmodes", "kfed")
#: Methods without a missing-value model -> why they are skipped when the data hold NaN.
NO_MISSING = {
    "stepmix": "use stepmix_nan",
    "kmodes": "k-modes has no missing-value model",
    "kfed": "k-means has no missing-value model",
}
#: Methods only for data with missing values (skipped when there are none).
ONLY_MISSING = ("stepmix_nan",)
INSTALL_HINT = "pip install 'fedvi[experiments]'"


class MissingComparator(ImportError):
    """A comparator's optional package is not installed."""


@dataclass
class MethodResult:
    """One row of the comparison table (labels/profiles are kept for figures only)."""

    method: str
    status: str = "ok"
    k_true: int | None = None
    k_found: int | None = None
    ari: float | None = None
    nmi: float | None = None
    wall_s: float | None = None
    uplink_bytes: int | None = None
    n_rows: int | None = None
    n_sites: int | None = None
    note: str = ""
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def federated(self) -> bool:
        return self.method in FEDERATED

    def row(self) -> dict[str, Any]:
        """The table row: plain Python values, ``None`` where not applicable; ``method``,
        ``federated``, then the other fields in order (``simulations.tables.COLUMNS``)."""
        d = {k: v for k, v in asdict(self).items() if k != "labels"}
        return {"method": d.pop("method"), "federated": self.federated, **d}


# -- helpers ----------------------------------------------------------------------------------
def _get(cfg: Any, path: str, default: Any = None) -> Any:
    """``cfg.a.b`` for a dotted path, ``default`` when absent (dicts or OmegaConf)."""
    node = cfg
    for key in path.split("."):
        if node is None:
            return default
        node = node.get(key) if isinstance(node, Mapping) or hasattr(node, "get") else None
    return default if node is None else node


def _plain(value: Any) -> Any:
    """OmegaConf containers -> Python; anything else unchanged."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def method_names(spec: Any) -> list[str]:
    """The comparators asked for: ``all``/``true`` or a list (or comma-separated string)."""
    spec = _plain(spec)
    if spec is True or (isinstance(spec, str) and spec.strip().lower() in ("all", "true")):
        return list(METHODS)
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = [str(s) for s in (spec or [])]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown comparators {unknown}; choose from {list(METHODS)} or 'all'")
    # The Flower run is always the first row; keep METHODS order for the rest.
    return [m for m in METHODS if m in names or m == "fedmerdel"]


def pooled(sites: Sequence[Any]) -> np.ndarray:
    """The sites' rows stacked in site order, dense (comparators need dense input).

    NaN cells (missing values) are kept; a mix of integer and float sites comes out float."""
    blocks = [x.toarray() if sp.issparse(x) else np.asarray(x) for x in sites]
    return np.vstack(blocks)


def missing_mask(X: np.ndarray) -> np.ndarray | None:
    """``(N, D)`` True where a cell is missing (NaN); ``None`` for a table that cannot hold NaN
    (integer) or holds none."""
    if X.dtype.kind not in "fc":
        return None
    mask = np.isnan(X)
    return mask if mask.any() else None


def levels_of(X: np.ndarray) -> list[int]:
    """Levels of each categorical column: its largest observed code + 1 (NaN ignored)."""
    return [max(int(v) + 1, 1) for v in np.nan_to_num(X, nan=0).max(axis=0)]


def one_hot(X: np.ndarray, likelihood: str, n_levels: Sequence[int] | None = None) -> np.ndarray:
    """Binary data as is (float); categorical codes as one-hot blocks ``(N, sum L_d)``.

    A missing (NaN) cell stays NaN: binary, the cell itself; categorical, its whole block."""
    if likelihood == "bernoulli":
        return X.astype(np.float64)
    levels = n_levels if n_levels is not None else levels_of(X)
    blocks = [(X[:, d, None] == np.arange(L)[None, :]) for d, L in enumerate(levels)]
    E = np.hstack(blocks).astype(np.float64)
    miss = missing_mask(X)
    if miss is not None:
        E[np.repeat(miss, levels, axis=1)] = np.nan
    return E


def n_found(labels: np.ndarray) -> int:
    """Number of clusters that hold at least one row."""
    return int(len(np.unique(labels)))


def score(result: MethodResult, truth: np.ndarray | None) -> MethodResult:
    """Fill ARI/NMI/K found from ``result.labels`` (NaN-free: left ``None`` without truth)."""
    if result.labels is None:
        return result
    result.k_found = n_found(result.labels)
    if truth is not None:
        result.ari, result.nmi = agreement(truth, result.labels)
    return result


# -- comparators: each returns (labels, k_found or None, uplink bytes or None, note) ----------
@dataclass
class Study:
    """What every comparator sees: the sites, the pooled table and the model settings."""

    sites: list
    X: np.ndarray
    likelihood: str
    n_levels: list[int] | None
    k_true: int | None
    seed: int
    cfg: Any
    truth: np.ndarray | None = None  # (N,) known labels of the pooled rows, when known

    def options(self, name: str) -> dict[str, Any]:
        return dict(_plain(_get(self.cfg, f"comparator_options.{name}", {})) or {})

    @cached_property
    def missing_fraction(self) -> float:
        """Fraction of the pooled cells that are missing (NaN); 0.0 when none are."""
        miss = missing_mask(self.X)
        return 0.0 if miss is None else float(miss.mean())


def with_plain(names: Sequence[str], cfg: Any) -> list[str]:
    """``names`` plus, when the model selects variables, the same MerDel fits without
    selection right after each (the plain model the selection is compared with)."""
    if not bool(_get(cfg, "model.variable_selection", False)):
        return list(names)
    out = []
    for name in names:
        out.append(name)
        if name in PLAIN:
            out.append(PLAIN[name])
    return out


def run_settings(cfg: Any, variable_selection: bool | None = None):
    """The run's settings (the same dataclasses the Flower run uses, from the same config);
    ``variable_selection`` overrides the model's. Nothing is re-typed here: a new setting
    reaches the core comparators as it reaches the sites."""
    import dataclasses

    from strategies.config import RunSettings

    s = RunSettings.from_cfg(cfg)
    if variable_selection is not None:
        s = dataclasses.replace(
            s, spec=dataclasses.replace(s.spec, variable_selection=bool(variable_selection))
        )
    return s


def fit_fedmerdel_core(p: Study, variable_selection: bool | None = None):
    """:func:`fedvi.federated_fit` with the run's model, fit, server and site settings."""
    import fedvi
    from fedvi.settings import as_dict

    s = run_settings(p.cfg, variable_selection)
    res = fedvi.federated_fit(
        p.sites,
        seed=p.seed,
        policy=s.site,
        **as_dict(s.spec),
        **as_dict(s.fit),
        **as_dict(s.server),
    )
    note = f"K_init {s.spec.n_components}/site"
    if res.variable_relevance is not None:
        note += f"; {int((res.variable_relevance > 0.5).sum())} variables selected"
    return np.concatenate(res.labels), res.n_clusters, int(sum(res.uplink_bytes)), note


def fit_merdel_central(p: Study, variable_selection: bool | None = None):
    """:class:`fedvi.MixtureVI` (MerDel) on the pooled rows: the centralised reference."""
    import fedvi
    from fedvi.settings import as_dict

    s = run_settings(p.cfg, variable_selection)
    m = fedvi.MixtureVI(**as_dict(s.spec), **as_dict(s.fit), seed=p.seed).fit(p.X)
    note = f"K_init {s.spec.n_components}"
    if s.spec.variable_selection:
        note += f"; {int((m.variable_relevance_ > 0.5).sum())} variables selected"
    return m.labels_, m.n_clusters_, None, note


def _stepmix(p: Study, measurement: str, name: str):
    """StepMix (latent class analysis by EM) with the true K on ``p.X``, options from
    ``comparator_options.<name>``; returns its labels and a note."""
    try:
        from stepmix.stepmix import StepMix
    except ImportError as err:
        raise MissingComparator("stepmix") from err
    opts = {"n_init": 1, "max_iter": 1000, "abs_tol": 1e-10, **p.options(name)}
    if p.likelihood != "bernoulli" and p.n_levels is not None:
        # StepMix one-hot encodes the integer codes itself, max_n_outcomes columns a variable,
        # inferring the sizes from the data unless told: tell it the model's levels.
        levels = [int(v) for v in p.n_levels]
        opts["measurement_params"] = {
            "max_n_outcomes": max(levels),
            "total_outcomes": sum(levels),
            **(opts.get("measurement_params") or {}),
        }
    model = StepMix(
        n_components=int(p.k_true),
        measurement=measurement,
        random_state=p.seed,
        verbose=0,
        progress_bar=0,
        **opts,
    )
    model.fit(p.X)
    labels = model.predict(p.X)
    conv = getattr(model, "converged_", None)
    note = f"true K; {getattr(model, 'n_iter_', '?')} EM iterations"
    if conv is False:
        note += " (max_iter reached)"
    return labels, note


def fit_stepmix(p: Study):
    """Latent class analysis (EM) with the true K (``stepmix.StepMix``) on the pooled rows."""
    measurement = "binary" if p.likelihood == "bernoulli" else "categorical"
    labels, note = _stepmix(p, measurement, "stepmix")
    return labels, None, None, note


def fit_stepmix_nan(p: Study):
    """StepMix's missing-value latent class model with the true K on the pooled rows.

    Measurement ``binary_nan`` (Bernoulli) or ``categorical_nan`` (categorical, 0-based integer
    codes, one-hot encoded by StepMix with a NaN block for a missing cell). Both are
    full-information maximum likelihood under ignorable missingness: a row's likelihood is the
    product over its observed cells only, and each M-step frequency is taken over the rows
    that observe the variable, the model ``fedvi``'s ``missing="ignore"`` fits by VI. NaN cells
    go to StepMix as they are (it validates with ``allow-nan``).
    """
    measurement = "binary_nan" if p.likelihood == "bernoulli" else "categorical_nan"
    labels, note = _stepmix(p, measurement, "stepmix_nan")
    return labels, None, None, f"{note}; {p.missing_fraction:.1%} of cells missing"


def fit_kmodes(p: Study):
    """k-modes (Huang initialisation) with the true K on the pooled rows (``kmodes``)."""
    try:
        from kmodes.kmodes import KModes
    except ImportError as err:
        raise MissingComparator("kmodes") from err
    opts = {"init": "Huang", "n_init": 1, "max_iter": 100, **p.options("kmodes")}
    km = KModes(n_clusters=int(p.k_true), random_state=p.seed, **opts).fit(p.X)
    note = f"true K; init {opts['init']}, n_init {opts['n_init']}"
    return np.asarray(km.labels_), None, None, note


def fit_kfed(p: Study):
    """k-FED-style one-shot federated clustering (Dennis, Li & Smith, ICML 2021).

    Each site runs k-means (scikit-learn, k-means++ init) with ``k_local`` centres (default the
    true K, capped by its rows) on its rows, binary as 0/1 and categorical as one-hot blocks;
    it sends its centres and their sizes once. The server runs k-means with the true K on the
    pooled centres, weighted by their sizes, and every row takes the server cluster of its
    local centre.

    Why this is a fair federated peer: like FedMerDel it is one-shot (one upload of per-cluster
    summaries, no rows, no iteration over the network); a centre and its size are exactly a
    cluster's ``(S_k / N_k, N_k)``, the same statistics FedMerDel sends, so the comparison
    isolates the model (hard Euclidean k-means given the true K versus a Bayesian mixture that
    learns K). Weighting by size makes the server objective the k-means cost of the rows
    collapsed onto their local centres, which is the quantity k-FED's analysis bounds. k-means
    on 0/1 vectors is k-means under Hamming distance with mean (frequency) centres, the usual
    choice for binary data; k-modes locally would send modes, which lose the frequencies.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as err:
        raise MissingComparator("scikit-learn") from err
    if p.k_true is None:
        raise ValueError("kfed needs the true K")
    opts = {"n_init": 3, **p.options("kfed")}
    k_local = int(opts.pop("k_local", p.k_true))
    centres, sizes, local_labels = [], [], []
    for b, site in enumerate(p.sites):
        Xb = one_hot(
            site.toarray() if sp.issparse(site) else np.asarray(site), p.likelihood, p.n_levels
        )
        k = min(k_local, len(Xb))
        km = KMeans(n_clusters=k, random_state=p.seed + b, n_init=opts["n_init"]).fit(Xb)
        counts = np.bincount(km.labels_, minlength=k).astype(np.float64)
        keep = counts > 0
        remap = np.cumsum(keep) - 1
        centres.append(km.cluster_centers_[keep])
        sizes.append(counts[keep])
        local_labels.append(remap[km.labels_])
    C, w = np.vstack(centres), np.concatenate(sizes)
    K = min(int(p.k_true), len(C))
    server = KMeans(n_clusters=K, random_state=p.seed, n_init=opts["n_init"])
    owner = server.fit(C, sample_weight=w).labels_
    offsets = np.cumsum([0] + [len(c) for c in centres])
    labels = np.concatenate([owner[offsets[b] + lab] for b, lab in enumerate(local_labels)])
    uplink = int(sum(c.nbytes + s.nbytes for c, s in zip(centres, sizes, strict=True)))
    return labels, None, uplink, f"true K; {k_local} local centres/site, weighted server k-means"


#: name -> fitting function (``fedmerdel`` is read from the run's results instead).
FITTERS: dict[str, Callable[[Study], tuple]] = {
    "fedmerdel_core": fit_fedmerdel_core,
    "merdel_central": fit_merdel_central,
    "fedmerdel_plain": partial(fit_fedmerdel_core, variable_selection=False),
    "merdel_central_plain": partial(fit_merdel_central, variable_selection=False),
    "stepmix": fit_stepmix,
    "stepmix_nan": fit_stepmix_nan,
    "kmodes": fit_kmodes,
    "kfed": fit_kfed,
}


def flower_row(results: Mapping[str, Any] | None, n_rows: int, n_sites: int) -> MethodResult:
    """The run's row from its ``results.json`` content (Flower or the in-process engine)."""
    r = MethodResult("fedmerdel", n_rows=n_rows, n_sites=n_sites)
    if not results:
        r.status = "no results"
        return r
    r.k_found = results.get("n_clusters")
    r.ari, r.nmi = results.get("ari"), results.get("nmi")
    wall = results.get("wall_clock") or {}
    r.wall_s = wall.get("simulation", wall.get("inprocess", wall.get("total")))
    uplink = results.get("uplink_bytes") or {}
    vals = [v for v in (uplink.values() if isinstance(uplink, Mapping) else uplink) if v]
    r.uplink_bytes = int(sum(vals)) if vals else None
    if results.get("engine") == "inprocess":
        r.note = "in-process engine (simulations.run federation.engine=inprocess)"
    else:
        r.note = "Flower simulation (wall-clock includes the engine's start-up)"
    if not results.get("complete", True):
        r.status = "incomplete"
    return r


def run_method(name: str, p: Study, truth: np.ndarray | None) -> MethodResult:
    """Fit one comparator, time it and score it; never raises (the status says what failed)."""
    r = MethodResult(name, k_true=p.k_true, n_rows=len(p.X), n_sites=len(p.sites))
    if name in NEEDS_K and p.k_true is None:
        r.status = "skipped: needs the true K (no known labels, no data.n_clusters)"
        return r
    if name in NO_MISSING and p.missing_fraction > 0:
        r.status = f"skipped: data have missing values ({NO_MISSING[name]})"
        return r
    if name in ONLY_MISSING and p.missing_fraction == 0:
        r.status = "skipped: no missing values"
        return r
    t = time.perf_counter()
    try:
        labels, k, uplink, note = FITTERS[name](p)
    except MissingComparator as err:
        r.status = f"missing: {err} not installed ({INSTALL_HINT})"
        return r
    except Exception as err:  # a comparator's failure is a result, not a crash
        log.exception("comparator %s failed", name)
        r.status = f"error: {type(err).__name__}: {err}"
        return r
    r.wall_s = time.perf_counter() - t
    r.labels = np.asarray(labels)
    r.uplink_bytes, r.note = uplink, note
    score(r, truth)
    if k is not None:
        r.k_found = int(k)
    return r


def study_of(cfg: Any, sites: Sequence[Any], truth: Sequence[np.ndarray] | None) -> Study:
    """The pooled study of ``sites`` (one dense copy of every row) under ``cfg``."""
    sites = list(sites)
    X = pooled(sites)
    z = None if truth is None else np.concatenate([np.asarray(t) for t in truth])
    if z is not None and len(z) != len(X):
        raise ValueError(f"truth has {len(z)} labels for {len(X)} rows")
    k_true = n_found(z) if z is not None else _get(cfg, "data.n_clusters", None)
    likelihood = str(_get(cfg, "model.likelihood", "bernoulli"))
    n_levels = _plain(_get(cfg, "model.n_levels", None))
    if likelihood == "categorical" and n_levels is None:
        n_levels = levels_of(X)
    k_true = None if k_true is None else int(k_true)
    return Study(sites, X, likelihood, n_levels, k_true, int(_get(cfg, "seed", 0)), cfg, z)


def compare(
    cfg: Any,
    sites: Sequence[Any],
    truth: Sequence[np.ndarray] | None,
    results: Mapping[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    study: Study | None = None,
) -> list[MethodResult]:
    """Run ``methods`` (default ``cfg.comparators``) on ``sites``; one result per method.
    ``study``: the :func:`study_of` these arguments, when the caller has it already."""
    names = method_names(methods if methods is not None else _get(cfg, "comparators", "all"))
    names = with_plain(names, cfg)
    p = study if study is not None else study_of(cfg, sites, truth)
    X, z = p.X, p.truth
    if p.missing_fraction:
        log.info("comparators: %.1f%% of the cells are missing", 100 * p.missing_fraction)
    out = []
    for name in names:
        if name == "fedmerdel":
            if results is None:
                continue
            r = flower_row(results, len(X), len(p.sites))
            r.k_true = p.k_true
        else:
            log.info("comparator %s: fitting on %d rows x %d variables", name, *X.shape)
            r = run_method(name, p, z)
        _announce(r)
        out.append(r)
    return out


def _announce(r: MethodResult) -> None:
    if r.status == "ok":
        log.info(
            "comparator %-15s K %s ARI %s NMI %s %s s",
            r.method,
            r.k_found,
            _fmt(r.ari),
            _fmt(r.nmi),
            _fmt(r.wall_s, 2),
        )
    else:
        log.warning("comparator %s: %s", r.method, r.status)
        print(f"fedvi: comparator {r.method}: {r.status}", file=sys.stderr)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)
