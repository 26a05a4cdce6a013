"""Global merge moves during refinement, decided by the exact ELBO from sums (SPEC §11).

After the one-shot merge, global clusters hold rows of the same sites, so the summary-only
gain of merging two of them (:func:`fedvi.elbo.merge_gain`) is only an upper bound: merging
lowers the assignment entropy by an amount that needs the rows. As bnpy does with its per-pair
``Hresp`` terms, each refinement round carries candidate pairs ``(j, k)``; every site returns,
next to its statistics, one scalar per pair,

    H_jk^(b) = -sum_n (r_nj + r_nk) log(r_nj + r_nk),

computed under the same responsibilities as those statistics (:func:`fedvi.floor.
floored_release`). It is a sum over rows, so it adds up across sites (and under secure
aggregation) like the other statistics, and the merged ELBO of the round's pooled assignment
is then exact: counts and sums add, the entropy of the pair becomes ``sum_b H_jk^(b)``.

Proposals come from the summary-only bound: a pair whose bound is not positive can never be
accepted; each cluster's best partner first, smallest cluster first (a merge into a partner is
a one-scalar restricted delete), then the other pairs. Acceptance is exact: disjoint pairs best
first while the exact gain is positive.

Deletes. An exact delete of cluster ``k`` needs the statistics of the rows re-assigned without
``k``: a full ``(G, P)`` set per candidate and site. A :class:`DeleteTrial` is the posterior
without ``k``, refined beside the current one for :data:`DELETE_ROUNDS` rounds (the sites
answer both); it replaces the current posterior if its exact ELBO is then higher.

Splits (opt-in). Merges and deletes only lower K. For a few large clusters the sites also send
``sum_n r_nk x_n x_n^T``; splitting ``k`` by one design column moves each row's weight whole
to one part, so the entropy is unchanged and :func:`split_gains` is exact from sums.

Everything here is a pure function of summaries (the server's side), except
:func:`pair_entropies` (the site's). :class:`Track` follows a posterior, its membership and
stable cluster ids through rounds; the rounds that drive them are
:class:`fedvi.coordinator.Coordinator`'s (both engines), the site's side is
:class:`fedvi.site_agent.SiteAgent`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from fedvi.data import EncodedData
from fedvi.elbo import elbo, merge_gain
from fedvi.floor import floored_release
from fedvi.options import FitOptions
from fedvi.summaries import Summaries
from fedvi.vi import relevance_step


def pooled_start(sites: list[Summaries], like: Summaries) -> Track:
    """The sites' one-shot clusters side by side as a starting posterior for refinement
    (``refine_start="pooled"``): each cluster holds one site; prior dimension, ``c_d`` and
    column totals are those of ``like`` (the merged posterior)."""
    pooled = Summaries.concat(sites)
    pooled = dataclasses.replace(
        pooled,
        prior_dim=like.prior_dim,
        relevance=like.relevance,
        column_totals=like.column_totals,
        column_observed=like.column_observed,
        n_rows=like.n_rows,
    )
    members = np.zeros((pooled.n_clusters, len(sites)), dtype=bool)
    site_of = np.repeat(np.arange(len(sites)), [s.n_clusters for s in sites])
    members[np.arange(pooled.n_clusters), site_of] = True
    return Track(pooled, members, np.arange(pooled.n_clusters))


def propose_pairs(posterior: Summaries, max_pairs: int) -> np.ndarray:
    """``(M, 2)`` candidate merges of global clusters, ``j < k``, at most ``max_pairs``.

    Only pairs whose summary-only gain (an upper bound of the exact one) is positive. First
    each cluster's best partner, smallest cluster first (deletes folded into merges), then the
    remaining pairs by decreasing bound.
    """
    G = posterior.n_clusters
    if G < 2 or max_pairs < 1:
        return np.zeros((0, 2), dtype=np.int64)
    j, k = np.triu_indices(G, 1)
    bound = merge_gain(posterior, j, k)
    table = np.full((G, G), -np.inf)
    table[j, k] = table[k, j] = bound
    chosen: list[tuple[int, int]] = []
    seen = set()
    for c in np.argsort(posterior.counts, kind="stable"):
        partner = int(np.argmax(table[c]))
        if table[c, partner] > 0:
            pair = (min(int(c), partner), max(int(c), partner))
            if pair not in seen:
                seen.add(pair)
                chosen.append(pair)
    for m in np.argsort(-bound, kind="stable"):
        if not bound[m] > 0:
            break
        pair = (int(j[m]), int(k[m]))
        if pair not in seen:
            seen.add(pair)
            chosen.append(pair)
    return np.asarray(chosen[:max_pairs], dtype=np.int64).reshape(-1, 2)


def pair_entropies(
    data: EncodedData,
    posterior: Summaries,
    pairs: np.ndarray,
    options: FitOptions | None = None,
    floor: int = 1,
) -> np.ndarray:
    """``(M,)`` a site's ``-sum_n (r_j + r_k) log(r_j + r_k)`` for ``pairs (M, 2)`` of global
    clusters, under its responsibilities of a refinement round (restricted by ``floor``);
    streamed over blocks of rows, all pairs at once per block."""
    return floored_release(data, posterior, floor, options, pairs).pair_entropy


@dataclass(frozen=True)
class MergeOutcome:
    """Merges accepted in one round.

    posterior: the merged statistics. group_of: ``(G,)`` new id of each cluster (merged
    clusters share one; ids keep the order of the first of each group). accepted: ``(A, 2)``
    pairs merged (old ids). gains: ``(A,)`` exact ELBO gains. scored: pairs scored.
    """

    posterior: Summaries
    group_of: np.ndarray
    accepted: np.ndarray
    gains: np.ndarray
    scored: int

    @property
    def n_merges(self) -> int:
        return len(self.accepted)


def exact_gains(stats: Summaries, pairs: np.ndarray, pair_entropy: np.ndarray) -> np.ndarray:
    """``(M,)`` exact ELBO change of merging each pair of ``stats`` (the round's pooled
    statistics), given the pooled merged-column entropies ``pair_entropy (M,)``."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return np.zeros(0)
    a, b = pairs[:, 0], pairs[:, 1]
    H = stats.entropy
    return merge_gain(stats, a, b) + np.asarray(pair_entropy) - H[a] - H[b]


