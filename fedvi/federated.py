"""``federated_fit``: the whole FedMerDel pipeline in one process.

Local MerDel on every site, one-shot summaries, the global merge, optional refinement rounds
and labelling on the sites. This is the reference that the Flower app reproduces: each step
here is the same core function that a Flower client or the strategy calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedvi.data import check_levels, check_likelihood, encode
from fedvi.elbo import elbo
from fedvi.global_merge import GlobalMerge, global_merge
from fedvi.labels import (
    LABEL_MODES,
    combine_refinement,
    label_rows,
    map_labels,
    refinement_stats,
)
from fedvi.merdel import FitOptions
from fedvi.site import SiteFit, fit_site
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries


def site_seed(seed: int | None, site: int) -> int | None:
    """Seed of site ``site``'s local fit: ``seed + site`` (``None`` stays random)."""
    return None if seed is None else int(seed) + int(site)


@dataclass(frozen=True)
class FederatedResult:
    """Outcome of :func:`federated_fit`.

    labels: one ``(N_b,)`` array per site of global cluster ids ``0..n_clusters-1``.
    global_model: :class:`Summaries` of the global clusters (the global posterior).
    mapping: one ``(K_b,)`` array per site: global cluster of each local cluster.
    elbo: global ELBO after the merge and any refinement; elbo_history: after each step.
    site_summaries: what each site sent. variable_relevance: ``(D,)`` or ``None``.
    """

    labels: list[np.ndarray]
    global_model: Summaries
    mapping: list[np.ndarray]
    elbo: float
    elbo_history: list[float]
    site_summaries: list[Summaries]
    merge: GlobalMerge
    spec: MixtureSpec

    @property
    def n_clusters(self) -> int:
        return self.global_model.n_clusters

    @property
    def variable_relevance(self) -> np.ndarray | None:
        return self.global_model.relevance

    @property
    def cluster_profiles(self) -> np.ndarray:
        """``(G, P)`` posterior mean ``E[phi]`` of each global cluster."""
        return self.global_model.profiles()

    @property
    def uplink_bytes(self) -> list[int]:
        return [s.nbytes() for s in self.site_summaries]


def shared_spec(
    datasets,
    likelihood: str,
    n_levels=None,
    alpha0: float = 0.01,
    beta: float | None = None,
    variable_selection: bool = False,
    relevance_prior=(2.0, 2.0),
    feature_names=None,
    relevance_update: str = "collapsed",
) -> MixtureSpec:
    """The model all sites fit. Categorical levels not given are the union of the sites'
    (largest code seen at any site + 1), i.e. what a schema round would agree on."""
    check_likelihood(likelihood)
    if not datasets:
        raise ValueError("federated_fit needs at least one site's data")
    widths = []
    for b, X in enumerate(datasets):
        shape = getattr(X, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"site {b}: data must be a 2-D table, got shape {shape}")
        widths.append(shape[1])
    if len(set(widths)) > 1:
        raise ValueError(
            "mismatched schemas between sites: numbers of columns are "
            + ", ".join(f"site {b}: {w}" for b, w in enumerate(widths))
        )
    D = widths[0]
    if likelihood == "bernoulli":
        levels = np.full(D, 2)
    elif n_levels is not None:
        levels = check_levels(n_levels, D)
    else:
        levels = np.max(
            [encode(X, "categorical", source=f"site {b}").n_levels for b, X in enumerate(datasets)],
            axis=0,
        )
    return MixtureSpec(
        likelihood=likelihood,
        n_levels=tuple(int(v) for v in levels),
        alpha0=alpha0,
        beta=beta,
        variable_selection=variable_selection,
        relevance_prior=tuple(relevance_prior),
        feature_names=None if feature_names is None else tuple(feature_names),
        relevance_update=relevance_update,
    )


def refine(posterior: Summaries, site_data, rounds: int) -> tuple[Summaries, list[float]]:
    """``rounds`` refinement rounds (SPEC §7); returns the posterior and the ELBO after each."""
    history = []
    for _ in range(int(rounds)):
        posterior = combine_refinement(
            posterior, [refinement_stats(d, posterior) for d in site_data]
        )
        history.append(elbo(posterior))
    return posterior, history


def federated_fit(
    datasets,
    likelihood: str = "bernoulli",
    n_components: int = 20,
    alpha0: float = 0.01,
    beta: float | None = None,
    n_levels=None,
    variable_selection: bool = False,
    relevance_prior=(2.0, 2.0),
    relevance_update: str = "collapsed",
    merge: str = "best_first",
    labels: str = "posterior",
    refine_rounds: int = 0,
    min_cluster_size: int = 5,
    moves: str = "merdel",
    move_every: int = 5,
    delete_iters: int = 3,
    delete_order: str = "smallest",
    backend: str = "numpy",
    device: str = "cpu",
    max_iter: int = 1000,
    tol: float = 1e-8,
    seed: int | None = 0,
    feature_names=None,
) -> FederatedResult:
    """Cluster the pooled population of several sites without pooling their rows.

    ``datasets``: one ``(N_b, D)`` table per site (dense or sparse for Bernoulli). Site ``b``
    fits with seed ``seed + b``. ``merge``: ``"best_first"`` (default) or ``"paper"``.
    ``labels``: ``"posterior"`` (local step under the global posterior, default) or ``"map"``
    (global id of each row's local cluster). ``refine_rounds``: CAVI rounds on the pooled
    statistics after the merge; each never lowers the ELBO.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    spec = shared_spec(
        datasets,
        likelihood,
        n_levels,
        alpha0,
        beta,
        variable_selection,
        relevance_prior,
        feature_names,
        relevance_update,
    )
    options = FitOptions(
        moves=moves,
        move_every=move_every,
        delete_iters=delete_iters,
        delete_order=delete_order,
        backend=backend,
        device=device,
        max_iter=max_iter,
        tol=tol,
    )
    fits: list[SiteFit] = [
        fit_site(
            X, spec, n_components, site_seed(seed, b), options, min_cluster_size, source=f"site {b}"
        )
        for b, X in enumerate(datasets)
    ]
    summaries = [f.summaries for f in fits]
    merged = global_merge(summaries, mode=merge)
    posterior, history = refine(merged.posterior, [f.data for f in fits], refine_rounds)
    if labels == "map" and refine_rounds == 0:
        site_labels = [
            map_labels(f.local_labels, m) for f, m in zip(fits, merged.mapping, strict=True)
        ]
    else:
        site_labels = [label_rows(f.data, posterior) for f in fits]
    return FederatedResult(
        labels=site_labels,
        global_model=posterior,
        mapping=merged.mapping,
        elbo=elbo(posterior),
        elbo_history=[merged.elbo_before, merged.elbo, *history],
        site_summaries=summaries,
        merge=merged,
        spec=spec,
    )
