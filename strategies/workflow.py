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

from logging import INFO
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
from strategies.fedmerdel import FedMerDel
from strategies.secure_workflow import BoundSecAggPlusWorkflow


def _current_round(context: LegacyContext) -> int:
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


def plain_fit_round(grid, context: LegacyContext, timeout: float) -> None:
    """Flower's default fit round, with a timeout; a node that did not answer in time is left
    to the strategy, which names every site it asked and did not hear from."""
    rnd = _current_round(context)
    arr_record = context.state.array_records[MAIN_PARAMS_RECORD]
    parameters = compat.arrayrecord_to_parameters(arr_record, keep_input=True)
    instructions = context.strategy.configure_fit(
        server_round=rnd, parameters=parameters, client_manager=context.client_manager
    )
    results, failures = [], []
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
        for msg in grid.send_and_receive(messages, timeout=timeout):
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
    log(INFO, "round %d: %d replies, %d failures", rnd, len(results), len(failures))
    params, metrics = context.strategy.aggregate_fit(rnd, results, failures)
    if params:
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            params, True
        )
        context.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)


class PhaseFitWorkflow:
    """The fit workflow of a :class:`FedMerDel` run (see the module docstring)."""

    def __init__(self, strategy: FedMerDel):
        self.strategy = strategy

    def __call__(self, grid, context: Context) -> None:
        rnd = _current_round(context)
        phase = self.strategy.phase(rnd)
        timeout = self.strategy.timeout_for(phase)
        if self.strategy.secure_round(rnd):
            BoundSecAggPlusWorkflow(
                num_shares=1.0,
                reconstruction_threshold=0.67,
                max_weight=secagg.MAX_WEIGHT,
                clipping_range=secagg.CLIPPING_RANGE,
                quantization_range=secagg.QUANTIZATION_RANGE,
                modulus_range=secagg.MODULUS_RANGE,
                timeout=timeout,
            )(grid, context)
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
