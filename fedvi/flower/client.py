"""The Flower site: a ``NumPyClient`` that runs the FedMerDel site steps under its own policy.

Everything a site receives from the server is untrusted input. The site's own
:class:`fedvi.SitePolicy` (its node config, ``--node-config 'partition-id=3
data-path="/secure/codes.csv" min-cluster-size=10'``) bounds what it reads, writes and
releases; the round config only asks. Each round (:mod:`fedvi.protocol`):

- ``preflight``: reads and checks its table (once: the encoded table is cached on the site's
  disk and reused by later phases) and returns its schema and row count, no fit;
- ``local``: fits MerDel; returns exactly its released :class:`fedvi.Summaries` (clusters below
  its floor removed first);
- ``refine``: statistics per global cluster under the broadcast posterior (checked first),
  restricted to clusters that own at least its floor of rows (or noised, with DP);
- ``label``: writes its labels to ``<output-dir>/labels_site<id>_run<run>_<model hash>.csv``
  on the site (a new file per run and model) and returns only counts per global cluster, those
  below its floor suppressed, and the file's name.

The phases themselves are :class:`fedvi.site_agent.SiteAgent`'s (the same object the
in-process engine calls); this module reads the site's file, moves the wire and keeps the
agent's state between messages. A failure is logged in full on the site; the server gets
only a :class:`fedvi.protocol.SiteError` naming the phase, the site and the rule or the kind of
problem (never a value, header, path or row number).
"""

from __future__ import annotations

import os
import time
from logging import ERROR, INFO

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedvi import secagg
from fedvi.data import DataError
from fedvi.flower.secure_round import secure_round_mod
from fedvi.flower.site_log import (
    colour_only_on_a_terminal,
    log_failure,
    log_path,
    site_errors_mod,
)
from fedvi.io import locate_error, open_table, write_labels
from fedvi.label_files import label_file_name, latest_labels, model_hash
from fedvi.ledger import request_sha256
from fedvi.policy import PolicyRefusal, SitePolicy
from fedvi.protocol import (
    K_PHASE,
    K_PROTOCOL,
    K_SECAGG,
    K_SITE,
    PHASES,
    PROTOCOL_VERSION,
    Phase,
    ProtocolError,
    SiteError,
    decode_request,
    encode_reply,
    reply_metrics,
    site_error_message,
)
from fedvi.site_agent import SiteAgent, safe_reason
from fedvi.vi import Source

__all__ = ["FedviClient", "labels_path", "make_client_app", "make_client_fn", "safe_reason"]

_LOCAL_SOURCE = "fedvi.local-source"


def labels_path(output_dir: str, site: int) -> str:
    """The newest label file site ``site`` wrote in ``output_dir``
    (:func:`fedvi.label_files.latest_labels`; the names carry the run id and model hash), or a
    path that does not exist when it wrote none."""
    try:
        return latest_labels(output_dir, site)
    except FileNotFoundError:
        return os.path.join(output_dir, f"labels_site{site}_none.csv")