def apply_merges(stats: Summaries, pairs: np.ndarray, pair_entropy: np.ndarray) -> MergeOutcome:
    """Merge disjoint pairs best first while their exact gain is positive (each cluster in at
    most one merge per round, so the gains add up exactly); then, with variable selection, one
    ``c_d`` update (an ascent step). The ELBO of the result is that of the round's pooled
    assignment with the merged columns summed: exact, and higher whenever a pair is accepted."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    G = stats.n_clusters
    gains = exact_gains(stats, pairs, pair_entropy)
    used = np.zeros(G, dtype=bool)
    target = np.arange(G)
    accepted, acc_gains, merged_h = [], [], {}
    for m in np.argsort(-gains, kind="stable"):
        if not gains[m] > 0:
            break
        a, b = (int(x) for x in pairs[m])
        if used[a] or used[b]:
            continue
        used[a] = used[b] = True
        target[b] = a
        accepted.append((a, b))
        acc_gains.append(float(gains[m]))
        merged_h[a] = float(pair_entropy[m])
    if not accepted:
        none = np.zeros((0, 2), np.int64)
        return MergeOutcome(stats, np.arange(G), none, np.zeros(0), len(pairs))
    keep = np.flatnonzero(target == np.arange(G))
    new_id = np.full(G, -1)
    new_id[keep] = np.arange(len(keep))
    group_of = new_id[target]
    entropy = stats.entropy[keep].copy()
    for a, h in merged_h.items():
        entropy[new_id[a]] = h
    merged = stats.combine(group_of, len(keep), entropy=entropy)
    if merged.spec.variable_selection:
        c = relevance_step(merged, merged.relevance)
        if elbo(merged, c) >= elbo(merged):
            merged = dataclasses.replace(merged, relevance=c)
    return MergeOutcome(
        merged, group_of, np.asarray(accepted, np.int64), np.asarray(acc_gains), len(pairs)
    )


def remap_pairs(pairs: np.ndarray, kept: np.ndarray, pair_entropy: np.ndarray):
    """Pairs (and their entropies) in the ids after removing clusters (``kept (G,)`` mask):
    pairs that lost a cluster are dropped."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    new_id = np.full(len(kept), -1)
    new_id[kept] = np.arange(int(np.sum(kept)))
    mapped = new_id[pairs]
    ok = (mapped >= 0).all(axis=1)
    return mapped[ok], np.asarray(pair_entropy)[ok]


