"""fedvi: federated variational Bayesian clustering of binary and categorical data.

Module layout (pure maths inside, side effects at the edges; no Flower or Hydra here):

- ``data``: validation and encoding of a site's table (errors name column and value).
- ``likelihoods``: Bernoulli/Beta and Categorical/Dirichlet families as functions of stats.
- ``spec``: ``MixtureSpec``, the model and schema every site shares (and its hashes).
- ``summaries``: ``Summaries``, the per-cluster statistics a site sends (no rows).
- ``elbo``: the ELBO and merge gains from summaries alone.
- ``vi``: vectorised CAVI steps (one ``X @ W.T`` per local step). ``init``: k-modes start.
- ``moves``, ``merdel``: merge/delete moves and the local fitting loop.
- ``mixture``: ``MixtureVI``, the single-site estimator (scikit-learn style).
- ``site``, ``global_merge``, ``labels``, ``federated``: the FedMerDel pipeline pieces
  (site fit, server merge, labelling/refinement) and ``federated_fit`` which chains them.

Each module holds one step of SPEC.md so that the Flower client and strategy call exactly
the functions that ``federated_fit`` calls.
"""

from fedvi.data import EncodedData, encode
from fedvi.elbo import elbo
from fedvi.federated import FederatedResult, federated_fit, shared_spec
from fedvi.global_merge import GlobalMerge, SchemaMismatchError, global_merge
from fedvi.labels import combine_refinement, label_rows, map_labels, refinement_stats
from fedvi.merdel import FitOptions
from fedvi.mixture import MixtureVI
from fedvi.site import SiteFit, encode_site, fit_site
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries

__all__ = [
    "EncodedData",
    "FederatedResult",
    "FitOptions",
    "GlobalMerge",
    "MixtureSpec",
    "MixtureVI",
    "SchemaMismatchError",
    "SiteFit",
    "Summaries",
    "combine_refinement",
    "elbo",
    "encode",
    "encode_site",
    "federated_fit",
    "fit_site",
    "global_merge",
    "label_rows",
    "map_labels",
    "refinement_stats",
    "shared_spec",
]
__version__ = "0.1.0"
