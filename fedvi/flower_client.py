"""The Flower site: a ``NumPyClient`` that runs the FedMerDel site steps (SPEC §5, §7).

Not imported by ``fedvi/__init__.py``: the core works without Flower installed.

Each round's ``fit`` reads ``config["phase"]`` (sent by the FedMerDel strategy):

- ``"schema"``: per-column number of levels, ``(D,)`` (categorical without ``n_levels``).
- ``"local"``: local MerDel fit; returns exactly ``Summaries.to_arrays()`` and, as metrics,
  ``Summaries.metadata()`` plus the site id and timings.
- ``"refine"``: statistics under the global posterior (``refinement_stats``), same arrays.
- ``"label"``: labels the rows under the global posterior (or through the local-to-global map
  in ``"map"`` mode), writes them to ``<output-dir>/labels_site<id>.csv`` on the site, and
  returns only ``(G,)`` counts per global cluster, ``-1`` where a count is below
  ``min_cluster_size`` (suppressed).

The site's data file comes from the node config (``data-path``, deployment) or from the
``data_paths`` list in the round config (simulation); rows never leave the site.
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.client import ClientApp, NumPyClient
from flwr.common.logger import log

import fedvi
from fedvi.federated import site_seed
from fedvi.io import SiteTable, read_table, write_labels
from fedvi.summaries import Summaries

PHASES = ("schema", "local", "refine", "label")
#: Prefix of the round-config keys that carry the posterior's ``Summaries.metadata()``.
POSTERIOR_PREFIX = "posterior."
_LOCAL_LABELS_KEY = "fedvi.local-labels"


def posterior_config(posterior: Summaries) -> dict[str, str | int | float | bool]:
    """The posterior's metadata as round-config entries (scalars only)."""
    return {POSTERIOR_PREFIX + k: v for k, v in posterior.metadata().items()}


def posterior_from(parameters: list[np.ndarray], config: dict) -> Summaries:
    """Rebuild the global posterior from the round's arrays and config."""
    meta = {
        k[len(POSTERIOR_PREFIX) :]: v for k, v in config.items() if k.startswith(POSTERIOR_PREFIX)
    }
    if not meta:
        raise ValueError("the round config carries no global posterior")
    return Summaries.from_arrays(list(parameters), meta)


