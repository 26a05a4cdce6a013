"""How a site fits (:class:`FitOptions`) and what the server does (:class:`ServerOptions`).

One frozen dataclass per group; each field declares its default, its doc and its constraint
once (:func:`fedvi.settings.setting`). The model itself is :class:`fedvi.MixtureSpec`; what a
site allows is its :class:`fedvi.SitePolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedvi.settings import (
    Boolean,
    Interval,
    InvalidSetting,
    OneOf,
    Optional,
    Pattern,
    check_fields,
    setting,
)

MOVE_SCHEDULES = ("merdel", "paper", "none")
BACKENDS = ("numpy", "torch")
MERGE_MODES = ("best_first", "paper")
LABEL_MODES = ("posterior", "map")
#: Constraints shared with :class:`fedvi.SitePolicy` (which wraps them in ``Optional``).
DEVICE = Pattern(r"cpu|cuda(:[0-9]+)?", "'cpu', 'cuda' or 'cuda:<index>'")
EPSILON = Interval(float, 0, open_low=True)
DELTA = Interval(float, 0, 1, True, True)


@dataclass(frozen=True)
class FitOptions:
    """The local fit of a site: CAVI interleaved with merge/delete moves (:mod:`fedvi.merdel`).

    Every field is a setting of ``MixtureVI``, ``federated_fit`` and the ``model`` config group.
    """

    moves: str = setting(
        "merdel",
        "move schedule: 'merdel' (every merge pair with a positive summary-only gain, then one "
        "delete), 'paper' (one merge and one delete proposal), 'none' (plain CAVI)",
        OneOf(*MOVE_SCHEDULES),
    )
    move_every: int = setting(5, "VI iterations between rounds of moves", Interval(int, 1))
    delete_iters: int = setting(
        3, "VI iterations run on a delete proposal and on the current model", Interval(int, 1)
    )
    delete_order: str = setting(
        "smallest",
        "delete candidate: the 'smallest' cluster first or the 'largest' (bnpy's rule)",
        OneOf("smallest", "largest"),
    )
    max_iter: int = setting(
        1000, "VI iterations at most (a ConvergenceWarning when reached)", Interval(int, 1)
    )
    tol: float = setting(
        1e-8,
        "stop when the relative ELBO change stays below tol for n_stable iterations",
        Interval(float, 0, open_low=True),
    )
    n_stable: int = setting(3, "iterations in a row below tol to converge", Interval(int, 1))
    empty_threshold: float = setting(
        1e-6, "a cluster whose count falls below this is removed", Interval(float, 0)
    )
    backend: str = setting(
        "numpy",
        "where the local step runs: 'numpy' or 'torch' (optional, float64, same results)",
        OneOf(*BACKENDS),
    )
    device: str = setting(
        "cpu",
        "torch device ('cpu', 'cuda', 'cuda:1'); 'cpu' with numpy",
        DEVICE,
    )
    block_rows: int = setting(
        8192,
        "rows per block when a pass streams the table (memory grows with it, not with N)",
        Interval(int, 64),
    )
    precision: str = setting(
        "float64",
        "dtype of the two matrix products per pass; statistics and the ELBO are always float64",
        OneOf("float64", "float32"),
    )

    def __post_init__(self):
        check_fields(self)
        if self.backend == "numpy" and self.device != "cpu":
            raise InvalidSetting(
                f"backend='numpy' runs on the CPU only, got device={self.device!r}"
            )


@dataclass(frozen=True)
class ServerOptions:
    """What the server does with the sites' summaries (global merge, refinement, labels, DP).

    Every field is a setting of ``federated_fit`` and the ``strategy`` config group.
    """

    merge_mode: str = setting(
        "best_first",
        "global merge: 'best_first' (largest positive gain first, independent of site order) "
        "or 'paper' (the authors' single pass in site order)",
        OneOf(*MERGE_MODES),
    )
    label_mode: str = setting(
        "posterior",
        "labels: 'posterior' (a local step under the global posterior) or 'map' (global id of "
        "each row's local cluster; the paper's, one-shot runs only)",
        OneOf(*LABEL_MODES),
    )
    refine_rounds: int = setting(
        3,
        "refinement rounds after the merge (sites that allow it send sums per global cluster, "
        "the server updates; a round that would lower the ELBO is not applied); 0: the "
        "paper's one-shot merge (measured in benchmarks/bench_refine.py)",
        Interval(int, 0),
    )
    refine_moves: bool = setting(
        False,
        "global merge and delete moves in refinement rounds (opt-in): each round carries "
        "candidate pairs of global clusters, sites return one merged-column entropy per pair with "
        "their statistics, and a move is applied only if the exact pooled ELBO rises (off under "
        "DP noise or when a site does not refine). Off by default: a greedy merge can end lower "
        "than plain rounds (sim4_skewed small: K 7 and ELBO -38306 with moves, K 8 and -38286 "
        "without); it helps where sites hold different classes (docs/experiments.md)",
        Boolean(),
    )
    refine_max_pairs: int = setting(
        32,
        "candidate pairs per refinement round when refine_moves is on (each costs 8 bytes per "
        "site)",
        Interval(int, 1),
    )
    refine_deletes: int = setting(
        1,
        "delete proposals in flight per refinement round when refine_moves is on: the "
        "posterior without its smallest cluster is refined beside the current one for two "
        "rounds and replaces it if its exact ELBO is then higher (each costs one more set of "
        "statistics per site and round; 0: none)",
        Interval(int, 0),
    )
    refine_splits: int = setting(
        0,
        "split candidates per refinement round when refine_moves is on: for the largest "
        "clusters the sites also send sum_n r_nk x_n x_n^T (P x P each), from which the server "
        "scores every split by one design column exactly and applies the best if the ELBO "
        "rises (0: none; these second moments are pairwise co-occurrences within a cluster, "
        "a more detailed release than the sums, so they are opt-in)",
        Interval(int, 0),
    )
    refine_start: str = setting(
        "merged",
        "where refinement with refine_moves starts: 'merged' (the one-shot global merge) or "
        "'pooled' (every site's local clusters side by side, so that the exact merges of the "
        "refinement rounds, not the one-shot greedy merge, decide which to join)",
        OneOf("merged", "pooled"),
    )
    refine_tol: float = setting(
        0.0,
        "refinement stops early when a round raises the ELBO by less than this, relative, and "
        "no move was accepted or is in flight (0: run every round)",
        Interval(float, 0),
    )
    min_cluster_size: int = setting(
        5,
        "disclosure floor the server asks for; each site applies the larger of this and its "
        "own policy's floor",
        Interval(int, 1),
    )
    dp_epsilon: float | None = setting(
        None,
        "differential privacy of the aggregate rounds (refinement statistics and label counts): "
        "total epsilon per site over those rounds; None: no noise",
        Optional(EPSILON),
    )
    dp_delta: float = setting(1e-5, "delta of the (epsilon, delta) guarantee", DELTA)

    def __post_init__(self):
        check_fields(self)
        if self.label_mode == "map" and self.refine_rounds > 0:
            raise InvalidSetting(
                "label_mode='map' labels rows through the one-shot merge's local-to-global map, "
                f"which refinement moves away from (refine_rounds={self.refine_rounds}): use "
                "label_mode='posterior' or refine_rounds=0"
            )
