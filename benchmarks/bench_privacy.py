"""What secure aggregation and differential privacy cost: ARI and ELBO of the sim4 and
categorical presets with 3 refinement rounds, plain, with SecAgg+ and with DP at several
epsilon, over seeds. Prints a Markdown table and writes ``privacy.png``.

    python benchmarks/bench_privacy.py                    # sim4 + categorical a, seeds 0-2
    python benchmarks/bench_privacy.py --quick            # sim4, seed 0, epsilon 1 and 8
    python benchmarks/bench_privacy.py --out /tmp/priv    # where privacy.png goes
    python benchmarks/bench_privacy.py --rows 1000 10000 100000   # the default-epsilon table

``--rows``: ARI and exact ELBO against epsilon and rows per site on the presets (each site's
default policy but its ``dp_epsilon``; ``noiseless``: ``dp_epsilon=None``). ``forced``: every
site refines whatever its size; ``default``: a site too small for its budget declines
refinement (``fedvi.privacy.refinement_useful``). ``rows/sigma``: a site's rows over the noise
scale of one cluster's sums in one refinement release (the rule's figure). This is the table
in docs/privacy.md that chose ``SitePolicy.dp_epsilon``'s default.

- plain: ``fedvi.federated_fit`` (the Flower run gives the same clusters bit for bit).
- SecAgg+: ``python -m simulations.run ... strategy.secure_aggregation=true`` (Flower's
  simulation engine; secure aggregation exists only there); the table also gives the relative
  difference of its global ELBO from the plain run's (the error of the fixed-point sums).
- DP: ``federated_fit(..., dp_epsilon=eps)``: each site's refinement statistics and label
  counts carry Gaussian noise for (eps, 1e-5)-DP over those releases (the one-shot summaries do
  not; see docs/privacy.md).

ELBO "exact": under DP the server's ELBO is that of noisy statistics, so every method is
scored the same way: one local step of every row under the final posterior, and the ELBO of
those responsibilities' statistics (computed here, with all the rows in one place).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import fedvi
from fedvi.metrics import adjusted_rand_index
from simulations.data import load_sites
from strategies.config import RunSettings, compose_config

PRESETS = {
    "sim4": ["+experiment=sim4", "federation.split=iid"],
    "categorical a": ["+experiment=categorical", "setting=a"],
}
EPSILONS = (0.5, 1.0, 2.0, 8.0)
ROUNDS = 3


def exact_elbo(posterior, sites) -> float:
    """ELBO of every row's local step under ``posterior`` (statistics pooled over sites)."""
    parts = [
        fedvi.refinement_stats(fedvi.encode(X, posterior.spec), posterior, floor=1, restrict=False)
        for X in sites
    ]
    pooled = fedvi.Summaries.add(parts, like=posterior)
    return fedvi.elbo(pooled)


def secagg_run(overrides, seed: int, out: str):
    args = [
        *overrides,
        f"seed={seed}",
        f"strategy.refine_rounds={ROUNDS}",
        "plots=false",
        "strategy.secure_aggregation=true",
        "hydra.mode=RUN",  # a sweeping preset (categorical) runs its one job here
        "comparators=null",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


RATE_EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0)


