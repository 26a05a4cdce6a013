"""Time and memory against the number of sites: a federation of many small practices.

    python benchmarks/bench_sites.py                          # 10, 100, 500, 1000, 5000 sites
    python benchmarks/bench_sites.py --sites 10,100           # a subset
    python benchmarks/bench_sites.py --flower --flower-sites 10,100,1000   # Flower simulation too
    python benchmarks/bench_sites.py --figure docs/sites.png  # the figure of time per site

In-process: ``fedvi.federated_fit`` on sites of 1,000 rows each (D 50 binary variables, 6 true
clusters with ``theta ~ Beta(1, 1)``, equal weights, ``K_init`` 20), once one-shot
(``refine_rounds=0``) and once with the default refinement. Each size runs in its own
process, so its peak memory (max RSS, data included) is its own. Phases are timed from
outside: the functions ``fedvi.federated`` calls for them are wrapped by this script (local
fits, global merge, refinement at the sites and the server, labels). Bytes per site: what each
site sent (its report's uplink) and what it received (the global posterior, once per
refinement round and once for labels, plus its mapping).

The paper estimate (6,500 practices of 10,000 patients each): one site's local fit, refinement
step and labels measured at 10,000 rows (sites work in parallel, so that is their wall time);
the server's merge and refinement sums measured on 6,500 sites' summaries of that size (the
statistics a site's six clusters would give, drawn from the generating model); bytes from the
encoded arrays.

``--flower``: ``python -m simulations.run`` (Flower's simulation engine, Ray) with 10, 100 and
1,000 virtual SuperNodes of 1,000 rows each (the ``simulated`` source with the same sizes;
its ``theta ~ Beta(1, 5)`` design), ``federation.num_cpus=1`` so Ray runs two sites at a time
on this machine's 2 cores.

``--secagg``: the same Flower simulation with ``strategy.secure_aggregation=true`` at 10, 50
and 100 SuperNodes (``--secagg-sites``), so that the refinement and label rounds are summed
with SecAgg+ (``strategies.secure_workflow.BoundSecAggPlusWorkflow``: every node shares its
keys with every other node, ``num_shares=1.0``). Each size runs in its own process, which
starts the simulation itself and wraps the server's round runner
(``strategies.workflow.PhaseFitWorkflow``), SecAgg+'s four stages and the Grids they call, so
it records the wall time of every round and stage and the bytes of every message to and from
the sites (protobuf size of the message content). Its records are written after every stage,
so a run stopped at ``--secagg-timeout`` still says where its time went.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

ROWS, FEATURES, TRUE_K, K_INIT = 1000, 50, 6, 20
PHASES = ("local", "merge", "refine", "labels")


def theta_of(seed: int = 0) -> np.ndarray:
    """``(TRUE_K, FEATURES)`` cluster profiles, ``theta ~ Beta(1, 1)``."""
    return np.random.default_rng([seed, 0]).beta(1.0, 1.0, size=(TRUE_K, FEATURES))


def make_site(b: int, rows: int, theta: np.ndarray, seed: int = 0):
    """Site ``b``'s ``(rows, D)`` int8 table and true clusters (its own seeded stream)."""
    rng = np.random.default_rng([seed, 1, b])
    z = rng.integers(0, len(theta), size=rows)
    return (rng.random((rows, theta.shape[1])) < theta[z]).astype(np.int8), z


