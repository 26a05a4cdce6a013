"""fedvi: federated variational Bayesian clustering of binary and categorical data.

The core needs NumPy and SciPy only (no Flower, no Hydra). Module layout, pure maths inside and
side effects at the edges (the method is explained in docs/method.md):

- settings, one frozen dataclass per group, checked once: ``spec`` (:class:`MixtureSpec`, the
  model), ``options`` (:class:`FitOptions`, the local fit; :class:`ServerOptions`, the server),
  ``policy`` (:class:`SitePolicy`, what a site allows), ``settings`` (the machinery);
- data: ``data`` (validation, compact encoding, blocks of rows), ``io`` (files: CSV, Parquet,
  NumPy), ``simulate``;
- maths: ``likelihoods``, ``summaries`` (:class:`Summaries`, the statistics a site sends, with
  their arithmetic), ``elbo``, ``vi`` (streamed CAVI passes), ``init`` (k-modes), ``moves`` and
  ``merdel`` (merge/delete moves and the local loop), ``global_merge``, ``labels``,
  ``privacy`` (disclosure floor, differential privacy);
- pipelines: ``site`` (:func:`fit_site`), ``mixture`` (:class:`MixtureVI`), ``coordinator``
  (the federated run as a state machine over phases, for any engine), ``reply_checks`` (what a
  site's reply must satisfy), ``site_agent`` (what a site does in each phase), ``federated``
  (the in-process engine: :func:`federated_fit`, :func:`extend`), ``model``
  (:class:`FittedModel`, model files), ``result`` (:class:`FederatedResult`);
- the Flower layer lives in ``fedvi.flower`` (the site's ClientApp) and ``fedvi.protocol`` (the
  wire format shared with the server in ``strategies/``); nothing here imports Flower.
"""

from fedvi._version import __version__
from fedvi.coordinator import SiteFailureError
from fedvi.data import DataError, EncodedData, encode
from fedvi.elbo import elbo
from fedvi.federated import extend, federated_fit
from fedvi.global_merge import GlobalMerge, SchemaMismatchError, global_merge
from fedvi.labels import label_rows, map_labels, refinement_stats
from fedvi.merdel import ConvergenceWarning
from fedvi.mixture import MixtureVI
from fedvi.model import FittedModel, load_model
from fedvi.options import FitOptions, ServerOptions
from fedvi.policy import PolicyRefusal, SitePolicy
from fedvi.result import FederatedResult, SiteReport
from fedvi.settings import InvalidSetting
from fedvi.site import SiteFit, fit_site
from fedvi.spec import MixtureSpec
from fedvi.summaries import Summaries

__all__ = [
    "ConvergenceWarning",
    "DataError",
    "EncodedData",
    "FederatedResult",
    "FitOptions",
    "FittedModel",
    "GlobalMerge",
    "InvalidSetting",
    "MixtureSpec",
    "MixtureVI",
    "PolicyRefusal",
    "SchemaMismatchError",
    "ServerOptions",
    "SiteFailureError",
    "SiteFit",
    "SitePolicy",
    "SiteReport",
    "Summaries",
    "elbo",
    "encode",
    "extend",
    "federated_fit",
    "fit_site",
    "global_merge",
    "label_rows",
    "load_model",
    "map_labels",
    "refinement_stats",
    "__version__",
]
