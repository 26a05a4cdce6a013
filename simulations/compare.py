"""Comparators run on the same data, in the same command, as the Flower federation.

``run_comparators(cfg, sites, truth, results, run_dir)`` is called at the end of
``simulations.run`` when ``cfg.comparators`` is set (a list of names below, or ``all``). It
fits each comparator on the run's own site tables, scores everything against the known labels
and writes ``comparison.csv``, ``comparison.md``, ``comparison.json`` and figures into the run
directory. Methods:

- ``fedmerdel``: the Flower run itself (taken from ``results``; ARI/NMI/K/uplink/wall-clock).
- ``fedmerdel_core``: :func:`fedvi.federated_fit` in-process on the same sites and options:
  the same algorithm without Flower's transport, a check that the app matches the core and a
  fair wall-clock against in-process comparators (sites run one after the other, so it is an
  upper bound of the deployed time, where sites run in parallel).
- ``merdel_central``: :class:`fedvi.MixtureVI` on the pooled rows (what pooling would give).
- ``stepmix``: latent class analysis by EM with the true K on the pooled rows (PyPI
  ``stepmix``, binary or categorical measurement model).
- ``kmodes``: k-modes (Huang init) with the true K on the pooled rows (PyPI ``kmodes``).
- ``kfed``: a k-FED-style one-shot federated clustering; see :func:`fit_kfed`.

Comparators that need the true K use the number of distinct known labels (or
``data.n_clusters``). A comparator whose package is not installed is reported as
``missing (pip install 'fedvi[experiments]')`` in the table and on the terminal; one that
fails is reported with its error. Neither stops the run.

Options per comparator come from ``cfg.comparator_options.<name>`` (e.g.
``comparator_options.kmodes.n_init=1``); every comparator is seeded with ``cfg.seed``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import scipy.sparse as sp

from fedvi.metrics import adjusted_rand_index, contingency, normalized_mutual_info

log = logging.getLogger("fedvi")

#: Every comparator, in table order (``fedmerdel`` is the Flower run itself).
METHODS = ("fedmerdel", "fedmerdel_core", "merdel_central", "stepmix", "kmodes", "kfed")
#: Methods that never pool rows; their uplink bytes are reported.
FEDERATED = ("fedmerdel", "fedmerdel_core", "fedmerdel_plain", "kfed")
#: With a variable-selection model, each MerDel fit is also run without selection, next to it.
PLAIN = {"fedmerdel_core": "fedmerdel_plain", "merdel_central": "merdel_central_plain"}
#: Methods given the true number of clusters.
NEEDS_K = ("stepmix", "kmodes", "kfed")
#: Table columns (``comparison.csv``).
COLUMNS = (
    "method",
    "federated",
    "status",
    "k_true",
    "k_found",
    "ari",
    "nmi",
    "wall_s",
    "uplink_bytes",
    "n_rows",
    "n_sites",
    "note",
)
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
        """The table row: plain Python values, ``None`` where not applicable."""
        d = {k: v for k, v in asdict(self).items() if k != "labels"}
        d["federated"] = self.federated
        return {k: d[k] for k in COLUMNS}


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
    """The sites' rows stacked in site order, dense (comparators need dense input)."""
    blocks = [x.toarray() if sp.issparse(x) else np.asarray(x) for x in sites]
    return np.vstack(blocks)


def one_hot(X: np.ndarray, likelihood: str, n_levels: Sequence[int] | None = None) -> np.ndarray:
    """Binary data as is (float); categorical codes as one-hot blocks ``(N, sum L_d)``."""
    if likelihood == "bernoulli":
        return X.astype(np.float64)
    levels = n_levels if n_levels is not None else X.max(axis=0) + 1
    blocks = [(X[:, d, None] == np.arange(L)[None, :]) for d, L in enumerate(levels)]
    return np.hstack(blocks).astype(np.float64)


def n_found(labels: np.ndarray) -> int:
    """Number of clusters that hold at least one row."""
    return int(len(np.unique(labels)))


def score(result: MethodResult, truth: np.ndarray | None) -> MethodResult:
    """Fill ARI/NMI/K found from ``result.labels`` (NaN-free: left ``None`` without truth)."""
    if result.labels is None:
        return result
    result.k_found = n_found(result.labels)
    if truth is not None:
        result.ari = adjusted_rand_index(truth, result.labels)
        result.nmi = normalized_mutual_info(truth, result.labels)
    return result


