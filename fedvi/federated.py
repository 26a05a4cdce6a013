"""The whole FedMerDel pipeline in one process: :func:`federated_fit` and :func:`extend`.

Local MerDel on every site, one-shot summaries, the global merge, refinement rounds and
labelling on the sites. This is the reference that the Flower app reproduces: each step here
is the same core function that a Flower site or the strategy calls, under the same settings
(:class:`MixtureSpec`, :class:`FitOptions`, :class:`ServerOptions`, one :class:`SitePolicy`
per site).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from fedvi.data import EncodedData, encode, site_list
from fedvi.elbo import elbo
from fedvi.floor import floored_release
from fedvi.global_merge import GlobalMerge, global_merge
from fedvi.labels import label_rows, map_labels, release_label_counts, release_refinement
from fedvi.model import FittedModel
from fedvi.options import FitOptions, ServerOptions
from fedvi.policy import SitePolicy, check_request
from fedvi.privacy import site_accountant
from fedvi.protocol import encode_refine
from fedvi.refine_moves import (
    DeleteTrial,
    Track,
    apply_merges,
    apply_splits,
    pooled_start,
    propose_deletes,
    propose_pairs,
    propose_splits,
    remap_pairs,
)
from fedvi.result import FederatedResult, SiteReport
from fedvi.settings import numpydoc, split_options
from fedvi.settle import settle_clusters
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


def refusal_note(round_no: int, withheld: dict[int, list[int]]) -> str:
    """Why a refinement round was not applied, naming the clusters and sites whose floor
    withheld statistics (the usual cause)."""
    text = (
        f"refinement round {round_no} not applied: it would have lowered the ELBO; the next "
        "round starts from it and the best posterior is kept"
    )
    if withheld:
        parts = "; ".join(
            f"cluster {g} at site(s) {', '.join(map(str, s))}" for g, s in sorted(withheld.items())
        )
        return text + f" (the sites' disclosure floors withheld: {parts})"
    return text + " (no site's floor withheld a cluster)"


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
    if "min_cluster_size" in options:  # [h19] a site's floor is never lowered by the server
        warn_floor(server.min_cluster_size, policies, ids)
    spec, encoded = shared_spec(tables, spec)
    result = FederatedResult(label_mode=server.label_mode)
    fits = _fit_sites(result, encoded, spec, policies, ids, fit, server, seed)
    merged = global_merge([f.summaries for f in fits], server.merge_mode, site_ids=ids)
    _finish(result, merged, fits, encoded, policies, ids, server, fit, seed)
    return result


def _fit_sites(result, encoded, spec, policies, ids, fit, server, seed) -> list:
    """Each site's local fit under its own policy (floor, hardware); fills its report."""
    fits = []
    for b, (data, p) in enumerate(zip(encoded, policies, strict=True)):
        f = fit_site(
            data,
            spec,
            site_fit_options(fit, p),
            site_seed(seed, ids[b]),
            p.floor(server.min_cluster_size),
            source=f"site {ids[b]}",
        )
        fits.append(f)
        result.sites[ids[b]] = SiteReport(
            site=ids[b],
            n_rows=data.n_rows,
            summaries=f.summaries,
            n_iter=f.trace.n_iter,
            converged=f.trace.converged,
            uplink_bytes={"local": f.summaries.nbytes()},
        )
    return fits


