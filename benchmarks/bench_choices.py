"""Measurements behind three defaults: the move schedule, the delete candidate rule and the
labelling mode. Prints one table per choice, averaged over seeds.

    python benchmarks/bench_choices.py [--seeds 5]

1. Move schedule (``moves=``): "merdel" (ours: every pair with a positive summary-only gain
   per sweep) vs "paper" (one merge + one delete proposal every 5 iterations) vs "none".
2. Delete candidate: smallest cluster first vs largest first.
3. Labels after the one-shot global merge (``refine_rounds=0``: "map" labels need it):
   "posterior" (local step under the global posterior) vs "map" (global id of the local
   arg-max), on skewed splits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fedvi
from fedvi.metrics import adjusted_rand_index
from fedvi.simulate import simulate, split_sites

SIM4 = dict(n_rows=10_000, n_clusters=8, n_features=100, weights=[0.2, 0.2] + [0.1] * 6)


def schedules(seeds: list[int]) -> None:
    print("\n1. move schedule (sim4 design, pooled, K_init=15)")
    print(f"{'moves':>8} {'fit s':>7} {'iters':>6} {'K':>5} {'ARI':>7} {'ELBO - best':>12}")
    rows = {m: [] for m in ("merdel", "paper", "none")}
    for seed in seeds:
        data = simulate(**SIM4, seed=seed)
        fits = {}
        for m in rows:
            t = time.perf_counter()
            fit = fedvi.MixtureVI(n_components=15, moves=m, seed=seed).fit(data.X)
            fits[m] = (time.perf_counter() - t, fit)
        best = max(f.elbo_ for _, f in fits.values())
        for m, (s, f) in fits.items():
            rows[m].append(
                (
                    s,
                    f.n_iter_,
                    f.n_clusters_,
                    adjusted_rand_index(data.z, f.labels_),
                    f.elbo_ - best,
                )
            )
    for m, r in rows.items():
        a = np.mean(r, axis=0)
        print(f"{m:>8} {a[0]:>7.2f} {a[1]:>6.0f} {a[2]:>5.1f} {a[3]:>7.4f} {a[4]:>12.1f}")


def delete_rule(seeds: list[int]) -> None:
    print("\n2. delete candidate rule (sim4 design, pooled, K_init=20, paper schedule)")
    print(
        f"{'rule':>9} {'fit s':>7} {'K':>5} {'ARI':>7} {'deletes ok/tried':>17} {'ELBO - best':>12}"
    )
    out = {"smallest": [], "largest": []}
    for seed in seeds:
        data = simulate(**SIM4, seed=seed)
        res = {}
        for name in out:
            t = time.perf_counter()
            f = fedvi.MixtureVI(n_components=20, moves="paper", delete_order=name, seed=seed)
            f.fit(data.X)
            res[name] = (time.perf_counter() - t, f)
        best = max(f.elbo_ for _, f in res.values())
        for name, (s, f) in res.items():
            out[name].append(
                (
                    s,
                    f.n_clusters_,
                    adjusted_rand_index(data.z, f.labels_),
                    f.moves_["delete_accepted"],
                    f.moves_["delete_tried"],
                    f.elbo_ - best,
                )
            )
    for name, r in out.items():
        a = np.mean(r, axis=0)
        print(
            f"{name:>9} {a[0]:>7.2f} {a[1]:>5.1f} {a[2]:>7.4f} "
            f"{a[3]:>8.1f}/{a[4]:<8.1f} {a[5]:>12.1f}"
        )


def labelling(seeds: list[int]) -> None:
    print("\n3. labelling after the one-shot global merge (sim4 design, 5 sites, no refinement)")
    print(f"{'split':>10} {'labels':>10} {'ARI':>7} {'K':>5}")
    for split in ("iid", "dirichlet", "exclusive"):
        out = {"posterior": [], "map": []}
        for seed in seeds:
            data = simulate(**SIM4, seed=seed)
            parts = split_sites(data.z, 5, split, seed=seed)
            z = np.concatenate([data.z[p] for p in parts])
            for mode in out:
                r = fedvi.federated_fit(
                    [data.X[p] for p in parts],
                    n_components=15,
                    label_mode=mode,
                    refine_rounds=0,
                    seed=seed,
                )
                out[mode].append((adjusted_rand_index(z, np.concatenate(r.labels)), r.n_clusters))
        for mode, r in out.items():
            a = np.mean(r, axis=0)
            print(f"{split:>10} {mode:>10} {a[0]:>7.4f} {a[1]:>5.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    seeds = list(range(p.parse_args().seeds))
    schedules(seeds)
    delete_rule(seeds)
    labelling(seeds)


if __name__ == "__main__":
    main()
