"""Structure after refinement: federated one-shot / refined / refined with global moves against
the centralised ``MixtureVI`` at equal ``K_init``, on a heterogeneous and two real survey splits.

    python benchmarks/bench_structure.py                # 3 cases, seeds 0-2 (about 3 minutes)
    python benchmarks/bench_structure.py --quick        # digits only, seed 0
    python benchmarks/bench_structure.py --cases fair --seeds 2
    python benchmarks/bench_structure.py --floor 1      # the sites' floor at 1 (its price)
    python benchmarks/bench_structure.py --dp           # the sites' default policy (DP)
    python benchmarks/bench_structure.py --presets      # presets: moves off / on

Cases (data shipped inside packages; nothing is downloaded; docs/experiments.md describes them):

- ``digits``: scikit-learn's 1,797 8x8 digits, binarised, 5 sites split by class (each digit
  on 2 sites, so each site holds about 4 classes).
- ``fair``: statsmodels' ``fair`` survey (6,366 rows), 8 categorical items, 5 sites = age bands.
- ``anes96``: statsmodels' 1996 ANES extract (944 rows), 8 categorical items, 5 sites =
  quintiles of the population of the place of residence.

``K_init`` 20 per site and for the centralised fit. Every fit runs with the sites' noiseless
opt-out (``SitePolicy(dp_epsilon=None)``, with ``max_aggregate_releases`` raised to the run's
rounds: the default cap of 6 would refuse round 6 onwards), the disclosure floor 5 (``--floor``
changes it) and ``refine_tol=1e-6`` (refinement stops once converged; the last method runs to
``1e-8``, MixtureVI's own tolerance, in at most 200 rounds). ``--dp`` gives the sites their
default policy (DP at epsilon 1 per run) instead. For each seed ``s`` the federated fits use
``seed=s`` and the centralised fit ``MixtureVI(seed=s)`` on the pooled rows (in the sites'
order). ELBOs are compared at the same prior dimension: the centralised ELBO is re-evaluated
with the federated prior dimension ``sum_b K_init`` (the same posterior; only the Dirichlet
normaliser changes). Printed per method: mean ELBO over seeds and its difference to the
centralised one, K per seed, mean ARI against the centralised fit of the same seed, refinement
rounds run and not applied (the floor; "stopped": runs whose refinement ended on anything but
convergence or its rounds, e.g. sites that declined), moves accepted, and kB all sites sent
after the one-shot summaries. The last line per case is the centralised fit's own seed-to-seed
ARI (mean over seed pairs).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
import warnings

import numpy as np

import fedvi
from fedvi.elbo import elbo
from fedvi.metrics import adjusted_rand_index

K_INIT = 20
ROUNDS = 20
LONG = 200  # "to convergence": refinement stops at refine_tol=1e-8 (MixtureVI's own tol)
MOVES = {"refine_moves": True}
POOLED = {"refine_moves": True, "refine_start": "pooled"}
METHODS = (
    ("one-shot", {"refine_rounds": 0}),
    (f"refined ({ROUNDS} rounds)", {"refine_rounds": ROUNDS, "refine_moves": False}),
    (f"refined + merge/delete ({ROUNDS} rounds)", {"refine_rounds": ROUNDS, **MOVES}),
    (f"pooled start + merge/delete ({ROUNDS} rounds)", {"refine_rounds": ROUNDS, **POOLED}),
    (
        f"pooled start + merge/delete/split ({ROUNDS} rounds)",
        {"refine_rounds": ROUNDS, **POOLED, "refine_splits": 2},
    ),
    (
        "pooled start + merge/delete x3/split x4 (to convergence)",
        {
            "refine_rounds": LONG,
            **POOLED,
            "refine_splits": 4,
            "refine_deletes": 3,
            "refine_tol": 1e-8,
        },
    ),
)


def policies(floor: int, dp: bool):
    """The sites' policy of a table: the noiseless opt-out (``dp_epsilon=None``) with room for
    every round of the run (``max_aggregate_releases``; the default 6 would refuse round 6
    onwards), or the default policy (DP at epsilon 1 per run) at the same floor."""
    if dp:
        return fedvi.SitePolicy(min_cluster_size=floor)
    return fedvi.SitePolicy(
        dp_epsilon=None, max_aggregate_releases=LONG + 2, min_cluster_size=floor
    )


def digits_case(seed: int = 0):
    from simulations.real_data import load_digit_table, split_digits

    X, y, _ = load_digit_table("digits")
    idx = split_digits(y, 5, "by_digit", seed=seed, sites_per_digit=2)
    return [X[i] for i in idx], "bernoulli"


ANES_ITEMS = ("TVnews", "selfLR", "ClinLR", "DoleLR", "PID", "educ", "income", "vote")


def anes96_case(seed: int = 0):
    from statsmodels.datasets import anes96

    d = anes96.load_pandas().data
    cols = []
    for c in ANES_ITEMS:
        v = d[c].to_numpy()
        if c == "income":  # 24 bands -> 6 of about equal width
            v = np.minimum((v - 1) // 4, 5)
        cols.append((v - v.min()).astype(np.int64))
    X = np.column_stack(cols)
    # Quintiles by rank (many respondents share a population value): urban to rural.
    order = np.argsort(-d["popul"].to_numpy(), kind="stable")
    site = np.empty(len(X), dtype=np.int64)
    site[order] = np.arange(len(X)) * 5 // len(X)
    return [X[site == b] for b in range(5)], "categorical"


FAIR_ITEMS = (
    "rate_marriage",
    "yrs_married",
    "children",
    "religious",
    "educ",
    "occupation",
    "occupation_husb",
)


def fair_case(seed: int = 0):
    from statsmodels.datasets import fair

    d = fair.load_pandas().data
    cols = [np.unique(d[c].to_numpy(), return_inverse=True)[1] for c in FAIR_ITEMS]
    cols.append((d["affairs"].to_numpy() > 0).astype(np.int64))
    X = np.column_stack(cols).astype(np.int64)
    # Sites by the respondent's age band (not a model variable): <= 22, 27, 32, 37, 42.
    age = d["age"].to_numpy()
    site = np.searchsorted([22.0, 27.0, 32.0, 37.0], age, side="left")
    return [X[site == b] for b in range(5)], "categorical"


CASES = {"digits": digits_case, "fair": fair_case, "anes96": anes96_case}


def centralised(sites, likelihood, seeds) -> dict:
    """Per seed: the centralised fit's ELBO at the federated prior dimension, K and labels."""
    pooled = np.vstack(sites)
    prior_dim = K_INIT * len(sites)
    out = {}
    for s in seeds:
        m = fedvi.MixtureVI(likelihood, n_components=K_INIT, seed=s).fit(pooled)
        post = dataclasses.replace(m.model_.posterior, prior_dim=prior_dim)
        out[s] = (elbo(post), m.n_clusters_, m.labels_)
    return out


