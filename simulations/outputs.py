"""What a run leaves in its directory: ``results.json``, profiles, relevance, plots, config.

Works on a :class:`strategies.fedmerdel.FedMerDelOutcome` (what the server learned) plus,
in simulations, the known labels for scoring.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from fedvi.io import read_labels
from fedvi.metrics import adjusted_rand_index, normalized_mutual_info


def column_names(spec, feature_names=None) -> list[str]:
    """Names of the ``P`` columns of ``E[phi]``: a variable (Bernoulli: ``P(x=1)``) or
    ``variable=level`` (categorical)."""
    names = list(spec.feature_names or feature_names or [f"x{d}" for d in range(spec.n_features)])
    if spec.likelihood == "bernoulli":
        return names
    return [f"{n}={lvl}" for n, L in zip(names, spec.n_levels, strict=True) for lvl in range(L)]


def site_labels(outcome) -> dict[int, np.ndarray] | None:
    """The sites' label files, when this machine can read them all (simulations)."""
    out = {}
    for sid, path in sorted(outcome.label_files.items()):
        if not path or not os.path.exists(path):
            return None
        out[sid] = read_labels(path)
    return out or None


def results_dict(outcome, truth=None, wall_clock: dict | None = None) -> dict:
    """The content of ``results.json``; ``truth``: one ``(N_b,)`` array per site or ``None``."""
    post = outcome.posterior
    sites = {}
    for sid in sorted(set(outcome.n_rows) | set(outcome.counts) | set(outcome.uplink_bytes)):
        local = outcome.site_summaries.get(sid)
        sites[f"site {sid}"] = {
            "n_rows": outcome.n_rows.get(sid),
            "n_local_clusters": None if local is None else local.n_clusters,
            "counts": None if sid not in outcome.counts else outcome.counts[sid].tolist(),
            "uplink_bytes": outcome.uplink_bytes.get(sid, {}).get("local"),
            "uplink_bytes_by_phase": outcome.uplink_bytes.get(sid, {}),
            "seconds_by_phase": outcome.site_seconds.get(sid, {}),
            "labels_file": outcome.label_files.get(sid),
        }
    res = {
        "complete": bool(outcome.complete),
        "n_clusters": outcome.n_clusters,
        "elbo": outcome.elbo,
        "elbo_history": [float(v) for v in outcome.elbo_history],
        "n_merges": None if outcome.merge is None else int(outcome.merge.n_merges),
        "label_mode": outcome.label_mode,
        "n_rows": int(sum(v for v in outcome.n_rows.values() if v is not None)),
        "sites": sites,
        "uplink_bytes": {k: v["uplink_bytes"] for k, v in sites.items()},
        "wall_clock": {**outcome.timings, **(wall_clock or {})},
        "failures": outcome.failures,
        "cluster_sizes": None if post is None else [float(c) for c in post.counts],
    }
    if post is not None and post.relevance is not None:
        res["variable_relevance"] = [float(c) for c in post.relevance]
        res["selected_variables"] = int((post.relevance > 0.5).sum())
    labels = site_labels(outcome)
    if truth is not None and labels is not None and len(labels) == len(truth):
        pred = np.concatenate([labels[s] for s in sorted(labels)])
        true = np.concatenate([np.asarray(t) for t in truth])
        if len(pred) == len(true):
            res["ari"] = adjusted_rand_index(true, pred)
            res["nmi"] = normalized_mutual_info(true, pred)
    return res


def write_profiles(outcome, out_dir: str, feature_names=None, plots: bool = True) -> list[str]:
    """``cluster_profiles.csv`` (``(G, P)`` ``E[phi]``), ``variable_relevance.csv`` when
    variable selection is on, and their PNG plots; returns the files written."""
    post = outcome.posterior
    if post is None:
        return []
    cols = column_names(post.spec, feature_names)
    prof = outcome.cluster_profiles
    written = [os.path.join(out_dir, "cluster_profiles.csv")]
    with open(written[0], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cluster", "size", *cols])
        for g, row in enumerate(prof):
            w.writerow([g, f"{post.counts[g]:.6g}", *(f"{v:.6g}" for v in row)])
    names = list(post.spec.feature_names or feature_names or [])
    names = names or [f"x{d}" for d in range(post.spec.n_features)]
    if post.relevance is not None:
        path = os.path.join(out_dir, "variable_relevance.csv")
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["variable", "relevance", "selected"])
            for n, c in zip(names, post.relevance, strict=True):
                w.writerow([n, f"{c:.6g}", int(c > 0.5)])
        written.append(path)
    if plots:
        written += _plots(prof, cols, post, names, out_dir)
    return written


def _plots(prof, cols, post, names, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    G, P = prof.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.15 * P, 30), 1.5 + 0.4 * G))
    im = ax.imshow(prof, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(G), [f"{g} (n={post.counts[g]:.0f})" for g in range(G)])
    if P <= 60:
        ax.set_xticks(range(P), cols, rotation=90, fontsize=7)
    ax.set_xlabel("variable" if post.spec.likelihood == "bernoulli" else "variable=level")
    ax.set_ylabel("global cluster")
    ax.set_title("E[phi] per global cluster")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "cluster_profiles.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if post.relevance is not None:
        D = len(names)
        fig, ax = plt.subplots(figsize=(min(2 + 0.2 * D, 30), 3))
        ax.bar(range(D), post.relevance, color=np.where(post.relevance > 0.5, "C0", "C7"))
        ax.axhline(0.5, color="k", lw=0.5, ls="--")
        if D <= 60:
            ax.set_xticks(range(D), names, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("relevance c_d")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "variable_relevance.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_outputs(
    outcome,
    out_dir: str,
    cfg=None,
    truth=None,
    feature_names=None,
    plots: bool = True,
    wall_clock: dict | None = None,
) -> dict:
    """Write ``results.json``, the profiles (and plots) and the resolved config to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    res = results_dict(outcome, truth, wall_clock)
    res["files"] = [
        os.path.basename(p) for p in write_profiles(outcome, out_dir, feature_names, plots)
    ]
    if cfg is not None:
        from omegaconf import OmegaConf

        with open(os.path.join(out_dir, "config_resolved.yaml"), "w") as fh:
            fh.write(OmegaConf.to_yaml(cfg, resolve=True))
        res["files"].append("config_resolved.yaml")
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=_json_default)
    return res


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v)}")