class FedviClient(NumPyClient):
    """One site on Flower: a thin wrapper of :class:`fedvi.site_agent.SiteAgent` that reads
    the site's table from the path its policy names, decodes each round, encodes the reply
    (masked for SecAgg+) and keeps the agent's per-run state in the node's context.

    ``node_config``: the SuperNode's config (``partition-id`` and the :class:`SitePolicy`
    keys); ``state``: the persistent context state; ``policy``: overrides the policy read from
    the node config (the simulation's built-in sites, whose factory names their files);
    ``rng``: the site's noise generator (default: OS entropy; tests pin it here); ``run_id``:
    the Flower run, which names the run's label file."""

    def __init__(
        self,
        node_config: dict,
        state=None,
        policy: SitePolicy | None = None,
        rng: np.random.Generator | None = None,
        run_id: int | None = None,
    ):
        self.node_config = dict(node_config)
        self.run_id = run_id  # names the run's label file
        if "partition-id" not in self.node_config:
            raise ValueError(
                "the SuperNode has no partition-id: start it with "
                '--node-config "partition-id=<site index> data-path=<file>"'
            )
        self.partition_id = int(self.node_config["partition-id"])
        self.policy = policy if policy is not None else SitePolicy.from_node_config(node_config)
        self.state = state
        self.name = f"site {self.partition_id}"
        self.agent = SiteAgent(
            self.partition_id,
            self._read,
            self.policy,
            rng=rng,
            label_sink=self._write_labels,
            state_dir=self.state_dir,
            run_id=run_id,
        )
        self._restore()

    # --- what the site reads and writes (its own policy names it) ---------------------------
    def data_path(self) -> str:
        if self.policy.data_path:
            return self.policy.data_path
        raise PolicyRefusal("data-path", "the node config names no data-path")

    def output_dir(self) -> str:
        if self.policy.output_dir:
            return self.policy.output_dir
        return os.path.dirname(os.path.abspath(self.data_path()))

    def state_dir(self) -> str:
        """The site's own state folder (its release ledger): the node config's ``state-dir``,
        else ``<output-dir>/.fedvi-state/site<id>`` (sites that share an output folder, as the
        simulation's do, keep separate ledgers)."""
        if self.policy.state_dir:
            return self.policy.state_dir
        return os.path.join(self.output_dir(), ".fedvi-state", f"site{self.partition_id}")

    def cache_dir(self) -> str:
        if self.policy.cache_dir:
            return self.policy.cache_dir
        return os.path.join(self.output_dir(), ".fedvi-cache")

    def _read(self, missing: str):
        """The site's table, read and validated once per file version (cached on its disk)."""
        return open_table(
            self.data_path(),
            label_column=self.policy.label_column,
            missing=missing,
            cache_dir=self.cache_dir(),
        )

    def _write_labels(self, labels: np.ndarray, posterior) -> str:
        """Write the run's labels to a new file named by the run id and the model's hash
        (atomically); its name (no folder) goes back in the label reply."""
        model = model_hash(posterior)
        name = label_file_name(self.partition_id, self.run_id, model)
        write_labels(os.path.join(self.output_dir(), name), labels, model=model)
        return name

    # --- the agent's per-run state in the node's context ------------------------------------
    def _restore(self) -> None:
        if self.state is None:
            return
        if _LOCAL_SOURCE in self.state.array_records:
            arrays = self.state[_LOCAL_SOURCE].to_numpy_ndarrays()
            self.agent.local_source = Source.from_arrays(arrays)

    def _save(self) -> None:
        if self.state is None:
            return
        if self.agent.local_source is not None:
            arrays = self.agent.local_source.to_arrays()
            self.state[_LOCAL_SOURCE] = ArrayRecord([np.asarray(a) for a in arrays])

    # --- NumPyClient ------------------------------------------------------------------------
    def get_properties(self, config):
        return {K_SITE: self.partition_id, K_PROTOCOL: PROTOCOL_VERSION}

    def get_parameters(self, config):
        return []

    def evaluate(self, parameters, config):
        return 0.0, 0, {}

    def fit(self, parameters, config):
        phase = config.get(K_PHASE)
        phase = phase if phase in PHASES else "unknown"
        t0 = time.perf_counter()
        try:
            sha = request_sha256(parameters, config)  # the ledger's hash of what came
            req = decode_request(parameters, config)
            secure = bool(config.get(K_SECAGG, False))
            reply = self.agent.handle(req, secure, sha)
            self._save()
            arrays, extra = encode_reply(reply)
            n = self.agent_rows(reply)
            if secure and req.phase in (Phase.REFINE, Phase.LABEL):
                arrays = self._secure(arrays, req)
                # SecAgg+ weighs each site by num_examples / max_weight: 1 makes the average
                # times the number of sites the sum, and keeps the site's size out of the
                # unmasked field.
                n = secagg.NUM_EXAMPLES
        except Exception as exc:  # nothing but a safe reason leaves the site
            if isinstance(exc, DataError) and self.policy.data_path:
                exc = locate_error(exc, self.policy.data_path)  # the site's log names the file
            log_failure(self.name, phase, exc, log_path(self.policy.output_dir, self.partition_id))
            raise SiteError(
                site_error_message(self.partition_id, phase, safe_reason(exc))
            ) from None
        seconds = time.perf_counter() - t0
        log(INFO, "%s: phase %s, %d rows, %.2f s", self.name, phase, n, seconds)
        return arrays, int(n), reply_metrics(self.partition_id, phase, seconds, **extra)

    def agent_rows(self, reply) -> int:
        """Rows behind a reply (Flower's ``num_examples``)."""
        if hasattr(reply, "n_rows"):  # pre-flight
            return int(reply.n_rows)
        stats = getattr(reply, "summaries", None) or getattr(reply, "stats", None)
        if stats is not None:
            return int(stats.n_rows)
        return 0 if self.agent.labels is None else len(self.agent.labels)

    def _secure(self, arrays, req) -> list:
        if req.secagg_scale is None:
            raise ProtocolError("a securely aggregated round needs secagg.scale")
        if req.phase is Phase.LABEL:
            arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        return secagg.encode_limbs(arrays, req.secagg_scale)


