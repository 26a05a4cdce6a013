"""FedMerDel as a Flower ``Strategy``: schema check, global merge, refinement, labelling.

Rounds (one phase each, see :attr:`FedMerDel.phases`):

1. ``schema`` (categorical without ``n_levels`` only): sites send their per-column number of
   levels; the server keeps the union (maximum), as ``fedvi.shared_spec`` does in-process.
2. ``local``: sites fit MerDel and send their :class:`fedvi.Summaries`; ``aggregate_fit``
   checks that all sites share one schema and model and calls ``fedvi.global_merge``.
3. ``refine`` x ``refine_rounds``: sites send statistics under the global posterior, the
   server sums them with ``fedvi.combine_refinement``.
4. ``label``: the posterior (and, in ``map`` mode, each site's map) is broadcast; sites write
   their labels locally and return counts per global cluster.

The maths is the core's; this module only moves its inputs and outputs. Failed sites are
reported in :attr:`FedMerDel.failures`; the run continues while at least ``min_sites``
answered, and stops with an error naming the failures otherwise.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

import fedvi
from fedvi.elbo import elbo
from fedvi.flower_client import posterior_config
from fedvi.global_merge import MERGE_MODES, SchemaMismatchError, check_compatible
from fedvi.labels import LABEL_MODES


class SiteFailureError(RuntimeError):
    """Fewer than ``min_sites`` sites answered a round."""


@dataclass
class FedMerDelOutcome:
    """Everything the server learned (no rows): per site keyed by partition id.

    posterior: the global :class:`fedvi.Summaries` (``G`` clusters). mapping: ``(K_b,)``
    global cluster of each local cluster. counts: ``(G,)`` rows per global cluster, ``-1``
    where suppressed. uplink_bytes: bytes of arrays each site sent, per phase.
    timings: server wall-clock per phase (seconds); site_seconds: each site's time per phase.
    """

    posterior: fedvi.Summaries | None = None
    merge: fedvi.GlobalMerge | None = None
    site_summaries: dict[int, fedvi.Summaries] = field(default_factory=dict)
    mapping: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, np.ndarray] = field(default_factory=dict)
    n_rows: dict[int, int] = field(default_factory=dict)
    label_files: dict[int, str] = field(default_factory=dict)
    uplink_bytes: dict[int, dict[str, int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    site_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    elbo_history: list[float] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    label_mode: str = "posterior"
    n_levels: list[int] | None = None
    complete: bool = False

    @property
    def n_clusters(self) -> int:
        return 0 if self.posterior is None else self.posterior.n_clusters

    @property
    def elbo(self) -> float | None:
        return None if self.posterior is None else float(elbo(self.posterior))

    @property
    def cluster_profiles(self) -> np.ndarray:
        """``(G, P)`` posterior mean ``E[phi]`` of each global cluster."""
        g = self.posterior
        return g.profiles()


_SITE_ERROR = re.compile(r"site (\d+) failed in phase '[^']*': [^\n]*?(?='>|\n|$)")


def short_error(text: str) -> tuple[int | None, str]:
    """The site and the one-line reason of a failed reply (Flower wraps a site's exception
    in tracebacks); ``(None, text)`` when the reply does not name a site."""
    matches = list(_SITE_ERROR.finditer(text))
    if not matches:
        return None, text
    return int(matches[-1].group(1)), matches[-1].group(0)


def _arrays_nbytes(arrays: list[np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))


class FedMerDel(Strategy):
    """The FedMerDel server (see the module docstring).

    model: ``likelihood``, ``n_levels`` (list or ``None``), ``alpha0``, ``beta``,
    ``variable_selection``, ``relevance_prior``. fit_options: keyword arguments of
    :class:`fedvi.FitOptions`. data_paths: one file per site for simulations (``[]`` when
    the SuperNodes carry ``data-path``). on_complete: called with the outcome after labelling.
    """

    def __init__(
        self,
        n_sites: int,
        model: dict,
        n_components: int = 20,
        fit_options: dict | None = None,
        seed: int = 0,
        merge: str = "best_first",
        labels: str = "posterior",
        refine_rounds: int = 0,
        min_sites: int | None = None,
        min_cluster_size: int = 5,
        data_paths: list[str] | None = None,
        label_column: str | None = None,
        output_dir: str = ".",
        wait_timeout: float = 300.0,
        on_complete: Callable[[FedMerDelOutcome], None] | None = None,
    ):
        super().__init__()
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        self.n_sites = int(n_sites)
        self.min_sites = self.n_sites if min_sites is None else int(min_sites)
        if not 1 <= self.min_sites <= self.n_sites:
            raise ValueError(f"min_sites must be in 1..{self.n_sites}, got {min_sites}")
        self.model = dict(model)
        self.n_components = int(n_components)
        self.fit_options = dict(fit_options or {})
        self.seed = int(seed)
        self.merge_mode = merge
        self.refine_rounds = int(refine_rounds)
        self.min_cluster_size = int(min_cluster_size)
        self.data_paths = list(data_paths or [])
        self.label_column = label_column or ""
        self.output_dir = str(output_dir)
        self.wait_timeout = float(wait_timeout)
        self.on_complete = on_complete
        self.outcome = FedMerDelOutcome(
            label_mode="map" if labels == "map" and self.refine_rounds == 0 else "posterior",
            n_levels=None if model.get("n_levels") is None else list(model["n_levels"]),
        )
        needs_schema = model["likelihood"] == "categorical" and model.get("n_levels") is None
        self.phases = (
            (["schema"] if needs_schema else [])
            + ["local"]
            + ["refine"] * self.refine_rounds
            + ["label"]
        )
        self._site_of: dict[str, int] = {}
        self._t0 = 0.0

    def __repr__(self) -> str:
        return f"FedMerDel(sites={self.n_sites}, merge={self.merge_mode}, phases={self.phases})"

    @property
    def num_rounds(self) -> int:
        return len(self.phases)

    @property
    def failures(self) -> list[dict[str, str]]:
        return self.outcome.failures

    def phase(self, server_round: int) -> str:
        if not 1 <= server_round <= len(self.phases):
            raise ValueError(f"round {server_round} is outside the plan {self.phases}")
        return self.phases[server_round - 1]

    # --- Strategy API ---------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([])

    def base_config(self, phase: str) -> dict[str, Scalar]:
        """Round config sent to every site (scalars only)."""
        model = dict(self.model)
        if self.outcome.n_levels is not None:
            model["n_levels"] = list(self.outcome.n_levels)
        return {
            "phase": phase,
            "model": json.dumps(model),
            "fit_options": json.dumps(self.fit_options),
            "n_components": self.n_components,
            "seed": self.seed,
            "min_cluster_size": self.min_cluster_size,
            "data_paths": json.dumps(self.data_paths),
            "label_column": self.label_column,
            "output_dir": self.output_dir,
        }

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        phase = self.phase(server_round)
        self._t0 = time.perf_counter()
        client_manager.wait_for(self.min_sites, timeout=int(self.wait_timeout))
        clients = sorted(client_manager.all().values(), key=lambda c: str(c.cid))
        if len(clients) < self.min_sites:
            raise SiteFailureError(
                f"only {len(clients)} sites connected within {self.wait_timeout:.0f} s; "
                f"min_sites={self.min_sites}"
            )
        config = self.base_config(phase)
        arrays: list[np.ndarray] = []
        if phase in ("refine", "label"):
            arrays = self.outcome.posterior.to_arrays()
            config.update(posterior_config(self.outcome.posterior))
        params = ndarrays_to_parameters(arrays)
        log(INFO, "FedMerDel round %d: phase %s on %d sites", server_round, phase, len(clients))
        out = []
        for c in clients:
            cfg = dict(config)
            if phase == "label":
                site = self._site_of.get(str(c.cid))
                if self.outcome.label_mode == "map" and site in self.outcome.mapping:
                    cfg["label_mode"] = "map"
                    cfg["mapping"] = json.dumps(self.outcome.mapping[site].tolist())
                else:
                    cfg["label_mode"] = "posterior"
            out.append((c, FitIns(params, cfg)))
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        phase = self.phase(server_round)
        answers = self._collect(phase, results, failures)
        if phase == "schema":
            self._aggregate_schema(answers)
        elif phase == "local":
            self._aggregate_local(answers)
        elif phase == "refine":
            self._aggregate_refine(answers)
        else:
            self._aggregate_label(answers)
        self.outcome.timings[phase] = self.outcome.timings.get(phase, 0.0) + (
            time.perf_counter() - self._t0
        )
        if phase == "label":
            self.outcome.complete = True
            if self.on_complete is not None:
                self.on_complete(self.outcome)
        post = self.outcome.posterior
        return (None if post is None else ndarrays_to_parameters(post.to_arrays())), {
            "phase": phase,
            "n_clusters": self.outcome.n_clusters,
        }

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None

    # --- phases ---------------------------------------------------------------------------
    def _collect(self, phase, results, failures) -> dict[int, tuple[list[np.ndarray], dict]]:
        """Answers by site id (sorted); records failures; raises if fewer than min_sites."""
        for f in failures:
            if isinstance(f, BaseException):
                sid, error = short_error(f"{type(f).__name__}: {f}")
                site = "unknown site" if sid is None else f"site {sid}"
            else:
                proxy, res = f
                sid = self._site_of.get(str(proxy.cid))
                site = "unknown site" if sid is None else f"site {sid}"
                error = f"{res.status.code.name}: {res.status.message}"
            self.outcome.failures.append({"phase": phase, "site": site, "error": error})
            log(WARNING, "FedMerDel phase %s: %s failed: %s", phase, site, error)
        answers: dict[int, tuple[list[np.ndarray], dict]] = {}
        for proxy, res in results:
            if "partition_id" not in res.metrics:
                raise ValueError(f"node {proxy.cid} answered without a partition_id")
            sid = int(res.metrics["partition_id"])
            if sid in answers:
                raise ValueError(
                    f"two nodes claim site {sid} (partition-id); give each SuperNode its own"
                )
            self._site_of[str(proxy.cid)] = sid
            arrays = parameters_to_ndarrays(res.parameters)
            answers[sid] = (arrays, {**res.metrics, "num_examples": int(res.num_examples)})
            self.outcome.uplink_bytes.setdefault(sid, {})[phase] = self.outcome.uplink_bytes.get(
                sid, {}
            ).get(phase, 0) + _arrays_nbytes(arrays)
            self.outcome.site_seconds.setdefault(sid, {})[phase] = float(
                res.metrics.get("seconds", 0.0)
            )
        if len(answers) < self.min_sites:
            detail = "; ".join(f"{f['site']}: {f['error']}" for f in self.outcome.failures)
            raise SiteFailureError(
                f"phase {phase!r}: only {len(answers)} of {self.n_sites} sites answered "
                f"(min_sites={self.min_sites}). Failures: {detail or 'none reported'}"
            )
        return dict(sorted(answers.items()))

    def _aggregate_schema(self, answers) -> None:
        widths = {sid: len(a[0]) for sid, (a, _) in answers.items()}
        if len(set(widths.values())) > 1:
            raise SchemaMismatchError(
                "sites have different numbers of variables: "
                + ", ".join(f"site {s}: {w}" for s, w in widths.items())
            )
        levels = np.max([np.asarray(a[0], dtype=np.int64) for a, _ in answers.values()], axis=0)
        self.outcome.n_levels = [int(v) for v in levels]
        log(INFO, "FedMerDel schema: %d variables, levels agreed", len(levels))

    def _aggregate_local(self, answers) -> None:
        sites = list(answers)
        names = [f"site {s}" for s in sites]
        summaries = [fedvi.Summaries.from_arrays(a, m) for a, m in answers.values()]
        check_compatible(summaries, names)
        merged = fedvi.global_merge(summaries, mode=self.merge_mode, names=names)
        o = self.outcome
        o.merge = merged
        o.posterior = merged.posterior
        o.site_summaries = dict(zip(sites, summaries, strict=True))
        o.mapping = dict(zip(sites, merged.mapping, strict=True))
        o.n_rows = {s: int(m["n_rows"]) for s, (_, m) in answers.items()}
        o.elbo_history = [merged.elbo_before, merged.elbo]
        log(
            INFO,
            "FedMerDel merge (%s): %d local clusters from %d sites -> %d global clusters",
            self.merge_mode,
            sum(s.n_clusters for s in summaries),
            len(sites),
            merged.n_clusters,
        )

    def _aggregate_refine(self, answers) -> None:
        o = self.outcome
        if set(answers) != set(o.site_summaries):
            missing = sorted(set(o.site_summaries) - set(answers))
            msg = f"refinement round skipped: sites {missing} did not answer"
            o.failures.append({"phase": "refine", "site": "server", "error": msg})
            log(WARNING, "FedMerDel %s", msg)
            return
        stats = [fedvi.Summaries.from_arrays(a, m) for a, m in answers.values()]
        o.posterior = fedvi.combine_refinement(o.posterior, stats)
        o.elbo_history.append(float(elbo(o.posterior)))
        log(INFO, "FedMerDel refinement: ELBO %.4f", o.elbo_history[-1])

    def _aggregate_label(self, answers) -> None:
        o = self.outcome
        for sid, (arrays, metrics) in answers.items():
            o.counts[sid] = np.asarray(arrays[0], dtype=np.int64)
            o.n_rows.setdefault(sid, int(metrics["num_examples"]))
            o.label_files[sid] = str(metrics.get("labels_path", ""))
        log(INFO, "FedMerDel labels written on %d sites", len(answers))
