"""SecAgg+ rounds that a server cannot split: the site's own checks around Flower's SecAgg+.

Flower 1.42's ``secaggplus_mod`` trusts the server for everything it relays: it answers a
round with as few participants as the server picks (it checks only that it got
``reconstruction_threshold`` keys) and it masks whatever request each node received. A server
that sends each node a different request (e.g. a posterior under which no row of the other
sites reaches cluster 1, or settings that make the other sites release nothing) turns the
secure sum into one site's release. :func:`secure_round_mod` closes this at the site:

1. **Participants and threshold** (the site's :class:`fedvi.SitePolicy`): the site refuses
   (a :class:`fedvi.policy.PolicyRefusal` naming ``secagg-min-sites`` or
   ``secagg-min-threshold``) a round whose setup, key exchange, masked-vector or unmask stage
   has fewer than ``secagg-min-sites`` participants, or whose reconstruction threshold ``t`` is
   not a strict majority of the share holders ``n`` (``2t > n``) and at least
   ``secagg-min-threshold * n``. At unmasking it also refuses lists in which a node is both
   active and dropped, a node it never exchanged keys with, or itself not active: with those
   checks no node reveals both shares of one node (its private-mask seed and its key), so no
   single site's vector can be unmasked.
2. **The request is bound into the masks.** After Flower derives the pairwise secret ``s_ij``
   of two nodes (ECDH + HKDF), each node keys its pairwise mask with
   ``sha256(TAG || s_ij || h)`` instead of ``s_ij``, where ``h = request_hash`` of the request
   *it* received (:func:`request_hash`: the FitIns arrays and config of the round). The two
   masks of a pair cancel in the sum only when both nodes received the same request; otherwise
   the sum carries uniformly random residues modulo ``2**32`` and the server gets noise, not a
   site's statistics.

Implementation: Flower's own ``secaggplus_mod`` runs every stage unchanged; after its
masked-vector stage this module re-keys the pairwise masks in the masked vector by adding
``sign * (PRG(bound key) - PRG(s_ij))`` modulo the modulus (:func:`rekey_correction`, the same
``pseudo_rand_gen`` Flower uses), so the bytes sent are exactly what Flower's code would send
with the bound key.

**Dropouts.** When a node drops after the key exchange, the server rebuilds its key ``sk1``
from shares and removes its pairwise masks with the active nodes. Those masks were keyed with
each *active* node's request hash, which the server knows (it sent the requests), so an honest
server removes them: :class:`strategies.secure_workflow.BoundSecAggPlusWorkflow` does
(Flower's stock ``SecAggPlusWorkflow`` would remove unbound masks and return noise in a round
with a dropout; without dropouts the stock workflow sums exactly). A hostile server learns
nothing more from this than from plain SecAgg+: dropped nodes' vectors are not in the sum, and
the masks between *active* nodes still cancel only when their requests agree, so whatever
set of nodes the server declares active (at least ``secagg-min-sites`` of them, a strict
majority of share holders) must all have received the same request for the sum to mean
anything.

What this does not stop (see docs/secure-aggregation.md): one request that itself singles
out a site (a posterior whose cluster only that site's rows reach; the per-site floor and DP
still apply to what the site releases), nodes run by the server (sybils) counted as
participants, and the per-site local-to-global map of map labelling, which is not bound (it is
the one part of a request that differs between honest sites).
"""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedvi.policy import PolicyRefusal, SitePolicy
from fedvi.request_binding import rekey_correction, request_hash


# --- the request a node received -------------------------------------------------------------
def content_hash(content: RecordDict) -> bytes:
    """:func:`request_hash` of the FitIns in a message's content (what a node received, or
    what the server sends it)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    return request_hash(parameters_to_ndarrays(fitins.parameters), fitins.config)


def _rekey_masked_vector(state_record, configs, out_configs, req_hash: bytes) -> None:
    """Re-key the pairwise masks of the masked vector Flower's mod just computed (in place)."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState

    state = SecAggPlusState(**state_record)
    masked = [bytes_to_ndarray(b) for b in out_configs[Key.MASKED_PARAMETERS]]
    shapes = [a.shape for a in masked]
    sk1 = bytes_to_private_key(state.sk1)
    for src in configs[Key.SOURCE_LIST]:  # the nodes whose pairwise masks Flower added
        secret = generate_shared_key(sk1, bytes_to_public_key(state.public_keys_dict[src][0]))
        sign = 1 if state.nid > src else -1
        fix = rekey_correction(pseudo_rand_gen, secret, req_hash, state.mod_range, shapes)
        masked = [a + sign * c for a, c in zip(masked, fix, strict=True)]
    out_configs[Key.MASKED_PARAMETERS] = [
        ndarray_to_bytes(np.mod(a, state.mod_range)) for a in masked
    ]


