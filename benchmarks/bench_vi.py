"""Speed and memory of local VI for growing N (D=100, K_init=20).

Prints, per N: seconds per VI iteration, the cost ratio of one iteration to one dense
``X @ W.T`` of the same shape, total fit time (k-modes init + MerDel to convergence), and the
peak resident memory of a fresh process doing the fit. Each N runs in its own subprocess so
that peak memory is per size.

    python benchmarks/bench_vi.py                 # N = 1e4, 1e5, 1e6
    python benchmarks/bench_vi.py --sizes 10000 30000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def one_size(n_rows: int, n_features: int, k_init: int, likelihood: str, sparse: bool) -> dict:
    import scipy.sparse as sp

    from fedvi.data import encode
    from fedvi.merdel import FitOptions
    from fedvi.mixture import fit_problem
    from fedvi.simulate import simulate
    from fedvi.spec import MixtureSpec
    from fedvi.vi import Problem, initial_state, iterate

    data = simulate(n_rows, 10, n_features, likelihood=likelihood, n_levels=3, seed=0)
    X = sp.csr_matrix(data.X) if sparse else data.X
    enc = encode(X, likelihood)
    spec = MixtureSpec(likelihood, tuple(enc.n_levels))
    problem = Problem.build(enc.matrix, spec, k_init)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k_init, size=n_rows)
    state = initial_state(problem, labels, k_init)
    iterate(problem, state)  # warm-up
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        state = iterate(problem, state)
    per_iter = (time.perf_counter() - t) / reps
    # One dense product of the same shape: (N, P) @ (P, K).
    Xd = enc.matrix.toarray() if sp.issparse(enc.matrix) else enc.matrix
    W = rng.standard_normal((k_init, Xd.shape[1]))
    Xd @ W.T
    t = time.perf_counter()
    for _ in range(reps):
        Xd @ W.T
    matmul = (time.perf_counter() - t) / reps
    del Xd
    t = time.perf_counter()
    fit_state, trace = fit_problem(problem, FitOptions(), seed=0)
    total = time.perf_counter() - t
    return {
        "N": n_rows,
        "likelihood": likelihood + (" (CSR)" if sparse else ""),
        "s_per_iter": per_iter,
        "matmul_s": matmul,
        "ratio": per_iter / matmul,
        "fit_s": total,
        "n_iter": trace.n_iter,
        "K_found": fit_state.n_clusters,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--k-init", type=int, default=20)
    p.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "categorical"])
    p.add_argument("--sparse", action="store_true", help="pass X as scipy CSR")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one_size(a.one, a.features, a.k_init, a.likelihood, a.sparse)))
        return
    header = f"{'N':>9} {'model':>18} {'s/iter':>9} {'X@W.T s':>9} {'ratio':>6} "
    header += f"{'fit s':>8} {'iters':>6} {'K':>3} {'peak MiB':>9}"
    print(header)
    for n in a.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--features",
            str(a.features),
            "--k-init",
            str(a.k_init),
            "--likelihood",
            a.likelihood,
        ]
        if a.sparse:
            cmd.append("--sparse")
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"{r['N']:>9} {r['likelihood']:>18} {r['s_per_iter']:>9.4f} {r['matmul_s']:>9.4f} "
            f"{r['ratio']:>6.2f} {r['fit_s']:>8.2f} {r['n_iter']:>6} {r['K_found']:>3} "
            f"{r['peak_rss_MiB']:>9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
