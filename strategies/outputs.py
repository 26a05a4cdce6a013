"""What a run leaves in its directory, completed or failed.

``results.json`` (the engine that ran the sites, status, failures by site and node, what
finished, per-site reports, the data as the sites reported it in pre-flight), ``model.npz``
(the global model, see :func:`fedvi.load_model`), ``cluster_profiles.csv``/``.png``,
``variable_relevance.csv``/``.png`` with variable selection, and ``config_resolved.yaml`` (the
settings that ran and the data the sites reported). Works on a :class:`fedvi.FederatedResult`;
``truth`` (simulations) adds ARI/NMI.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from fedvi.metrics import agreement
from fedvi.model import json_default
from fedvi.result import FederatedResult
from strategies import EXIT_CODES


def exit_code(result: FederatedResult) -> int:
    return EXIT_CODES.get(result.status, 1)


def column_names(spec) -> list[str]:
    """Names of the ``P`` columns of ``E[phi]``: a variable (Bernoulli: ``P(x=1)``) or
    ``variable=level`` (categorical)."""
    names = list(spec.feature_names or [f"x{d}" for d in range(spec.n_features)])
    if spec.likelihood == "bernoulli":
        return names
    return [f"{n}={lvl}" for n, L in zip(names, spec.n_levels, strict=True) for lvl in range(L)]


def data_report(result: FederatedResult) -> dict:
    """The data as the sites reported it (pre-flight, or their fits): rows, variables, schema."""
    sites = {}
    for sid, r in sorted(result.sites.items()):
        sites[f"site {sid}"] = {"n_rows": r.n_rows, "status": r.status, **(r.schema or {})}
    spec = result.spec
    return {
        "n_sites": sum(1 for r in result.sites.values() if r.status == "ok"),
        "n_rows": int(sum(r.n_rows or 0 for r in result.sites.values() if r.status == "ok")),
        "n_variables": None if spec is None else spec.n_features,
        "likelihood": None if spec is None else spec.likelihood,
        "levels": None if spec is None else list(spec.n_levels),
        "schema_hash": None if spec is None else spec.schema_hash(),
        "sites": sites,
    }


def _by_phase(result: FederatedResult) -> dict[str, int]:
    """Bytes the sites sent per phase, summed over the sites."""
    out: dict[str, int] = {}
    for r in result.sites.values():
        for phase, n in r.uplink_bytes.items():
            out[phase] = out.get(phase, 0) + int(n)
    return out


def results_dict(
    result: FederatedResult, labels=None, truth=None, wall_clock: dict | None = None
) -> dict:
    """The content of ``results.json``. ``labels``/``truth``: one ``(N_b,)`` array per site
    (simulations) to score the clustering."""
    post = result.posterior
    sites = {}
    for sid, r in sorted(result.sites.items()):
        sites[f"site {sid}"] = {
            "node_id": r.node_id,
            "status": r.status,
            "error": r.error,
            "n_rows": r.n_rows,
            "n_local_clusters": None if r.summaries is None else r.summaries.n_clusters,
            "n_iter": r.n_iter,
            "converged": r.converged,
            "counts": None if r.counts is None else np.asarray(r.counts).tolist(),
            "uplink_bytes": int(sum(r.uplink_bytes.values())) if r.uplink_bytes else None,
            "uplink_bytes_by_phase": r.uplink_bytes,
            "seconds_by_phase": r.seconds,
            "policy": r.policy,
            "privacy": r.privacy,
            "label_file": r.label_file,
        }
    res = {
        "status": result.status,
        "complete": result.complete,
        "error": result.error,
        "failures": result.failures,
        "notes": result.notes,
        "n_clusters": result.n_clusters,
        "elbo": result.elbo,
        "elbo_history": [float(v) for v in result.elbo_history],
        "n_merges": None if result.merge is None else int(result.merge.n_merges),
        "label_mode": result.label_mode,
        "refinement_rounds": [
            {**r, "withheld": {str(g): s for g, s in r["withheld"].items()}} for r in result.rounds
        ],
        "n_rows": int(sum(r.n_rows or 0 for r in result.sites.values() if r.status == "ok")),
        "data": data_report(result),
        "sites": sites,
        "uplink_bytes": {k: v["uplink_bytes"] for k, v in sites.items()},
        "uplink_bytes_by_phase": _by_phase(result),
        "uplink_bytes_total": int(sum(v["uplink_bytes"] or 0 for v in sites.values())),
        "wall_clock": {**result.timings, **(wall_clock or {})},
        "privacy": result.privacy,
        "cluster_sizes": None if post is None else [float(c) for c in post.counts],
    }
    if result.id_map is not None:
        res["id_map"] = np.asarray(result.id_map).tolist()
    if post is not None and post.relevance is not None:
        res["variable_relevance"] = [float(c) for c in post.relevance]
        res["selected_variables"] = int((post.relevance > 0.5).sum())
    if truth is not None and labels is not None and len(labels) == len(truth):
        pred = np.concatenate([np.asarray(x) for x in labels])
        true = np.concatenate([np.asarray(t) for t in truth])
        if len(pred) == len(true):
            res["ari"], res["nmi"] = agreement(true, pred)
    return res


def write_profiles(result: FederatedResult, out_dir: str, plots: bool = True) -> list[str]:
    """``cluster_profiles.csv`` (``(G, P)`` ``E[phi]``), ``variable_relevance.csv`` with
    variable selection, and their PNG plots; returns the files written."""
    post = result.posterior
    if post is None:
        return []
    cols = column_names(post.spec)
    prof = result.cluster_profiles
    written = [os.path.join(out_dir, "cluster_profiles.csv")]
    with open(written[0], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cluster", "size", *cols])
        for g, row in enumerate(prof):
            w.writerow([g, f"{post.counts[g]:.6g}", *(f"{v:.6g}" for v in row)])
    names = list(post.spec.feature_names or [f"x{d}" for d in range(post.spec.n_features)])
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
    result: FederatedResult,
    out_dir: str,
    cfg=None,
    labels=None,
    truth=None,
    plots: bool = True,
    wall_clock: dict | None = None,
    deployment: bool = False,
    engine: str = "flower",
) -> dict:
    """Write ``results.json``, ``model.npz``, the profiles (and plots) and the resolved config
    to ``out_dir``, whatever the run's status; returns the results dict. ``deployment``: the
    config's ``data`` group (the default simulated study) did not run, so it is replaced by the
    data the sites reported. ``engine``: what ran the sites (``flower`` or ``inprocess``,
    recorded in ``results.json``)."""
    os.makedirs(out_dir, exist_ok=True)
    files = []
    try:
        files += [os.path.basename(p) for p in write_profiles(result, out_dir, plots)]
    except Exception as exc:  # a plot must not lose the results
        result.notes.append(f"profiles not written: {type(exc).__name__}: {exc}")
    res = {"engine": engine, **results_dict(result, labels, truth, wall_clock)}
    if result.model is not None:
        result.model.save(os.path.join(out_dir, "model.npz"))
        files.append("model.npz")
        res["model_file"] = "model.npz"
    if cfg is not None:
        from omegaconf import OmegaConf

        resolved = OmegaConf.to_container(cfg, resolve=True)
        if deployment:
            resolved["data"] = {"source": "sites (deployment)", **res["data"]}
        resolved["run"] = {"status": result.status, "data_reported": res["data"]}
        with open(os.path.join(out_dir, "config_resolved.yaml"), "w") as fh:
            fh.write(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        files.append("config_resolved.yaml")
    res["files"] = files
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=2, default=json_default)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    return res
