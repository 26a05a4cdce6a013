"""Collect the runs of a study (a run or a sweep directory) into one table and figures.

    python -m simulations.report multirun/2026-11-25/12-00-00     # a sweep
    python -m simulations.report outputs/2026-11-25/12-00-00      # one run

Every run directory below ``<dir>`` that holds ``comparison.csv`` (written by
``simulations.compare``) or ``results.json`` (the run alone, Flower or in-process) contributes
its rows, tagged with the run's directory, the keys it overrode (a sweep's job: one column per
key of its ``.hydra/overrides.yaml``), seed and the settings that define the study (from the
run's own config) and the engine that ran it, so that every number traces to a config and a
seed. Written into ``<dir>``:

- ``report.csv`` / ``report.md``: every method of every run (the run's own row, ``fedmerdel``,
  also has its ELBO).
- ``targets.csv`` / ``targets.md``: per run, the issue's targets: federated vs centralised
  MerDel ARI, K found vs truth, federated vs StepMix ARI and, for N >= 1e5, wall-clock (the
  in-process core, sites one after the other, and the Flower simulation, whose time includes
  the engine's start-up).
- ``ari_vs_sites.png``, ``k_found_vs_truth.png``, ``time_vs_n.png``; and, when exactly one
  numeric key is swept, ``sweep_<key>.png``: ELBO, K, ARI and wall-clock against it.

The presets call :class:`SweepReport` (a Hydra callback) at the end of a run or sweep, so the
one command that runs a study also writes its report.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from simulations.tables import COLUMNS, markdown_table, write_table

try:  # Hydra calls every hook of a callback: inherit the no-op ones when Hydra is there.
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - the report itself does not need Hydra
    _Callback = object

log = logging.getLogger("fedvi")

#: Study settings copied from each run's config into the report (column <- dotted key).
SETTINGS = {
    "source": "data.source",
    "setting": "setting",
    "likelihood": "model.likelihood",
    "k_init": "model.n_components",
    "variable_selection": "model.variable_selection",
    "split": "federation.split",
    "seed": "seed",
}
RUN_COLUMNS = ("run", *SETTINGS)
TARGET_COLUMNS = (
    "run",
    "split",
    "n_sites",
    "n_rows",
    "k_true",
    "fed_k",
    "central_k",
    "fed_ari",
    "central_ari",
    "delta_ari",
    "within_0.02",
    "k_found_true",
    "stepmix_ari",
    "fed_ge_stepmix",
    "fed_wall_s",
    "core_wall_s",
    "stepmix_wall_s",
    "core_faster_than_stepmix",
    "flower_faster_than_stepmix",
)


def _lookup(cfg: Mapping[str, Any] | None, path: str) -> Any:
    node: Any = cfg
    for key in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _number(v: Any) -> Any:
    """CSV text -> int/float/bool/None where it is one."""
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        return v
    if v in ("True", "False"):
        return v == "True"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def run_config(run_dir: str) -> dict[str, Any] | None:
    """The run's resolved config: ``comparison.json``, ``config_resolved.yaml`` or
    ``.hydra/config.yaml`` (first found)."""
    path = os.path.join(run_dir, "comparison.json")
    if os.path.exists(path):
        with open(path) as fh:
            cfg = json.load(fh).get("config")
        if cfg:
            return cfg
    for name in ("config_resolved.yaml", os.path.join(".hydra", "config.yaml")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            from omegaconf import OmegaConf

            conf = OmegaConf.load(path)
            try:
                return OmegaConf.to_container(conf, resolve=True)
            except Exception:  # noqa: BLE001 - unresolvable interpolations: keep them raw
                return OmegaConf.to_container(conf, resolve=False)
    return None


def run_overrides(run_dir: str) -> dict[str, Any]:
    """The overrides a Hydra job ran with (``.hydra/overrides.yaml``): dotted key -> value
    (``+``/``++``/``~`` prefixes dropped, values parsed as YAML scalars); ``{}`` if none."""
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.exists(path):
        return {}
    import yaml

    with open(path) as fh:
        items = yaml.safe_load(fh) or []
    out: dict[str, Any] = {}
    for item in items:
        key, _, text = str(item).partition("=")
        key = key.lstrip("+~")
        if not key or key.startswith("hydra."):
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out[key] = value if value is None or isinstance(value, (bool, int, float, str)) else text
    return out


def find_runs(root: str) -> list[str]:
    """Run directories under ``root`` (itself included), in a stable natural order."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site_data", "labels", ".hydra")]
        if "comparison.csv" in filenames or "results.json" in filenames:
            runs.append(dirpath)

    def key(path: str) -> list:
        rel = os.path.relpath(path, root)
        return [int(p) if p.isdigit() else p for p in rel.split(os.sep)]

    return sorted(runs, key=key)