class PhaseClock:
    """Wall time per phase, by wrapping the functions ``fedvi.federated`` calls for it."""

    WRAP = {
        "fit_site": "local",
        "global_merge": "merge",
        "release_refinement": "refine",
        "combine_refinement": "refine",
        "label_rows": "labels",
        "map_labels": "labels",
        "release_label_counts": "labels",
    }

    def __init__(self):
        F = importlib.import_module("fedvi.federated")

        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        for name, phase in self.WRAP.items():
            setattr(F, name, self._timed(getattr(F, name), phase))

    def _timed(self, fn, phase):
        def wrapped(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t
                self.cpu[phase] += time.process_time() - c

        return wrapped


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_in_process(n_sites: int, refine: bool, rows: int = ROWS) -> dict:
    """One federation of ``n_sites`` sites (in this process); its figures."""
    import fedvi
    from fedvi.metrics import adjusted_rand_index

    theta = theta_of()
    sites, truth = zip(*(make_site(b, rows, theta) for b in range(n_sites)), strict=True)
    clock = PhaseClock()
    kw = {} if refine else {"refine_rounds": 0}
    t, c = time.perf_counter(), time.process_time()
    res = fedvi.federated_fit(list(sites), "bernoulli", n_components=K_INIT, seed=0, **kw)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    up = [sum(r.uplink_bytes.values()) for r in res.sites.values()]
    rounds = len(res.elbo_history) - 2
    post = res.posterior.nbytes()
    down = [(rounds + 1) * post + r.mapping.nbytes for r in res.sites.values()]
    return {
        "sites": n_sites,
        "rows": n_sites * rows,
        "refine_rounds": rounds,
        "wall": wall,
        **clock.seconds,
        "cpu": cpu,
        **{f"cpu_{k}": v for k, v in clock.cpu.items()},
        "peak_mib": peak_rss_mib(),
        "up_per_site": float(np.mean(up)),
        "down_per_site": float(np.mean(down)),
        "pooled_clusters": int(sum(s.n_clusters for s in res.site_summaries)),
        "K": res.n_clusters,
        "ari": adjusted_rand_index(np.concatenate(truth), np.concatenate(res.labels)),
    }


def paper_estimate(n_sites: int = 6500, rows: int = 10_000) -> dict:
    """The 6,500-practice estimate (module docstring)."""
    from fedvi.federated import combine_refinement, fixed_contribution
    from fedvi.global_merge import global_merge

    one = run_in_process(1, refine=True, rows=rows)
    theta = theta_of()
    X, _ = make_site(0, rows, theta)
    import fedvi

    like = fedvi.federated_fit([X], "bernoulli", n_components=K_INIT, refine_rounds=0)
    like = like.site_summaries[0]
    rng = np.random.default_rng(7)
    sites = []
    for _ in range(n_sites):
        n = rng.multinomial(rows, np.full(TRUE_K, 1.0 / TRUE_K)).astype(float)
        S = rng.binomial(n.astype(int)[:, None], theta).astype(float)
        sites.append(
            replace(
                like,
                counts=n,
                sums=S,
                entropy=np.zeros(TRUE_K),
                column_totals=S.sum(axis=0),
                n_rows=rows,
            )
        )
    t, c = time.perf_counter(), time.process_time()
    merged = global_merge(sites)
    merge_s, merge_cpu = time.perf_counter() - t, time.process_time() - c
    G = merged.n_clusters
    stats = [fixed_contribution(s, m, G) for s, m in zip(sites, merged.mapping, strict=True)]
    t = time.perf_counter()
    combine_refinement(merged.posterior, stats)
    round_s = time.perf_counter() - t
    r = one["refine_rounds"]
    site_s = one["local"] + one["refine"] + one["labels"]
    return {
        "sites": n_sites,
        "rows_per_site": rows,
        "site_local_s": one["local"],
        "site_refine_s": one["refine"],
        "site_labels_s": one["labels"],
        "server_merge_s": merge_s,
        "server_merge_cpu_s": merge_cpu,
        "server_refine_round_s": round_s,
        "refine_rounds": r,
        "K": G,
        "wall_estimate_s": site_s + merge_s + r * round_s,
        "up_per_site": one["up_per_site"],
        "down_per_site": one["down_per_site"],
        "server_bytes_in": one["up_per_site"] * n_sites,
    }


def run_flower(n_sites: int, timeout: float, round_timeout: float | None = None) -> dict:
    """One Flower simulation (``python -m simulations.run``) of ``n_sites`` SuperNodes.
    ``round_timeout``: seconds a site has per round (pre-flight included); ``None`` keeps the
    strategy's defaults (derived from the data size and the CPU slots)."""
    out = tempfile.mkdtemp(prefix=f"bench_sites_{n_sites}_")
    cmd = [sys.executable, "-m", "simulations.run"] + _simulation_overrides(n_sites, out)
    if round_timeout is not None:
        cmd += [
            f"strategy.round_timeout={round_timeout}",
            f"strategy.preflight_timeout={round_timeout}",
        ]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stderr or "")[-2000:]
    wall = time.perf_counter() - t
    row = {"sites": n_sites, "wall": wall, "per_site": wall / n_sites, "rc": rc, "dir": out}
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        row.update({k: res.get(k) for k in ("n_clusters", "ari", "status")})
        row["simulation_s"] = (res.get("wall_clock") or {}).get("simulation")
    if rc != 0:
        row["tail"] = tail
    return row


