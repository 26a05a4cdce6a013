"""One result type for a federated run, in process (:func:`fedvi.federated_fit`) or on Flower.

The Flower strategy fills the same :class:`FederatedResult` from the sites' replies; the
in-process run also has each site's labels (on Flower they stay on the sites).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedvi.global_merge import GlobalMerge
from fedvi.model import FittedModel
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries

#: Values of :attr:`FederatedResult.status`.
STATUSES = ("completed", "completed_with_failures", "failed")


@dataclass
class SiteReport:
    """What the server knows of one site (nothing per row, except ``labels`` in process).

    site: partition id. node_id: Flower node (``None`` in process). n_rows: rows it reported.
    summaries: its one-shot :class:`Summaries`. mapping: ``(K_b,)`` global cluster of each of
    its local clusters. counts: ``(G,)`` rows per global cluster (``-1`` suppressed) or
    ``None``. labels: ``(N_b,)`` global cluster of each row (in process only). n_iter,
    converged: its local fit. seconds / uplink_bytes: per phase. status: ``"ok"``,
    ``"failed"`` or ``"excluded"``; error: the reason it reported (no data in it). label_file:
    the name (no folder) of the label file it wrote on its own disk in the label round.
    """

    site: int
    node_id: int | None = None
    n_rows: int | None = None
    summaries: Summaries | None = None
    mapping: np.ndarray | None = None
    counts: np.ndarray | None = None
    labels: np.ndarray | None = None
    n_iter: int | None = None
    converged: bool | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    uplink_bytes: dict[str, int] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    schema: dict | None = None
    policy: dict | None = None
    privacy: dict | None = None
    label_file: str | None = None

    def add_uplink(self, phase: str, arrays) -> None:
        """Count the bytes of the arrays the site sent in ``phase`` (as on the wire)."""
        n = int(sum(np.asarray(a).nbytes for a in arrays))
        self.uplink_bytes[phase] = self.uplink_bytes.get(phase, 0) + n


@dataclass
class FederatedResult:
    """Outcome of a federated run.

    model: the global :class:`FittedModel` (``None`` if the run failed before the merge).
    sites: :class:`SiteReport` per partition id. merge: the :class:`GlobalMerge`.
    elbo_history: global ELBO before and after the merge and after each applied refinement
        round (``rounds`` lists every round run).
    failures: one dict per failure (``phase``, ``site``, ``node``, ``error``).
    status: ``"completed"``, ``"completed_with_failures"`` or ``"failed"``.
    timings: server wall-clock per phase. label_mode: how the labels were made.
    notes: what the run decided on the way (e.g. a refinement round skipped, and why).
    privacy: secure aggregation and differential-privacy settings and spending.
    rounds: one dict per refinement round run (``round``, ``applied``, ``withheld``: global
        cluster -> sites whose floor withheld it (none named under secure aggregation),
        ``merges``, ``splits``, ``deletes``: moves accepted in it, ``candidates``: pairs
        scored, ``elbo``: of the posterior the next round starts from).
    id_map: after :func:`fedvi.extend` (or a run that resumes a model), ``(G_old,)`` new id
        of each cluster of the extended model (``-1``: removed); ``None`` otherwise.
    """

    model: FittedModel | None = None
    sites: dict[int, SiteReport] = field(default_factory=dict)
    merge: GlobalMerge | None = None
    elbo_history: list[float] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    status: str = "failed"
    timings: dict[str, float] = field(default_factory=dict)
    label_mode: str = "posterior"
    notes: list[str] = field(default_factory=list)
    privacy: dict = field(default_factory=dict)
    error: str | None = None
    rounds: list[dict] = field(default_factory=list)
    id_map: np.ndarray | None = None

    # -- the global model ------------------------------------------------------------------
    @property
    def posterior(self) -> Summaries | None:
        return None if self.model is None else self.model.posterior

    @property
    def spec(self) -> MixtureSpec | None:
        return None if self.model is None else self.model.spec

    @property
    def n_clusters(self) -> int:
        return 0 if self.model is None else self.model.n_clusters

    @property
    def elbo(self) -> float | None:
        return None if self.model is None else self.model.elbo

    @property
    def variable_relevance(self) -> np.ndarray | None:
        return None if self.model is None else self.model.variable_relevance

    @property
    def cluster_profiles(self) -> np.ndarray:
        """``(G, P)`` posterior mean ``E[phi]`` of each global cluster."""
        return self.model.profiles()

    @property
    def complete(self) -> bool:
        return self.status in ("completed", "completed_with_failures")

    def settle(self, exc: BaseException | None = None) -> None:
        """After a run: ``"failed"`` if it raised ``exc`` or stopped before completing, with
        the first error recorded kept."""
        if exc is not None:
            self.status = "failed"
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        if not self.complete:
            self.status = "failed"
            self.error = self.error or "the run stopped before labelling"

    # -- per site, in site order ---------------------------------------------------------
    def _ok(self) -> list[SiteReport]:
        return [self.sites[s] for s in sorted(self.sites) if self.sites[s].status == "ok"]

    @property
    def labels(self) -> list[np.ndarray]:
        """One ``(N_b,)`` array of global cluster ids per site (in process)."""
        return [r.labels for r in self._ok()]

    @property
    def mapping(self) -> list[np.ndarray]:
        return [r.mapping for r in self._ok() if r.mapping is not None]

    @property
    def site_summaries(self) -> list[Summaries]:
        return [r.summaries for r in self._ok() if r.summaries is not None]

    @property
    def uplink_bytes(self) -> list[int]:
        """Bytes of arrays each site sent in the local round."""
        return [int(r.uplink_bytes.get("local", 0)) for r in self._ok()]
