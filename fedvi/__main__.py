"""``python -m fedvi``: label a site's rows with a fitted model, print a site's release ledger,
or run a quick in-process demo.

    python -m fedvi label --model model.npz --data new.csv --out labels.csv
    python -m fedvi ledger --state-dir /secure/fedvi-state
    python -m fedvi label --model extended.npz --relabel old_labels.csv --out labels.csv
    python -m fedvi demo --sites 5 --rows 10000
    python -m fedvi app-hash path/to/fedvi-app
    python -m fedvi site --app-sha256 <hash> --superlink host:port --port 9094 --node-config ...

``label`` runs on the site, on its own rows only: it reads the model file (the global
posterior, no data), validates the table against the model's schema (columns matched by name
where the file has a header) and writes each row's global cluster. With ``--relabel`` it
instead renumbers a labels file written under the model that :func:`fedvi.extend` extended
(the extended model records the old-to-new ids), so an earlier site's labels need no new
pass over its rows. ``demo`` (the default)
clusters a built-in simulated study over several sites in one process. ``ledger`` prints the
site's audit log (one line per release and refusal, :mod:`fedvi.ledger`) as a table, with the
totals of the last period (releases, refusals, runs, epsilon spent). ``app-hash`` prints the
sha256 of the Flower app bundle built from an app folder (what ``flwr run`` ships); ``site``
runs the site's SuperNode so that it runs only the app with that hash (docs/app-pin.md; every
option after ``--app-sha256`` goes to ``flower-supernode``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np


def _write(path: str, labels: np.ndarray, model: str | None = None) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        np.save(path, labels)
        return path
    if ext == ".parquet":
        from fedvi.io import write_table

        return write_table(path, labels[:, None], feature_names=["cluster"])
    from fedvi.io import write_labels

    return write_labels(path, labels, model=model)


def _read_labels(path: str) -> np.ndarray:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.int64).ravel()
    if ext == ".parquet":
        from fedvi.io import read_column

        return np.asarray(read_column(path, "cluster"), dtype=np.int64)
    from fedvi.io import read_labels

    return read_labels(path)


def relabel(args) -> int:
    """Renumber an old labels file with the id map an extended model records."""
    from fedvi.model import ModelFileError, load_model

    try:
        model = load_model(args.model)
        old = _read_labels(args.relabel)
    except (ModelFileError, OSError, ValueError) as exc:
        print(f"fedvi label: {exc}", file=sys.stderr)
        return 2
    info = model.info.get("id_map")
    if not info:
        print(
            f"fedvi label: {args.model} records no id map (only a model made by fedvi.extend "
            "does): label the rows with --data instead",
            file=sys.stderr,
        )
        return 2
    id_map = np.asarray(info["map"], dtype=np.int64)
    bad = (old < 0) | (old >= len(id_map))
    if bad.any():
        print(
            f"fedvi label: {args.relabel} has {int(bad.sum())} label(s) outside the "
            f"{len(id_map)} clusters of the model that was extended (first: "
            f"{int(old[bad][0])}); is it a labels file of that model?",
            file=sys.stderr,
        )
        return 2
    new = id_map[old]
    from fedvi.label_files import model_hash

    out = _write(args.out, new, model=model_hash(model.posterior))
    lost = int((new < 0).sum())
    print(
        f"fedvi label: {len(new)} labels of {args.relabel} renumbered to the clusters of "
        f"{args.model}; written to {out}"
        + (f" ({lost} rows were in removed clusters: -1; label them with --data)" if lost else "")
    )
    return 0


def label(args) -> int:
    if args.relabel:
        return relabel(args)
    if not args.data:
        print(
            "fedvi label: give --data (a table to label) or --relabel (a labels file)",
            file=sys.stderr,
        )
        return 2
    from fedvi.data import DataError, encode
    from fedvi.io import read_table
    from fedvi.label_files import model_hash
    from fedvi.labels import label_counts, label_rows
    from fedvi.model import ModelFileError, load_model

    try:
        model = load_model(args.model)
        spec = model.spec
        if args.missing:
            spec = dataclasses.replace(spec, missing=args.missing)
        table = read_table(args.data, label_column=args.label_column, missing=spec.missing)
        data = encode(table, spec, source=args.data)
    except (ModelFileError, DataError, OSError) as exc:  # a file's DataFileError is a DataError
        print(f"fedvi label: {exc}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    labels = label_rows(data, model.posterior)
    digest = model_hash(model.posterior)  # as in the run's own label files
    out = _write(args.out, labels, digest)
    used = label_counts(labels, model.n_clusters)
    print(
        f"fedvi label: {len(labels)} rows of {args.data} labelled with the {model.n_clusters} "
        f"clusters of {args.model} in {time.perf_counter() - t:.2f} s "
        f"({int((used > 0).sum())} clusters used; model {digest}); written to {out}"
    )
    return 0


def ledger(args) -> int:
    from fedvi.ledger import LEDGER_FILE, Ledger, LedgerError, format_table, totals
    from fedvi.privacy import epsilon_for

    path = os.path.join(args.state_dir, LEDGER_FILE)
    if not os.path.exists(path):
        print(f"fedvi ledger: no ledger at {path}", file=sys.stderr)
        return 2
    book = Ledger(args.state_dir)
    try:
        entries = book.entries()
        recent = book.since(args.period_days * 86400.0)
    except LedgerError as exc:
        print(f"fedvi ledger: {exc}", file=sys.stderr)
        return 2
    print(format_table(entries))
    t = totals(recent)
    deltas = [e["delta"] for e in recent if e.get("delta")]
    eps = epsilon_for(t["rho"], max(deltas)) if deltas and t["rho"] > 0 else 0.0
    print(
        f"\nlast {args.period_days:g} days: {t['releases']} releases, {t['refusals']} refusals, "
        f"{t['runs']} runs; epsilon spent {eps:.3g} (zCDP rho {t['rho']:.3g})"
    )
    return 0


def demo(args) -> int:
    from fedvi.federated import federated_fit
    from fedvi.metrics import adjusted_rand_index
    from fedvi.simulate import simulate, split_sites

    data = simulate(
        args.rows,
        args.clusters,
        args.features,
        weights=[0.2, 0.2] + [0.1] * 6 if args.clusters == 8 else None,
        seed=args.seed,
    )
    parts = split_sites(data.z, args.sites, args.split, seed=args.seed)
    t = time.perf_counter()
    res = federated_fit([data.X[p] for p in parts], seed=args.seed)
    took = time.perf_counter() - t
    truth = np.concatenate([data.z[p] for p in parts])
    ari = adjusted_rand_index(truth, np.concatenate(res.labels))
    print(f"{args.sites} sites, {args.rows} rows, {args.features} variables, split={args.split}")
    print(
        f"clusters found: {res.n_clusters} (truth {args.clusters}); ARI {ari:.4f}; "
        f"ELBO {res.elbo:.2f}; {took:.2f} s"
    )
    print("local clusters sent per site:", [s.n_clusters for s in res.site_summaries])
    print("uplink bytes per site:", res.uplink_bytes)
    if args.save:
        print("model saved to", res.model.save(args.save))
    return 0


def app_hash(args) -> int:
    from fedvi.flower.app_pin import app_hash as fab_hash

    try:
        print(fab_hash(args.folder))
    except (OSError, ValueError) as exc:
        print(f"fedvi app-hash: {args.folder}: {exc}", file=sys.stderr)
        return 2
    return 0


def site(argv: list[str]) -> int:
    from fedvi.flower.app_pin import run_site

    p = argparse.ArgumentParser(
        prog="python -m fedvi site",
        description="Run flower-supernode --isolation process and start each ClientApp with "
        "this site's app pin; the other options go to flower-supernode.",
    )
    p.add_argument("--app-sha256", required=True, help="sha256 of the app this site runs")
    args, supernode_args = p.parse_known_args(argv)
    return run_site(args.app_sha256, supernode_args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedvi", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    lab = sub.add_parser("label", help="label a table's rows with a fitted model (on the site)")
    lab.add_argument("--model", required=True, help="model file (model.npz of a run)")
    lab.add_argument("--data", help="the table: .csv, .parquet, .npy or .npz")
    lab.add_argument(
        "--relabel",
        default=None,
        help="an old site's labels file (.csv, .parquet, .npy) to renumber to the ids of a "
        "model made by fedvi.extend (instead of --data)",
    )
    lab.add_argument(
        "--out", required=True, help="labels file: .csv (row,cluster,model), .parquet, .npy"
    )
    lab.add_argument("--label-column", default=None, help="a column to leave out (known labels)")
    lab.add_argument(
        "--missing",
        choices=["error", "ignore"],
        default=None,
        help="how to treat missing cells (default: as the model was fitted)",
    )
    led = sub.add_parser("ledger", help="print a site's release ledger as a table (on the site)")
    led.add_argument("--state-dir", required=True, help="the site's state folder (state-dir)")
    led.add_argument("--period-days", type=float, default=30.0, help="period of the totals")
    dem = sub.add_parser("demo", help="cluster a simulated study over several sites, in process")
    dem.add_argument("--rows", type=int, default=10_000)
    dem.add_argument("--clusters", type=int, default=8)
    dem.add_argument("--features", type=int, default=100)
    dem.add_argument("--sites", type=int, default=5)
    dem.add_argument("--split", default="dirichlet", choices=["iid", "dirichlet", "exclusive"])
    dem.add_argument("--seed", type=int, default=0)
    dem.add_argument("--save", default=None, help="write the fitted model to this file")
    ah = sub.add_parser("app-hash", help="sha256 of the Flower app bundle of an app folder")
    ah.add_argument("folder", nargs="?", default=".", help="the app folder (default: .)")
    sub.add_parser(
        "site",
        help="run this site's SuperNode pinned to one app: --app-sha256 <hash> plus "
        "flower-supernode's own options",
        add_help=False,
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "site":
        return site(argv[1:])
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    args = p.parse_args(argv)
    commands = {"label": label, "ledger": ledger, "app-hash": app_hash}
    return commands.get(args.command, demo)(args)


if __name__ == "__main__":
    raise SystemExit(main())
