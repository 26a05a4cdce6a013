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
- ``label``: writes its labels to ``<output-dir>/labels_site<id>.csv`` on the site and returns
  only counts per global cluster, those below its floor suppressed.

Every release and refusal passes the site's release gate (:mod:`fedvi.gate`): the agreed model,
the caps and the privacy budget, read from the site's ledger in its state folder; the noise
comes from the site's own entropy.

A failure is logged in full on the site; the server gets only a :class:`fedvi.protocol.SiteError`
naming the phase, the site and the rule or the kind of problem (never a value, header, path or
row number).
"""

from __future__ import annotations

import dataclasses
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
from fedvi.federated import site_fit_options, site_seed
from fedvi.gate import SiteGate  # issue 15: the site's release gate (ledger, caps, budget)
from fedvi.io import open_table, write_labels
from fedvi.labels import label_rows, map_labels, release_label_counts, release_refinement
from fedvi.ledger import Ledger, LedgerError, request_sha256
from fedvi.options import FitOptions
from fedvi.policy import PolicyRefusal, SitePolicy, check_posterior, check_request
from fedvi.protocol import (
    K_PHASE,
    K_PROTOCOL,
    K_SECAGG,
    K_SITE,
    PHASES,
    PROTOCOL_VERSION,
    Phase,
    Preflight,
    ProtocolError,
    Request,
    SiteError,
    decode_request,
    encode_refine,
    encode_summaries,
    names_hash,
    reply_metrics,
    site_error_message,
    variable_hashes,
)
from fedvi.settings import InvalidSetting
from fedvi.site import encode_site, fit_site
from fedvi.vi import Problem, Source, labels_of

_LOCAL_SOURCE = "fedvi.local-source"


def safe_reason(exc: BaseException) -> str:
    """What may be said to the server about ``exc``: a rule or a category, never its text
    when that text could hold the site's data."""
    if isinstance(exc, PolicyRefusal):
        return str(exc)  # built from rule names and numbers only
    if isinstance(exc, DataError):  # a DataFileError too
        kind = getattr(exc, "kind", "bad-value")
        return f"the site's table failed validation ({kind}); details are in the site's log"
    if isinstance(exc, (InvalidSetting, ProtocolError)):
        return f"invalid request: {exc}"  # about the server's own values
    if isinstance(exc, LedgerError):
        return "refused: the site's release ledger is not available; details are in its log"
    return f"internal error ({type(exc).__name__}); details are in the site's log"


def labels_path(output_dir: str, site: int) -> str:
    """Where site ``site`` writes its labels (``<output_dir>/labels_site<id>.csv``)."""
    return os.path.join(output_dir, f"labels_site{site}.csv")