def run_rows(run_dir: str, root: str) -> list[dict[str, Any]]:
    """The table rows of one run: the keys it overrode (a sweep's job), its settings, the
    engine, then the method's columns and the run's ELBO (row ``fedmerdel``)."""
    cfg = run_config(run_dir)
    base: dict[str, Any] = {"run": os.path.relpath(run_dir, root)}
    for col, key in SETTINGS.items():
        base[col] = _lookup(cfg, key)
    base.update(run_overrides(run_dir))
    res = None
    if os.path.exists(os.path.join(run_dir, "results.json")):
        with open(os.path.join(run_dir, "results.json")) as fh:
            res = json.load(fh)
    base["engine"] = None if res is None else res.get("engine")
    path = os.path.join(run_dir, "comparison.csv")
    rows: list[dict[str, Any]] = []
    if os.path.exists(path):
        with open(path, newline="") as fh:
            rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    else:
        from simulations.comparators import flower_row

        n_sites = len(res.get("sites") or {}) or None
        rows = [flower_row(res, res.get("n_rows"), n_sites).row()]
        rows[0]["k_true"] = _lookup(cfg, "data.n_clusters")
    elbo = None if res is None else res.get("elbo")
    return [
        {
            **base,
            **{c: r.get(c) for c in COLUMNS},
            "elbo": elbo if r.get("method") == "fedmerdel" else None,
        }
        for r in rows
    ]


def sweep_keys(root: str) -> list[str]:
    """The keys overridden by the runs under ``root`` (first seen first): the columns a sweep
    adds to the report."""
    return list(dict.fromkeys(k for run in find_runs(root) for k in run_overrides(run)))


