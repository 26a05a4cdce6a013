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

A failure is logged in full on the site; the server gets only a :class:`fedvi.protocol.SiteError`
naming the phase, the site and the rule or the kind of problem (never a value, header, path or
row number).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from logging import ERROR, INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedvi import secagg
from fedvi.data import DataError
from fedvi.federated import site_fit_options, site_seed
from fedvi.flower.secure_round import secure_round_mod
from fedvi.io import open_table, write_labels
from fedvi.labels import label_rows, map_labels, release_label_counts, release_refinement
from fedvi.options import FitOptions
from fedvi.policy import PolicyRefusal, SitePolicy, check_posterior, check_request
from fedvi.privacy import Accountant, BudgetExhausted, site_accountant
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
_PRIVACY = "fedvi.privacy"


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
    if isinstance(exc, BudgetExhausted):
        return "refused: the site's privacy budget is spent"
    return f"internal error ({type(exc).__name__}); details are in the site's log"


def labels_path(output_dir: str, site: int) -> str:
    """Where site ``site`` writes its labels (``<output_dir>/labels_site<id>.csv``)."""
    return os.path.join(output_dir, f"labels_site{site}.csv")


class FedviClient(NumPyClient):
    """One site. ``node_config``: the SuperNode's config (``partition-id`` and the
    :class:`SitePolicy` keys); ``state``: the persistent context state (keeps what later phases
    need: the local fit's source for map labels, the privacy accountant); ``policy``: overrides
    the policy read from the node config (the simulation's built-in sites)."""

    def __init__(self, node_config: dict, state=None, policy: SitePolicy | None = None):
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
            req = decode_request(parameters, config)
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
            policy=self.policy.summary(),
        )
        return [], data.n_rows, pre.to_metrics()

    def _local(self, req: Request, secure: bool):
        check_request(req.spec, self.policy)
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

    def _accountant(self, req: Request) -> Accountant | None:
        acc = site_accountant(self.policy, req.server)
        if acc is not None and self.state is not None and _PRIVACY in self.state.config_records:
            saved = json.loads(str(self.state.config_records[_PRIVACY]["json"]))
            return Accountant.from_dict(saved)
        return acc

    def _save_accountant(self, acc: Accountant | None) -> dict:
        if acc is None:
            return {}
        if self.state is not None:
            self.state.config_records[_PRIVACY] = ConfigRecord({"json": json.dumps(acc.to_dict())})
        return {"privacy.epsilon_spent": acc.epsilon_spent, "privacy.releases": acc.made}

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
        return data

    def _rng(self, req: Request, acc: Accountant | None):
        """The noise generator of this release (``None`` without DP)."""
        if acc is None:
            return None
        return np.random.default_rng([req.seed, self.partition_id, acc.made, 11])

    def _refine(self, req: Request, secure: bool):
        data = self._aggregate_round(req, secure, "allow-refine", self.policy.allow_refine)
        acc = self._accountant(req)
        stats = release_refinement(
            data, req.posterior, self._floor(req), self._opts(req), acc, self._rng(req, acc)
        )
        arrays = encode_refine(stats)
        extra = self._save_accountant(acc)
        return self._secure(arrays, req, secure), data.n_rows, extra

    def _label(self, req: Request, secure: bool):
        data = self._aggregate_round(req, secure, "allow-labels", self.policy.allow_labels)
        posterior = req.posterior
        if req.mapping is not None:
            labels = map_labels(self._local_labels(data, req), self._checked_mapping(req))
        else:
            labels = label_rows(data, posterior, self._opts(req))
        write_labels(labels_path(self.output_dir(req), self.partition_id), labels)
        acc = self._accountant(req)
        marker = 0 if secure else -1
        shown = release_label_counts(
            labels, posterior.n_clusters, self._floor(req), acc, self._rng(req, acc), marker
        )
        # Under secure aggregation the server sees only the sum: no per-site scalar about it.
        extra = {} if secure else {"label.n_suppressed": int((shown == marker).sum())}
        extra.update(self._save_accountant(acc))
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
            return FedviClient(node_config, context.state, policy).to_client()
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
    """The site's ``ClientApp`` (see :func:`make_client_fn`), with its SecAgg+ mod
    (:func:`make_secagg_mod`)."""
    return ClientApp(
        client_fn=make_client_fn(policy_for, partition_offset),
        mods=[make_secagg_mod(policy_for, partition_offset)],
    )


#: The deployed site's app (``[tool.flwr.app.components] clientapp``): policy from the node config.
app = make_client_app()