class FedviClient(NumPyClient):
    """One site. ``node_config``: the SuperNode's config (``partition-id`` and the
    :class:`SitePolicy` keys); ``state``: the persistent context state (keeps what later phases
    need: the local fit's source for map labels; the budget and caps live in the site's
    ledger, :mod:`fedvi.gate`); ``policy``: overrides
    the policy read from the node config (the simulation's built-in sites); ``run_id``: the
    Flower run (the ledger's per-run caps; a fresh id when not given); ``noise_rng``: the site's
    own noise generator (tests inject one; default OS entropy, never a request's seed)."""

    def __init__(
        self,
        node_config: dict,
        state=None,
        policy: SitePolicy | None = None,
        run_id=None,
        noise_rng: np.random.Generator | None = None,
    ):
        self.node_config = dict(node_config)
        if "partition-id" not in self.node_config:
            raise ValueError(
                "the SuperNode has no partition-id: start it with "
                '--node-config "partition-id=<site index> data-path=<file>"'
            )
        self.partition_id = int(self.node_config["partition-id"])
        self.policy = policy if policy is not None else SitePolicy.from_node_config(node_config)
        self.state = state
        self.name = f"site {self.partition_id}"
        self.run_id, self.noise_rng = run_id, noise_rng
        self.gate: SiteGate | None = None
        self._sha: str | None = None
        self._req: Request | None = None

    # --- what the site reads and writes (its policy decides) ----------------------------
    def _sim(self, req: Request) -> dict:
        if req.sim_paths and not self.policy.allow_server_paths:
            raise PolicyRefusal(
                "allow-server-paths",
                "this site reads and writes only the paths of its own node config; the server "
                "sent paths",
            )
        return req.sim_paths or {}

    def data_path(self, req: Request) -> str:
        sim = self._sim(req)
        if self.policy.data_path:
            return self.policy.data_path
        paths = sim.get("sim.data_paths") or []
        if self.partition_id < len(paths):
            return paths[self.partition_id]
        raise PolicyRefusal("data-path", "the node config names no data-path")

    def label_column(self, req: Request) -> str | None:
        return self.policy.label_column or self._sim(req).get("sim.label_column")

    def output_dir(self, req: Request) -> str:
        sim = self._sim(req)
        if self.policy.output_dir:
            return self.policy.output_dir
        if sim.get("sim.output_dir"):
            return sim["sim.output_dir"]
        return os.path.dirname(os.path.abspath(self.data_path(req)))

    def state_dir(self, req: Request) -> str:
        """The site's own state folder (its ledger): the node config's, else
        ``<output-dir>/.fedvi-state/site<id>`` (sites that share an output folder, as the
        simulation's do, keep separate ledgers)."""
        if self.policy.state_dir:
            return self.policy.state_dir
        return os.path.join(self.output_dir(req), ".fedvi-state", f"site{self.partition_id}")

    def _gate(self, req: Request) -> SiteGate:
        # issue 15 hook: one gate per client (run); its ledger lives in the site's state folder
        if self.gate is None:
            ledger = Ledger(self.state_dir(req))
            self.gate = SiteGate(self.policy, ledger, self.run_id, self.noise_rng)
        return self.gate

    def cache_dir(self, req: Request) -> str:
        if self.policy.cache_dir:
            return self.policy.cache_dir
        return os.path.join(self.output_dir(req), ".fedvi-cache")

    def table(self, req: Request, spec=None):
        """The site's table, read and validated once per file version (cached on its disk),
        encoded against ``spec``: ``(data, resolved spec)``."""
        spec = spec or req.spec
        t = open_table(
            self.data_path(req),
            label_column=self.label_column(req),
            missing=spec.missing,
            cache_dir=self.cache_dir(req),
        )
        if req.variable_order is not None and spec.feature_names is None:
            spec = dataclasses.replace(spec, feature_names=self._ordered(t, req.variable_order))
        return encode_site(t, spec, min_rows=1, source=self.name)

    def _ordered(self, table, order) -> tuple[str, ...]:
        """This table's variable names in the run's agreed order (given as name hashes)."""
        if table.feature_names is None:
            raise PolicyRefusal("schema", "the run matches variables by name; this table has none")
        by_hash = dict(zip(variable_hashes(table.feature_names), table.feature_names, strict=True))
        if set(by_hash) != set(order):
            raise PolicyRefusal("schema", "this table's variables differ from the agreed ones")
        return tuple(by_hash[h] for h in order)

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
            self._sha = request_sha256(parameters, config)  # issue 15: the ledger's request hash
            req = self._req = decode_request(parameters, config)
            handler = {
                Phase.PREFLIGHT: self._preflight,
                Phase.LOCAL: self._local,
                Phase.REFINE: self._refine,
                Phase.LABEL: self._label,
            }[req.phase]
            secure = bool(config.get(K_SECAGG, False))
            arrays, n, extra = handler(req, secure)
        except Exception as exc:  # nothing but a safe reason leaves the site
            log(ERROR, "%s, phase %s failed", self.name, phase, exc_info=exc)
            self._log_refusal(phase, exc)
            raise SiteError(
                site_error_message(self.partition_id, phase, safe_reason(exc))
            ) from None
        seconds = time.perf_counter() - t0
        log(INFO, "%s: phase %s, %d rows, %.2f s", self.name, phase, n, seconds)
        if secure and req.phase in (Phase.REFINE, Phase.LABEL):
            # SecAgg+ weighs each site by num_examples / max_weight: 1 makes the average times
            # the number of sites the sum, and keeps the site's size out of the unmasked field.
            n = secagg.NUM_EXAMPLES
        return arrays, int(n), reply_metrics(self.partition_id, phase, seconds, **extra)

    def _log_refusal(self, phase: str, exc: BaseException) -> None:
        """issue 15 hook: a refusal raised outside the gate goes to the ledger too."""
        if not isinstance(exc, PolicyRefusal) or getattr(exc, "logged", False):
            return
        if self._req is None:
            return
        try:
            self._gate(self._req).log_refusal(phase, exc, self._sha)
        except Exception:  # a refusal before the site knows its state folder: log only
            log(ERROR, "%s: the ledger could not log a refusal", self.name)

    # --- phases -------------------------------------------------------------------------------
    def _floor(self, req: Request) -> int:
        return self.policy.floor(req.server.min_cluster_size)

    def _opts(self, req: Request) -> FitOptions:
        """The run's fit options on this site's own hardware."""
        return site_fit_options(req.fit, self.policy)

    def _preflight(self, req: Request, secure: bool):
        check_request(req.spec, self.policy)
        data, _ = self.table(req)
        if data.n_rows < self._floor(req):
            raise PolicyRefusal(
                "min-cluster-size", "the site has fewer rows than the disclosure floor"
            )
        pre = Preflight(
            site=self.partition_id,
            n_rows=data.n_rows,
            n_features=data.n_features,
            levels=tuple(int(v) for v in data.n_levels),
            names_hash=names_hash(data.feature_names),
            variable_hashes=None
            if data.feature_names is None
            else tuple(variable_hashes(data.feature_names)),
            has_missing=bool(data.has_missing),
            policy=self.policy.summary(
                self._gate(req).preflight(
                    req.spec, data.n_rows, data.n_features, req.server, self._sha
                )
            ),
        )
        return [], data.n_rows, pre.to_metrics()

    def _local(self, req: Request, secure: bool):
        check_request(req.spec, self.policy)
        self._gate(req).start_local(req.spec, self._sha)  # issue 15: caps, agreed model
        t0 = time.perf_counter()
        data, spec = self.table(req)
        load = time.perf_counter() - t0
        fit = fit_site(
            data,
            spec,
            self._opts(req),
            seed=site_seed(req.seed, self.partition_id),
            min_cluster_size=self._floor(req),
            source=self.name,
        )
        if self.state is not None:
            arrays = fit.state.source.to_arrays()
            self.state[_LOCAL_SOURCE] = ArrayRecord([np.asarray(a) for a in arrays])
        self.gate.local_released(
            spec, fit.summaries.n_clusters, data.n_rows, self._floor(req), self._sha
        )
        arrays, meta = encode_summaries(fit.summaries, "summaries")
        meta.update(
            {
                "fit.n_iter": int(fit.trace.n_iter),
                "fit.converged": bool(fit.trace.converged),
                "fit.load_seconds": load,
                "fit.n_clusters": fit.summaries.n_clusters,
            }
        )
        return arrays, data.n_rows, meta

    def _aggregate_round(self, req: Request, secure: bool, rule: str, allowed: bool):
        if not allowed:
            raise PolicyRefusal(rule, f"this site does not answer {req.phase.value} rounds")
        if self.policy.require_secure_aggregation and not secure:
            raise PolicyRefusal(
                "require-secure-aggregation",
                f"this site answers {req.phase.value} rounds under secure aggregation only",
            )
        check_posterior(req.posterior, self.policy)
        data, _ = self.table(req, req.posterior.spec)
        # issue 15: the gate checks the agreed model, the caps and grants the budget (rho)
        rho = self._gate(req).aggregate(
            req.phase.value, req.posterior, data.n_rows, data.n_features, req.server, self._sha
        )
        return data, rho

    def _released(self, req: Request, data, rho, what: str) -> dict:
        """issue 15 hook: log the release in the ledger; the reply's budget figures."""
        return self.gate.released(
            req.phase.value,
            req.posterior.n_clusters,
            data.n_rows,
            what,
            rho,
            self._floor(req),
            req.server,
            self._sha,
        )

    def _refine(self, req: Request, secure: bool):
        data, rho = self._aggregate_round(req, secure, "allow-refine", self.policy.allow_refine)
        stats = release_refinement(
            data, req.posterior, self._floor(req), self._opts(req), rho, self.gate.rng
        )
        arrays = encode_refine(stats)
        extra = self._released(req, data, rho, "counts, sums, entropies per cluster")
        return self._secure(arrays, req, secure), data.n_rows, extra

    def _label(self, req: Request, secure: bool):
        data, rho = self._aggregate_round(req, secure, "allow-labels", self.policy.allow_labels)
        posterior = req.posterior
        if req.mapping is not None:
            labels = map_labels(self._local_labels(data, req), self._checked_mapping(req))
        else:
            labels = label_rows(data, posterior, self._opts(req))
        write_labels(labels_path(self.output_dir(req), self.partition_id), labels)
        marker = 0 if secure else -1
        shown = release_label_counts(
            labels, posterior.n_clusters, self._floor(req), rho, self.gate.rng, marker
        )
        # Under secure aggregation the server sees only the sum: no per-site scalar about it.
        extra = {} if secure else {"label.n_suppressed": int((shown == marker).sum())}
        extra.update(self._released(req, data, rho, "label counts per cluster"))
        arrays = [shown.astype(np.float64 if secure else np.int64)]
        return self._secure(arrays, req, secure), data.n_rows, extra

    def _secure(self, arrays, req: Request, secure: bool):
        if not secure:
            return arrays
        if req.secagg_scale is None:
            raise ProtocolError("a securely aggregated round needs secagg.scale")
        return secagg.encode_limbs(arrays, req.secagg_scale)

    def _checked_mapping(self, req: Request) -> np.ndarray:
        m = req.mapping
        if m.ndim != 1 or (m < 0).any() or (m >= req.posterior.n_clusters).any():
            raise PolicyRefusal("posterior", "the local-to-global map is not valid")
        return m

    def _local_labels(self, data, req: Request) -> np.ndarray:
        if self.state is None or _LOCAL_SOURCE not in self.state.array_records:
            raise PolicyRefusal("label-mode", "map labelling needs this site's local fit")
        source = Source.from_arrays(self.state[_LOCAL_SOURCE].to_numpy_ndarrays())
        if len(req.mapping) != source.n_clusters:
            raise PolicyRefusal("posterior", "the map does not match this site's local clusters")
        problem = Problem.build(data, req.posterior.spec, options=self._opts(req))
        return labels_of(problem, source)