def merge_membership(membership: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """``(G', S)``: the sites each merged cluster holds (union over its group)."""
    G2 = int(group_of.max()) + 1 if len(group_of) else 0
    out = np.zeros((G2, membership.shape[1]), dtype=bool)
    np.logical_or.at(out, group_of, membership)
    return out


#: Refinement rounds a delete proposal runs beside the current posterior before the two are
#: compared (measured on binarised digits split by class: of the 8 smallest clusters, 1 delete
#: raised the ELBO after one round, 2 after two).
DELETE_ROUNDS = 2


@dataclass(frozen=True)
class Track:
    """A global posterior followed through refinement rounds: its statistics, which sites each
    cluster holds (``membership (G, S)``) and stable cluster ids ``cids (G,)`` (a move's
    memory survives renumbering)."""

    posterior: Summaries
    membership: np.ndarray
    cids: np.ndarray

    def subset(self, keep) -> Track:
        return Track(self.posterior.subset(keep), self.membership[keep], self.cids[keep])

    def after_round(self, posterior: Summaries, kept: np.ndarray) -> Track:
        """The next round's posterior, whose clusters are this one's ``kept (G,)``."""
        return Track(posterior, self.membership[kept], self.cids[kept])

    def merged(self, outcome: MergeOutcome) -> Track:
        G2 = outcome.posterior.n_clusters
        first = np.full(G2, -1)
        for old in range(len(outcome.group_of) - 1, -1, -1):
            first[outcome.group_of[old]] = old
        return Track(
            outcome.posterior,
            merge_membership(self.membership, outcome.group_of),
            self.cids[first],
        )

    def split(self, outcome: SplitOutcome) -> Track:
        """After :func:`apply_splits`: each split's part ``B`` is a new cluster (new id)."""
        n = len(outcome.split)
        start = int(self.cids.max()) + 1 if len(self.cids) else 0
        return Track(
            outcome.posterior,
            np.vstack([self.membership, self.membership[outcome.split]]),
            np.concatenate([self.cids, np.arange(start, start + n)]),
        )

    def without(self, k: int) -> Track:
        keep = np.ones(self.posterior.n_clusters, dtype=bool)
        keep[k] = False
        return self.subset(keep)


@dataclass
class DeleteTrial:
    """A delete proposal in flight: the posterior without cluster ``cid``, refined beside the
    current one for ``rounds_left`` more rounds."""

    track: Track
    cid: int
    count: float
    rounds_left: int = DELETE_ROUNDS


def propose_deletes(
    track: Track, failed: dict[int, float], busy: set[int], n: int
) -> list[DeleteTrial]:
    """Up to ``n`` delete proposals, smallest cluster first, skipping clusters already in
    flight (``busy``, by stable id) and clusters whose delete failed while their count has not
    moved by more than one row or 1 % since (``failed``: stable id -> count then)."""
    out: list[DeleteTrial] = []
    counts = track.posterior.counts
    if track.posterior.n_clusters < 2 or n < 1:
        return out
    for k in np.argsort(counts, kind="stable"):
        cid, c = int(track.cids[k]), float(counts[k])
        if cid in busy:
            continue
        seen = failed.get(cid)
        if seen is not None and abs(c - seen) <= max(1.0, 0.01 * seen):
            continue
        out.append(DeleteTrial(track.without(int(k)), cid, c))
        if len(out) >= n:
            break
    return out


def split_gains(stats: Summaries, k: int, moment: np.ndarray) -> np.ndarray:
    """``(P,)`` exact ELBO change of splitting cluster ``k`` of ``stats`` (the round's pooled
    statistics) by design column ``l``: its rows with ``x_nl = 1`` (weights ``r_nk x_nl``)
    against the others. ``moment (P, P)``: the pooled ``sum_n r_nk x_n x_n^T``.

    The split moves each row's weight ``r_nk`` whole to one part, so the assignment entropy
    is unchanged and the gain is minus the merge gain of the two parts: exact from sums. Its
    parts' statistics are ``N_A = M_ll``, ``S_A = M_l``; ``B`` = cluster ``k`` minus ``A``.
    Columns that leave a part with less than one row of weight get ``-inf``."""
    M = np.asarray(moment, dtype=np.float64)
    P = M.shape[0]
    NA = np.clip(np.diag(M), 0.0, stats.counts[k])
    SA = np.clip(M, 0.0, None)
    NB = stats.counts[k] - NA
    SB = np.clip(stats.sums[k][None, :] - SA, 0.0, None)
    parts = dataclasses.replace(
        stats,
        counts=np.concatenate([NA, NB]),
        sums=np.vstack([SA, SB]),
        entropy=np.zeros(2 * P),
        observed=None,
    )
    gain = -merge_gain(parts, np.arange(P), np.arange(P) + P)
    gain[(NA < 1.0) | (NB < 1.0)] = -np.inf
    return gain


@dataclass(frozen=True)
class SplitOutcome:
    """Splits applied in one round: the new posterior (each split cluster keeps its id for
    part ``A``; part ``B`` is appended), ``split``: the clusters split, ``gains``."""

    posterior: Summaries
    split: list[int]
    gains: list[float]


def apply_splits(stats: Summaries, ks, moments) -> SplitOutcome:
    """Split each cluster of ``ks`` by its best column when the exact gain is positive (each
    split changes only its own cluster's terms and the cluster count, so the gains add up;
    the prior dimension bounds the number of clusters)."""
    out, done, gains = stats, [], []
    for k, M in zip(ks, moments, strict=True):
        if out.n_clusters >= out.prior_dim or M is None:
            break
        g = split_gains(out, int(k), M)
        col = int(np.argmax(g))
        if not g[col] > 0:
            continue
        NA, SA = float(np.clip(M[col, col], 0.0, out.counts[k])), np.clip(M[col], 0.0, None)
        SB = np.clip(out.sums[k] - SA, 0.0, None)
        counts = np.append(out.counts, out.counts[k] - NA)
        counts[k] = NA
        sums = np.vstack([out.sums, SB])
        sums[k] = SA
        out = dataclasses.replace(
            out, counts=counts, sums=sums, entropy=np.append(out.entropy, 0.0)
        )
        done.append(int(k))
        gains.append(float(g[col]))
    if done and out.spec.variable_selection:
        c = relevance_step(out, out.relevance)
        if elbo(out, c) >= elbo(out):
            out = dataclasses.replace(out, relevance=c)
    return SplitOutcome(out, done, gains)


def propose_splits(track: Track, failed: dict[int, float], n: int) -> np.ndarray:
    """``(M,)`` clusters whose second moments the next round asks for: up to ``n``, largest
    first, skipping those whose split failed while their count has not moved by more than one
    row or 1 % since (``failed``: stable id -> count then)."""
    post = track.posterior
    if n < 1 or post.n_clusters >= post.prior_dim or post.observed is not None:
        return np.zeros(0, dtype=np.int64)
    out = []
    for k in np.argsort(-post.counts, kind="stable"):
        seen = failed.get(int(track.cids[k]))
        c = float(post.counts[k])
        if seen is not None and abs(c - seen) <= max(1.0, 0.01 * seen):
            continue
        out.append(int(k))
        if len(out) >= n:
            break
    return np.asarray(out, dtype=np.int64)
