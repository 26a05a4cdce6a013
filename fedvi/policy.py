"""What a site allows: its own policy, which bounds every reply whatever the server asks.

A deployed site reads its :class:`SitePolicy` from the SuperNode's node config (kebab-case
keys: ``--node-config 'partition-id=3 data-path="/secure/codes.csv" min-cluster-size=10'``),
never from the run config the coordinator sends. ``federated_fit`` and the simulations take one
policy per site (or one for all). See docs/privacy.md for what each setting protects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedvi.options import BACKENDS, DELTA, DEVICE, EPSILON
from fedvi.settings import (
    Boolean,
    Interval,
    InvalidSetting,
    OneOf,
    Optional,
    Text,
    check_fields,
    setting,
)

#: The default total epsilon per run of a site (measured: docs/privacy.md, bench_privacy.py).
DEFAULT_EPSILON = 1.0

#: Node-config keys that Flower itself sets or that name the site rather than its policy.
NODE_IDENTITY_KEYS = ("partition-id", "num-partitions")


class OptOut(Optional):
    """``None`` (also written ``'none'`` in a node config) or what ``inner`` allows."""

    def __call__(self, value):
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            return None
        return super().__call__(value)


class PolicyRefusal(Exception):
    """A request that the site's policy does not allow; ``rule`` names the policy setting.

    Its message never holds a cell value, a header, a path or a row number, so it may be sent to
    the server as it is.
    """

    #: How every refusal's message starts (what a server reads of it).
    PREFIX = "refused by the site's policy"

    def __init__(self, rule: str, reason: str):
        super().__init__(f"{self.PREFIX} ({rule}): {reason}")
        self.rule = rule


@dataclass(frozen=True)
class SitePolicy:
    """The site's own rules and resources (a floor is a floor: the server may ask for more)."""

    min_cluster_size: int = setting(
        5,
        "disclosure floor: no released statistic (local cluster, refinement statistic, label "
        "count, observed count) covers fewer rows of this site",
        Interval(int, 1),
    )
    max_components: int = setting(
        100,
        "largest n_components (K_init) the server may ask for, and most global clusters this "
        "site accepts in a posterior",
        Interval(int, 1),
    )
    allow_refine: bool = setting(
        True, "answer refinement rounds (sums per global cluster)", Boolean()
    )
    allow_labels: bool = setting(True, "answer the labelling round (counts per cluster)", Boolean())
    allow_refine_moves: bool = setting(
        True,
        "send the statistics of global moves in refinement rounds when the run asks for them "
        "(refine_moves, noiseless sites only): one entropy per candidate pair, a second set "
        "of statistics under each delete proposal, and, with refine_splits, second moments "
        "(pairwise co-occurrences within a cluster); all under the floor. false: the run "
        "refines without moves",
        Boolean(),
    )
    require_secure_aggregation: bool = setting(
        False,
        "answer refinement and label rounds only under secure aggregation (SecAgg+)",
        Boolean(),
    )
    secagg_min_sites: int = setting(
        2,
        "fewest sites this site's vector is securely summed with: it refuses a SecAgg+ round "
        "with fewer participants (key exchange, masked vectors or unmasking)",
        Interval(int, 2),
    )
    secagg_min_threshold: float = setting(
        0.5,
        "smallest SecAgg+ reconstruction threshold this site accepts, as a fraction of the "
        "round's participants; a strict majority is always required, so that no node can be "
        "unmasked from shares",
        Interval(float, 0.5, 1.0),
    )
    dp_epsilon: float | None = setting(
        DEFAULT_EPSILON,
        "total epsilon of the (epsilon, delta)-DP guarantee of this site's aggregate releases "
        "in one run (refinement statistics and label counts carry Gaussian noise from the "
        "site's own entropy); the server may only lower it. 'none' (None): no noise, for a "
        "site that trusts the coordinator (docs/privacy.md: what the opt-out does not protect)",
        OptOut(EPSILON),
    )
    dp_delta: float | None = setting(
        None,
        "largest delta of the (epsilon, delta) guarantee; None: 1/N (N the site's rows); the "
        "server may only lower it (a larger delta from the server is clamped to this one)",
        Optional(DELTA),
    )
    dp_epsilon_period: float = setting(
        4.0,
        "total epsilon of all this site's aggregate releases, over every run of one period "
        "(read from the release ledger, so it holds across runs and restarts)",
        EPSILON,
    )
    max_aggregate_releases: int = setting(
        6,
        "most aggregate releases (refinement rounds + label rounds) this site makes in one run",
        Interval(int, 1),
    )
    max_runs: int = setting(
        10,
        "most runs (distinct run ids with a local fit) this site joins in one period",
        Interval(int, 1),
    )
    max_local_fits: int = setting(
        10,
        "most local fits (one-shot summaries) this site releases in one period",
        Interval(int, 1),
    )
    period_days: float = setting(
        30.0,
        "length of the period of max-runs, max-local-fits and dp-epsilon-period, in days",
        Interval(float, 0, open_low=True),
    )
    state_dir: str | None = setting(
        None,
        "the site's own state folder, where its release ledger (ledger.jsonl) lives; None: "
        "<output-dir>/.fedvi-state/site<partition-id> (federated_fit: in memory; given, "
        "<state-dir>/site<id> per site)",
        Optional(Text()),
    )
    data_path: str | None = setting(None, "the site's table (deployment)", Optional(Text()))
    label_column: str | None = setting(
        None, "column of known labels in the table, used only for scoring", Optional(Text())
    )
    output_dir: str | None = setting(None, "where the site writes its labels", Optional(Text()))
    cache_dir: str | None = setting(
        None,
        "where the site keeps its encoded table between phases (default: "
        "<output-dir>/.fedvi-cache)",
        Optional(Text()),
    )
    backend: str | None = setting(
        None,
        "this site's compute backend ('numpy' or 'torch'); None: the run's",
        Optional(OneOf(*BACKENDS)),
    )
    device: str | None = setting(
        None,
        "this site's torch device; None: the run's",
        Optional(DEVICE),
    )

    def __post_init__(self):
        check_fields(self, owner="site policy ")

    def floor(self, requested: int | None = None) -> int:
        """The disclosure floor in force: this site's, raised (never lowered) by the server's."""
        return max(self.min_cluster_size, int(requested or 0))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """The policy in a SuperNode's node config (kebab-case keys); unknown keys are errors."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        values = {}
        unknown = []
        for key, value in node_config.items():
            if key in NODE_IDENTITY_KEYS:
                continue
            if key not in names:
                unknown.append(key)
                continue
            values[names[key]] = value
        if unknown:
            raise InvalidSetting(
                f"unknown node-config key(s) {sorted(unknown)}; allowed: "
                f"{sorted([*names, *NODE_IDENTITY_KEYS])}"
            )
        return cls(**values)

    def summary(self, refine_declined: bool = False) -> dict[str, Any]:
        """What the site tells the server in pre-flight (rules only: no paths);
        ``refine_declined``: the site is too small for its privacy budget to refine
        (:func:`fedvi.privacy.refinement_useful`), so it reports ``allow_refine`` false."""
        return {
            "min_cluster_size": self.min_cluster_size,
            "max_components": self.max_components,
            "allow_refine": self.allow_refine and not refine_declined,
            "allow_labels": self.allow_labels,
            "allow_refine_moves": self.allow_refine_moves,
            "require_secure_aggregation": self.require_secure_aggregation,
            "secagg_min_sites": self.secagg_min_sites,
            "secagg_min_threshold": self.secagg_min_threshold,
            "dp_epsilon": self.dp_epsilon,
            "dp_delta": self.dp_delta,
        }


def check_request(spec, policy: SitePolicy) -> None:
    """Refuse a model (a :class:`fedvi.MixtureSpec`) the site's policy does not allow (names
    the rule, not the data)."""
    if spec.n_components > policy.max_components:
        raise PolicyRefusal(
            "max-components",
            f"n_components={spec.n_components} exceeds this site's cap of {policy.max_components}",
        )


def check_posterior(posterior, policy: SitePolicy) -> None:
    """Check a posterior the site did not compute before using it: a :class:`PolicyRefusal`
    naming the rule when its shape or values are not those of a posterior (finite, counts and
    sums non-negative, sums within the counts, relevance in [0, 1]) or it has more clusters than
    the site's ``max-components``. (What a crafted posterior can still do, e.g. one cluster per
    row, is bounded by the floor that every release applies.)"""
    import numpy as np

    s = posterior
    G = s.n_clusters
    if G < 1:
        raise PolicyRefusal("posterior", "the posterior has no cluster")
    if G > policy.max_components:
        raise PolicyRefusal(
            "max-components",
            f"the posterior has {G} clusters; this site accepts at most {policy.max_components}",
        )
    if s.prior_dim < G:
        raise PolicyRefusal("posterior", f"prior dimension {s.prior_dim} < {G} clusters")
    arrays = [s.counts, s.sums, s.entropy, s.column_totals]
    arrays += [a for a in (s.relevance, s.observed, s.column_observed) if a is not None]
    if not all(np.isfinite(a).all() for a in arrays):
        raise PolicyRefusal("posterior", "the posterior holds non-finite values")
    if (s.counts < 0).any() or (s.sums < 0).any() or (s.entropy < 0).any():
        raise PolicyRefusal("posterior", "the posterior holds negative statistics")
    fam = s.spec.family()
    limit = np.asarray(fam.observed(s.sums, s.counts, s.observed))[:, fam.block_index()]
    if s.spec.likelihood == "bernoulli" and (s.sums > limit * (1 + 1e-9) + 1e-9).any():
        raise PolicyRefusal("posterior", "the posterior's sums exceed its counts")
    if s.relevance is not None and ((s.relevance < 0) | (s.relevance > 1)).any():
        raise PolicyRefusal("posterior", "relevance outside [0, 1]")


def check_agreed_model(posterior, agreed: Mapping[str, Any] | None) -> None:
    """Refuse a refine or label posterior whose model is not the one agreed in this run's
    local fit (``agreed``: the resolved :class:`fedvi.MixtureSpec` as a dict, from the site's
    ledger). Every setting counts (priors ``alpha0``/``beta``/``relevance_prior``, ``n_components``,
    likelihood, levels, variables, variable selection, missing cells): a posterior with a
    crafted prior (``beta=1e-9`` makes a cluster score any linear function of a row) is
    refused by the rule ``agreed-model``, naming the settings that differ (never a value). The
    prior dimension must be a multiple of the agreed ``n_components`` (one ``K_init`` per site).
    """
    if agreed is None:
        raise PolicyRefusal(
            "agreed-model", "no local fit of this run has agreed a model with this site"
        )
    got = posterior.spec.to_dict()
    differ = sorted(k for k in set(agreed) | set(got) if agreed.get(k) != got.get(k))
    if differ:
        raise PolicyRefusal(
            "agreed-model",
            "the posterior's model differs from the one agreed in this run's local fit "
            f"(settings {differ})",
        )
    k0 = int(agreed["n_components"])
    if posterior.prior_dim % k0 != 0:
        raise PolicyRefusal(
            "agreed-model", "the posterior's prior dimension is not a multiple of n_components"
        )