def rows_table(rows_per_site, seeds, epsilons=RATE_EPSILONS, presets=PRESETS) -> None:
    """Print the epsilon x rows-per-site table (Markdown) on ``presets``."""
    import fedvi.privacy as privacy
    from fedvi.policy import SitePolicy

    useful = privacy.USEFUL_ROWS_PER_SIGMA
    print(
        "| preset | rows/site | epsilon | rows/sigma | ARI noiseless | ARI DP forced | "
        "dARI forced | ARI DP default | dARI default | ELBO gap forced (per row) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, overrides in presets.items():
        for n in rows_per_site:
            res = {}
            for seed in seeds:
                sites_n = compose_config("config", [*overrides, f"seed={seed}"]).federation.sites
                cfg = compose_config(
                    "config", [*overrides, f"seed={seed}", f"data.n_rows={n * int(sites_n)}"]
                )
                sites, truth, _ = load_sites(cfg)
                s = RunSettings.from_cfg(cfg)
                z = np.concatenate(truth)
                D = sites[0].shape[1]
                kw = {
                    "likelihood": s.spec.likelihood,
                    "n_components": s.spec.n_components,
                    "refine_rounds": ROUNDS,
                    "seed": seed,
                }
                total = sum(x.shape[0] for x in sites)

                def run(eps, rule, seed=seed, sites=sites, z=z, kw=kw, total=total):
                    pol = SitePolicy(dp_epsilon=eps, dp_epsilon_period=max(4.0, eps or 4.0))
                    privacy.USEFUL_ROWS_PER_SIGMA = rule
                    try:
                        r = fedvi.federated_fit(
                            sites, policy=pol, noise_rng=np.random.default_rng(seed), **kw
                        )
                    finally:
                        privacy.USEFUL_ROWS_PER_SIGMA = useful
                    ari = adjusted_rand_index(z, np.concatenate(r.labels))
                    return ari, exact_elbo(r.posterior, sites) / total

                base = run(None, useful)
                res.setdefault("plain", []).append(base)
                for eps in epsilons:
                    srv = fedvi.ServerOptions(refine_rounds=ROUNDS)
                    pol = SitePolicy(dp_epsilon=eps, dp_epsilon_period=max(4.0, eps))
                    delta = min(1.0 / n, srv.dp_delta)  # the site's 1/N, lowered by the run's
                    rho = privacy.rho_for(eps, delta) / privacy.planned_releases(pol, srv)
                    sigma = privacy.gaussian_sigma(np.sqrt(D), rho / privacy.refine_blocks())
                    forced = run(eps, 0.0)
                    declines = not privacy.refinement_useful(n, D, rho)
                    default = run(eps, useful) if declines else forced
                    res.setdefault(eps, []).append((forced, default, n / sigma))
                print(f"{name} {n} seed {seed} done", file=sys.stderr, flush=True)
            plain_ari = np.mean([b[0] for b in res["plain"]])
            plain_elbo = np.mean([b[1] for b in res["plain"]])
            for eps in epsilons:
                f_ari = np.mean([r[0][0] for r in res[eps]])
                f_elbo = np.mean([r[0][1] for r in res[eps]])
                d_ari = np.mean([r[1][0] for r in res[eps]])
                ratio = res[eps][0][2]
                print(
                    f"| {name} | {n} | {eps:g} | {ratio:.0f} | {plain_ari:.4f} | {f_ari:.4f} | "
                    f"{f_ari - plain_ari:+.4f} | {d_ari:.4f} | {d_ari - plain_ari:+.4f} | "
                    f"{f_elbo - plain_elbo:+.4f} |",
                    flush=True,
                )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=".")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", type=int, nargs="+", default=None, help="rows per site (table)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--epsilons", type=float, nargs="+", default=list(RATE_EPSILONS))
    args = p.parse_args(argv)
    if args.rows:
        presets = {k: PRESETS[k] for k in args.presets}
        rows_table(args.rows, args.seeds, args.epsilons, presets)
        return
    presets = {"sim4": PRESETS["sim4"]} if args.quick else PRESETS
    epsilons = (1.0, 8.0) if args.quick else EPSILONS
    seeds = [0] if args.quick else args.seeds
    rows = []
    for name, overrides in presets.items():
        for seed in seeds:
            cfg = compose_config("config", [*overrides, f"seed={seed}"])
            sites, truth, _ = load_sites(cfg)
            s = RunSettings.from_cfg(cfg)
            z = np.concatenate(truth)
            kw = {
                "likelihood": s.spec.likelihood,
                "n_components": s.spec.n_components,
                "refine_rounds": ROUNDS,
                "seed": seed,
            }
            noiseless = fedvi.SitePolicy(dp_epsilon=None)
            plain = fedvi.federated_fit(sites, policy=noiseless, **kw)
            rows.append(
                (
                    name,
                    seed,
                    "plain",
                    adjusted_rand_index(z, np.concatenate(plain.labels)),
                    exact_elbo(plain.posterior, sites),
                    plain.n_clusters,
                    None,
                )
            )
            with tempfile.TemporaryDirectory() as tmp:
                sec = secagg_run(overrides, seed, tmp)
            rel = abs(sec["elbo"] - plain.elbo) / abs(plain.elbo)
            rows.append((name, seed, "SecAgg+", sec["ari"], float("nan"), sec["n_clusters"], rel))
            for eps in epsilons:
                pol = fedvi.SitePolicy(dp_epsilon=eps, dp_epsilon_period=max(4.0, eps))
                dp = fedvi.federated_fit(sites, policy=pol, **kw)
                rows.append(
                    (
                        name,
                        seed,
                        f"DP eps={eps:g}",
                        adjusted_rand_index(z, np.concatenate(dp.labels)),
                        exact_elbo(dp.posterior, sites),
                        dp.n_clusters,
                        None,
                    )
                )
            print(f"{name} seed {seed} done", file=sys.stderr, flush=True)
    methods = ["plain", "SecAgg+", *(f"DP eps={e:g}" for e in epsilons)]
    print(
        "| preset | method | ARI (mean over seeds) | min ARI | ELBO exact - plain (mean) | K |"
        " SecAgg ELBO rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for name in presets:
        base = {r[1]: r[4] for r in rows if r[0] == name and r[2] == "plain"}
        for m in methods:
            sel = [r for r in rows if r[0] == name and r[2] == m]
            aris = [r[3] for r in sel]
            gaps = [r[4] - base[r[1]] for r in sel if np.isfinite(r[4])]
            ks = sorted({r[5] for r in sel})
            rel = max((r[6] for r in sel if r[6] is not None), default=None)
            summary[(name, m)] = (np.mean(aris), np.mean(gaps) if gaps else np.nan)
            print(
                f"| {name} | {m} | {np.mean(aris):.4f} | {np.min(aris):.4f} | "
                f"{np.mean(gaps) if gaps else float('nan'):.1f} | {ks} | "
                f"{'' if rel is None else f'{rel:.1e}'} |"
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in presets:
        x = list(epsilons)
        axes[0].plot(x, [summary[(name, f"DP eps={e:g}")][0] for e in x], "o-", label=f"{name}, DP")
        axes[0].axhline(summary[(name, "plain")][0], ls="--", lw=1, color="k")
        axes[0].axhline(summary[(name, "SecAgg+")][0], ls=":", lw=1, color="C3")
        axes[1].plot(x, [summary[(name, f"DP eps={e:g}")][1] for e in x], "o-", label=name)
    axes[0].set(
        xscale="log",
        xlabel="epsilon (per site, refinement + labels)",
        ylabel="ARI",
        title="ARI (dashed: plain; dotted: SecAgg+)",
    )
    axes[1].axhline(0, ls="--", lw=1, color="k")
    axes[1].set(
        xscale="log",
        xlabel="epsilon",
        ylabel="exact ELBO minus plain run's",
        title="ELBO of the final posterior",
    )
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "privacy.png")
    fig.savefig(path, dpi=100)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