def make_secagg_mod(policy_for=None, partition_offset: int = 0):
    """The site's SecAgg+ mod (see :func:`secagg_mod`) under the policy that
    :func:`make_client_fn` gives the site: ``policy_for(partition_id)`` or the node config's."""

    def policy_of(ctxt) -> SitePolicy:
        node_config = dict(ctxt.node_config)
        if policy_for is not None:
            return policy_for(int(node_config["partition-id"]) + partition_offset)
        return SitePolicy.from_node_config(node_config)

    def mod(msg, ctxt, call_next):
        """Route SecAgg+ messages through the site's secure-round checks and Flower's
        ``secaggplus_mod`` (:mod:`fedvi.flower.secure_round`), plain rounds straight to the
        client; mark (for the site's policy) whether the fit it runs is securely aggregated.

        The mark is set here, on the site, from the message's own SecAgg+ stage; a value sent
        by the server under the same key is removed first.
        """
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        fit_config = msg.content.config_records.get("fitins.config")
        if fit_config is not None:
            fit_config.pop(K_SECAGG, None)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            return call_next(msg, ctxt)
        try:
            policy = policy_of(ctxt)
        except Exception as exc:  # the site's own configuration: details stay in its log
            log(ERROR, "the node config is not valid", exc_info=exc)
            raise SiteError(
                site_error_message(
                    None, "setup", "the site's node config is not valid; details are in its log"
                )
            ) from None
        if configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS and fit_config is not None:
            fit_config[K_SECAGG] = True
        return secure_round_mod(policy, msg, ctxt, call_next, secaggplus_mod)

    return mod


#: The deployed site's SecAgg+ mod: its policy from the node config.
secagg_mod = make_secagg_mod()


def make_client_fn(policy_for=None, partition_offset: int = 0, rng_for=None):
    """``client_fn(context)`` of the site's ClientApp: ``policy_for(partition_id) ->
    SitePolicy`` replaces the node config's policy (the simulation's built-in sites get their
    data path, label column and output folder this way, per partition id: never from the
    server); ``partition_offset`` shifts the simulation's partition ids (sites added to a
    model); ``rng_for(partition_id) -> np.random.Generator`` gives the site's noise generator
    (tests pin it; default: OS entropy)."""

    def client_fn(context: Context):
        """The site's client from its node config (a config error stays on the site)."""
        colour_only_on_a_terminal()
        node_config = dict(context.node_config)
        try:
            node_config["partition-id"] = int(node_config["partition-id"]) + partition_offset
            policy = None
            if policy_for is not None:
                policy = policy_for(node_config["partition-id"])
            rng = None if rng_for is None else rng_for(node_config["partition-id"])
            return FedviClient(node_config, context.state, policy, rng, context.run_id).to_client()
        except Exception as exc:  # the site's own configuration: details stay in its log
            log(ERROR, "the node config is not valid: %s", " ".join(str(exc).split()))
            pid = node_config.get("partition-id")
            raise SiteError(
                site_error_message(
                    pid if isinstance(pid, int) else None,
                    "setup",
                    "the site's node config is not valid; details are in the site's log",
                )
            ) from None

    return client_fn


def make_client_app(policy_for=None, partition_offset: int = 0, rng_for=None) -> ClientApp:
    """The site's ``ClientApp`` (see :func:`make_client_fn`), with its SecAgg+ mod
    (:func:`make_secagg_mod`)."""
    return ClientApp(
        client_fn=make_client_fn(policy_for, partition_offset, rng_for),
        mods=[site_errors_mod, make_secagg_mod(policy_for, partition_offset)],
    )


#: The deployed site's app (``[tool.flwr.app.components] clientapp``): policy from the node config.
app = make_client_app()
