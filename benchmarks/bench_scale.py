"""Speed and memory at scale: bounded memory, near-limit speed.

Every measurement runs in a fresh Python process, started through a small launcher so that the
peak resident memory (``ru_maxrss``) it reports is its own, not this script's. Parts:

a. ``federated_fit`` on 10^6 x 100 binary rows over 10 sites (int8 tables generated block by
   block): fit seconds, the int8 size of the input, peak RSS before the fit (data generation),
   RSS at the start of the fit and the fit's own peak (the peak is reset in between through
   /proc/self/clear_refs), and the process's peak; goal: peak <= 2.5 x int8 input + 200 MiB.
b. Seconds per VI iteration (``fedvi.vi.iterate`` after ``initial_state``, mean of 5 after a
   warm-up) at N = 10^5 and 10^6, D = 100, K = 20, for ``precision`` float64/float32 and
   ``block_rows`` 8192/16384/65536, against the old in-memory VI of commit 46e3204 (a git
   worktree, ``--old``); runs interleaved and repeated (``--repeat``), medians reported;
   goal: the new iteration at least as fast as the old.
c. float32 against float64 on the presets sim4 (iid, dirichlet, exclusive), sim5 and
   categorical a: K, ELBO (relative difference) and whether the labels are identical;
   float32 may become the default only if K and labels are identical and the ELBO agrees to
   ~1e-9 everywhere.
d. The Flower app (``python -m simulations.run data=files``) on ten 100,000 x 100 sites
   written as CSV and as Parquet, against ``federated_fit`` in-process plus one
   ``fedvi.io.read_table`` of every file; goal: the app within 2x.
e. (``--huge`` only: 10-20 minutes) ten 1,000,000 x 100 Parquet sites (written in row
   groups of 100,000, so this script stays bounded) and one app run over them: wall clock,
   status, K and the peak memory of its process tree (driver plus Ray workers: the sum of RSS
   and of PSS, sampled every second, and ``/usr/bin/time -v``'s largest single process).
   The files are deleted afterwards.

    git -C /work/main worktree add /tmp/old_fedvi 46e3204      # once, for part b
    python benchmarks/bench_scale.py                 # a, b, c, d (about 15 minutes)
    python benchmarks/bench_scale.py --huge --parts e
    python benchmarks/bench_scale.py --quick         # a small version of a-d (~1 minute)
    python benchmarks/bench_scale.py --parts b --blas-threads 1   # one BLAS thread
    python benchmarks/bench_scale.py --quick --huge --parts e
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 2**20
N_TRUE = 10  # clusters of the generated tables (equal weights, theta ~ Beta(1, 5))

# Starts the measured process and exits with its status; this launcher itself stays small,
# and Linux does not carry its (or this script's) memory into the child's ru_maxrss.
_LAUNCHER = (
    "import subprocess, sys; sys.exit(subprocess.run([sys.executable, *sys.argv[1:]]).returncode)"
)
COMMANDS: list[str] = []  # every command line run, printed at the end
ENV = dict(os.environ)  # the measured processes' environment (--blas-threads)


# -- helpers run inside the measured processes ----------------------------------------------------
def peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0; else a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def theta_of(n_features: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng([seed, 0]).beta(1.0, 5.0, size=(N_TRUE, n_features))


def make_rows(n_rows: int, theta, rng, block: int = 16384):
    """``(X int8 (n, D), z (n,))``: rows of the 10-cluster design, generated block by block so
    that no float64 copy of the table exists."""
    import numpy as np

    z = rng.integers(0, len(theta), size=n_rows)
    X = np.empty((n_rows, theta.shape[1]), dtype=np.int8)
    for s in range(0, n_rows, block):
        zz = z[s : s + block]
        X[s : s + len(zz)] = rng.random((len(zz), theta.shape[1])) < theta[zz]
    return X, z


def make_sites(n_sites: int, rows: int, n_features: int, seed: int = 0):
    import numpy as np

    theta = theta_of(n_features, seed)
    out = [make_rows(rows, theta, np.random.default_rng([seed, 1, b])) for b in range(n_sites)]
    return [x for x, _ in out], [z for _, z in out]


def child_fit(a: dict) -> dict:
    """Part a: federated_fit on compact int8 sites."""
    import fedvi

    sites, _ = make_sites(a["sites"], a["rows"], a["features"])
    before = peak_mib()
    # After the reset the peak is the RSS at the start of the fit, then the fit's own peak.
    fit_from = peak_mib() if reset_peak() else None
    t = time.perf_counter()
    res = fedvi.federated_fit(sites, likelihood="bernoulli", n_components=20, seed=0)
    seconds = time.perf_counter() - t
    after = peak_mib()
    return {
        "rss_at_fit_MiB": fit_from,
        "fit_peak_MiB": after if fit_from is not None else None,
        "input_MiB": sum(x.nbytes for x in sites) / MiB,
        "peak_before_MiB": before,
        "peak_MiB": max(before, after),
        "fit_s": seconds,
        "K": res.n_clusters,
        "elbo": res.elbo,
    }


def child_iter(a: dict) -> dict:
    """Part b: seconds per VI iteration, new streamed VI or the old in-memory one."""
    import numpy as np

    if a["impl"] == "old":
        sys.path.insert(0, a["old_path"])
    import fedvi
    import fedvi.vi

    if a["impl"] == "old" and not fedvi.__file__.startswith(a["old_path"]):
        raise RuntimeError(f"old fedvi not imported (got {fedvi.__file__})")
    X, _ = make_rows(a["rows"], theta_of(a["features"]), np.random.default_rng(1))
    K = a["k"]
    labels = np.random.default_rng(0).integers(0, K, size=a["rows"])
    t0 = time.perf_counter()
    if a["impl"] == "old":
        from fedvi.data import encode

        data = encode(X, "bernoulli")
        spec = fedvi.spec.MixtureSpec("bernoulli", tuple(data.n_levels))
        problem = fedvi.vi.Problem.build(data.matrix, spec, K)
    else:
        options = fedvi.FitOptions(block_rows=a["block_rows"], precision=a["precision"])
        data = fedvi.encode(X, fedvi.MixtureSpec("bernoulli", n_components=K))
        spec = fedvi.MixtureSpec("bernoulli", n_components=K).resolve(data.n_levels)
        problem = fedvi.vi.Problem.build(data, spec, K, options)
    state = fedvi.vi.initial_state(problem, labels, K)
    setup = time.perf_counter() - t0
    state = fedvi.vi.iterate(problem, state)  # warm-up
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        state = fedvi.vi.iterate(problem, state)
    return {
        "s_per_iter": (time.perf_counter() - t) / reps,
        "setup_s": setup,
        "elbo": float(state.elbo),
        "peak_MiB": peak_mib(),
        "fedvi": fedvi.__file__,
    }


def child_precision(a: dict) -> dict:
    """Part c: the same federated fit in float64 and float32."""
    import numpy as np

    import fedvi
    from fedvi.metrics import adjusted_rand_index
    from simulations.data import load_sites
    from strategies.config import compose_config

    cfg = compose_config("config", a["overrides"])
    sites, truth, _ = load_sites(cfg)
    z = np.concatenate(truth)
    out = {}
    for p in ("float64", "float32"):
        t = time.perf_counter()
        r = fedvi.federated_fit(
            sites,
            likelihood=str(cfg.model.likelihood),
            n_components=int(cfg.model.n_components),
            seed=0,
            precision=p,
        )
        lab = np.concatenate(r.labels)
        out[p] = {
            "s": time.perf_counter() - t,
            "K": r.n_clusters,
            "elbo": float(r.elbo),
            "labels": lab,
            "ari": adjusted_rand_index(z, lab),
        }
    d, f = out["float64"], out["float32"]
    return {
        "N": int(len(z)),
        "K64": d["K"],
        "K32": f["K"],
        "elbo64": d["elbo"],
        "elbo32": f["elbo"],
        "rel": abs(f["elbo"] - d["elbo"]) / abs(d["elbo"]),
        "same_labels": bool(np.array_equal(d["labels"], f["labels"])),
        "n_diff": int((d["labels"] != f["labels"]).sum()),
        "ari64": d["ari"],
        "ari32": f["ari"],
        "s64": d["s"],
        "s32": f["s"],
    }


def child_write(a: dict) -> dict:
    """Part d: write the sites as CSV and Parquet (names v0..v99, labels in column y)."""
    from fedvi.io import write_table

    sites, truth = make_sites(a["sites"], a["rows"], a["features"])
    names = [f"v{j}" for j in range(a["features"])]
    paths = {}
    t = time.perf_counter()
    for fmt in ("csv", "parquet"):
        paths[fmt] = [
            write_table(os.path.join(a["dir"], f"site{b}.{fmt}"), X, names, labels=z)
            for b, (X, z) in enumerate(zip(sites, truth, strict=True))
        ]
    return {
        "paths": paths,
        "MiB": {f: sum(os.path.getsize(p) for p in ps) / MiB for f, ps in paths.items()},
        "write_s": time.perf_counter() - t,
    }


def child_inproc(a: dict) -> dict:
    """Part d: one read of every file, then federated_fit in-process."""
    import fedvi
    from fedvi.io import read_table

    t = time.perf_counter()
    tables = [read_table(p, label_column="y") for p in a["paths"]]
    read = time.perf_counter() - t
    t = time.perf_counter()
    res = fedvi.federated_fit(tables, likelihood="bernoulli", n_components=20, seed=0)
    return {
        "read_s": read,
        "fit_s": time.perf_counter() - t,
        "K": res.n_clusters,
        "elbo": float(res.elbo),
        "peak_MiB": peak_mib(),
    }


def child_write_huge(a: dict) -> dict:
    """Part e: Parquet sites written row group by row group (bounded memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    theta = theta_of(a["features"])
    names = [f"v{j}" for j in range(a["features"])]
    schema = pa.schema([(n, pa.int8()) for n in names] + [("y", pa.int64())])
    os.makedirs(a["dir"], exist_ok=True)
    paths = []
    t = time.perf_counter()
    for b in range(a["sites"]):
        rng = np.random.default_rng([0, 2, b])
        path = os.path.join(a["dir"], f"site{b}.parquet")
        with pq.ParquetWriter(path, schema) as w:
            for s in range(0, a["rows"], a["group"]):
                X, z = make_rows(min(a["group"], a["rows"] - s), theta, rng)
                cols = [pa.array(X[:, j]) for j in range(X.shape[1])] + [pa.array(z)]
                w.write_table(pa.Table.from_arrays(cols, schema=schema), a["group"])
        paths.append(path)
    return {
        "paths": paths,
        "MiB": sum(os.path.getsize(p) for p in paths) / MiB,
        "write_s": time.perf_counter() - t,
        "peak_MiB": peak_mib(),
    }


CHILDREN = {
    "fit": child_fit,
    "iter": child_iter,
    "precision": child_precision,
    "write": child_write,
    "inproc": child_inproc,
    "write_huge": child_write_huge,
}


# -- the driver --------------------------------------------------------------------------------
def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(kind: str, **args) -> dict:
    """Run ``CHILDREN[kind](args)`` in a fresh process (through the launcher)."""
    cmd = [sys.executable, "-c", _LAUNCHER, __file__, "--child", kind, json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
    if out.returncode:
        raise RuntimeError(f"{kind} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the process tree of ``pid`` every ``every`` seconds: the largest sum of RSS and
    of PSS (``smaps_rollup``, shared pages counted once) and the largest single process."""

    def __init__(self, pid: int, every: float = 1.0):
        self.pid, self.every = pid, every
        self.rss = self.pss = self.single = 0
        self.single_name = ""
        self.n_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            rss = pss = 0
            pids = _tree(self.pid)
            for p in pids:
                r = _kib(f"/proc/{p}/status", "VmRSS:")
                rss += r
                pss += _kib(f"/proc/{p}/smaps_rollup", "Pss:")
                if r > self.single:
                    self.single = r
                    try:
                        with open(f"/proc/{p}/cmdline", "rb") as fh:
                            self.single_name = fh.read().replace(b"\0", b" ").decode()[:60]
                    except OSError:
                        pass
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self.n_procs = max(self.n_procs, len(pids))
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_app(paths: list[str], run_dir: str, extra: list[str] = ()) -> dict:
    """One ``python -m simulations.run data=files`` over ``paths``; wall clock, memory and
    what its results.json says."""
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "data=files",
        f"data.paths=[{','.join(paths)}]",
        "data.label_column=y",
        "model.n_components=20",
        "plots=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    threads = ENV.get("OPENBLAS_NUM_THREADS")
    prefix = f"OPENBLAS_NUM_THREADS={threads} OMP_NUM_THREADS={threads} " if threads else ""
    COMMANDS.append(f"cd {ROOT} && {prefix}" + shlex.join(cmd))
    timed = ["/usr/bin/time", "-v", *cmd] if os.path.exists("/usr/bin/time") else cmd
    t = time.perf_counter()
    proc = subprocess.Popen(
        timed, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    mem = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    mem.stop()
    driver = None
    for line in stderr.splitlines():
        if "Maximum resident set size" in line:
            driver = int(line.split(":")[1]) / 1024
    out = {
        "rc": proc.returncode,
        "wall_s": wall,
        "tree_rss_MiB": mem.rss / 1024,
        "tree_pss_MiB": mem.pss / 1024,
        "single_MiB": mem.single / 1024,
        "single_name": mem.single_name,
        "n_procs": mem.n_procs,
        "time_v_max_MiB": driver,
        "load": load(),
    }
    res_path = os.path.join(run_dir, "results.json")
    if not os.path.exists(res_path):
        out["error"] = (stderr or stdout)[-2000:]
        return out
    with open(res_path) as fh:
        res = json.load(fh)
    phases: dict[str, list[float]] = {}
    for site in res["sites"].values():
        for ph, s in (site.get("seconds_by_phase") or {}).items():
            phases.setdefault(ph, []).append(float(s))
    out.update(
        status=res["status"],
        K=res["n_clusters"],
        elbo=res["elbo"],
        ari=res.get("ari"),
        wall_clock=res["wall_clock"],
        site_phase_sum={k: sum(v) for k, v in phases.items()},
        site_phase_max={k: max(v) for k, v in phases.items()},
        failures=res.get("failures"),
    )
    return out


def fmt_phases(d: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items())


# -- parts ---------------------------------------------------------------------------------
def part_a(args) -> None:
    sites, rows = (10, 2_000) if args.quick else (10, 100_000)
    print(f"\na. federated_fit, {sites} sites x {rows:,} rows x 100 binary (int8), K_init 20")
    print(f"   load before: {load()}")
    r = measure("fit", sites=sites, rows=rows, features=100)
    goal = 2.5 * r["input_MiB"] + 200
    print(
        f"{'N':>10} {'fit s':>7} {'K':>3} {'int8 MiB':>9} {'peak before fit':>16} "
        f"{'RSS at fit start':>17} {'peak in fit':>12} {'peak MiB':>9} {'goal MiB':>9} {'met':>4}"
    )
    na = "-"
    print(
        f"{sites * rows:>10,} {r['fit_s']:>7.1f} {r['K']:>3} {r['input_MiB']:>9.1f} "
        f"{r['peak_before_MiB']:>16.0f} {r['rss_at_fit_MiB'] or na:>17.0f} "
        f"{r['fit_peak_MiB'] or na:>12.0f} {r['peak_MiB']:>9.0f} {goal:>9.0f} "
        f"{'yes' if r['peak_MiB'] <= goal else 'no':>4}"
    )
    print(f"   load after: {load()}")


def part_b(args) -> None:
    sizes = [20_000] if args.quick else [100_000, 1_000_000]
    repeat = 1 if args.quick else args.repeat
    old = os.path.isdir(os.path.join(args.old, "fedvi"))
    configs = [("old", "float64", 0)] if old else []
    configs += [("new", p, b) for p in ("float64", "float32") for b in (8192, 16384, 65536)]
    print(f"\nb. seconds per VI iteration (D 100, K 20), median of {repeat} interleaved runs")
    if not old:
        print(f"   (no old worktree at {args.old}: git -C {ROOT} worktree add {args.old} 46e3204)")
    print(f"   load before: {load()}")
    times: dict = {}
    for rep in range(repeat):
        for n in sizes:
            k = rep % len(configs)
            for impl, p, b in configs[k:] + configs[:k]:  # rotate the order per repeat
                r = measure(
                    "iter",
                    impl=impl,
                    rows=n,
                    features=100,
                    k=20,
                    precision=p,
                    block_rows=b or 16384,
                    old_path=args.old,
                )
                times.setdefault((n, impl, p, b), []).append(r)
        print(f"   repeat {rep + 1} done, load {load()}", flush=True)
    print(
        f"{'N':>9} {'code':>4} {'precision':>9} {'block':>6} {'s/iter':>8} {'runs':>24} "
        f"{'/ old':>6} {'setup s':>8} {'peak MiB':>9}"
    )
    for n in sizes:
        base = None
        if old:
            base = statistics.median(r["s_per_iter"] for r in times[(n, "old", "float64", 0)])
        for impl, p, b in configs:
            rs = times[(n, impl, p, b)]
            med = statistics.median(r["s_per_iter"] for r in rs)
            runs = " ".join(f"{r['s_per_iter']:.3f}" for r in rs)
            ratio = f"{med / base:>6.2f}" if base else f"{'-':>6}"
            print(
                f"{n:>9,} {impl:>4} {p:>9} {b or '-':>6} {med:>8.4f} {runs:>24} {ratio} "
                f"{statistics.median(r['setup_s'] for r in rs):>8.2f} "
                f"{max(r['peak_MiB'] for r in rs):>9.0f}"
            )
    if old:
        for n in sizes:
            base = statistics.median(r["s_per_iter"] for r in times[(n, "old", "float64", 0)])
            new = statistics.median(r["s_per_iter"] for r in times[(n, "new", "float64", 16384)])
            best = min(
                (statistics.median(r["s_per_iter"] for r in times[(n, "new", p, b)]), p, b)
                for _, p, b in configs[1:]
            )
            print(
                f"   N {n:,}: default (float64, 16384) {new:.4f} s vs old {base:.4f} s: "
                f"{'met' if new <= base else 'not met'}; fastest new {best[0]:.4f} s "
                f"({best[1]}, {best[2]}): {'met' if best[0] <= base else 'not met'}"
            )
    print(f"   load after: {load()}")


PRESETS = [
    ("sim4", "iid", ["+experiment=sim4", "federation.split=iid"]),
    ("sim4", "dirichlet", ["+experiment=sim4", "federation.split=dirichlet"]),
    ("sim4", "exclusive", ["+experiment=sim4", "federation.split=exclusive"]),
    ("sim5", "iid", ["+experiment=sim5", "federation.split=iid"]),
    ("categorical a", "iid", ["+experiment=categorical", "setting=a", "federation.split=iid"]),
]


def part_c(args) -> None:
    presets = PRESETS[:1] if args.quick else PRESETS
    print("\nc. float32 vs float64 (federated_fit, seed 0, the preset's likelihood and K_init)")
    print(f"   load before: {load()}")
    print(
        f"{'preset':>14} {'split':>10} {'N':>7} {'K 64/32':>8} {'ELBO float64':>16} "
        f"{'rel. diff':>9} {'same labels':>12} {'ARI 64/32':>14} {'s 64/32':>11}"
    )
    ok = True
    for name, split, overrides in presets:
        r = measure("precision", overrides=overrides)
        same = r["same_labels"] and r["K64"] == r["K32"] and r["rel"] <= 1e-9
        ok &= same
        lab = "yes" if r["same_labels"] else f"no ({r['n_diff']})"
        print(
            f"{name:>14} {split:>10} {r['N']:>7,} {r['K64']:>4}/{r['K32']:<3} "
            f"{r['elbo64']:>16.4f} {r['rel']:>9.1e} {lab:>12} "
            f"{r['ari64']:>6.4f}/{r['ari32']:<6.4f} {r['s64']:>5.2f}/{r['s32']:<5.2f}"
        )
    print(
        "   float32 as default: "
        + ("allowed (same K and labels, ELBO within 1e-9)" if ok else "NOT allowed")
    )
    print(f"   load after: {load()}")


def part_d(args, tmp: str) -> None:
    sites, rows = (3, 2_000) if args.quick else (10, 100_000)
    print(f"\nd. the app against the core in-process: {sites} sites x {rows:,} rows x 100")
    print(f"   load before: {load()}")
    w = measure("write", dir=os.path.join(tmp, "d"), sites=sites, rows=rows, features=100)
    print(
        f"   files: CSV {w['MiB']['csv']:.1f} MiB, Parquet {w['MiB']['parquet']:.1f} MiB "
        f"(written in {w['write_s']:.1f} s)"
    )
    rows_out = {}
    for fmt in ("csv", "parquet"):
        if args.quick and fmt != "csv":  # --quick: the app (~20 s of start-up) on CSV only
            continue
        inproc = measure("inproc", paths=w["paths"][fmt])
        app = run_app(w["paths"][fmt], os.path.join(tmp, f"run_{fmt}"))
        rows_out[fmt] = (inproc, app)
    print(
        f"{'format':>8} {'read s':>7} {'fit s':>6} {'core s':>7} {'core MiB':>9} {'K':>3} "
        f"{'app s':>7} {'app/core':>8} {'goal':>5} {'K':>3} {'status':>10} "
        f"{'tree RSS':>9} {'tree PSS':>9}"
    )
    for fmt, (c, a) in rows_out.items():
        core = c["read_s"] + c["fit_s"]
        ratio = a["wall_s"] / core
        print(
            f"{fmt:>8} {c['read_s']:>7.1f} {c['fit_s']:>6.1f} {core:>7.1f} "
            f"{c['peak_MiB']:>9.0f} {c['K']:>3} {a['wall_s']:>7.1f} {ratio:>8.2f} "
            f"{'met' if ratio <= 2 else 'no':>5} {a.get('K', '-'):>3} "
            f"{a.get('status', 'failed'):>10} "
            f"{a['tree_rss_MiB']:>9.0f} {a['tree_pss_MiB']:>9.0f}"
        )
    for fmt, (c, a) in rows_out.items():
        print(f"   {fmt}: ELBO core {c['elbo']:.2f}, app {a.get('elbo')}; load {a['load']}")
        if "wall_clock" in a:
            print(f"     results.json wall_clock: {fmt_phases(a['wall_clock'])}")
            print(f"     sites' seconds_by_phase, sum: {fmt_phases(a['site_phase_sum'])}")
            print(f"     sites' seconds_by_phase, max: {fmt_phases(a['site_phase_max'])}")
        else:
            print(f"     no results.json (rc {a['rc']}): {a.get('error')}")
        print(
            f"     largest process {a['single_MiB']:.0f} MiB ({a['single_name']}), "
            f"/usr/bin/time max {a['time_v_max_MiB']} MiB, {a['n_procs']} processes"
        )
    print(f"   load after: {load()}")


def part_e(args, tmp: str) -> None:
    sites, rows = (10, 20_000) if args.quick else (10, 1_000_000)
    d = os.path.join(tmp, "e")
    print(f"\ne. the app at {sites * rows:,} rows: {sites} Parquet sites x {rows:,} x 100")
    print(f"   load before: {load()}")
    try:
        w = measure(
            "write_huge", dir=d, sites=sites, rows=rows, features=100, group=min(rows, 100_000)
        )
        print(
            f"   files: {w['MiB']:.0f} MiB Parquet, written in {w['write_s']:.0f} s, "
            f"writer peak RSS {w['peak_MiB']:.0f} MiB"
        )
        a = run_app(w["paths"], os.path.join(d, "run"))
        cache = os.path.join(d, "run", "labels", ".fedvi-cache")
        cache_mib = (
            sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / MiB
            if os.path.isdir(cache)
            else 0.0
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(
        f"{'rows':>11} {'wall s':>7} {'rc':>3} {'status':>10} {'K':>3} {'ARI':>7} "
        f"{'tree RSS MiB':>13} {'tree PSS MiB':>13} {'largest MiB':>12} {'time -v MiB':>12}"
    )
    ari = a.get("ari")
    print(
        f"{sites * rows:>11,} {a['wall_s']:>7.0f} {a['rc']:>3} {a.get('status', 'failed'):>10} "
        f"{a.get('K', '-'):>3} {ari if ari is None else round(ari, 4)!s:>7} "
        f"{a['tree_rss_MiB']:>13.0f} {a['tree_pss_MiB']:>13.0f} {a['single_MiB']:>12.0f} "
        f"{a['time_v_max_MiB']!s:>12}"
    )
    if "wall_clock" in a:
        print(f"   results.json wall_clock: {fmt_phases(a['wall_clock'])}")
        print(f"   sites' seconds_by_phase, sum: {fmt_phases(a['site_phase_sum'])}")
        print(f"   sites' seconds_by_phase, max: {fmt_phases(a['site_phase_max'])}")
        if a.get("failures"):
            print(f"   failures: {a['failures']}")
    else:
        print(f"   no results.json (rc {a['rc']}): {a.get('error')}")
    print(
        f"   largest process: {a['single_name']}; {a['n_procs']} processes; site caches "
        f"{cache_mib:.0f} MiB; files deleted; load {a['load']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script (< 1 min)")
    p.add_argument("--huge", action="store_true", help="allow part e (10^7 rows, 10-20 min)")
    p.add_argument("--parts", default=None, help="letters to run, e.g. 'ab' (default: abcd, +e)")
    p.add_argument("--repeat", type=int, default=3, help="part b: interleaved repeats")
    p.add_argument("--old", default="/tmp/old_fedvi", help="part b: worktree of commit 46e3204")
    p.add_argument("--tmp", default=None, help="folder for the files (default: a temporary one)")
    p.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="OPENBLAS/OMP_NUM_THREADS of the measured processes (default: unset, all cores)",
    )
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, payload = args.child
        sys.path.insert(0, ROOT)
        print(json.dumps(CHILDREN[kind](json.loads(payload))))
        return
    if args.blas_threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            ENV[var] = str(args.blas_threads)
    parts = args.parts or ("abcde" if args.huge else "abcd")
    if "e" in parts and not args.huge:
        p.error("part e (10^7 rows) needs --huge")
    import numpy

    git = ["git", "-C", ROOT]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    diff = subprocess.run(
        [*git, "diff", "--", "fedvi", "strategies", "simulations", "configs"], capture_output=True
    ).stdout
    import hashlib

    dirty = (
        f" + uncommitted changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})" if diff else ""
    )
    print(
        f"python {sys.version.split()[0]}, numpy {numpy.__version__}, {os.cpu_count()} CPUs, "
        f"commit {commit.stdout.strip()}"
        + dirty
        + f", BLAS threads {args.blas_threads or 'default'}"
    )
    base = args.tmp or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(base, exist_ok=True)
    t0 = time.perf_counter()
    try:
        for part in parts:
            t = time.perf_counter()
            if part == "a":
                part_a(args)
            elif part == "b":
                part_b(args)
            elif part == "c":
                part_c(args)
            elif part == "d":
                part_d(args, base)
            elif part == "e":
                part_e(args, base)
            print(f"   ({part}: {time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        if args.tmp is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print("\ncommands:")
    print(f"  cd {ROOT} && {shlex.join([sys.executable, *sys.argv])}")
    for c in COMMANDS:
        print(f"  {c}")


if __name__ == "__main__":
    main()
