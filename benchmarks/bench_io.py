"""Site table readers (``fedvi.io``) against ``pandas.read_csv``: seconds and peak memory.

    python benchmarks/bench_io.py [--rows 100000] [--cols 100] [--repeat 3]

Writes a ``rows x cols`` table of 0/1 codes as CSV and Parquet, and the same table with 10% of
the cells missing, to a temporary folder. Prints the best of ``--repeat`` runs of each reader,
then the peak resident memory (``ru_maxrss``) of a fresh Python process that reads the file
once, next to that of a process that only imports the modules. Goal: ``read_table`` on the CSV
within 3x of ``pandas.read_csv`` (default engine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from fedvi.io import open_table, read_table, write_table

# A child process reads a file once. It is started by a small launcher process (not by this
# one: Linux carries the parent's peak RSS over a fork + exec), which prints the child's peak
# RSS in KiB from getrusage(RUSAGE_CHILDREN).
_CHILD = """
import sys
kind, path, cache = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "import pandas":
    import pandas
elif kind == "import fedvi.io":
    import fedvi.io, pyarrow.csv, pyarrow.parquet
elif kind == "pandas":
    import pandas
    df = pandas.read_csv(path) if path.endswith(".csv") else pandas.read_parquet(path)
else:
    import fedvi.io
    if kind == "read_table":
        t = fedvi.io.read_table(path, missing="ignore")
    else:
        t = fedvi.io.open_table(path, missing="ignore", cache_dir=cache)
    int(t.X.sum(dtype="int64"))  # touch every code (of a memory map too)
"""
_LAUNCHER = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_mib(kind: str, path: str = "", cache: str = "") -> float:
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, _CHILD, kind, path, cache],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def timings(readers: dict, repeat: int) -> dict:
    """Best seconds of each reader; the readers take turns, so that a busy machine slows all
    of them alike."""
    times = {name: [] for name in readers}
    for _ in range(repeat):
        for name, fn in readers.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--missing", type=float, default=0.1)
    args = parser.parse_args()
    import pandas as pd

    rng = np.random.default_rng(0)
    X = (rng.random((args.rows, args.cols)) < 0.3).astype(np.int8)
    Xm = X.copy()
    Xm[rng.random(X.shape) < args.missing] = -1
    names = [f"v{j + 1}" for j in range(args.cols)]
    tmp = tempfile.mkdtemp(prefix="bench_io_")
    try:
        files = {
            "csv": write_table(os.path.join(tmp, "t.csv"), X, names),
            "csv, missing": write_table(os.path.join(tmp, "m.csv"), Xm, names),
            "parquet": write_table(os.path.join(tmp, "t.parquet"), X, names),
            "parquet, missing": write_table(os.path.join(tmp, "m.parquet"), Xm, names),
            "npy (int8)": write_table(os.path.join(tmp, "t.npy"), X),
        }
        mib = {k: os.path.getsize(p) / 2**20 for k, p in files.items()}
        print(
            f"table: {args.rows} x {args.cols}, {args.missing:.0%} missing in the 'missing' files"
        )
        print(f"python {sys.version.split()[0]}, numpy {np.__version__}, pandas {pd.__version__}")
        import pyarrow

        print(f"pyarrow {pyarrow.__version__}, {os.cpu_count()} CPUs, best of {args.repeat}\n")
        print(f"{'file':<18}{'MiB':>7}  {'reader':<34}{'seconds':>9}")
        ratios = {}
        for name, path in files.items():
            cache = os.path.join(tmp, "cache-" + os.path.basename(path))
            readers = {}
            if path.endswith(".csv"):
                readers["pandas.read_csv"] = lambda p=path: pd.read_csv(p)
            elif path.endswith(".parquet"):
                readers["pandas.read_parquet"] = lambda p=path: pd.read_parquet(p)
            readers["fedvi.io.read_table"] = lambda p=path: read_table(p, missing="ignore")

            def first(p=path, c=cache):
                shutil.rmtree(c, ignore_errors=True)
                open_table(p, missing="ignore", cache_dir=c)

            readers["fedvi.io.open_table (first call)"] = first
            readers["fedvi.io.open_table (cached)"] = lambda p=path, c=cache: open_table(
                p, missing="ignore", cache_dir=c
            )
            best = timings(readers, args.repeat)
            for reader, s in best.items():
                print(f"{name:<18}{mib[name]:>7.1f}  {reader:<34}{s:>9.3f}")
            if path.endswith(".csv"):
                ratios[name] = best["fedvi.io.read_table"] / best["pandas.read_csv"]
        for name, ratio in ratios.items():
            print(f"{name}: read_table / pandas.read_csv = {ratio:.2f} (goal: <= 3)")

        print("\npeak RSS of a process that reads the file once (MiB)")
        for kind in ("import pandas", "import fedvi.io"):
            print(f"{'(' + kind + ' only)':<46}{peak_mib(kind):>8.1f}")
        cache = os.path.join(tmp, "cache-rss")
        for name, kind in [
            ("csv", "pandas"),
            ("csv", "read_table"),
            ("csv", "open_table"),
            ("csv, missing", "pandas"),
            ("csv, missing", "read_table"),
            ("parquet", "pandas"),
            ("parquet", "read_table"),
            ("npy (int8)", "read_table"),
        ]:
            label = {"open_table": "open_table (first call)"}.get(kind, kind)
            print(f"{name + ': ' + label:<46}{peak_mib(kind, files[name], cache):>8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