SECAGG_STAGES = ("setup", "share_keys", "masked_vectors", "unmask")


def _simulation_overrides(n_sites: int, out: str) -> list[str]:
    """The ``simulations.run`` overrides of an ``n_sites`` federation of 1,000-row sites."""
    return [
        f"data.n_rows={n_sites * ROWS}",
        f"data.n_clusters={TRUE_K}",
        f"data.n_features={FEATURES}",
        "data.weights=null",
        f"federation.sites={n_sites}",
        "federation.split=iid",
        "federation.num_cpus=1",
        f"model.n_components={K_INIT}",
        "plots=false",
        f"hydra.run.dir={out}",
    ]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_secure_worker(
    n_sites: int, refine_rounds: int, out: str, round_timeout, secure: bool = True
) -> dict:
    """In this process: the Flower simulation of ``n_sites`` with SecAgg+ rounds (``secure``;
    else the same run with plain rounds, the baseline), its server instrumented (module
    docstring). Records go to ``out/secagg_bench.json`` as they come."""
    from flwr.common.serde import recorddict_to_proto

    import strategies.secure_workflow as SW
    import strategies.workflow as W

    rec = {"sites": n_sites, "refine_rounds": refine_rounds, "secure": secure}
    rec.update(rounds=[], stages=[])
    rec["load_start"] = _load()
    now = {"round": None, "stage": None, "measure_s": 0.0}
    path = os.path.join(out, "secagg_bench.json")

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(path + ".tmp", path)

    def size(msgs) -> int:
        t = time.perf_counter()
        n = sum(recorddict_to_proto(m.content).ByteSize() for m in msgs if m.has_content())
        now["measure_s"] += time.perf_counter() - t  # not the protocol's time
        return n

    def count(entry, sent, replies):
        entry["bytes_down"] += size(sent)
        entry["bytes_up"] += size(replies)
        entry["messages"] += len(sent)
        entry["replies_ok"] += sum(1 for m in replies if m.has_content())
        entry["replies_error"] += sum(1 for m in replies if m.has_error())

    def new_entry(**kw):
        return {**kw, "bytes_down": 0, "bytes_up": 0, "messages": 0, "replies_ok": 0,
                "replies_error": 0}  # fmt: skip

    call = W.PhaseFitWorkflow.__call__

    def round_call(self, grid, context):
        rnd = W._current_round(context)
        plan = self.strategy.round(rnd)
        entry = new_entry(round=rnd, phase=plan.phase.value if plan else None)
        entry["secure"] = bool(plan and plan.secure)
        now.update(round=entry, measure_s=0.0)
        t = time.perf_counter()
        try:
            return call(self, grid, context)
        finally:
            entry["s"] = time.perf_counter() - t - now["measure_s"]
            entry["load"] = _load()
            rec["rounds"].append(entry)
            save()

    W.PhaseFitWorkflow.__call__ = round_call

    watch = W.send_and_watch

    def plain_send(grid, messages, *args, **kwargs):
        messages = list(messages)
        replies, lost = watch(grid, messages, *args, **kwargs)
        count(now["round"], messages, replies)
        return replies, lost

    W.send_and_watch = plain_send

    def stage(name, fn):
        def wrapped(self, grid, context, state):
            entry = new_entry(round=now["round"]["round"], stage=name)
            now["stage"] = entry
            m0, t, ok = now["measure_s"], time.perf_counter(), None
            try:
                ok = fn(self, grid, context, state)
                return ok
            finally:
                entry["s"] = time.perf_counter() - t - (now["measure_s"] - m0)
                entry["ok"] = bool(ok)
                entry["active_nodes"] = len(getattr(state, "active_node_ids", ()) or ())
                rec["stages"].append(entry)
                save()

        return wrapped

    B = SW.BoundSecAggPlusWorkflow
    for short, name in zip(
        SECAGG_STAGES,
        ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage"),
        strict=True,
    ):
        setattr(B, name, stage(short, getattr(B, name)))

    relay = SW._ReportingGrid.send_and_receive

    def secure_send(self, messages, timeout=None):
        messages = list(messages)
        replies = relay(self, messages, timeout=timeout)
        count(now["stage"], messages, replies)
        count(now["round"], messages, replies)
        return replies

    SW._ReportingGrid.send_and_receive = secure_send

    import runpy

    sys.argv = ["simulations.run"] + _simulation_overrides(n_sites, out)
    sys.argv += [
        f"strategy.secure_aggregation={str(secure).lower()}",
        f"strategy.refine_rounds={refine_rounds}",
    ]
    if round_timeout is not None:
        sys.argv += [
            f"strategy.round_timeout={round_timeout}",
            f"strategy.preflight_timeout={round_timeout}",
        ]
    t = time.perf_counter()
    try:
        # As ``python -m simulations.run`` (Hydra finds ``configs/`` from the main module).
        runpy.run_module("simulations.run", run_name="__main__", alter_sys=True)
        rec["rc"] = 0
    except SystemExit as exc:
        rec["rc"] = exc.code
    rec["wall"] = time.perf_counter() - t
    rec["load_end"] = _load()
    res_path = os.path.join(out, "results.json")
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
        rec.update({k: res.get(k) for k in ("n_clusters", "ari", "status")})
        rec["simulation_s"] = (res.get("wall_clock") or {}).get("simulation")
    save()
    return rec