# -- comparators: each returns (labels, k_found or None, uplink bytes or None, note) ----------
@dataclass
class Problem:
    """What every comparator sees: the sites, the pooled table and the model settings."""

    sites: list
    X: np.ndarray
    likelihood: str
    n_levels: list[int] | None
    k_true: int | None
    seed: int
    cfg: Any

    def options(self, name: str) -> dict[str, Any]:
        return dict(_plain(_get(self.cfg, f"comparator_options.{name}", {})) or {})


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


def _model_kwargs(cfg: Any, variable_selection: bool | None = None) -> dict[str, Any]:
    """``fedvi`` model options shared by the core-based comparators (from ``cfg.model``);
    ``variable_selection`` overrides the config's."""
    m = _get(cfg, "model", {}) or {}
    kw = {
        "likelihood": str(_get(m, "likelihood", "bernoulli")),
        "n_components": int(_get(m, "n_components", 20)),
        "alpha0": float(_get(m, "alpha0", 0.01)),
        "beta": _get(m, "beta", None),
        "n_levels": _plain(_get(m, "n_levels", None)),
        "variable_selection": bool(_get(m, "variable_selection", False)),
        "relevance_prior": tuple(_plain(_get(m, "relevance_prior", (2.0, 2.0)))),
        "moves": str(_get(m, "moves", "merdel")),
        "move_every": int(_get(m, "move_every", 5)),
        "max_iter": int(_get(m, "max_iter", 1000)),
        "tol": float(_get(m, "tol", 1e-8)),
    }
    if variable_selection is not None:
        kw["variable_selection"] = bool(variable_selection)
    return kw


def fit_fedmerdel_core(p: Problem, variable_selection: bool | None = None):
    """:func:`fedvi.federated_fit` with the run's model and strategy options."""
    import fedvi

    s = _get(p.cfg, "strategy", {}) or {}
    res = fedvi.federated_fit(
        p.sites,
        **_model_kwargs(p.cfg, variable_selection),
        merge=str(_get(s, "merge", "best_first")),
        labels=str(_get(s, "labels", "posterior")),
        refine_rounds=int(_get(s, "refine_rounds", 0)),
        min_cluster_size=int(_get(s, "min_cluster_size", 5)),
        seed=p.seed,
    )
    note = f"K_init {_model_kwargs(p.cfg)['n_components']}/site"
    if res.variable_relevance is not None:
        note += f"; {int((res.variable_relevance > 0.5).sum())} variables selected"
    return np.concatenate(res.labels), res.n_clusters, int(sum(res.uplink_bytes)), note


def fit_merdel_central(p: Problem, variable_selection: bool | None = None):
    """:class:`fedvi.MixtureVI` (MerDel) on the pooled rows: the centralised reference."""
    import fedvi

    kw = _model_kwargs(p.cfg, variable_selection)
    m = fedvi.MixtureVI(**kw, seed=p.seed).fit(p.X)
    note = f"K_init {kw['n_components']}"
    if kw["variable_selection"]:
        note += f"; {int((m.variable_relevance_ > 0.5).sum())} variables selected"
    return m.labels_, m.n_clusters_, None, note


