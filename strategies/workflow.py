"""How each round is run on Flower's Grid: per-phase timeouts, SecAgg+ where sums suffice.

:class:`PhaseFitWorkflow` is the ``fit_workflow`` of Flower's ``DefaultWorkflow``: it runs a
round whose replies are only ever summed (refinement, labels) with SecAgg+ (request-bound
masks: :class:`strategies.secure_workflow.BoundSecAggPlusWorkflow`) when
the strategy asks for secure aggregation, and every other round as Flower's default fit
workflow does, but with the strategy's timeout for the phase, so that a site that hangs is
named after that many seconds instead of blocking the run. :func:`run_strategy` runs a strategy
to the end on a Grid (deployment or simulation).
"""

from __future__ import annotations

import time
from logging import DEBUG
from typing import cast

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Parameters, Status
from flwr.common.logger import log
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedvi import secagg
from fedvi.protocol import K_SECONDS, Phase
from strategies.fedmerdel import FedMerDel
from strategies.node_status import WatchedGrid, send_and_watch
from strategies.secure_workflow import BoundSecAggPlusWorkflow


def _current_round(context: LegacyContext) -> int:
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


def startup_seconds(arrivals: dict[int, float], site_seconds: dict[int, float]) -> float:
    """How long the first round waited for the engine and nodes rather than for the sites'
    work: the earliest reply's arrival minus the seconds that site says it worked (0 if none)."""
    lags = [arrivals[n] - site_seconds.get(n, 0.0) for n in arrivals]
    return max(0.0, min(lags)) if lags else 0.0


def plain_fit_round(grid, context: LegacyContext, timeout: float) -> None:
    """Flower's default fit round, with a timeout, watching the SuperLink's node list while it
    waits (:func:`strategies.node_status.send_and_watch`): a node that goes offline is handed
    to the strategy as a :class:`NodeOffline` as soon as the SuperLink notices, one still
    silent at the timeout as a :class:`RoundTimeout`, a site's own error as a failed
    ``FitRes``."""
    rnd = _current_round(context)
    arr_record = context.state.array_records[MAIN_PARAMS_RECORD]
    parameters = compat.arrayrecord_to_parameters(arr_record, keep_input=True)
    t0 = time.perf_counter()
    instructions = context.strategy.configure_fit(
        server_round=rnd, parameters=parameters, client_manager=context.client_manager
    )
    waited = time.perf_counter() - t0  # pre-flight: waiting for the sites to connect
    results, failures, arrivals = [], [], {}
    if instructions:
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        messages = [
            Message(
                content=compat.fitins_to_recorddict(ins, True),
                dst_node_id=proxy.node_id,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
            )
            for proxy, ins in instructions
        ]
        phase = context.strategy.round(rnd).phase.value
        site_of = context.strategy.node_site
        replies, lost = send_and_watch(grid, messages, timeout, phase, site_of, arrivals=arrivals)
        failures.extend(lost)  # NodeOffline / RoundTimeout, each with its node and site
        for msg in replies:
            proxy = proxies.get(msg.metadata.src_node_id)
            if msg.has_content() and proxy is not None:
                res = compat.recorddict_to_fitres(msg.content, False)
                (results if res.status.code == Code.OK else failures).append((proxy, res))
            elif proxy is not None:
                reason = msg.error.reason if msg.has_error() else "no content"
                failures.append(
                    (
                        proxy,
                        FitRes(Status(Code.FIT_NOT_IMPLEMENTED, reason), Parameters([], ""), 0, {}),
                    )
                )
            else:
                failures.append(RuntimeError(msg.error.reason if msg.has_error() else "reply"))
    log(DEBUG, "round %d: %d replies, %d failures", rnd, len(results), len(failures))
    try:
        params, metrics = context.strategy.aggregate_fit(rnd, results, failures)
    finally:
        if rnd == 1:  # start-up (sites connecting, the engine starting) is not pre-flight work
            worked = {int(p.node_id): float(r.metrics.get(K_SECONDS, 0.0)) for p, r in results}
            startup = waited + startup_seconds(arrivals, worked)
            timings = context.strategy.result.timings
            first = context.strategy.round(rnd).phase.value
            timings[first] = max(0.0, timings.get(first, 0.0) - startup)
            timings["startup"] = startup
    if params:
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            params, True
        )
        context.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)


