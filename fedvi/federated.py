"""The whole FedMerDel pipeline in one process: :func:`federated_fit` and :func:`extend`.

Local MerDel on every site, one-shot summaries, the global merge, refinement rounds and
labelling on the sites. This is the reference that the Flower app reproduces: each step here
is the same core function that a Flower site or the strategy calls, under the same settings
(:class:`MixtureSpec`, :class:`FitOptions`, :class:`ServerOptions`, one :class:`SitePolicy`
per site).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from fedvi.data import EncodedData, encode, site_list
from fedvi.elbo import elbo
from fedvi.gate import SiteGate  # issue 15: each site's release gate
from fedvi.global_merge import GlobalMerge, global_merge
from fedvi.labels import label_rows, map_labels, release_label_counts, release_refinement
from fedvi.ledger import Ledger
from fedvi.model import FittedModel
from fedvi.options import FitOptions, ServerOptions
from fedvi.policy import PolicyRefusal, SitePolicy, check_request
from fedvi.protocol import encode_refine
from fedvi.result import FederatedResult, SiteReport
from fedvi.settings import numpydoc, split_options
from fedvi.site import fit_site
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries
from fedvi.vi import relevance_step


def site_seed(seed: int | None, site: int) -> int | None:
    """Seed of site ``site``'s local fit: ``seed + site`` (``None`` stays random)."""
    return None if seed is None else int(seed) + int(site)


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


def site_fit_options(fit: FitOptions, policy: SitePolicy) -> FitOptions:
    """The run's fit options with the site's own backend/device (its hardware)."""
    changes = {k: getattr(policy, k) for k in ("backend", "device") if getattr(policy, k)}
    if changes.get("backend") == "numpy" and "device" not in changes:
        changes["device"] = "cpu"
    return dataclasses.replace(fit, **changes) if changes else fit


def shared_spec(tables: Sequence, spec: MixtureSpec) -> tuple[MixtureSpec, list[EncodedData]]:
    """Encode every site's table and agree on one resolved model: the variable names (the
    model's, else the first named table's: every other named table is aligned to them by name)
    and, for categorical data without ``n_levels``, the levels (largest code seen at any site +
    1, what a schema round would agree on)."""
    encoded = []
    for b, X in enumerate(tables):
        data = encode(X, spec, source=f"site {b}")
        if spec.feature_names is None and data.feature_names is not None:
            spec = dataclasses.replace(spec, feature_names=data.feature_names)
        encoded.append(data)
    widths = [d.n_features for d in encoded]
    if len(set(widths)) > 1:
        raise ValueError(
            "mismatched schemas between sites: numbers of columns are "
            + ", ".join(f"site {b}: {w}" for b, w in enumerate(widths))
        )
    levels = np.max([d.n_levels for d in encoded], axis=0)
    if spec.likelihood == "categorical" and spec.n_levels is not None:
        levels = encoded[0].n_levels
    resolved = spec.resolve(levels, spec.feature_names)
    encoded = [encode(d, resolved, source=f"site {b}") for b, d in enumerate(encoded)]
    return resolved, encoded


def combine_refinement(
    posterior: Summaries,
    site_stats: Sequence[Summaries],
    fixed: Sequence[Summaries] = (),
    noisy: bool = False,
    empty_threshold: float = 1e-6,
) -> tuple[Summaries, bool, np.ndarray]:
    """Sum the sites' refinement statistics (and the ``fixed`` contributions of sites that do
    not take part) into the next global posterior; ``(posterior, accepted, kept)`` where
    ``kept (G,)`` marks the previous clusters that survive (empty ones are removed).

    A round is one CAVI iteration on the pooled rows (restricted, at sites that apply their
    disclosure floor, to the clusters they may release), so it is accepted only if the ELBO
    does not fall; otherwise the previous posterior is returned with ``accepted=False``. Column
    totals are those of the one-shot summaries (the same rows). ``noisy``: the statistics carry
    differential-privacy noise, so the ELBO is not comparable and every round is accepted. The
    ``c_d`` update (variable selection) runs here, on the summed statistics.
    """
    summed = Summaries.add([*site_stats, *fixed], like=posterior)
    new = dataclasses.replace(
        summed,
        column_totals=posterior.column_totals,
        column_observed=posterior.column_observed,
        n_rows=posterior.n_rows,
    )
    keep = new.counts >= empty_threshold
    if not keep.all():
        new = new.subset(keep)
    if new.spec.variable_selection:
        new = dataclasses.replace(new, relevance=relevance_step(new, new.relevance))
    if not noisy and elbo(new) < elbo(posterior) - 1e-8 * abs(elbo(posterior)):
        return posterior, False, np.ones(posterior.n_clusters, dtype=bool)
    return new, True, keep