def secagg_mod(msg, ctxt, call_next):
    """Route SecAgg+ messages to Flower's ``secaggplus_mod`` and plain rounds straight to the
    client; mark (for the site's policy) whether the fit it runs is securely aggregated.

    The mark is set here, on the site, from the message's own SecAgg+ stage; a value sent by the
    server under the same key is removed first.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    fit_config = msg.content.config_records.get("fitins.config")
    if fit_config is not None:
        fit_config.pop(K_SECAGG, None)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return call_next(msg, ctxt)
    if configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS and fit_config is not None:
        fit_config[K_SECAGG] = True
    return secaggplus_mod(msg, ctxt, call_next)


def make_client_fn(policy_for=None, partition_offset: int = 0):
    """``client_fn(context)`` of the site's ClientApp: ``policy_for(partition_id) ->
    SitePolicy`` replaces the node config's policy (the simulation's built-in sites use it to
    opt in to server-sent paths), and ``partition_offset`` shifts the simulation's partition
    ids (sites added to a model)."""

    def client_fn(context: Context):
        """The site's client from its node config (a config error stays on the site)."""
        node_config = dict(context.node_config)
        try:
            node_config["partition-id"] = int(node_config["partition-id"]) + partition_offset
            policy = None
            if policy_for is not None:
                policy = policy_for(node_config["partition-id"])
            return FedviClient(node_config, context.state, policy, context.run_id).to_client()
        except Exception as exc:  # the site's own configuration: details stay in its log
            log(ERROR, "the node config is not valid", exc_info=exc)
            pid = node_config.get("partition-id")
            raise SiteError(
                site_error_message(
                    pid if isinstance(pid, int) else None,
                    "setup",
                    "the site's node config is not valid; details are in the site's log",
                )
            ) from None

    return client_fn


def make_client_app(policy_for=None, partition_offset: int = 0) -> ClientApp:
    """The site's ``ClientApp`` (see :func:`make_client_fn`), with :func:`secagg_mod`."""
    return ClientApp(client_fn=make_client_fn(policy_for, partition_offset), mods=[secagg_mod])


#: The deployed site's app (``[tool.flwr.app.components] clientapp``): policy from the node config.
app = make_client_app()