def suppress_counts(counts: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """``(G,)`` int64 counts with values in ``1..min_cluster_size-1`` replaced by ``-1``."""
    out = np.asarray(counts, dtype=np.int64).copy()
    out[(out > 0) & (out < int(min_cluster_size))] = -1
    return out


class FedviClient(NumPyClient):
    """One site. ``node_config``: the SuperNode's config (``partition-id``, optional
    ``data-path``, ``label-column``, ``output-dir``). ``state``: the persistent context state
    (keeps the local arg-max labels between rounds for ``"map"`` labelling)."""

    def __init__(self, node_config: dict, state=None):
        self.node_config = dict(node_config)
        if "partition-id" not in self.node_config:
            raise ValueError(
                "the SuperNode has no partition-id: start it with "
                '--node-config "partition-id=<site index> data-path=<file>"'
            )
        self.partition_id = int(self.node_config["partition-id"])
        self.state = state
        self.name = f"site {self.partition_id}"

    # --- data -------------------------------------------------------------------------
    def data_path(self, config: dict) -> str:
        if self.node_config.get("data-path"):
            return str(self.node_config["data-path"])
        paths = json.loads(str(config.get("data_paths", "[]")))
        if self.partition_id >= len(paths):
            raise ValueError(
                f"{self.name}: no data file: the SuperNode has no data-path in its node config "
                f"and the run lists {len(paths)} site files"
            )
        return str(paths[self.partition_id])

    def load(self, config: dict) -> SiteTable:
        """Read the site's table; the label column (if any) is dropped from ``X``."""
        label_column = self.node_config.get("label-column") or config.get("label_column") or None
        return read_table(self.data_path(config), label_column=label_column)

    def output_dir(self, config: dict) -> str:
        """``output-dir`` of the node, else the run's (simulation), else the data's folder."""
        if self.node_config.get("output-dir"):
            return str(self.node_config["output-dir"])
        if config.get("output_dir"):
            return str(config["output_dir"])
        return os.path.dirname(os.path.abspath(self.data_path(config)))

    # --- NumPyClient ----------------------------------------------------------------------
    def get_parameters(self, config):
        return []

    def evaluate(self, parameters, config):
        return 0.0, 0, {}

    def fit(self, parameters, config):
        phase = str(config.get("phase", ""))
        handler = {
            "schema": self._schema,
            "local": self._local,
            "refine": self._refine,
            "label": self._label,
        }.get(phase)
        if handler is None:
            raise ValueError(f"{self.name}: unknown phase {phase!r}; expected one of {PHASES}")
        t0 = time.perf_counter()
        try:
            arrays, n, metrics = handler(parameters, config)
        except Exception as exc:
            # Name the site: the server only sees the message of a failed reply.
            raise RuntimeError(f"{self.name} failed in phase {phase!r}: {exc}") from exc
        metrics.update(
            partition_id=self.partition_id,
            phase=phase,
            seconds=time.perf_counter() - t0,
        )
        log(INFO, "%s: phase %s done in %.2f s", self.name, phase, metrics["seconds"])
        return arrays, int(n), metrics

    # --- phases ---------------------------------------------------------------------------
    def _schema(self, parameters, config):
        table = self.load(config)
        levels = fedvi.encode(table.X, "categorical", source=table.path).n_levels
        return [np.asarray(levels, dtype=np.int64)], table.n_rows, {"n_features": len(levels)}

    def _spec(self, table: SiteTable, config: dict) -> fedvi.MixtureSpec:
        model = json.loads(str(config["model"]))
        extra = {}
        if model.get("relevance_update") is not None:
            extra["relevance_update"] = str(model["relevance_update"])
        return fedvi.shared_spec(
            [table.X],
            model["likelihood"],
            model.get("n_levels"),
            alpha0=float(model["alpha0"]),
            beta=model.get("beta"),
            variable_selection=bool(model.get("variable_selection", False)),
            relevance_prior=tuple(model.get("relevance_prior", (2.0, 2.0))),
            feature_names=table.feature_names if model.get("use_feature_names", True) else None,
            **extra,
        )

    def fit_options(self, config: dict) -> dict:
        """The run's fit options; the site's own ``backend``/``device`` node config (its
        hardware) overrides the run's."""
        opts = json.loads(str(config["fit_options"]))
        for key in ("backend", "device"):
            if self.node_config.get(key):
                opts[key] = str(self.node_config[key])
        return opts

    def _local(self, parameters, config):
        t0 = time.perf_counter()
        table = self.load(config)
        load_s = time.perf_counter() - t0
        spec = self._spec(table, config)
        fit = fedvi.fit_site(
            table.X,
            spec,
            int(config["n_components"]),
            seed=site_seed(int(config["seed"]), self.partition_id),
            options=fedvi.FitOptions(**self.fit_options(config)),
            min_cluster_size=int(config["min_cluster_size"]),
            source=f"{self.name} ({table.path})",
        )
        if self.state is not None:
            self.state[_LOCAL_LABELS_KEY] = ArrayRecord([np.asarray(fit.local_labels)])
        metrics = dict(fit.summaries.metadata())
        metrics.update(
            n_clusters=fit.summaries.n_clusters,
            n_iter=int(fit.trace.n_iter),
            load_seconds=load_s,
        )
        return fit.summaries.to_arrays(), fit.summaries.n_rows, metrics

    def _data(self, posterior: Summaries, config: dict) -> fedvi.EncodedData:
        table = self.load(config)
        return fedvi.encode_site(table.X, posterior.spec, source=f"{self.name} ({table.path})")

    def _refine(self, parameters, config):
        posterior = posterior_from(parameters, config)
        stats = fedvi.refinement_stats(self._data(posterior, config), posterior)
        return stats.to_arrays(), stats.n_rows, dict(stats.metadata())

    def _label(self, parameters, config):
        posterior = posterior_from(parameters, config)
        data = self._data(posterior, config)
        mode = str(config.get("label_mode", "posterior"))
        if mode == "map":
            if self.state is None or _LOCAL_LABELS_KEY not in self.state:
                raise ValueError(f"{self.name}: map labelling needs this site's local fit")
            local = self.state[_LOCAL_LABELS_KEY].to_numpy_ndarrays()[0]
            if len(local) != data.n_rows:
                raise ValueError(
                    f"{self.name}: the data file changed between rounds ({len(local)} rows "
                    f"fitted, {data.n_rows} now)"
                )
            labels = fedvi.map_labels(local, np.asarray(json.loads(str(config["mapping"]))))
        else:
            labels = fedvi.label_rows(data, posterior)
        path = os.path.join(self.output_dir(config), f"labels_site{self.partition_id}.csv")
        write_labels(path, labels)
        counts = np.bincount(labels, minlength=posterior.n_clusters)
        shown = suppress_counts(counts, int(config.get("min_cluster_size", 5)))
        return (
            [shown],
            data.n_rows,
            {"labels_path": os.path.abspath(path), "n_suppressed": int((shown < 0).sum())},
        )


def client_fn(context: Context):
    """Build the site's client from its node config and persistent state."""
    return FedviClient(context.node_config, context.state).to_client()


app = ClientApp(client_fn=client_fn)
