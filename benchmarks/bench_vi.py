"""Speed and memory of local VI for growing N (D=100, K_init=20).

Prints, per N: seconds per VI iteration, the cost ratio of one iteration to one dense
``X @ W.T`` of the same shape, total fit time (k-modes init + MerDel to convergence), and the
peak resident memory of a fresh process doing the fit ("data MiB": its peak while generating
and encoding the table, which the generator's float64 temporaries dominate; "peak MiB": the
peak from the end of that to the end of the fit, the peak being reset in between through
/proc/self/clear_refs: encoded table, imports and the VI's working memory). Each N runs in
its own subprocess so that peak memory is per size. The VI streams the compact table in blocks
of ``--block-rows`` rows with products in ``--precision``.

    python benchmarks/bench_vi.py                 # N = 1e4, 1e5, 1e6
    python benchmarks/bench_vi.py --sizes 10000 30000
    python benchmarks/bench_vi.py --sparse --sizes 10000 100000
    python benchmarks/bench_vi.py --likelihood categorical --sizes 10000 100000
    python benchmarks/bench_vi.py --precision float32 --block-rows 65536
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0; else a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def one_size(
    n_rows: int,
    n_features: int,
    k_init: int,
    likelihood: str,
    sparse: bool,
    block_rows: int,
    precision: str,
) -> dict:
    import scipy.sparse as sp

    from fedvi.merdel import fit_problem
    from fedvi.options import FitOptions
    from fedvi.simulate import simulate
    from fedvi.site import encode_site
    from fedvi.spec import MixtureSpec
    from fedvi.vi import Problem, initial_state, iterate

    data = simulate(n_rows, 10, n_features, likelihood=likelihood, n_levels=3, seed=0)
    X = sp.csr_matrix(data.X) if sparse else data.X
    enc, spec = encode_site(X, MixtureSpec(likelihood, n_components=k_init))
    del data, X  # the encoded table (int8, or CSR) is what the VI reads
    peak_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset_peak()  # from here on, the peak is the VI's (table + imports + working memory)
    options = FitOptions(block_rows=block_rows, precision=precision)
    problem = Problem.build(enc, spec, k_init, options)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k_init, size=n_rows)
    state = initial_state(problem, labels, k_init)
    iterate(problem, state)  # warm-up
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        state = iterate(problem, state)
    per_iter = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    fit_state, trace = fit_problem(problem, options, seed=0)
    total = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # One dense product of the same shape, (N, P) @ (P, K), on the whole table at once (after
    # the fit, so that its float64 copy of the table is not part of the fit's peak).
    Xd, _ = enc.design()
    Xd = Xd.toarray() if sp.issparse(Xd) else Xd
    W = rng.standard_normal((k_init, Xd.shape[1]))
    Xd @ W.T
    t = time.perf_counter()
    for _ in range(reps):
        Xd @ W.T
    matmul = (time.perf_counter() - t) / reps
    return {
        "N": n_rows,
        "likelihood": likelihood + (" (CSR)" if sparse else ""),
        "s_per_iter": per_iter,
        "matmul_s": matmul,
        "ratio": per_iter / matmul,
        "fit_s": total,
        "n_iter": trace.n_iter,
        "K_found": fit_state.n_clusters,
        "data_peak_MiB": peak_data,
        "peak_rss_MiB": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--k-init", type=int, default=20)
    p.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "categorical"])
    p.add_argument("--sparse", action="store_true", help="pass X as scipy CSR")
    p.add_argument("--block-rows", type=int, default=16384, help="FitOptions.block_rows")
    p.add_argument("--precision", default="float64", choices=["float64", "float32"])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        r = one_size(a.one, a.features, a.k_init, a.likelihood, a.sparse, a.block_rows, a.precision)
        print(json.dumps(r))
        return
    header = f"{'N':>9} {'model':>18} {'s/iter':>9} {'X@W.T s':>9} {'ratio':>6} "
    header += f"{'fit s':>8} {'iters':>6} {'K':>3} {'data MiB':>9} {'peak MiB':>9}"
    print(f"block_rows {a.block_rows}, precision {a.precision}")
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
            "--block-rows",
            str(a.block_rows),
            "--precision",
            a.precision,
        ]
        if a.sparse:
            cmd.append("--sparse")
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"{r['N']:>9} {r['likelihood']:>18} {r['s_per_iter']:>9.4f} {r['matmul_s']:>9.4f} "
            f"{r['ratio']:>6.2f} {r['fit_s']:>8.2f} {r['n_iter']:>6} {r['K_found']:>3} "
            f"{r['data_peak_MiB']:>9.0f} {r['peak_rss_MiB']:>9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