def _finish(result, merged: GlobalMerge, fits, encoded, policies, ids, server, fit, seed):
    """Refinement, labels and the global model, after the merge (shared by fit and extend)."""
    result.merge = merged
    for b, s in enumerate(ids):
        result.sites[s].mapping = merged.mapping[b]
    posterior = merged.posterior
    result.elbo_history = [merged.elbo_before, merged.elbo]
    accountants = [site_accountant(p, server) for p in policies]
    rngs = [np.random.default_rng([0 if seed is None else seed, s, 7]) for s in ids]
    floors = [p.floor(server.min_cluster_size) for p in policies]
    takes_part = [p.allow_refine for p in policies]
    fixed_all = [
        fixed_contribution(f.summaries, merged.mapping[b], posterior.n_clusters)
        for b, f in enumerate(fits)
    ]
    # [h19] refinement with the soft floor and global merge/delete moves (fedvi.floor,
    # fedvi.refine_moves); the coordinator ports this loop.
    noisy = any(a is not None for a in accountants)
    moves = server.refine_moves and not noisy and all(takes_part)
    main = Track(posterior, merged.membership, np.arange(posterior.n_clusters))
    if moves and server.refine_start == "pooled" and merged.base_map is None:
        main = pooled_start([f.summaries for f in fits], posterior)
    trials: list[DeleteTrial] = []
    failed: dict[str, dict[int, float]] = {"delete": {}, "split": {}}
    # The best posterior so far is the one applied; a round that lowers the ELBO (a site's
    # floor withheld a cluster it released before) is not applied, but the next round starts
    # from it (repeating the same round would give the same result).
    best, best_elbo = main, elbo(main.posterior)
    for r in range(server.refine_rounds):
        if not any(takes_part):
            result.notes.append("refinement skipped: no site allows refinement rounds")
            break
        pairs = propose_pairs(main.posterior, server.refine_max_pairs) if moves else None
        splits = None
        if moves:
            busy = {t.cid for t in trials}
            n_del = server.refine_deletes - len(trials)
            trials += propose_deletes(main, failed["delete"], busy, n_del)
            splits = propose_splits(main, failed["split"], server.refine_splits)
            split_cids, split_counts = main.cids[splits], main.posterior.counts[splits]
        stats, fixed, pair_h, moments, withheld = [], [], [], [], {}
        trial_stats = [[] for _ in trials]
        for b, data in enumerate(encoded):
            if not takes_part[b]:
                fixed.append(fixed_all[b])
                continue
            opts = site_fit_options(fit, policies[b])
            if accountants[b] is None:
                rel = floored_release(data, main.posterior, floors[b], opts, pairs, splits)
                st = rel.stats
                for g in np.flatnonzero(rel.withheld):
                    withheld.setdefault(int(g), []).append(ids[b])
                if pairs is not None:
                    pair_h.append(rel.pair_entropy)
                    result.sites[ids[b]].add_uplink("refine_moves", [rel.pair_entropy])
                if splits is not None and len(splits):
                    moments.append(rel.second)
                    result.sites[ids[b]].add_uplink("refine_moves", [rel.second])
                for t, ts in zip(trials, trial_stats, strict=True):
                    ts.append(floored_release(data, t.track.posterior, floors[b], opts).stats)
                    result.sites[ids[b]].add_uplink("refine_moves", encode_refine(ts[-1]))
            else:
                st = release_refinement(
                    data, main.posterior, floors[b], opts, accountants[b], rngs[b]
                )
            stats.append(st)
            result.sites[ids[b]].add_uplink("refine", encode_refine(st))
        new, _, kept = combine_refinement(main.posterior, stats, fixed, noisy=True)
        lowered = not noisy and elbo(new) < best_elbo - 1e-8 * abs(best_elbo)
        log = {"round": r + 1, "applied": not lowered, "withheld": withheld, "merges": 0}
        log.update(candidates=0 if pairs is None else len(pairs), deletes=0, splits=0)
        result.rounds.append(log)
        if lowered:
            result.notes.append(refusal_note(r + 1, withheld))
        if not moves:  # with moves every site refines: no fixed contribution to follow
            fixed_all = [f.subset(kept) for f in fixed_all]
        main = main.after_round(new, kept)
        # Split candidates in the round's ids (-1: gone or merged this round).
        at = np.full(0, -1) if splits is None else np.where(kept, np.cumsum(kept) - 1, -1)[splits]
        if pairs is not None and len(pairs):
            p2, h2 = remap_pairs(pairs, kept, np.sum(pair_h, axis=0))
            outcome = apply_merges(main.posterior, p2, h2)
            if outcome.n_merges:
                main = main.merged(outcome)
                log["merges"] = outcome.n_merges
                hit = np.isin(at, outcome.accepted.ravel())
                at = np.where(hit | (at < 0), -1, outcome.group_of[np.maximum(at, 0)])
        if len(at):
            ok = at >= 0
            done = apply_splits(main.posterior, at[ok], np.sum(moments, axis=0)[ok])
            if done.split:
                main = main.split(done)
                log["splits"] = len(done.split)
            for cid, count, k in zip(split_cids, split_counts, at, strict=True):
                if k not in done.split:
                    failed["split"][int(cid)] = float(count)
        for t, ts in zip(trials, trial_stats, strict=True):
            t_new, _, t_kept = combine_refinement(t.track.posterior, ts, noisy=True)
            t.track = t.track.after_round(t_new, t_kept)
            t.rounds_left -= 1
        done = [t for t in trials if t.rounds_left == 0]
        trials = [t for t in trials if t.rounds_left > 0]
        winner = max(done, key=lambda t: elbo(t.track.posterior), default=None)
        if winner is not None and elbo(winner.track.posterior) > elbo(main.posterior):
            main = winner.track
            log["deletes"] = 1
            trials = []  # the others were proposals against the replaced posterior
        for t in done:
            if t is not winner or main is not t.track:
                failed["delete"][t.cid] = t.count
        log["elbo"] = elbo(main.posterior)
        previous = best_elbo
        # Applied: not lower than the best so far (to the tolerance of combine_refinement).
        if noisy or elbo(main.posterior) >= best_elbo - 1e-8 * abs(best_elbo):
            best, best_elbo = main, elbo(main.posterior)
            result.elbo_history.append(best_elbo)  # the ELBO after each applied round
        moved = log["merges"] or log["deletes"] or log["splits"] or trials
        small = server.refine_tol > 0 and best_elbo - previous < server.refine_tol * abs(best_elbo)
        if not (noisy or moved or lowered) and small:
            result.notes.append(f"refinement converged after {r + 1} rounds")
            break
    if best_elbo < merged.elbo and not noisy:  # a pooled start that never caught up
        best = Track(posterior, merged.membership, np.arange(posterior.n_clusters))
    posterior, membership = best.posterior, best.membership
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
            rep.counts = release_label_counts(labels, G, floors[b], accountants[b], rngs[b])
            rep.add_uplink("label", [rep.counts])
        if accountants[b] is not None:
            rep.privacy = {
                "epsilon_spent": accountants[b].epsilon_spent,
                **accountants[b].to_dict(),
            }
    # [h19] one meaning of K: clusters that own no rows are removed (fedvi.settle).
    refit = server.refine_rounds > 0 and not noisy and all(takes_part)
    ctx = (encoded, policies, ids, fit, floors, accountants, rngs)
    every_site = merged.base_map is None  # extend: the model's earlier sites report no counts
    posterior, membership, settle_map = _settle(
        result, posterior, membership, ctx, refit, every_site
    )
    result.model = FittedModel(posterior, merged.site_ids, membership)
    result.status = "completed"
    result.privacy = {
        "secure_aggregation": False,
        "dp_epsilon": server.dp_epsilon,
        "dp_delta": server.dp_delta,
    }
    return settle_map