def secagg_primitives(sizes: list[int], threshold: float = 0.67) -> list[dict]:
    """CPU seconds of SecAgg+'s per-site cryptography at ``N`` participants, in this process:
    a site's Shamir split of its two secrets (its private key, its 32-byte mask seed) into
    ``N`` shares (the share-keys stage, at every site), the server's rebuild of one site's
    seed from ``threshold * N`` shares (the unmask stage, once per active site), and one
    pair's key agreement and mask (the masked-vector stage, ``N - 1`` pairs per site)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

    def cpu(fn, repeat=1):
        c = time.process_time()
        for _ in range(repeat):
            fn()
        return (time.process_time() - c) / repeat

    sk, _ = generate_key_pairs()
    _, pk = generate_key_pairs()
    key, seed = private_key_to_bytes(sk), os.urandom(32)
    shared = generate_shared_key(sk, pk)
    pair = cpu(lambda: generate_shared_key(sk, pk), 50)
    mask = cpu(lambda: pseudo_rand_gen(shared, 2**32, [(2300,)]), 50)
    rows = []
    for n in sizes:
        t = max(round(threshold * n), 2)
        shares = create_shares(seed, t, n)
        rows.append(
            {
                "sites": n,
                "threshold": t,
                "split_s_per_site": cpu(
                    lambda t=t, n=n: (create_shares(key, t, n), create_shares(seed, t, n))
                ),
                "combine_s_per_site": cpu(lambda got=shares[:t]: combine_shares(got)),
                "pair_key_s": pair,
                "pair_mask_s": mask,
                "key_bytes": len(key),
            }
        )
    return rows


def run_secure(
    n_sites: int, refine_rounds: int, timeout: float, round_timeout=None, secure: bool = True
) -> dict:
    """One SecAgg+ simulation (``secure=False``: its plain baseline) in its own process group
    (stopped, Ray included, after ``timeout`` s); its records, complete or as far as they got."""
    out = tempfile.mkdtemp(prefix=f"bench_secagg_{n_sites}_")
    worker = f"secagg:{n_sites}:{refine_rounds}:{out}:{round_timeout}:{int(secure)}"
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", worker],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        tail = proc.communicate(timeout=timeout)[0][-2000:]
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            tail = (proc.communicate(timeout=30)[0] or "")[-2000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            tail = (proc.communicate()[0] or "")[-2000:]
        rc = "timeout"
    path = os.path.join(out, "secagg_bench.json")
    rec = {"sites": n_sites, "refine_rounds": refine_rounds, "secure": secure}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    rec.update({"process_wall": time.perf_counter() - t, "process_rc": rc, "dir": out})
    if rc != 0:
        rec["tail"] = tail
    return rec


def secure_summary(r: dict) -> dict:
    """One row of the SecAgg+ table from a run's records."""
    rounds, stages = r.get("rounds", []), r.get("stages", [])
    n = r["sites"]
    by_phase: dict[str, float] = {}
    for x in rounds:
        by_phase[x["phase"]] = by_phase.get(x["phase"], 0.0) + x["s"]
    sec = [x for x in rounds if x.get("secure")]
    stage_s = {k: [x["s"] for x in stages if x["stage"] == k] for k in SECAGG_STAGES}
    return {
        "sites": n,
        "refine_rounds": r["refine_rounds"],
        "secure": r.get("secure", True),
        "completed": r.get("status") == "completed" and r.get("process_rc") == 0,
        "status": r.get("status") or r.get("process_rc"),
        "wall": r.get("wall", r.get("process_wall")),
        **{f"{p}_s": by_phase.get(p) for p in ("preflight", "local", "refine", "label")},
        "secure_rounds": len(sec),
        "secure_round_s": float(np.mean([x["s"] for x in sec])) if sec else None,
        **{f"{k}_s": float(np.mean(v)) if v else None for k, v in stage_s.items()},
        "secure_up_B_per_site": (float(np.mean([x["bytes_up"] for x in sec])) / n if sec else None),
        "secure_down_B_per_site": (
            float(np.mean([x["bytes_down"] for x in sec])) / n if sec else None
        ),
        "plain_up_B_per_site": sum(x["bytes_up"] for x in rounds if not x.get("secure")) / n,
        "plain_down_B_per_site": (sum(x["bytes_down"] for x in rounds if not x.get("secure")) / n),
        "K": r.get("n_clusters"),
        "ari": r.get("ari"),
        "load": f"{r.get('load_start')} / {r.get('load_end')}",
    }