# --- the site's checks -----------------------------------------------------------------------
def _refuse(rule: str, reason: str) -> None:
    raise PolicyRefusal(rule, reason)


def check_participants(policy: SitePolicy, n: int, stage: str) -> None:
    """Refuse a stage with fewer than ``secagg-min-sites`` participants."""
    if n < policy.secagg_min_sites:
        _refuse(
            "secagg-min-sites",
            f"secure aggregation with {n} participants at stage {stage}; this site needs at "
            f"least {policy.secagg_min_sites}",
        )


def check_threshold(policy: SitePolicy, threshold: int, holders: int) -> None:
    """Refuse a reconstruction threshold that is not a strict majority of the ``holders`` of
    shares, or below ``secagg-min-threshold`` of them."""
    if not (2 * threshold > holders and threshold >= policy.secagg_min_threshold * holders):
        _refuse(
            "secagg-min-threshold",
            f"reconstruction threshold {threshold} of {holders} share holders; this site "
            f"needs a strict majority and at least {policy.secagg_min_threshold} of them",
        )
    if threshold > holders:
        _refuse("secagg-min-threshold", f"threshold {threshold} above {holders} share holders")


def check_stage(policy: SitePolicy, stage: str, configs, state_record, nid: int) -> None:
    """The site's checks of one SecAgg+ stage, before Flower's mod runs it."""
    if stage == Stage.SETUP:
        n = int(configs.get(Key.SAMPLE_NUMBER, 0))
        check_participants(policy, n, stage)
        holders = min(n, int(configs.get(Key.SHARE_NUMBER, 0)))
        check_threshold(policy, int(configs.get(Key.THRESHOLD, 0)), holders)
    elif stage == Stage.SHARE_KEYS:
        # One pair of public keys per participant (this site's included), besides the stage.
        n = sum(1 for key in configs if key != Key.STAGE)
        check_participants(policy, n, stage)
        check_threshold(policy, int(state_record.get("threshold", 0)), n)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        n = len(configs.get(Key.SOURCE_LIST, [])) + 1  # the nodes whose shares reached it
        check_participants(policy, n, stage)
    elif stage == Stage.UNMASK:
        active = list(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
        dead = list(configs.get(Key.DEAD_NODE_ID_LIST, []))
        known = set(state_record.get("public_keys_dict:K", []))
        if len(set(active)) != len(active) or len(set(dead)) != len(dead):
            _refuse("secagg-min-threshold", "a node is listed twice at unmasking")
        if set(active) & set(dead):
            _refuse("secagg-min-threshold", "a node is listed as both active and dropped")
        if not (set(active) | set(dead)) <= known or nid not in active:
            _refuse("secagg-min-threshold", "the unmask lists do not match the key exchange")
        check_participants(policy, len(active), stage)
        check_threshold(policy, int(state_record.get("threshold", 0)), len(known))


def secure_round_mod(policy: SitePolicy, msg, ctxt, call_next, secaggplus_mod):
    """Run one SecAgg+ message through the site's checks and Flower's ``secaggplus_mod``, and
    bind the request into the pairwise masks of the masked-vector stage.

    ``msg`` is a TRAIN message carrying SecAgg+ configs; ``secaggplus_mod`` is Flower's mod
    (passed in so that this module's caller chooses it).
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    state_record = ctxt.state.config_records.get(RECORD_KEY_STATE) or {}
    nid = msg.metadata.dst_node_id
    check_stage(policy, stage, configs, state_record, nid)
    req_hash = None
    if stage == Stage.COLLECT_MASKED_VECTORS:
        req_hash = content_hash(msg.content)
        sources = list(configs[Key.SOURCE_LIST])  # Flower's mod pops the stage, not these
    out = secaggplus_mod(msg, ctxt, call_next)
    if req_hash is not None and out.has_content():
        out_configs = out.content.config_records[RECORD_KEY_CONFIGS]
        _rekey_masked_vector(
            ctxt.state.config_records[RECORD_KEY_STATE],
            {Key.SOURCE_LIST: sources},
            out_configs,
            req_hash,
        )
    return out
