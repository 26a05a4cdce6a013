"""``python -m fedvi``: label a site's rows with a fitted model, or run a quick in-process demo.

    python -m fedvi label --model model.npz --data new.csv --out labels.csv
    python -m fedvi label --model extended.npz --relabel old_labels.csv --out labels.csv
    python -m fedvi demo --sites 5 --rows 10000

``label`` runs on the site, on its own rows only: it reads the model file (the global
posterior, no data), validates the table against the model's schema (columns matched by name
where the file has a header) and writes each row's global cluster. With ``--relabel`` it
instead renumbers a labels file written under the model that :func:`fedvi.extend` extended
(the extended model records the old-to-new ids), so an earlier site's labels need no new
pass over its rows. ``demo`` (the default)
clusters a built-in simulated study over several sites in one process.
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
    dem = sub.add_parser("demo", help="cluster a simulated study over several sites, in process")
    dem.add_argument("--rows", type=int, default=10_000)
    dem.add_argument("--clusters", type=int, default=8)
    dem.add_argument("--features", type=int, default=100)
    dem.add_argument("--sites", type=int, default=5)
    dem.add_argument("--split", default="dirichlet", choices=["iid", "dirichlet", "exclusive"])
    dem.add_argument("--seed", type=int, default=0)
    dem.add_argument("--save", default=None, help="write the fitted model to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    args = p.parse_args(argv)
    return label(args) if args.command == "label" else demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
