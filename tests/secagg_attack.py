"""A hostile server against real SecAgg+ rounds on Flower's simulation engine (no tests here;
``tests/test_secure_round.py`` runs it in a subprocess of its own, as Ray wants).

    python tests/secagg_attack.py OUT.json [--sites 3] [--attack split|posterior|none|drop]
        [--node-config 'secagg-min-sites=4']

Three sites (simulated tables), one refinement round under secure aggregation, with
``strategies.workflow.run_strategy`` (the ServerApp's own loop). ``--attack split``: the
server sends site 0 the honest refinement request and every other site the same request with
another SecAgg scale (``2**80``: each site divides its statistics by it, so theirs vanish below
Flower's quantisation grid), so that the secure sum is site 0's statistics alone. This is the
per-node-request attack of issue 15 (there, the other sites got a posterior whose cluster 1 no
row reaches); any difference in the request works the same way, and the defence binds the
whole request. ``--attack posterior``: the other sites get a posterior whose cluster 0
outweighs the others a billion times, so all their rows go to cluster 0 and the sum's other
clusters are site 0's statistics. ``--attack none``: an honest server. ``--attack drop``: an
honest server whose site 2 drops out after the key exchange (its request is malformed, so its
fit fails at the masked-vector stage): the server must remove site 2's pairwise masks, keyed
with the other sites' request hashes.

Writes to OUT.json: the decoded secure sum of the refinement round (``captured``), site 0's
and every site's true refinement statistics under the honest request (computed in-process
afterwards, without secure aggregation), the encoding-error bound, every error reason the
sites sent back (``errors``), the strategy's failures and notes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import fedvi  # noqa: E402
from fedvi import secagg  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.policy import SitePolicy  # noqa: E402
from fedvi.protocol import K_PHASE, Phase  # noqa: E402
from fedvi.simulate import simulate, split_sites  # noqa: E402


class RecordingGrid:
    """A Grid that records the error reason of every reply (what the sites said)."""

    def __init__(self, grid, errors: list[str]):
        self._grid, self._errors = grid, errors

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _record(self, replies) -> list:
        replies = list(replies)
        for m in replies:
            if m.has_error():
                self._errors.append(m.error.reason)
                print(f"secagg_attack: error reply: {m.error.reason}", file=sys.stderr)
        return replies

    def send_and_receive(self, messages, *args, **kwargs):
        return self._record(self._grid.send_and_receive(messages, *args, **kwargs))

    def pull_messages(self, message_ids):  # the round runner pushes and pulls itself
        return self._record(self._grid.pull_messages(message_ids))


def hostile_strategy(base, attack: str):
    from flwr.common import FitIns, parameters_to_ndarrays

    class Server(base):
        """FedMerDel, except for what it sends in the refinement round (``attack``)."""

        honest: dict = {}
        captured = None

        def configure_fit(self, server_round, parameters, client_manager):
            out = super().configure_fit(server_round, parameters, client_manager)
            rnd = self.round(server_round)
            if rnd is None or rnd.phase is not Phase.REFINE or not out:
                return out
            sent = []
            for proxy, ins in out:
                site = self.node_site[proxy.cid]
                self.honest[site] = ins
                if attack == "split" and site != 0:
                    config = dict(ins.config)
                    config["secagg.scale"] = 2.0**80
                    ins = FitIns(ins.parameters, config)
                elif attack == "posterior" and site != 0:
                    ins = self.crafted_request()
                elif attack == "drop" and site == 2:
                    config = dict(ins.config)
                    config[K_PHASE] = "no-such-phase"
                    ins = FitIns(ins.parameters, config)
                sent.append((proxy, ins))
            return sent

        def crafted_request(self):
            """The refinement request with a posterior whose cluster 0 outweighs the others
            a billion times: every row of a site that gets it goes to cluster 0, so its
            statistics of the other clusters are zeros."""
            from strategies.fedmerdel import fitins

            post = self.coordinator.posterior
            counts, sums = post.counts.copy(), post.sums.copy()
            counts[0] *= 1e9
            sums[0] *= 1e9
            crafted = dataclasses.replace(post, counts=counts, sums=sums)
            req = self.coordinator.request(Phase.REFINE, None, secure=True)
            return fitins(dataclasses.replace(req, posterior=crafted))

        def aggregate_fit(self, server_round, results, failures):
            rnd = self.rounds.get(server_round)
            if rnd is not None and rnd.phase is Phase.REFINE and results and self.captured is None:
                arrays = parameters_to_ndarrays(results[0][1].parameters)
                scale = self.coordinator.secagg_scale()
                self.captured = secagg.decode_limbs(arrays, len(results), scale)
            return super().aggregate_fit(server_round, results, failures)

    return Server


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--attack", choices=["split", "posterior", "none", "drop"], default="split")
    ap.add_argument("--node-config", default="")
    args = ap.parse_args(argv)

    from flwr.app import RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.common.config import parse_config_args
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fedvi.flower.client import FedviClient, make_client_app
    from strategies.fedmerdel import FedMerDel
    from strategies.options import StrategyOptions
    from strategies.workflow import run_strategy

    tmp = Path(tempfile.mkdtemp(prefix="fedvi-secagg-attack-"))
    sim = simulate(1800, 4, 16, seed=5)
    parts = split_sites(sim.z, args.sites, "iid", seed=5)
    paths = []
    for b, rows in enumerate(parts):
        paths.append(tmp / f"site{b}.npy")
        np.save(paths[-1], sim.X[rows])
    extra = parse_config_args([args.node_config]) if args.node_config else {}
    # Sites that opt out of DP noise (unless --node-config says otherwise): the test compares
    # the secure sum with each site's exact statistics, and what protects here is the masks.
    base = SitePolicy.from_node_config({"dp-epsilon": "none", **extra})

    def policy_for(pid: int) -> SitePolicy:  # the simulated site's own files (its factory's)
        return dataclasses.replace(base, data_path=str(paths[pid]), output_dir=str(tmp))

    strategy = hostile_strategy(FedMerDel, args.attack)(
        fedvi.MixtureSpec(n_components=8),
        FitOptions(),
        ServerOptions(refine_rounds=1, refine_moves=False),  # the statistics alone
        StrategyOptions(secure_aggregation=True, wait_for_sites=60, round_timeout=60),
        range(args.sites),
        seed=7,
        site_slots=1,
    )
    errors: list[str] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        try:
            run_strategy(RecordingGrid(grid, errors), context, strategy)
        except Exception as exc:  # the outcome is what was captured
            strategy.result.notes.append(f"run failed: {type(exc).__name__}: {exc}")

    run_simulation(
        server_app=server_app,
        client_app=make_client_app(policy_for),
        num_supernodes=args.sites,
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 1,
                "include_dashboard": False,
                "log_to_driver": False,
            },
        },
    )
    out = {
        "attack": args.attack,
        "errors": errors,
        "failures": strategy.result.failures,
        "notes": strategy.result.notes,
        "policies": {str(s): r.policy for s, r in strategy.result.sites.items()},
        "captured": None,
        "truth": {},
    }
    if strategy.captured is not None and 0 in strategy.honest:
        out["captured"] = [np.asarray(a).tolist() for a in strategy.captured]
        out["scale"] = strategy.coordinator.secagg_scale()
        # |error| < n * 2**-63 * scale per value with 3 limbs (fedvi.secagg); 1e-9 relative
        # to the scale is far above it and far below any statistic's change.
        out["encoding_error"] = 1e-9 * out["scale"]
        from strategies.fedmerdel import fitins

        ins = strategy.honest[0]
        # Each site's exact statistics: a fresh run of the same site (its gate answers a refine
        # request only after a local fit of the run agreed the model; the fit is seeded, so
        # the agreed model and the statistics are the run's).
        local = fitins(strategy.coordinator.request(Phase.LOCAL))
        for site in sorted(strategy.honest):
            client = FedviClient({"partition-id": site}, RecordDict(), policy_for(site))
            client.fit(parameters_to_ndarrays(local.parameters), dict(local.config))
            arrays, _, _ = client.fit(parameters_to_ndarrays(ins.parameters), dict(ins.config))
            out["truth"][str(site)] = [np.asarray(a).tolist() for a in arrays]
    Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
