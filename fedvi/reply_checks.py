"""What a site's reply must satisfy before the coordinator uses it.

A site is trusted with its own rows, not with the run: a reply that is not finite, holds
negative statistics, sums above their counts, more clusters than were asked for, counts that do
not add up to the rows it reported, or label counts outside ``0..rows``, is refused. Each check
is a pure function that raises :class:`BadReply` with a reason built from shapes and rule
names only; the coordinator names the site as a failure (``malformed``) and goes on without it.

Tolerances: statistics are sums of responsibilities in float64, so "equal" means within
``RTOL`` relative (plus a tiny absolute slack for empty clusters).
"""

from __future__ import annotations

import numpy as np

from fedvi.protocol import Preflight, RefineReply, Request
from fedvi.summaries import Summaries

#: Relative tolerance of "the counts add up to the rows" and "sums within counts".
RTOL = 1e-6


class BadReply(ValueError):
    """A reply the coordinator will not use; the message says which rule it breaks."""


def _finite_non_negative(name: str, *arrays) -> None:
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all():
            raise BadReply(f"{name} holds non-finite values")
        if (a < 0).any():
            raise BadReply(f"{name} holds negative values")


def check_preflight(pre: Preflight) -> None:
    """A schema that can be a table's: at least one row and one variable, one level count
    (at least 1) per variable."""
    if pre.n_rows < 1:
        raise BadReply(f"pre-flight reports {pre.n_rows} rows")
    if pre.n_features < 1:
        raise BadReply(f"pre-flight reports {pre.n_features} variables")
    if len(pre.levels) != pre.n_features or any(v < 1 for v in pre.levels):
        raise BadReply("pre-flight levels do not match its variables")
    hashes = pre.variable_hashes
    if hashes is not None and len(hashes) != pre.n_features:
        raise BadReply("pre-flight variable names do not match its variables")


def sums_within_counts(s: Summaries) -> bool:
    """Whether every variable's sum (over its levels, for categorical data) is at most what
    its cluster can hold: its count, or its observed count with missing cells."""
    per_variable = s.spec.family().blocksum(s.sums)
    limit = s.counts[:, None] if s.observed is None else s.observed
    return bool((per_variable <= limit * (1 + RTOL) + RTOL).all())


def check_statistics(s: Summaries, what: str, noisy: bool = False) -> None:
    """Finite, non-negative statistics whose sums stay within their counts (``noisy``: with
    differential-privacy noise, which a site clamps per value, only finite and non-negative)."""
    _finite_non_negative(what, s.counts, s.sums, s.entropy, s.observed, s.column_totals)
    if noisy:
        return
    if not sums_within_counts(s):
        raise BadReply(f"{what}: sums exceed their counts")
    if s.observed is not None and (s.observed > s.counts[:, None] * (1 + RTOL) + RTOL).any():
        raise BadReply(f"{what}: observed counts exceed their counts")


def check_summaries(s: Summaries, n_rows: int, max_clusters: int) -> None:
    """A site's one-shot summaries: at most ``max_clusters`` clusters (the ``n_components`` it
    was asked to start from), valid statistics, counts adding up to the ``n_rows`` it reported
    in pre-flight."""
    if not 1 <= s.n_clusters <= max_clusters:
        raise BadReply(f"{s.n_clusters} clusters; at most {max_clusters} were asked for")
    check_statistics(s, "summaries")
    if s.n_rows != n_rows:
        raise BadReply(f"summaries of {s.n_rows} rows; pre-flight reported {n_rows}")
    total = float(s.counts.sum())
    if abs(total - n_rows) > RTOL * max(n_rows, 1):
        raise BadReply(f"counts add up to {total:.6g}, not to the site's {n_rows} rows")


def check_refinement(
    stats: Summaries, posterior: Summaries, n_rows: int, noisy: bool = False
) -> None:
    """One site's refinement statistics (or the secure sum of several, ``n_rows`` then the
    contributing sites' rows): one row of statistics per global cluster, valid, each count at
    most ``n_rows`` and (without noise, which may move them) adding up to at most ``n_rows``."""
    if stats.n_clusters != posterior.n_clusters or stats.sums.shape != posterior.sums.shape:
        raise BadReply("refinement statistics of the wrong shape")
    check_statistics(stats, "refinement statistics", noisy)
    if (stats.counts > n_rows * (1 + RTOL)).any():
        raise BadReply("a refinement count exceeds the site's rows")
    if noisy:
        return
    total = float(stats.counts.sum())
    if total > n_rows * (1 + RTOL) + RTOL:
        raise BadReply(f"refinement counts add up to {total:.6g}, above the {n_rows} rows")


def check_label_counts(
    counts: np.ndarray, n_clusters: int, n_rows: int, marker: int = -1, noisy: bool = False
) -> np.ndarray:
    """``(G,)`` integer label counts, each within ``0..n_rows`` or the suppression ``marker``,
    adding up to at most ``n_rows`` (not checked with noise); returns them as int64."""
    c = np.asarray(counts)
    if c.shape != (n_clusters,):
        raise BadReply(f"label counts of shape {c.shape}; {n_clusters} clusters")
    if not np.isfinite(c.astype(np.float64)).all() or (c != np.rint(c)).any():
        raise BadReply("label counts are not whole numbers")
    c = c.astype(np.int64)
    shown = c[c != marker]
    if (shown < 0).any() or (shown > n_rows).any():
        raise BadReply(f"label counts outside 0..{n_rows} (the site's rows)")
    if not noisy and shown.sum() > n_rows:
        raise BadReply(f"label counts add up to {int(shown.sum())}, above the {n_rows} rows")
    return c


def check_move_statistics(reply: RefineReply, req: Request, n_rows: int) -> None:
    """The move statistics of a refinement reply (or a secure sum, ``n_rows`` then the sites'
    rows) to ``req``: present exactly when asked for, of the asked shapes, finite and
    non-negative; merged-column entropies at most ``n_rows / e`` (``-x log x <= 1/e`` per row),
    second moments at most ``n_rows``, each trial's statistics valid (:func:`check_refinement`)."""
    moves = req.moves
    if moves is None:
        if reply.pair_entropy is not None or reply.second is not None or reply.trials:
            raise BadReply("move statistics that were not asked for")
        return
    if reply.pair_entropy is None or reply.second is None or len(reply.trials) != len(moves.trials):
        raise BadReply("the move statistics asked for are missing")
    P = req.posterior.sums.shape[1]
    if reply.pair_entropy.shape != (len(moves.pairs),) or reply.second.shape != (
        len(moves.splits),
        P,
        P,
    ):
        raise BadReply("move statistics of the wrong shape")
    _finite_non_negative("second moments", reply.second)
    h = reply.pair_entropy
    if not np.isfinite(h).all():
        raise BadReply("merged-column entropies hold non-finite values")
    # r_j + r_k may exceed 1 by a rounding error: -x log x then is a tiny negative number.
    if (h < -RTOL * max(n_rows, 1)).any():
        raise BadReply("merged-column entropies hold negative values")
    if (h > n_rows / np.e * (1 + RTOL) + RTOL).any():
        raise BadReply("a merged-column entropy exceeds what the rows can hold")
    if (reply.second > n_rows * (1 + RTOL) + RTOL).any():
        raise BadReply("a second moment exceeds the rows")
    for stats, trial in zip(reply.trials, moves.trials, strict=True):
        check_refinement(stats, trial, n_rows)