def fit_stepmix(p: Problem):
    """Latent class analysis (EM) with the true K (``stepmix.StepMix``) on the pooled rows."""
    try:
        from stepmix.stepmix import StepMix
    except ImportError as err:
        raise MissingComparator("stepmix") from err
    opts = {"n_init": 1, "max_iter": 1000, "abs_tol": 1e-10, **p.options("stepmix")}
    model = StepMix(
        n_components=int(p.k_true),
        measurement="binary" if p.likelihood == "bernoulli" else "categorical",
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
    return labels, None, None, note


def fit_kmodes(p: Problem):
    """k-modes (Huang initialisation) with the true K on the pooled rows (``kmodes``)."""
    try:
        from kmodes.kmodes import KModes
    except ImportError as err:
        raise MissingComparator("kmodes") from err
    opts = {"init": "Huang", "n_init": 1, "max_iter": 100, **p.options("kmodes")}
    km = KModes(n_clusters=int(p.k_true), random_state=p.seed, **opts).fit(p.X)
    note = f"true K; init {opts['init']}, n_init {opts['n_init']}"
    return np.asarray(km.labels_), None, None, note


def fit_kfed(p: Problem):
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
FITTERS: dict[str, Callable[[Problem], tuple]] = {
    "fedmerdel_core": fit_fedmerdel_core,
    "merdel_central": fit_merdel_central,
    "fedmerdel_plain": partial(fit_fedmerdel_core, variable_selection=False),
    "merdel_central_plain": partial(fit_merdel_central, variable_selection=False),
    "stepmix": fit_stepmix,
    "kmodes": fit_kmodes,
    "kfed": fit_kfed,
}


def flower_row(results: Mapping[str, Any] | None, n_rows: int, n_sites: int) -> MethodResult:
    """The Flower run's row from its ``results.json`` content."""
    r = MethodResult("fedmerdel", n_rows=n_rows, n_sites=n_sites)
    if not results:
        r.status = "no results"
        return r
    r.k_found = results.get("n_clusters")
    r.ari, r.nmi = results.get("ari"), results.get("nmi")
    wall = results.get("wall_clock") or {}
    r.wall_s = wall.get("simulation", wall.get("total"))
    uplink = results.get("uplink_bytes") or {}
    vals = [v for v in (uplink.values() if isinstance(uplink, Mapping) else uplink) if v]
    r.uplink_bytes = int(sum(vals)) if vals else None
    r.note = "Flower simulation (wall-clock includes the engine's start-up)"
    if not results.get("complete", True):
        r.status = "incomplete"
    return r


def run_method(name: str, p: Problem, truth: np.ndarray | None) -> MethodResult:
    """Fit one comparator, time it and score it; never raises (the status says what failed)."""
    r = MethodResult(name, k_true=p.k_true, n_rows=len(p.X), n_sites=len(p.sites))
    if name in NEEDS_K and p.k_true is None:
        r.status = "skipped: needs the true K (no known labels, no data.n_clusters)"
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


def compare(
    cfg: Any,
    sites: Sequence[Any],
    truth: Sequence[np.ndarray] | None,
    results: Mapping[str, Any] | None = None,
    methods: Sequence[str] | None = None,
) -> list[MethodResult]:
    """Run ``methods`` (default ``cfg.comparators``) on ``sites``; one result per method."""
    names = method_names(methods if methods is not None else _get(cfg, "comparators", "all"))
    names = with_plain(names, cfg)
    sites = list(sites)
    X = pooled(sites)
    z = None if truth is None else np.concatenate([np.asarray(t) for t in truth])
    if z is not None and len(z) != len(X):
        raise ValueError(f"truth has {len(z)} labels for {len(X)} rows")
    k_true = n_found(z) if z is not None else _get(cfg, "data.n_clusters", None)
    likelihood = str(_get(cfg, "model.likelihood", "bernoulli"))
    n_levels = _plain(_get(cfg, "model.n_levels", None))
    if likelihood == "categorical" and n_levels is None:
        n_levels = [int(v) for v in X.max(axis=0) + 1]
    p = Problem(
        sites,
        X,
        likelihood,
        n_levels,
        None if k_true is None else int(k_true),
        int(_get(cfg, "seed", 0)),
        cfg,
    )
    out = []
    for name in names:
        if name == "fedmerdel":
            if results is None:
                continue
            r = flower_row(results, len(X), len(sites))
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


# -- outputs ----------------------------------------------------------------------------------
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A GitHub Markdown table of ``rows`` (floats to 4 places, ``-`` for missing)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(_fmt(v, 2 if c.endswith("_s") else 4).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str, stem: str = "comparison") -> list:
    """``<stem>.csv`` and ``<stem>.md`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    columns = list(rows[0].keys()) if rows else list(COLUMNS)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as fh:
        fh.write(markdown_table(rows, columns))
    return [csv_path, md_path]


def git_state() -> dict[str, Any] | None:
    """Commit of the code that made the numbers and whether the work tree differed from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "modified_files": dirty.splitlines()}


def provenance(cfg: Any) -> dict[str, Any]:
    """Where the numbers come from: config, seed, command line and package versions."""
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "sklearn", "stepmix", "kmodes", "mlxtend", "flwr", "fedvi"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001 - a missing package is information here
            versions[mod] = None
    return {
        "seed": _get(cfg, "seed", 0),
        "argv": list(sys.argv),
        "git": git_state(),
        "config": json.loads(json.dumps(_plain(cfg), default=str)),
        "versions": versions,
    }