#: Seconds a simulation's engine spends per wave of sites besides their work (messages to and
#: from each virtual node; measured up to 2.5 s a wave at 1,000 nodes on 2 loaded cores).
WAVE_OVERHEAD = 3.0


#: Seconds one site spends splitting its two SecAgg+ secrets into N Shamir shares, per N²
#: (the share-keys stage: threshold 0.67 N, so O(N²) per site); measured 1.385 s at N = 100
#: on the 2-core development machine (``bench_sites.py --secagg-primitives``).
SHARE_SPLIT_PER_N2 = 1.4e-4
#: Headroom on that measurement for a loaded or slower machine (the 100-site simulation's
#: share-keys stage took 2 x the sites' split time on 2 loaded cores).
SECURE_MARGIN = 4.0


def phase_timeout(strategy: FedMerDel, phase: Phase, secure: bool = False) -> float:
    """Seconds a site has to answer ``phase`` (each stage of a ``secure`` round): the
    configured ``round_timeout``, else a bound derived from the largest site's table
    (rows x variables) from pre-flight, stretched when sites take turns for a simulation's
    CPU slots (``site_slots``): each wave of sites adds its work and :data:`WAVE_OVERHEAD`
    (pre-flight too, whose base is ``preflight_timeout``). A secure round's stages also get
    each site's share split, which grows as N² per site (:data:`SHARE_SPLIT_PER_N2`, times
    :data:`SECURE_MARGIN`, per wave): a bound linear in N stopped the 150-site share-keys
    stage (docs/experiments.md)."""
    options = strategy.options
    slots = strategy.site_slots
    pre = strategy.coordinator.preflights
    sites = len(pre) if pre and phase is not Phase.PREFLIGHT else len(strategy.coordinator.expected)
    waves = -(-max(sites, 1) // slots) if slots else 1
    overhead = WAVE_OVERHEAD * waves if slots else 0.0
    if phase is Phase.PREFLIGHT:
        return options.preflight_timeout + overhead
    if options.round_timeout is not None:
        return options.round_timeout
    cells = max((p.n_rows * p.n_features for p in pre.values()), default=1e6)
    if phase is Phase.LOCAL:
        return 120.0 + 3e-6 * cells * waves + overhead
    shares = SECURE_MARGIN * SHARE_SPLIT_PER_N2 * sites**2 * waves if secure else 0.0
    return 60.0 + 5e-7 * cells * waves + overhead + shares


class PhaseFitWorkflow:
    """The fit workflow of a :class:`FedMerDel` run (see the module docstring)."""

    def __init__(self, strategy: FedMerDel):
        self.strategy = strategy

    def __call__(self, grid, context: Context) -> None:
        rnd = _current_round(context)
        plan = self.strategy.round(rnd)
        if plan is None:  # the run is over (refinement stopped before its last round)
            return
        timeout = phase_timeout(self.strategy, plan.phase, plan.secure)
        if plan.secure:
            # The SecAgg+ stages call the Grid themselves: the watched Grid stops waiting for a
            # node the SuperLink lists as offline.
            watched = WatchedGrid(grid, plan.phase.value, self.strategy.node_site)
            BoundSecAggPlusWorkflow(
                num_shares=1.0,
                reconstruction_threshold=0.67,
                max_weight=secagg.MAX_WEIGHT,
                clipping_range=secagg.CLIPPING_RANGE,
                quantization_range=secagg.QUANTIZATION_RANGE,
                modulus_range=secagg.MODULUS_RANGE,
                timeout=timeout,
            )(watched, context)
            self.strategy.after_secure_round(rnd)
        else:
            plain_fit_round(grid, context, timeout)


def _no_evaluation(grid, context) -> None:
    return None


def run_strategy(grid, context: Context, strategy: FedMerDel) -> None:
    """Run ``strategy`` to its last round on ``grid`` (raises if the run fails)."""
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=strategy.num_rounds),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=PhaseFitWorkflow(strategy), evaluate_workflow=_no_evaluation)(
        grid, legacy
    )
