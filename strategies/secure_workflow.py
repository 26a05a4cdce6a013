"""Flower's ``SecAggPlusWorkflow`` for sites whose pairwise masks are bound to their request.

Sites running :mod:`fedvi.flower.secure_round` key each pairwise mask with the hash of the
request they received. Without dropouts the stock workflow sums exactly (the masks of every
pair of active nodes cancel when the requests agree). When a node drops out after the key
exchange, the server removes that node's pairwise masks with the active nodes from its
rebuilt key; those masks were keyed with each *active* node's request hash, which this
workflow remembers from the requests it sent (:func:`fedvi.request_binding.request_hash`)
and applies before Flower's own unmasking removes the unbound masks.
"""

from __future__ import annotations

from logging import WARNING

import flwr.compat.common.recorddict_compat as compat
from flwr.common import parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedvi.request_binding import rekey_correction, request_hash


def _sent_hash(content) -> bytes:
    """The request hash of the FitIns the server sends a node (as the node computes it)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    return request_hash(parameters_to_ndarrays(fitins.parameters), fitins.config)


class _ReportingGrid:
    """The Grid of every stage: logs each node's error reply (a site's refusal names its rule,
    e.g. ``secagg-min-sites``), which Flower's workflow keeps to itself when it halts."""

    def __init__(self, grid):
        self.grid = grid

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if m.has_error():
                reason = str(m.error.reason).splitlines()[-1][-400:]
                log(WARNING, "secure aggregation: node %s: %s", m.metadata.src_node_id, reason)
        return replies


class _RekeyingGrid:
    """The Grid of the unmask stage: passes messages through and, from the replies' shares,
    re-keys the dropped nodes' pairwise masks in the masked sum before Flower removes them."""

    def __init__(self, grid, state, hashes: dict[int, bytes]):
        self.grid, self.state, self.hashes = grid, state, hashes

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        state = self.state
        dead = state.sampled_node_ids - state.active_node_ids
        shares: dict[int, list[bytes]] = {nid: [] for nid in dead}
        for m in replies:
            if m.has_error():
                continue
            res = m.content.config_records[RECORD_KEY_CONFIGS]
            for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
                if owner in shares:
                    shares[owner].append(share)
        vector = state.aggregate_ndarrays
        shapes = [a.shape for a in vector]
        for nid, got in shares.items():
            if len(got) < state.threshold:
                continue  # Flower's unmasking halts on it
            sk1 = bytes_to_private_key(combine_shares(got))
            for other in state.nid_to_neighbours[nid] & state.active_node_ids:
                secret = generate_shared_key(
                    sk1, bytes_to_public_key(state.nid_to_publickeys[other][0])
                )
                sign = 1 if nid > other else -1
                fix = rekey_correction(
                    pseudo_rand_gen, secret, self.hashes[other], state.mod_range, shapes
                )
                vector = [v + sign * c for v, c in zip(vector, fix, strict=True)]
        state.aggregate_ndarrays = parameters_mod(vector, state.mod_range)
        return replies


class BoundSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` for request-bound pairwise masks (see the module docstring); the
    nodes' error replies are logged."""

    def __call__(self, grid, context) -> None:
        super().__call__(_ReportingGrid(grid), context)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        self._hashes = {nid: _sent_hash(rd) for nid, rd in state.nid_to_fitins.items()}
        return super().collect_masked_vectors_stage(grid, context, state)

    def unmask_stage(self, grid, context, state) -> bool:
        return super().unmask_stage(_RekeyingGrid(grid, state, self._hashes), context, state)