def matched_order(truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cluster ids of ``labels`` ordered to line up with the true clusters (Hungarian match
    on the contingency table, then unmatched clusters by size)."""
    from scipy.optimize import linear_sum_assignment

    l_ids, l_inv = np.unique(labels, return_inverse=True)
    table = contingency(truth, labels)
    rows, cols = linear_sum_assignment(-table)
    order = [int(c) for _, c in sorted(zip(rows, cols, strict=True))]
    sizes = np.bincount(l_inv, minlength=len(l_ids))
    rest = [int(c) for c in np.argsort(-sizes, kind="stable") if c not in set(order)]
    return l_ids[order + rest]


def profiles(E: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``(len(ids), P)`` mean of the encoded rows of each cluster in ``ids``."""
    return np.vstack([E[labels == i].mean(axis=0) for i in ids])


def write_figures(
    results: Sequence[MethodResult],
    X: np.ndarray,
    truth: np.ndarray | None,
    likelihood: str,
    n_levels: Sequence[int] | None,
    out_dir: str,
) -> list[str]:
    """Per-run figures: ARI/NMI per method, K found vs truth, wall-clock, profile heat-maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    paths = []
    if not ok:
        return paths
    names = [r.method for r in ok]
    x = np.arange(len(ok))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ari = [np.nan if r.ari is None else r.ari for r in ok]
    nmi = [np.nan if r.nmi is None else r.nmi for r in ok]
    axes[0].bar(x - 0.2, ari, 0.4, label="ARI")
    axes[0].bar(x + 0.2, nmi, 0.4, label="NMI")
    axes[0].set_ylim(min(0.0, np.nanmin(ari + nmi + [0.0])), 1.0)
    axes[0].set_title("agreement with the known labels")
    axes[0].legend()
    kf = [np.nan if r.k_found is None else r.k_found for r in ok]
    axes[1].bar(x, kf, color="C2")
    kt = next((r.k_true for r in ok if r.k_true is not None), None)
    if kt is not None:
        axes[1].axhline(kt, color="k", ls="--", lw=1, label=f"true K = {kt}")
        axes[1].legend()
    axes[1].set_title("clusters found")
    wall = [np.nan if r.wall_s is None else r.wall_s for r in ok]
    axes[2].bar(x, wall, color="C3")
    axes[2].set_yscale("log")
    axes[2].set_title("wall-clock (s)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "comparison.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    with_labels = [r for r in ok if r.labels is not None]
    if truth is not None and with_labels:
        E = one_hot(X, likelihood, n_levels)
        panels = [("truth", profiles(E, truth, np.unique(truth)))]
        for r in with_labels:
            panels.append((r.method, profiles(E, r.labels, matched_order(truth, r.labels))))
        height = sum(len(pr) for _, pr in panels)
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(min(max(7.0, 3 + 0.05 * E.shape[1]), 24), 1.5 + 0.12 * height),
            gridspec_kw={"height_ratios": [len(pr) + 1 for _, pr in panels]},
            squeeze=False,
        )
        for ax, (name, pr) in zip(axes[:, 0], panels, strict=True):
            im = ax.imshow(
                pr, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest"
            )
            ax.set_ylabel(f"{name}\n({len(pr)})", rotation=0, ha="right", va="center")
            ax.set_yticks([])
            ax.set_xticks([])
        axes[-1, 0].set_xlabel("variable" + ("" if likelihood == "bernoulli" else "=level"))
        fig.subplots_adjust(left=0.2, right=0.85)
        cax = fig.add_axes((0.88, 0.2, 0.02, 0.6))
        fig.colorbar(im, cax=cax, label="mean of the cluster's rows")
        fig.suptitle("cluster profiles, clusters matched to the true ones")
        paths.append(os.path.join(out_dir, "comparison_profiles.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def run_comparators(
    cfg: Any,
    sites: Sequence[Any],
    truth: Sequence[np.ndarray] | None,
    results: Mapping[str, Any] | None,
    run_dir: str,
    methods: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the comparators, write the table (CSV, Markdown, JSON) and figures to ``run_dir``.

    Returns the table rows. ``methods`` overrides ``cfg.comparators``.
    """
    rs = compare(cfg, sites, truth, results, methods)
    rows = [r.row() for r in rs]
    written = write_table(rows, run_dir)
    meta = {"rows": rows, **provenance(cfg)}
    with open(os.path.join(run_dir, "comparison.json"), "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    if bool(_get(cfg, "plots", True)):
        likelihood = str(_get(cfg, "model.likelihood", "bernoulli"))
        X = pooled(sites)
        z = None if truth is None else np.concatenate([np.asarray(t) for t in truth])
        levels = _plain(_get(cfg, "model.n_levels", None))
        if likelihood == "categorical" and levels is None:
            levels = [int(v) for v in X.max(axis=0) + 1]
        written += write_figures(rs, X, z, likelihood, levels, run_dir)
    print(markdown_table(rows))
    log.info("comparison: %s", ", ".join(os.path.basename(p) for p in written))
    return rows