def fixed_contribution(summaries: Summaries, mapping: np.ndarray, n_clusters: int) -> Summaries:
    """A site's one-shot statistics per global cluster (what it contributes when it does not
    take part in refinement): its local clusters summed by ``mapping``."""
    return summaries.combine(mapping, n_clusters)


def federated_fit(
    datasets,
    likelihood: str | None = None,
    *,
    seed: int | None = 0,
    policy: SitePolicy | Sequence[SitePolicy] | None = None,
    site_ids: Sequence[int] | None = None,
    noise_rng: np.random.Generator | None = None,
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
    for p in policies:
        check_request(spec, p)
    spec, encoded = shared_spec(tables, spec)
    result = FederatedResult(label_mode=server.label_mode)
    gates = site_gates(policies, ids, noise_rng)
    fits = _fit_sites(result, encoded, spec, policies, ids, fit, server, seed, gates)
    merged = global_merge([f.summaries for f in fits], server.merge_mode, site_ids=ids)
    _finish(result, merged, fits, encoded, policies, ids, server, fit, gates)
    return result


def site_gates(policies: Sequence[SitePolicy], ids, noise_rng=None) -> list[SiteGate]:
    """issue 15: each site's release gate for one in-process run (its ledger in
    ``<state_dir>/site<id>``, else in memory; noise from ``noise_rng`` or OS entropy)."""
    return [
        SiteGate(p, Ledger(p.state_dir and os.path.join(p.state_dir, f"site{s}")), rng=noise_rng)
        for p, s in zip(policies, ids, strict=True)
    ]


def _fit_sites(result, encoded, spec, policies, ids, fit, server, seed, gates) -> list:
    """Each site's local fit under its own policy (floor, hardware); fills its report."""
    fits = []
    for b, (data, p) in enumerate(zip(encoded, policies, strict=True)):
        gates[b].start_local(spec)
        f = fit_site(
            data,
            spec,
            site_fit_options(fit, p),
            site_seed(seed, ids[b]),
            p.floor(server.min_cluster_size),
            source=f"site {ids[b]}",
        )
        fits.append(f)
        floor = p.floor(server.min_cluster_size)
        gates[b].local_released(spec, f.summaries.n_clusters, data.n_rows, floor)
        result.sites[ids[b]] = SiteReport(
            site=ids[b],
            n_rows=data.n_rows,
            summaries=f.summaries,
            n_iter=f.trace.n_iter,
            converged=f.trace.converged,
            uplink_bytes={"local": f.summaries.nbytes()},
        )
    return fits


def _finish(result, merged: GlobalMerge, fits, encoded, policies, ids, server, fit, gates):
    """Refinement, labels and the global model, after the merge (shared by fit and extend)."""
    result.merge = merged
    for b, s in enumerate(ids):
        result.sites[s].mapping = merged.mapping[b]
    posterior = merged.posterior
    result.elbo_history = [merged.elbo_before, merged.elbo]
    floors = [p.floor(server.min_cluster_size) for p in policies]
    takes_part = [p.allow_refine for p in policies]
    noisy = any(p.dp_epsilon is not None for p in policies)
    for b, data in enumerate(encoded):  # issue 15: a site too small for its budget declines
        if (
            takes_part[b]
            and server.refine_rounds
            and not gates[b].refinement_useful(data.n_rows, data.n_features, server)
        ):
            takes_part[b] = False
            result.notes.append(
                f"site {ids[b]} declines refinement: too small for its privacy budget to give "
                "a useful release (its one-shot statistics stand)"
            )
    membership = merged.membership
    fixed_all = [
        fixed_contribution(f.summaries, merged.mapping[b], posterior.n_clusters)
        for b, f in enumerate(fits)
    ]
    for r in range(server.refine_rounds):
        if not any(takes_part):
            result.notes.append("refinement skipped: no site allows refinement rounds")
            break
        stats, fixed = [], []
        for b, data in enumerate(encoded):
            if not takes_part[b]:
                fixed.append(fixed_all[b])
                continue
            opts = site_fit_options(fit, policies[b])
            try:  # issue 15: the site's gate grants (or refuses) this release
                rho = gates[b].aggregate("refine", posterior, data.n_rows, data.n_features, server)
            except PolicyRefusal as exc:
                takes_part[b] = False
                fixed.append(fixed_all[b])
                result.notes.append(f"site {ids[b]} stops refining: {exc}")
                continue
            st = release_refinement(data, posterior, floors[b], opts, rho, gates[b].rng)
            gates[b].released(
                "refine", posterior.n_clusters, data.n_rows, "refinement", rho, floors[b], server
            )
            stats.append(st)
            result.sites[ids[b]].add_uplink("refine", encode_refine(st))
        new, accepted, kept = combine_refinement(posterior, stats, fixed, noisy=noisy)
        if not accepted:
            result.notes.append(
                f"refinement round {r + 1} not applied: it would have lowered the ELBO "
                "(sites' floors restricted their assignments); refinement stopped"
            )
            break
        fixed_all = [f.subset(kept) for f in fixed_all]
        membership = membership[kept]
        posterior = new
        result.elbo_history.append(elbo(posterior))
    G = posterior.n_clusters
    one_shot = server.refine_rounds == 0 or len(result.elbo_history) == 2
    use_map = server.label_mode == "map" and one_shot
    result.label_mode = "map" if use_map else "posterior"
    for b, (f, data) in enumerate(zip(fits, encoded, strict=True)):
        rep = result.sites[ids[b]]
        if use_map:
            labels = map_labels(f.local_labels(), merged.mapping[b])
        else:
            labels = label_rows(data, posterior, site_fit_options(fit, policies[b]))
        rep.labels = labels
        if policies[b].allow_labels:
            rho = gates[b].aggregate("label", posterior, data.n_rows, data.n_features, server)
            rep.counts = release_label_counts(labels, G, floors[b], rho, gates[b].rng)
            spent = gates[b].released(
                "label", G, data.n_rows, "label counts", rho, floors[b], server
            )
            rep.add_uplink("label", [rep.counts])
            if spent:
                rep.privacy = {
                    "epsilon_spent": spent["privacy.epsilon_spent"],
                    "releases": spent["privacy.releases"],
                }
    result.model = FittedModel(posterior, merged.site_ids, membership)
    result.status = "completed"
    result.privacy = {
        "secure_aggregation": False,
        "dp_epsilon": server.dp_epsilon,
        "dp_delta": server.dp_delta,
    }


def extend(
    model: FittedModel,
    datasets,
    *,
    seed: int | None = 0,
    policy: SitePolicy | Sequence[SitePolicy] | None = None,
    site_ids: Sequence[int] | None = None,
    noise_rng: np.random.Generator | None = None,
    **options,
) -> FederatedResult:
    """Add sites to a fitted global model without refitting the others.

    The new sites fit locally under the model's own specification (schema, priors, K_init) and
    their clusters are merged into the existing global clusters by the same exact, summary-only
    global merge (the model file keeps which sites each global cluster holds). ``site_ids``
    default to the ids after the model's. Refinement needs every site's rows, so none runs
    here. Returns the new sites' reports (labels under the new posterior) and the new model.
    """
    fit, server = split_options(options, (FitOptions, ServerOptions), "extend")
    tables = site_list(datasets, "datasets")
    start = max(model.site_ids) + 1 if model.site_ids else 0
    ids = list(range(start, start + len(tables))) if site_ids is None else list(site_ids)
    policies = policies_for(policy, len(tables))
    spec = model.spec
    for p in policies:
        check_request(spec, p)
    encoded = [encode(X, spec, source=f"site {s}") for X, s in zip(tables, ids, strict=True)]
    result = FederatedResult(label_mode="posterior")
    gates = site_gates(policies, ids, noise_rng)
    fits = _fit_sites(result, encoded, spec, policies, ids, fit, server, seed, gates)
    merged = global_merge(
        [f.summaries for f in fits],
        server.merge_mode,
        site_ids=ids,
        base=(model.posterior, model.membership, list(model.site_ids)),
    )
    no_refine = dataclasses.replace(server, refine_rounds=0, label_mode="posterior")
    _finish(result, merged, fits, encoded, policies, ids, no_refine, fit, gates)
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
    Seed of the local fits (never of the privacy noise: that comes from the sites' entropy).
policy : SitePolicy or list of SitePolicy, optional
    Each site's own rules (disclosure floor, what it answers, its privacy budget: by default
    its refinement statistics and label counts carry DP noise, ``dp_epsilon`` of
    :class:`SitePolicy`; ``SitePolicy(dp_epsilon=None)`` opts out).
site_ids : list of int, optional
    Partition ids of the sites (default ``0..B-1``).
noise_rng : numpy Generator, optional
    The sites' noise generator (tests; default: OS entropy).
{numpydoc(MixtureSpec, FitOptions, ServerOptions)}

Returns
-------
FederatedResult
    ``model`` (the global :class:`FittedModel`: ``predict``, ``save``), ``labels`` (one
    ``(N_b,)`` array per site), ``mapping``, ``elbo``, ``elbo_history``, ``n_clusters``,
    ``sites`` (a :class:`SiteReport` each), ``notes``.
"""