def _settle(result, posterior, membership, ctx, refit: bool, every_site: bool = True):
    """Remove the global clusters that own no rows (:func:`fedvi.settle.settle_clusters`, on the
    released label counts). With ``refit``, one exact refinement round without them follows (so
    their soft mass moves to the others and the ELBO stays that of a valid assignment) and the
    sites label again; otherwise the posterior keeps the other clusters' statistics and the
    labels are renumbered. Returns the posterior, membership and ``(G,)`` old-to-new ids."""
    encoded, policies, ids, fit, floors, accountants, rngs = ctx
    total = np.arange(posterior.n_clusters)
    for _ in range(3):
        counts = [
            result.sites[s].counts if policies[b].allow_labels else None for b, s in enumerate(ids)
        ]
        settled = settle_clusters(posterior, counts if every_site else [*counts, None])
        if not settled.n_removed:
            break
        removed = np.flatnonzero(~settled.keep).tolist()
        result.notes.append(f"clusters {removed} own no rows: removed at the end of the run")
        membership = membership[settled.keep]
        total = np.where(total >= 0, settled.old_to_new[np.maximum(total, 0)], -1)
        sub = posterior.subset(settled.keep)
        if not refit:
            posterior = sub
            for s in ids:
                rep = result.sites[s]
                rep.labels = settled.relabel(rep.labels)
                if rep.counts is not None:
                    rep.counts = rep.counts[settled.keep]
            continue
        stats = [
            floored_release(d, sub, floors[b], site_fit_options(fit, policies[b])).stats
            for b, d in enumerate(encoded)
        ]
        posterior, _, kept = combine_refinement(sub, stats, noisy=True)
        membership = membership[kept]
        new_id = np.full(len(kept), -1)
        new_id[kept] = np.arange(int(kept.sum()))
        total = np.where(total >= 0, new_id[np.maximum(total, 0)], -1)
        result.elbo_history.append(elbo(posterior))
        for b, s in enumerate(ids):
            rep = result.sites[s]
            rep.labels = label_rows(encoded[b], posterior, site_fit_options(fit, policies[b]))
            if policies[b].allow_labels:
                rep.counts = release_label_counts(
                    rep.labels, posterior.n_clusters, floors[b], accountants[b], rngs[b]
                )
                rep.add_uplink("label", [rep.counts])
    return posterior, membership, total


def extend(
    model: FittedModel,
    datasets,
    *,
    seed: int | None = 0,
    policy: SitePolicy | Sequence[SitePolicy] | None = None,
    site_ids: Sequence[int] | None = None,
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
    fits = _fit_sites(result, encoded, spec, policies, ids, fit, server, seed)
    merged = global_merge(
        [f.summaries for f in fits],
        server.merge_mode,
        site_ids=ids,
        base=(model.posterior, model.membership, list(model.site_ids)),
    )
    no_refine = dataclasses.replace(server, refine_rounds=0, label_mode="posterior")
    settle_map = _finish(result, merged, fits, encoded, policies, ids, no_refine, fit, seed)
    # [h19] old-to-new ids of the model's clusters (-1: removed), recorded in the model.
    base_map = merged.base_map
    result.id_map = np.where(base_map >= 0, settle_map[np.maximum(base_map, 0)], -1)
    result.model = dataclasses.replace(
        result.model,
        info={
            **model.info,
            "id_map": {"from_n_clusters": model.n_clusters, "map": result.id_map.tolist()},
        },
    )
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
    Seed of the local fits (and of any privacy noise).
policy : SitePolicy or list of SitePolicy, optional
    Each site's own rules (disclosure floor, what it answers, its privacy budget).
site_ids : list of int, optional
    Partition ids of the sites (default ``0..B-1``).
{numpydoc(MixtureSpec, FitOptions, ServerOptions)}

Returns
-------
FederatedResult
    ``model`` (the global :class:`FittedModel`: ``predict``, ``save``), ``labels`` (one
    ``(N_b,)`` array per site), ``mapping``, ``elbo``, ``elbo_history``, ``n_clusters``,
    ``sites`` (a :class:`SiteReport` each), ``notes``.
"""
