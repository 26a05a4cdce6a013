"""The in-process engine of ``python -m simulations.run`` (``federation.engine=inprocess``).

The run's sites are function calls of :func:`fedvi.federated_fit` (:func:`fedvi.extend` with
``resume``) in this process, under the settings and the site policy that the simulation's
ClientApps get: no engine start-up, so a sweep runs at the core's speed (see
``benchmarks/bench_sweep.py``). The run directory gets what the Flower engine leaves: each
site's labels in ``labels/labels_site<id>_<model hash>.csv`` (or the site policy's
``output_dir``; the name is listed in ``results.json``), then
``results.json`` (``"engine": "inprocess"``), ``model.npz`` and the profiles, written by
``simulations.run`` as for Flower.

What only the Flower engine has: secure aggregation (here the same sums are made in the
clear) and timeouts. A site left out (its schema, its policy) is named and the run goes on
while ``strategy.min_sites`` remain, as on Flower. The site tables stay in memory: no
``site_data/`` folder.
"""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import numpy as np

from fedvi.federated import extend, federated_fit
from fedvi.io import write_labels
from fedvi.label_files import label_file_name, model_hash
from fedvi.result import FederatedResult
from fedvi.settings import as_dict
from simulations.data import load_sites
from strategies.config import RunSettings

log = logging.getLogger("fedvi")
TRACE = logging.getLogger("fedvi.trace")


class EngineRun(NamedTuple):
    """What an engine hands back to ``simulations.run``. labels: one ``(N_b,)`` array per site
    as the sites wrote them (``None`` unless every site wrote its labels). sites / truth: the
    rows and known labels when this engine loaded them (else ``None``). wall: seconds by step."""

    result: FederatedResult
    labels: list[np.ndarray] | None
    sites: list | None
    truth: list[np.ndarray] | None
    wall: dict[str, float]


def fit(sites: list, names, settings: RunSettings, resume=None) -> FederatedResult:
    """The federated fit of ``sites`` (one ``(N_b, D)`` table each) under ``settings``, with
    the site ids the Flower engine gives them (after the resumed model's sites)."""
    offset = 0 if resume is None else max(resume.site_ids) + 1
    ids = list(range(offset, offset + len(sites)))
    fit_server = {**as_dict(settings.fit), **as_dict(settings.server)}
    common = {
        "seed": settings.seed,
        "policy": settings.site,
        "site_ids": ids,
        "min_sites": settings.strategy.min_sites,
    }
    if resume is not None:
        return extend(resume, sites, **common, **fit_server)
    spec = as_dict(settings.spec)
    if spec["feature_names"] is None and names is not None:
        # The Flower engine's sites read the names from their files (site_data/*.npz).
        spec["feature_names"] = list(names)
    return federated_fit(sites, **common, **spec, **fit_server)


def write_site_labels(result: FederatedResult, settings: RunSettings, run_dir: str):
    """Each site's labels where its ClientApp writes them; the labels, or ``None`` when some
    site has none (it failed, or its policy does not answer the label round)."""
    policy = settings.site
    out_dir = policy.output_dir or os.path.join(run_dir, "labels")
    if not result.complete or not policy.allow_labels:
        return None
    model = model_hash(result.model.posterior)
    for sid, rep in sorted(result.sites.items()):
        rep.label_file = label_file_name(sid, None, model)
        write_labels(os.path.join(out_dir, rep.label_file), rep.labels, model=model)
    return result.labels


def run_inprocess(cfg, settings: RunSettings, run_dir: str, resume=None) -> EngineRun:
    """Load the sites (``simulations.data.load_sites``), fit, write the labels. An error fails
    the run (``result.status == "failed"``, the reason in ``result.error``) rather than raising,
    as on Flower."""
    wall: dict[str, float] = {}
    sites = truth = labels = None
    result = FederatedResult()
    t = time.perf_counter()
    try:
        sites, truth, names = load_sites(cfg)
        wall["data"] = time.perf_counter() - t
        log.info("fedvi: %d sites, in process -> %s", len(sites), run_dir)
        t = time.perf_counter()
        result = fit(sites, names, settings, resume)
        if settings.strategy.secure_aggregation:
            result.notes.append(
                "secure aggregation is Flower's (SecAgg+): the in-process engine sums the same "
                "statistics in the clear"
            )
        for rep in result.sites.values():
            rep.policy = settings.site.summary()
        labels = write_site_labels(result, settings, run_dir)
    except Exception as exc:  # reported in results.json and the exit status, as on Flower
        result.settle(exc)
        TRACE.error("the run failed", exc_info=exc)
    wall["inprocess"] = time.perf_counter() - t
    return EngineRun(result, labels, sites, truth, wall)
