"""One-shot FedMerDel against 1, 3 and 5 refinement rounds, on the presets: the measurement
behind the default of ``refine_rounds``.

    python benchmarks/bench_refine.py                 # every preset below
    python benchmarks/bench_refine.py --quick         # sim4 only

For each preset (its sites as ``python -m simulations.run +experiment=<preset>`` builds them),
``fedvi.federated_fit`` in-process with ``refine_rounds`` = 0, 1, 3, 5 (the simulated sites'
own policy, ``configs/site``: floor 5, no DP noise), and centralised MerDel on the pooled rows
for reference. Prints K, ARI, the final global ELBO, the bytes all sites sent (local summaries
+ refinement statistics + label counts) and the seconds (sites one after the other, in one
process).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fedvi
from fedvi.metrics import adjusted_rand_index
from simulations.data import load_sites
from strategies.config import RunSettings, compose_config

PRESETS = [
    ("sim4", ["federation.split=iid"]),
    ("sim4", ["federation.split=dirichlet"]),
    ("sim4", ["federation.split=exclusive"]),
    ("sim5", ["federation.split=iid"]),
    ("sim5", ["federation.split=dirichlet"]),
    ("categorical", ["setting=a"]),
    ("varsel", ["setting=a"]),
    ("mnist", ["federation.split=random"]),
    ("mnist", ["federation.split=by_digit"]),
    ("digits", ["federation.split=random"]),
]
ROUNDS = (0, 1, 3, 5)


def preset_sites(preset: str, overrides: list[str]):
    """``(sites, truth (N,), s, kw)``: a preset's sites as ``python -m simulations.run
    +experiment=<preset>`` builds them, its true labels pooled, its ``RunSettings`` and the
    model settings ``federated_fit`` and ``MixtureVI`` take."""
    cfg = compose_config("config", [f"+experiment={preset}", *overrides])
    sites, truth, _ = load_sites(cfg)
    s = RunSettings.from_cfg(cfg)
    kw = {
        "likelihood": s.spec.likelihood,
        "n_components": s.spec.n_components,
        "variable_selection": s.spec.variable_selection,
    }
    return sites, np.concatenate(truth), s, kw


def one(preset: str, overrides: list[str]) -> list[dict]:
    sites, z, s, kw = preset_sites(preset, overrides)
    rows = []
    for r in ROUNDS:
        t = time.perf_counter()
        # The simulated sites' own policy (configs/site): noiseless, as the presets run; under a
        # deployed site's default DP budget these sites would decline refinement.
        res = fedvi.federated_fit(sites, seed=s.seed, refine_rounds=r, policy=s.site, **kw)
        took = time.perf_counter() - t
        sent = sum(sum(rep.uplink_bytes.values()) for rep in res.sites.values())
        rows.append(
            {
                "method": f"refine {r}" if r else "one-shot",
                "K": res.n_clusters,
                "ARI": adjusted_rand_index(z, np.concatenate(res.labels)),
                "ELBO": res.elbo,
                "kB": sent / 1e3,
                "s": took,
                "rounds": len(res.elbo_history) - 2,
                "requested": r,
            }
        )
    t = time.perf_counter()
    central = fedvi.MixtureVI(seed=s.seed, **kw).fit(np.vstack(sites))
    rows.append(
        {
            "method": "centralised",
            "K": central.n_clusters_,
            "ARI": adjusted_rand_index(z, central.labels_),
            "ELBO": central.elbo_,
            "kB": float("nan"),
            "s": time.perf_counter() - t,
            "rounds": 0,
            "requested": 0,
        }
    )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="sim4 (iid) only")
    args = p.parse_args(argv)
    presets = PRESETS[:1] if args.quick else PRESETS
    print("| preset | split | method | K | ARI | ELBO | uplink kB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, overrides in presets:
        split = " ".join(o.split("=")[1] for o in overrides)
        for row in one(preset, overrides):
            stopped = row["rounds"] not in (0, row["requested"])
            applied = f" ({row['rounds']} applied)" if stopped else ""
            print(
                f"| {preset} | {split} | {row['method']}{applied} | {row['K']} | "
                f"{row['ARI']:.4f} | {row['ELBO']:.1f} | {row['kB']:.1f} | {row['s']:.1f} |"
            )


if __name__ == "__main__":
    main()
