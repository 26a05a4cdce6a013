"""The in-process engine: :func:`federated_fit` and :func:`extend`.

The run's logic is :class:`fedvi.coordinator.Coordinator`'s, the sites' is
:class:`fedvi.site_agent.SiteAgent`'s; this engine only delivers each round's requests to the
agents (function calls) and hands their replies back. The Flower strategy
(``strategies/fedmerdel.py``) drives the same coordinator over the same agents' phases, so
both give the same result on the same data, settings, policies and seed (with differential
privacy, when each site's noise generator is the same).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from fedvi.coordinator import (
    MOVES_OFF,
    NO_SITE_REFINES,
    Coordinator,
    Failure,
    SiteFailureError,
    combine_refinement,
    fixed_contribution,
    refusal_note,
)
from fedvi.data import DataError, EncodedData, site_list
from fedvi.model import FittedModel
from fedvi.options import FitOptions, ServerOptions
from fedvi.policy import SitePolicy
from fedvi.result import FederatedResult
from fedvi.settings import numpydoc, split_options
from fedvi.site_agent import SiteAgent, safe_reason, site_fit_options, site_seed
from fedvi.spec import MixtureSpec

__all__ = [
    "combine_refinement",
    "extend",
    "federated_fit",
    "fixed_contribution",
    "policies_for",
    "refusal_note",
    "run_inprocess",
    "shared_spec",
    "site_fit_options",
    "site_seed",
    "warn_floor",
]


def policies_for(policy, n_sites: int) -> list[SitePolicy]:
    """One :class:`SitePolicy` per site from ``None`` (defaults), one policy, or a list."""
    if policy is None:
        return [SitePolicy()] * n_sites
    if isinstance(policy, SitePolicy):
        return [policy] * n_sites
    out = list(policy)
    if len(out) != n_sites or not all(isinstance(p, SitePolicy) for p in out):
        raise ValueError(f"policy: give one SitePolicy or a list of {n_sites} (one per site)")
    return out


def warn_floor(requested: int, policies: Sequence[SitePolicy], ids: Sequence[int]) -> None:
    """Warn when the floor asked for (``min_cluster_size``) is below a site's own policy floor,
    which wins: the request changes nothing at those sites."""
    higher = [(s, p.min_cluster_size) for s, p in zip(ids, policies, strict=True)]
    higher = [(s, f) for s, f in higher if f > requested]
    if higher:
        floors = sorted({f for _, f in higher})
        warnings.warn(
            f"min_cluster_size={requested} is below the disclosure floor of the site policy at "
            f"site(s) {[s for s, _ in higher]} (floor {', '.join(map(str, floors))}), which "
            "wins: a site's floor is never lowered by the server. To lower it, give "
            f"policy=SitePolicy(min_cluster_size={requested}) (the site's own decision).",
            UserWarning,
            stacklevel=3,
        )


def _rngs(rng, n_sites: int) -> list:
    if rng is None:
        return [None] * n_sites
    out = list(rng)
    if len(out) != n_sites:
        raise ValueError(f"rng: give one generator per site ({n_sites})")
    return out


def agents_for(tables, ids, policies, rngs=None) -> dict[int, SiteAgent]:
    """One :class:`SiteAgent` per site over in-memory tables, for one run: each site's ledger
    in ``<policy.state_dir>/site<id>`` when its policy names a state folder (caps and budget
    then hold across calls), else in memory (they hold within the call)."""
    rngs = rngs or [None] * len(ids)
    return {
        s: SiteAgent(
            s,
            X,
            p,
            rng=r,
            state_dir=os.path.join(p.state_dir, f"site{s}") if p.state_dir else None,
        )
        for X, s, p, r in zip(tables, ids, policies, rngs, strict=True)
    }


def deliver(rnd, agents: Mapping[int, SiteAgent], errors: dict | None = None) -> dict:
    """Each request of round ``rnd`` handed to its site's agent: ``{site: reply | Failure}``
    (a site with no agent is left for the coordinator to name). A site's exception becomes a
    ``site_error`` failure carrying only :func:`fedvi.site_agent.safe_reason`, as on Flower;
    ``errors`` keeps the exception itself (the caller owns these sites)."""
    replies = {}
    for s, req in rnd.requests.items():
        if s not in agents:
            continue
        try:
            replies[s] = agents[s].handle(req)
        except Exception as exc:  # the site's failure: named, the run goes on without it
            if errors is not None:
                errors.setdefault(s, exc)
            replies[s] = Failure("site_error", safe_reason(exc))
    return replies


def run_inprocess(coordinator: Coordinator, agents: Mapping[int, SiteAgent]) -> FederatedResult:
    """Drive ``coordinator`` to the end over ``agents``; the result, with each site's labels
    (in process the caller holds every site). When the run cannot go on, a site's own data
    error is raised (it names the site, the column and the value), else the coordinator's
    :class:`fedvi.coordinator.SiteFailureError`."""
    errors: dict[int, BaseException] = {}
    while (rnd := coordinator.next_round()) is not None:
        try:
            coordinator.accept(rnd, deliver(rnd, agents, errors))
        except SiteFailureError as exc:
            data_errors = [e for _, e in sorted(errors.items()) if isinstance(e, DataError)]
            if data_errors:
                raise data_errors[0] from exc
            raise
    result = coordinator.result
    for s, agent in agents.items():
        if s in result.sites and agent.labels is not None:
            result.sites[s].labels = agent.labels
    return result


def shared_spec(tables: Sequence, spec: MixtureSpec) -> tuple[MixtureSpec, list[EncodedData]]:
    """The resolved model that the pre-flight round agrees on for these tables (variable names,
    levels), and each table encoded under it, as its site would encode it."""
    tables = site_list(tables, "tables")
    ids = list(range(len(tables)))
    coordinator = Coordinator(spec, FitOptions(), ServerOptions(), ids)
    agents = agents_for(tables, ids, [SitePolicy(min_cluster_size=1)] * len(ids))
    errors: dict[int, BaseException] = {}
    rnd = coordinator.next_round()
    try:
        coordinator.accept(rnd, deliver(rnd, agents, errors))
    except SiteFailureError as exc:
        if errors:
            raise next(iter(errors.values())) from exc
        raise
    local = coordinator.next_round()
    encoded = [agents[s].table(local.requests[s])[0] for s in ids]
    return coordinator.agreed_spec, encoded


def federated_fit(
    datasets,
    likelihood: str | None = None,
    *,
    seed: int | None = 0,
    policy: SitePolicy | Sequence[SitePolicy] | None = None,
    site_ids: Sequence[int] | None = None,
    min_sites: int | None = None,
    rng: Sequence[np.random.Generator] | None = None,
    **options,
) -> FederatedResult:
    """Cluster the pooled population of several sites without pooling their rows."""
    if likelihood is not None:
        options["likelihood"] = likelihood
    spec, fit, server = split_options(
        options, (MixtureSpec, FitOptions, ServerOptions), "federated_fit"
    )
    tables = site_list(datasets, "datasets")
    ids = list(range(len(tables))) if site_ids is None else [int(s) for s in site_ids]
    if len(ids) != len(tables) or len(set(ids)) != len(ids):
        raise ValueError(f"site_ids: give {len(tables)} distinct ids, got {site_ids!r}")
    policies = policies_for(policy, len(tables))
    if "min_cluster_size" in options:  # a site's floor is never lowered by the server
        warn_floor(server.min_cluster_size, policies, ids)
    agents = agents_for(tables, ids, policies, _rngs(rng, len(tables)))
    coordinator = Coordinator(spec, fit, server, ids, seed=seed, min_sites=min_sites)
    result = run_inprocess(coordinator, agents)
    warn_unmet(result, options)
    return result


# Notes that mean a setting the caller gave explicitly did not take effect.
_UNMET = {
    "refine_rounds": f"refinement stopped: {NO_SITE_REFINES}",
    "refine_moves": MOVES_OFF,
}


def warn_unmet(result: FederatedResult, options: dict) -> None:
    """Warn (``UserWarning``) when a refinement setting passed explicitly could not take
    effect because of the sites' policies (e.g. ``refine_rounds=5`` with sites that are too
    small for their privacy budget), so a result never silently looks refined."""
    for key, prefix in _UNMET.items():
        if not options.get(key):
            continue
        for note in result.notes:
            if note.startswith(prefix):
                warnings.warn(f"{key}={options[key]!r}: {note}", UserWarning, stacklevel=3)


def extend(
    model: FittedModel,
    datasets,
    *,
    seed: int | None = 0,
    policy: SitePolicy | Sequence[SitePolicy] | None = None,
    site_ids: Sequence[int] | None = None,
    min_sites: int | None = None,
    rng: Sequence[np.random.Generator] | None = None,
    **options,
) -> FederatedResult:
    """Add sites to a fitted global model without refitting the others.

    The new sites fit locally under the model's own specification (schema, priors, K_init) and
    their clusters are merged into the existing global clusters by the same exact, summary-only
    global merge (the model file keeps which sites each global cluster holds). ``site_ids``
    default to the ids after the model's. Refinement needs every site's rows, so none runs
    here. Returns the new sites' reports (labels under the new posterior) and the new model;
    ``result.id_map`` (also in the model's ``info["id_map"]``) gives the new id of each of the
    old model's clusters (``-1``: removed), for its sites' labels
    (``python -m fedvi label --relabel``).
    """
    fit, server = split_options(options, (FitOptions, ServerOptions), "extend")
    tables = site_list(datasets, "datasets")
    start = max(model.site_ids) + 1 if model.site_ids else 0
    ids = list(range(start, start + len(tables))) if site_ids is None else list(site_ids)
    overlap = sorted(set(ids) & set(model.site_ids))
    if overlap:  # the caller named them: an error, not a site left out
        raise ValueError(f"sites {overlap} are already in the model")
    policies = policies_for(policy, len(tables))
    agents = agents_for(tables, ids, policies, _rngs(rng, len(tables)))
    posterior_labels = dataclasses.replace(server, label_mode="posterior")
    coordinator = Coordinator(
        model.spec, fit, posterior_labels, ids, seed=seed, resume=model, min_sites=min_sites
    )
    result = run_inprocess(coordinator, agents)
    if server.refine_rounds:
        result.notes.append("extend: no refinement rounds (the model's other sites are not here)")
    return result


federated_fit.__doc__ = f"""Cluster the pooled population of several sites without pooling rows.

Every site fits MerDel locally (site ``b`` with seed ``seed + site_ids[b]``) and releases only
per-cluster summaries (subject to its policy's disclosure floor); the server merges them
(``merge_mode``), optionally refines (``refine_rounds``), and each site labels its own rows.

Parameters
----------
datasets : list of tables, one per site
    Each ``(N_b, D)``: an array (0/1 or integer codes; NaN marks a missing cell), a pandas
    DataFrame (columns matched by name across sites), a ``scipy.sparse`` matrix (Bernoulli) or
    a table from :func:`fedvi.io.read_table`.
likelihood : str, optional
    Shorthand for the ``likelihood`` setting below.
seed : int or None, default 0
    Seed of the local fits. Privacy noise is never seeded from it: each site draws its noise
    from its own generator (``rng``).
policy : SitePolicy or list of SitePolicy, optional
    Each site's own rules (disclosure floor, what it answers, its privacy budget).
site_ids : list of int, optional
    Partition ids of the sites (default ``0..B-1``).
min_sites : int, optional
    How many sites must remain for the run to go on (default: all). A site that fails, sends
    a reply that does not pass :mod:`fedvi.reply_checks`, or whose schema differs from the
    first site's is left out and named in ``failures``.
rng : list of numpy.random.Generator, optional
    Each site's noise generator (default: fresh OS entropy at each site); pass generators
    only to reproduce a run with differential privacy (tests).
{numpydoc(MixtureSpec, FitOptions, ServerOptions)}

Returns
-------
FederatedResult
    ``model`` (the global :class:`FittedModel`: ``predict``, ``save``), ``labels`` (one
    ``(N_b,)`` array per site), ``mapping``, ``elbo``, ``elbo_history``, ``n_clusters``,
    ``sites`` (a :class:`SiteReport` each), ``notes``.
"""