def swept_keys(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """The ``keys`` whose value differs between ``rows``."""
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def summary_columns(keys: Sequence[str]) -> list[str]:
    """The columns printed on the console: the run, its overridden ``keys``, the results."""
    return list(dict.fromkeys(["run", *keys, *COLUMNS[:-1], "elbo", "engine", COLUMNS[-1]]))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def collect(root: str) -> list[dict[str, Any]]:
    """All rows of all runs under ``root``."""
    rows = []
    for run in find_runs(root):
        try:
            rows += run_rows(run, root)
        except Exception as err:  # noqa: BLE001 - one broken run must not hide the others
            log.warning("report: skipping %s: %s", run, err)
    return rows


def _num(v: Any) -> float:
    return float("nan") if v is None or v == "" else float(v)


def targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: the issue's targets, measured (``None`` where a method is absent)."""
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        by = {r["method"]: r for r in rows if r["run"] == run and r.get("status") == "ok"}
        fed = by.get("fedmerdel") or by.get("fedmerdel_core")
        if fed is None:
            continue
        central, step, core = by.get("merdel_central"), by.get("stepmix"), by.get("fedmerdel_core")
        any_row = next(r for r in rows if r["run"] == run)
        t: dict[str, Any] = {
            "run": run,
            "split": any_row.get("split"),
            "n_sites": fed.get("n_sites"),
            "n_rows": fed.get("n_rows"),
            "k_true": fed.get("k_true"),
            "fed_k": fed.get("k_found"),
            "central_k": None if central is None else central.get("k_found"),
            "fed_ari": fed.get("ari"),
            "central_ari": None if central is None else central.get("ari"),
            "stepmix_ari": None if step is None else step.get("ari"),
            "fed_wall_s": fed.get("wall_s"),
            "core_wall_s": None if core is None else core.get("wall_s"),
            "stepmix_wall_s": None if step is None else step.get("wall_s"),
        }
        t["delta_ari"] = (
            None
            if t["fed_ari"] is None or t["central_ari"] is None
            else t["fed_ari"] - t["central_ari"]
        )
        t["within_0.02"] = None if t["delta_ari"] is None else bool(t["delta_ari"] >= -0.02)
        t["k_found_true"] = (
            None if t["k_true"] is None or t["fed_k"] is None else t["fed_k"] == t["k_true"]
        )
        t["fed_ge_stepmix"] = (
            None
            if t["fed_ari"] is None or t["stepmix_ari"] is None
            else bool(t["fed_ari"] >= t["stepmix_ari"])
        )
        big = t["n_rows"] is not None and t["n_rows"] >= 100_000
        for col, wall in (("core", t["core_wall_s"]), ("flower", fed.get("wall_s"))):
            if fed is core and col == "flower":
                wall = None  # no Flower row: the fed columns are the core's
            t[f"{col}_faster_than_stepmix"] = (
                bool(wall < t["stepmix_wall_s"])
                if big and wall is not None and t["stepmix_wall_s"] is not None
                else None
            )
        out.append({c: t.get(c) for c in TARGET_COLUMNS})
    return out


def _series(rows, method: str, x: str, y: str, where: Mapping[str, Any]):
    pts = [
        (_num(r.get(x)), _num(r.get(y)))
        for r in rows
        if r["method"] == method
        and r.get("status") == "ok"
        and all(r.get(k) == v for k, v in where.items())
    ]
    pts = [(a, b) for a, b in pts if np.isfinite(a) and np.isfinite(b)]
    if not pts:
        return np.array([]), np.array([])
    xs = np.array(sorted({a for a, _ in pts}))
    ys = np.array([np.mean([b for a, b in pts if a == v]) for v in xs])
    return xs, ys


def write_figures(rows: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """ARI vs number of sites, K found vs truth, wall-clock vs N (means over repeated runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    methods = list(dict.fromkeys(r["method"] for r in ok))
    groups = sorted(
        {(r.get("n_rows"), str(r.get("split"))) for r in ok}, key=lambda g: (_num(g[0]), g[1])
    )
    paths = []

    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False, sharey=True)
    for ax, (n_rows, split) in zip(axes[0], groups, strict=True):
        for i, m in enumerate(methods):
            xs, ys = _series(ok, m, "n_sites", "ari", {"n_rows": n_rows, "split": split})
            if len(xs):
                ax.plot(xs, ys, marker="o", color=f"C{i}", label=m)
        ax.set_title(f"N = {n_rows}, split {split}", fontsize=9)
        ax.set_xlabel("sites")
    axes[0, 0].set_ylabel("ARI")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ari_vs_sites.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    kt = [_num(r.get("k_true")) for r in ok]
    kf = [_num(r.get("k_found")) for r in ok]
    lim = np.nanmax(kt + kf + [1.0]) + 1
    ax.plot([0, lim], [0, lim], color="k", lw=0.7, ls="--", label="K found = true K")
    rng = np.random.default_rng(0)
    for i, m in enumerate(methods):
        pts = [(_num(r.get("k_true")), _num(r.get("k_found"))) for r in ok if r["method"] == m]
        if pts:
            a, b = np.array(pts).T
            jitter = (i - len(methods) / 2) * 0.08 + rng.uniform(-0.02, 0.02, len(a))
            ax.scatter(a + jitter, b, color=f"C{i}", s=18, label=m)
    ax.set_xlabel("true K")
    ax.set_ylabel("K found")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "k_found_vs_truth.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, m in enumerate(methods):
        xs, ys = _series(ok, m, "n_rows", "wall_s", {})
        if len(xs):
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (rows, all sites)")
    ax.set_ylabel("wall-clock (s, mean over runs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "time_vs_n.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


#: Panels of the sweep figure: column -> axis label.
SWEEP_METRICS = {"elbo": "ELBO", "k_found": "K found", "ari": "ARI", "wall_s": "wall-clock (s)"}


def sweep_figure(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], out_dir: str):
    """``sweep_<key>.png``: ELBO, K, ARI and wall-clock of each run against the swept key,
    when exactly one of the overridden ``keys`` that vary is numeric, ``seed`` aside (seeds are
    replicates: a point each, the line their mean); one line per value of the other swept keys.
    Returns the path, or ``None`` (no such key: no figure)."""
    runs = [r for r in rows if r.get("method") == "fedmerdel" and r.get("status") == "ok"]
    swept = swept_keys(runs, keys)
    numeric = [k for k in swept if all(_is_number(r.get(k)) for r in runs)]
    if len(numeric) > 1 and "seed" in numeric:
        numeric.remove("seed")
    if len(numeric) != 1:
        return None
    (x,) = numeric
    others = [k for k in swept if k not in (x, "seed")]
    metrics = [m for m in SWEEP_METRICS if any(_is_number(r.get(m)) for r in runs)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    lines = list(dict.fromkeys(tuple(r.get(k) for k in others) for r in runs))
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, line in enumerate(lines):
            where = dict(zip(others, line, strict=True))
            pts = [
                (r[x], _num(r.get(m)))
                for r in runs
                if all(r.get(k) == v for k, v in where.items()) and _is_number(r.get(m))
            ]
            if not pts:
                continue
            xs = sorted({a for a, _ in pts})
            label = ", ".join(f"{k}={v}" for k, v in where.items()) or None
            ax.plot(
                xs, [np.mean([b for a, b in pts if a == v]) for v in xs], color=f"C{i}", label=label
            )
            ax.scatter(*zip(*pts, strict=True), color=f"C{i}", s=12)
        ax.set_xlabel(x)
        ax.set_ylabel(SWEEP_METRICS[m])
    if others:
        axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"{len(runs)} runs against {x} (line: mean)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"sweep_{x}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_report(root: str, out_dir: str | None = None, plots: bool = True) -> list[dict]:
    """Collect ``root`` and write the report files into ``out_dir`` (default ``root``)."""
    out_dir = out_dir or root
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no run under {root} has comparison.csv or results.json")
    keys = sweep_keys(root)
    columns = list(dict.fromkeys(["run", *keys, *RUN_COLUMNS, "engine", *COLUMNS, "elbo"]))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    write_table(rows, out_dir, "report")
    tgt = targets(rows)
    if tgt:
        write_table(tgt, out_dir, "targets")
    if plots:
        write_figures(rows, out_dir)
        sweep_figure(rows, keys, out_dir)
    return rows


class SweepReport(_Callback):
    """Hydra callback: write the report at the end of a run or a sweep (see the presets)."""

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        self._report(_lookup_cfg(config, "hydra.runtime.output_dir", "hydra.run.dir"))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._report(_lookup_cfg(config, "hydra.sweep.dir"))

    def _report(self, root: str | None) -> None:
        if not root or not os.path.isdir(root):
            return
        try:
            rows = make_report(root, plots=True)
        except Exception as err:  # noqa: BLE001 - the runs' own outputs stay valid
            log.warning("report for %s failed: %s", root, err)
            return
        print(
            markdown_table(
                rows,
                [
                    "run",
                    *sweep_keys(root),
                    "split",
                    "method",
                    "status",
                    "k_true",
                    "k_found",
                    "ari",
                    "nmi",
                    "elbo",
                    "wall_s",
                    "engine",
                    "uplink_bytes",
                ],
            )
        )
        print(f"fedvi: report of {len(rows)} rows in {os.path.abspath(root)}/report.md")


def _lookup_cfg(config: Any, *paths: str) -> str | None:
    for path in paths:
        node = config
        try:
            for key in path.split("."):
                node = node[key]
        except Exception:  # noqa: BLE001 - missing/unresolvable keys
            continue
        if node:
            return str(node)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m simulations.report <dir> [--out DIR] [--no-plots]``."""
    ap = argparse.ArgumentParser(prog="python -m simulations.report", description=__doc__)
    ap.add_argument("dir", help="a run directory or a sweep (multirun) directory")
    ap.add_argument("--out", help="where to write the report (default: <dir>)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = ap.parse_args(argv)
    try:
        rows = make_report(args.dir, args.out, plots=not args.no_plots)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.dir
    print(markdown_table(rows, summary_columns(sweep_keys(args.dir))))
    tpath = os.path.join(out, "targets.md")
    if os.path.exists(tpath):
        with open(tpath) as fh:
            print(fh.read())
    print(f"wrote {out}/report.csv, report.md, targets.csv/md and figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