def secure_table(rows: list[dict]) -> str:
    """Markdown: one SecAgg+ simulation per row (``secure_summary``); times are wall s."""

    def f(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    head = (
        "| SuperNodes | SecAgg+ | refine rounds | completed | wall s | pre-flight | local | "
        "refine | labels | s per secure round | setup | share keys | masked vectors | unmask | "
        "secure B up/site | secure B down/site | K | ARI |"
    )
    lines = [head, "|" + "---|" * 18]
    for r in map(secure_summary, rows):
        lines.append(
            f"| {r['sites']:,} | {'yes' if r['secure'] else 'no'} | {r['refine_rounds']} | "
            f"{'yes' if r['completed'] else r['status']} | {f(r['wall'], '{:.0f}')} | "
            f"{f(r['preflight_s'])} | {f(r['local_s'])} | {f(r['refine_s'])} | "
            f"{f(r['label_s'])} | {f(r['secure_round_s'])} | {f(r['setup_s'])} | "
            f"{f(r['share_keys_s'])} | {f(r['masked_vectors_s'])} | {f(r['unmask_s'])} | "
            f"{f(r['secure_up_B_per_site'], '{:,.0f}')} | "
            f"{f(r['secure_down_B_per_site'], '{:,.0f}')} | {r['K']} | {f(r['ari'], '{:.3f}')} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown: wall time, then CPU seconds of the process per phase (robust on a shared
    machine), total CPU over the local fits' CPU, memory, bytes, K and ARI."""
    head = (
        "| sites | rows | refine rounds | wall s | CPU s | local | merge | refine | labels | "
        "CPU / local | peak MiB | up B/site | down B/site | pooled clusters | K | ARI |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['sites']:,} | {r['rows']:,} | {r['refine_rounds']} | {r['wall']:.1f} | "
            f"{r['cpu']:.1f} | {r['cpu_local']:.1f} | {r['cpu_merge']:.2f} | "
            f"{r['cpu_refine']:.1f} | {r['cpu_labels']:.1f} | {r['cpu'] / r['cpu_local']:.2f} | "
            f"{r['peak_mib']:.0f} | {r['up_per_site']:,.0f} | {r['down_per_site']:,.0f} | "
            f"{r['pooled_clusters']:,} | {r['K']} | {r['ari']:.4f} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], flower: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in flower if r.get("rc") == 0]
    fig, axes = plt.subplots(1, 2 if ok else 1, figsize=(11 if ok else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    for refine, style in ((0, "o-"), (1, "s--")):
        sel = [r for r in rows if (r["refine_rounds"] > 0) == bool(refine)]
        if sel:
            n = [r["sites"] for r in sel]
            label = "one-shot" if not refine else "with refinement"
            ax.plot(n, [r["cpu"] for r in sel], style, label=f"{label}: total")
            if not refine:
                ax.plot(n, [r["cpu_local"] for r in sel], ":", label="local fits (sum)")
                ax.plot(n, [max(r["cpu_merge"], 1e-3) for r in sel], "x-", label="global merge")
    ax.set_title("in-process, CPU seconds", fontsize=10)
    ax.set_ylabel("seconds")
    if ok:
        fx = axes[0, 1]
        n = [r["sites"] for r in ok]
        fx.plot(n, [r["wall"] for r in ok], "^-", label="whole run")
        fx.plot(n, [r["per_site"] for r in ok], "v:", label="per site")
        fx.set_title("Flower simulation (Ray, 2 sites at a time), wall", fontsize=10)
    for x in axes[0]:
        x.set_xscale("log")
        x.set_yscale("log")
        x.set_xlabel("sites (1,000 rows each)")
        x.legend(fontsize=8)
        x.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", default="10,100,500,1000,5000")
    p.add_argument("--refine", choices=("both", "0", "default"), default="both")
    p.add_argument("--flower", action="store_true", help="also the Flower simulation")
    p.add_argument("--flower-sites", default="10,100,1000")
    p.add_argument("--flower-timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="seconds a site has per round in the simulation (default: the strategy's own)",
    )
    p.add_argument("--secagg", action="store_true", help="the SecAgg+ simulations only")
    p.add_argument("--secagg-sites", default="10,50,100")
    p.add_argument("--secagg-refine-rounds", type=int, default=1)
    p.add_argument("--secagg-timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument(
        "--secagg-primitives",
        action="store_true",
        help="with --secagg: SecAgg+'s per-site cryptography at --secagg-sites, CPU s, no run",
    )
    p.add_argument(
        "--secagg-baseline",
        action="store_true",
        help="with --secagg: the same simulations with plain rounds (secure_aggregation=false)",
    )
    p.add_argument("--no-paper", action="store_true", help="skip the 6,500-practice estimate")
    p.add_argument("--figure", default=None, help="write the figure here (PNG)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument(
        "--from-json",
        default=None,
        help="comma-separated --json files of earlier runs: print their table, draw the figure",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.from_json:
        rows, flower, secure = [], [], []
        for path in a.from_json.split(","):
            with open(path) as f:
                saved = json.load(f)
            secure += saved.get("secagg") or []
            if "in_process" not in saved:
                continue
            rows += [r for r in saved["in_process"] if "cpu" in r]  # runs with CPU times
            flower += saved.get("flower") or []
        rows.sort(key=lambda r: (r["refine_rounds"] > 0, r["sites"]))
        if rows:
            print(table(rows))
        if secure:
            order = sorted(
                secure, key=lambda r: (r["refine_rounds"], r["sites"], r.get("secure", 1))
            )
            print(secure_table(order))
        if a.figure:
            figure(rows, sorted(flower, key=lambda r: r["sites"]), a.figure)
        return
    if a.worker and a.worker.startswith("secagg:"):
        _, n, r, out, rt, *secure = a.worker.split(":")
        rt = None if rt == "None" else float(rt)
        secure = not secure or secure[0] == "1"
        print("RESULT " + json.dumps(run_secure_worker(int(n), int(r), out, rt, secure)))
        return
    if a.worker:  # one configuration in this process: print its figures
        kind, n, refine = a.worker.split(":")
        out = paper_estimate() if kind == "paper" else run_in_process(int(n), refine == "1")
        print("RESULT " + json.dumps(out))
        return
    if a.secagg and a.secagg_primitives:
        print("| N | threshold | split s / site | combine s / site | pair key | pair mask |")
        print("|---|---|---|---|---|---|")
        for r in secagg_primitives([int(x) for x in a.secagg_sites.split(",")]):
            print(
                f"| {r['sites']} | {r['threshold']} | {r['split_s_per_site']:.3f} | "
                f"{r['combine_s_per_site']:.3f} | {r['pair_key_s'] * 1e3:.2f} ms | "
                f"{r['pair_mask_s'] * 1e3:.2f} ms |"
            )
        return
    if a.secagg:
        secure = []
        for n in [int(x) for x in a.secagg_sites.split(",")]:
            kind = "plain (baseline)" if a.secagg_baseline else "SecAgg+"
            print(f"{kind} simulation, {n} SuperNodes (load {_load()}) ...", flush=True)
            secure.append(
                run_secure(
                    n,
                    a.secagg_refine_rounds,
                    a.secagg_timeout,
                    a.round_timeout,
                    secure=not a.secagg_baseline,
                )
            )
            print(secure_table(secure[-1:]).splitlines()[-1], flush=True)
            if secure[-1].get("process_rc") != 0:
                print(secure[-1].get("tail", ""), flush=True)
            if a.json:  # after every size: a later one may not finish
                with open(a.json, "w") as f:
                    json.dump({"secagg": secure}, f, indent=1)
        print("\nSecAgg+ through the Flower simulation (wall s; bytes per site per secure round)")
        print(secure_table(secure))
        return
    refines = {"both": (0, 1), "0": (0,), "default": (1,)}[a.refine]
    rows = []
    for n in [int(x) for x in a.sites.split(",")]:
        for refine in refines:
            rows.append(_child(f"sites:{n}:{refine}"))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\nIn-process, one process per size (CPU seconds of that process per phase)")
    print(table(rows))
    one = sorted((r for r in rows if r["refine_rounds"] == 0), key=lambda r: r["sites"])
    for a_, b_ in zip(one, one[1:], strict=False):
        print(
            f"{a_['sites']} -> {b_['sites']} sites (x{b_['sites'] / a_['sites']:.0f}): CPU "
            f"x{b_['cpu'] / a_['cpu']:.1f}, merge CPU "
            f"x{b_['cpu_merge'] / max(a_['cpu_merge'], 1e-9):.1f}, "
            f"wall x{b_['wall'] / a_['wall']:.1f}"
        )
    paper = None if a.no_paper else _child("paper:0:1")
    if paper:
        print("\nPaper estimate: 6,500 practices of 10,000 patients (sites in parallel)")
        print(json.dumps(paper, indent=1))
    flower = []
    if a.flower:
        for n in [int(x) for x in a.flower_sites.split(",")]:
            flower.append(run_flower(n, a.flower_timeout, a.round_timeout))
            r = flower[-1]
            print(
                f"Flower simulation, {n} SuperNodes: rc {r['rc']}, {r['wall']:.0f} s "
                f"({r['per_site']:.2f} s per site), K {r.get('n_clusters')}, ARI {r.get('ari')}"
                + (f"\n{r['tail']}" if r["rc"] != 0 else ""),
                flush=True,
            )
    if a.figure:
        figure(rows, flower, a.figure)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"in_process": rows, "paper": paper, "flower": flower}, f, indent=1)


def _child(worker: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", worker], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{worker} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


if __name__ == "__main__":
    main()
