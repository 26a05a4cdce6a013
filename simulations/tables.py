"""Tables, provenance and figures of a comparison (:mod:`simulations.comparators`).

``run_comparators(cfg, sites, truth, results, run_dir)`` is called at the end of
``simulations.run`` when ``cfg.comparators`` is set: it runs :func:`compare` and writes
``comparison.csv``, ``comparison.md``, ``comparison.json`` (rows plus provenance: config,
seed, command line, git state, package versions) and figures into the run directory.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedvi.metrics import contingency
from simulations.comparators import (
    MethodResult,
    _fmt,
    _get,
    _plain,
    compare,
    one_hot,
    study_of,
)

log = logging.getLogger("fedvi")

#: Table columns (``comparison.csv``): the keys of :meth:`MethodResult.row`, in order:
#: method, federated, status, k_true, k_found, ari, nmi, wall_s, uplink_bytes, n_rows,
#: n_sites, note.
COLUMNS = tuple(MethodResult("").row())


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
    """``(len(ids), P)`` mean of the encoded rows of each cluster in ``ids``, over the
    observed cells (NaN, missing, cells skipped; NaN where a cluster observes none)."""
    seen = ~np.isnan(E)
    E0 = np.where(seen, E, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.vstack([E0[labels == i].sum(axis=0) / seen[labels == i].sum(axis=0) for i in ids])


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
    study = study_of(cfg, sites, truth)
    rs = compare(cfg, sites, truth, results, methods, study=study)
    rows = [r.row() for r in rs]
    written = write_table(rows, run_dir)
    meta = {"rows": rows, **provenance(cfg)}
    with open(os.path.join(run_dir, "comparison.json"), "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    if bool(_get(cfg, "plots", True)):
        written += write_figures(
            rs, study.X, study.truth, study.likelihood, study.n_levels, run_dir
        )
    print(markdown_table(rows))
    log.info("comparison: %s", ", ".join(os.path.basename(p) for p in written))
    return rows