def run_case(name: str, seeds, floor: int = 5, dp: bool = False, methods=METHODS) -> list[str]:
    """Table rows of one case: each method over ``seeds``, then the centralised fit."""
    sites, likelihood = CASES[name]()
    central = centralised(sites, likelihood, seeds)
    kw = {"likelihood": likelihood, "n_components": K_INIT, "refine_tol": 1e-6}
    kw.update(min_cluster_size=floor, policy=policies(floor, dp))
    lines = []
    c_elbo = np.mean([central[s][0] for s in seeds])
    for method, opts in methods:
        rows = []
        for s in seeds:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fedvi.federated_fit(sites, seed=s, **{**kw, **opts})
            took = time.perf_counter() - t
            labels = np.concatenate(res.labels)
            sent = sum(
                v for rep in res.sites.values() for k, v in rep.uplink_bytes.items() if k != "local"
            )
            rows.append(
                {
                    "elbo": res.elbo,
                    "K": res.n_clusters,
                    "distinct": len(np.unique(labels)),
                    "ari": adjusted_rand_index(labels, central[s][2]),
                    "not_applied": sum(not r["applied"] for r in res.rounds),
                    # a run whose refinement ended on anything but convergence or its rounds
                    "stopped": sum(n.startswith("refinement stopped") for n in res.notes),
                    "rounds": len(res.rounds),
                    "moves": sum(r["merges"] + r["deletes"] + r["splits"] for r in res.rounds),
                    "kB": sent / 1e3,
                    "s": took,
                }
            )
        e = np.mean([r["elbo"] for r in rows])
        ks = "/".join(str(r["K"]) for r in rows)
        same = all(r["K"] == r["distinct"] for r in rows)
        stopped = sum(r["stopped"] for r in rows)
        lines.append(
            f"| {name} | {method} | {e:.1f} | {100 * (e - c_elbo) / abs(c_elbo):+.3f} % | {ks}"
            f"{'' if same else ' (!)'} | {np.mean([r['ari'] for r in rows]):.3f} | "
            f"{sum(r['rounds'] for r in rows)} / {sum(r['not_applied'] for r in rows)}"
            f"{f' ({stopped} stopped)' if stopped else ''} | "
            f"{sum(r['moves'] for r in rows)} | "
            f"{np.mean([r['kB'] for r in rows]):.1f} | {np.mean([r['s'] for r in rows]):.1f} |"
        )
    pairs = list(itertools.combinations(seeds, 2))
    s2s = [adjusted_rand_index(central[a][2], central[b][2]) for a, b in pairs]
    s2s_text = f"{np.mean(s2s):.3f}" if s2s else "- (one seed)"
    ks = "/".join(str(central[s][1]) for s in seeds)
    lines.append(
        f"| {name} | centralised MixtureVI | {c_elbo:.1f} | 0 | {ks} | seed-to-seed "
        f"{s2s_text} | | | | |"
    )
    return lines


#: Well-separated presets (their sites as ``python -m simulations.run +experiment=<preset>``
#: builds them) for ``--presets``: the default refinement with and without moves.
PRESETS = [
    ("sim4", ["federation.split=iid"]),
    ("sim4", ["federation.split=dirichlet"]),
    ("sim4", ["federation.split=exclusive"]),
    ("sim4_skewed", ["data.n_rows=2000"]),
    ("sim5", ["federation.split=iid"]),
    ("sim5", ["federation.split=dirichlet"]),
    ("categorical", ["setting=a"]),
    ("digits", ["federation.split=random"]),
]


def presets_table() -> list[str]:
    """K, ARI against the truth and ELBO of the default run (3 rounds) with ``refine_moves``
    off and on, noiseless sites, on the presets."""
    from bench_refine import preset_sites  # this folder, on the path when run as a script

    lines = [
        "| preset | overrides | moves off: K / ARI / ELBO | moves on: K / ARI / ELBO |",
        "|---|---|---|---|",
    ]
    for preset, overrides in PRESETS:
        sites, z, s, kw = preset_sites(preset, overrides)
        kw["policy"] = fedvi.SitePolicy(dp_epsilon=None)
        cells = []
        for moves in (False, True):
            res = fedvi.federated_fit(sites, seed=s.seed, refine_moves=moves, **kw)
            ari = adjusted_rand_index(z, np.concatenate(res.labels))
            cells.append(f"{res.n_clusters} / {ari:.4f} / {res.elbo:.1f}")
        lines.append(f"| {preset} | {' '.join(overrides)} | {cells[0]} | {cells[1]} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="digits only, seed 0")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--floor", type=int, default=5, help="the sites' disclosure floor (min_cluster_size)"
    )
    p.add_argument(
        "--dp",
        action="store_true",
        help="the sites' default policy (DP noise at epsilon 1 per run) instead of the "
        "noiseless opt-out",
    )
    p.add_argument(
        "--presets",
        action="store_true",
        help="only the well-separated presets, default refinement with moves off and on",
    )
    args = p.parse_args(argv)
    if args.presets:
        print("\n".join(presets_table()))
        return
    cases = ["digits"] if args.quick else args.cases
    seeds = [0] if args.quick else list(range(args.seeds))
    policy = "default policy (DP, epsilon 1 per run)" if args.dp else "noiseless opt-out"
    print(f"sites: {policy}, disclosure floor {args.floor}; seeds {seeds}")
    print(
        "| case | method | ELBO (mean) | vs centralised | K per seed | ARI vs centralised | "
        "rounds run / not applied | moves accepted | kB after one-shot | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in cases:
        for line in run_case(name, seeds, args.floor, args.dp):
            print(line, flush=True)


if __name__ == "__main__":
    main()
