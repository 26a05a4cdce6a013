"""The hostile coordinator: everything a site receives is untrusted, its own policy bounds
every reply. Each test plays the server against the unmodified site client (``FedviClient``)
and asserts on what the site returns, never on its log.

Checked once against the code before the site policy existed (commit 46e3204): the same
requests made a 60-row site return its 60 rows as 60 clusters, read a file the server named,
and put cell values and paths into the error sent back (see the closing note of that change).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from flwr.app import RecordDict  # noqa: E402
from flwr.app.message_type import MessageType  # noqa: E402

import fedvi  # noqa: E402
from fedvi.flower.client import FedviClient, secagg_mod  # noqa: E402
from fedvi.options import FitOptions, ServerOptions  # noqa: E402
from fedvi.protocol import (  # noqa: E402
    Phase,
    SiteError,
    decode_refine,
    decode_summaries,
    encode_request,
    parse_site_error,
)
from fedvi.simulate import simulate  # noqa: E402
from fedvi.summaries import Summaries  # noqa: E402

FLOOR = 5
SECRET = "alice-smith"


@pytest.fixture
def site(tmp_path):
    """A deployed site: 60 rows in a CSV with a header, its own data-path and output-dir. It
    opts out of DP noise (``dp-epsilon=none``): these tests check what the floor and the
    posterior checks bound alone (with its default budget a 60-row site declines refinement;
    tests/test_attacks.py plays the default node config)."""
    sim = simulate(60, 3, 12, seed=4)
    path = tmp_path / "private" / "codes.csv"
    path.parent.mkdir()
    header = ",".join(f"cond_{j}" for j in range(12))
    rows = "\n".join(",".join(str(int(v)) for v in x) for x in sim.X)
    path.write_text(header + "\n" + rows + "\n")
    out = tmp_path / "private" / "out"
    node_config = {
        "partition-id": 3,
        "data-path": str(path),
        "output-dir": str(out),
        "dp-epsilon": "none",
    }
    return FedviClient(node_config), sim.X, path


def ask(client, phase, spec=None, fit=None, server=None, posterior=None, **kw):
    arrays, config = encode_request(
        phase,
        spec or fedvi.MixtureSpec(n_components=10),
        fit or FitOptions(),
        server or ServerOptions(),
        seed=0,
        posterior=posterior,
        **kw,
    )
    return client.fit(arrays, config)


def refused(client, phase, rule, **kw) -> str:
    with pytest.raises(SiteError) as err:
        ask(client, phase, **kw)
    text = str(err.value)
    site, got_phase, reason = parse_site_error(text)
    assert (site, got_phase) == (3, Phase(phase).value)
    assert rule in reason
    return text


def no_leak(text: str, *secrets) -> None:
    for s in secrets:
        assert str(s) not in text


def local_posterior(client) -> Summaries:
    arrays, _, metrics = ask(client, "local")
    return decode_summaries(arrays, metrics, "summaries")


# -- what the server asks for: bounded by the site's policy ---------------------------------
def test_one_cluster_per_row_is_not_released(site):
    client, X, _ = site
    spec = fedvi.MixtureSpec(n_components=60)
    arrays, n, metrics = ask(
        client,
        "local",
        spec=spec,
        fit=FitOptions(moves="none"),
        server=ServerOptions(min_cluster_size=1),
    )
    s = decode_summaries(arrays, metrics, "summaries")
    assert n == 60 and s.counts.sum() == pytest.approx(60)
    assert s.n_clusters <= 60 // FLOOR
    assert s.counts.min() >= FLOOR  # every released cluster covers the site's floor
    # No array has a row dimension.
    assert all(a.shape[0] != 60 for a in arrays if a.ndim)


def test_server_may_raise_the_floor_not_lower_it(site):
    client, X, _ = site
    arrays, _, metrics = ask(client, "local", server=ServerOptions(min_cluster_size=25))
    s = decode_summaries(arrays, metrics, "summaries")
    assert s.counts.min() >= 25 and s.n_clusters <= 2


def test_n_components_above_the_cap_is_refused(site):
    client, _, _ = site
    refused(client, "local", "max-components", spec=fedvi.MixtureSpec(n_components=500))
    refused(client, "preflight", "max-components", spec=fedvi.MixtureSpec(n_components=500))


@pytest.mark.parametrize("key", ["sim.data_paths", "sim.label_column", "sim.output_dir"])
def test_server_sent_paths_are_refused(site, tmp_path, key):
    """No site reads a path from the server: the keys that once carried the simulation's paths
    are unknown round-config keys, refused before anything is read."""
    client, _, path = site
    other = tmp_path / "other_private.csv"
    other.write_text(f"name,x\n{SECRET},1\n")
    arrays, config = encode_request(
        "preflight", fedvi.MixtureSpec(n_components=10), FitOptions(), ServerOptions(), 0
    )
    config[key] = str(other)
    with pytest.raises(SiteError) as err:
        client.fit(arrays, config)
    text = str(err.value)
    assert "unknown round-config keys" in text and key in text
    no_leak(text, other, path, SECRET, "name")


def test_a_site_without_a_data_path_does_not_take_one_from_the_server(tmp_path):
    client = FedviClient({"partition-id": 3})
    refused(client, "preflight", "data-path")


def test_errors_name_the_rule_not_the_data(tmp_path):
    bad = tmp_path / "codes.csv"
    bad.write_text(f"age_band,{SECRET}_col\n0,1\n1,{SECRET}\n")
    client = FedviClient({"partition-id": 3, "data-path": str(bad), "label-column": "nope"})
    with pytest.raises(SiteError) as err:
        ask(client, "preflight")
    text = str(err.value)
    assert "failed validation" in text
    no_leak(text, SECRET, bad, "age_band", "row ", "line ", "nope")


# -- posteriors the site did not compute --------------------------------------------------
def crafted_one_cluster_per_row(X, spec) -> Summaries:
    """A posterior with one cluster per row, each cluster exactly that row (count 1)."""
    N = len(X)
    return Summaries(
        counts=np.ones(N),
        sums=X.astype(float),
        entropy=np.zeros(N),
        column_totals=X.sum(axis=0).astype(float),
        n_rows=N,
        prior_dim=N,
        spec=spec,
    )


@pytest.fixture
def resolved(site):
    client, X, _ = site
    names = tuple(f"cond_{j}" for j in range(12))
    return fedvi.MixtureSpec(n_components=10).resolve((2,) * 12, names)


def test_crafted_posterior_yields_nothing_below_the_floor_in_refinement(site, resolved):
    client, X, _ = site
    ask(client, "local")  # the run's local fit agrees the model (issue 15)
    post = crafted_one_cluster_per_row(X, resolved)
    arrays, n, metrics = ask(
        client, "refine", spec=resolved, posterior=post, server=ServerOptions(min_cluster_size=1)
    )
    stats = decode_refine(arrays, post, n)
    released = stats.counts > 0
    assert released.sum() <= 60 // FLOOR
    assert stats.counts[released].min() >= FLOOR
    assert stats.counts.sum() == pytest.approx(60)
    assert (stats.sums[~released] == 0).all() and (stats.entropy[~released] == 0).all()


def test_crafted_posterior_label_counts_are_suppressed(site, resolved):
    client, X, _ = site
    ask(client, "local")
    post = crafted_one_cluster_per_row(X, resolved)
    (counts,), n, metrics = ask(
        client, "label", spec=resolved, posterior=post, server=ServerOptions(min_cluster_size=1)
    )
    counts = np.asarray(counts)
    assert ((counts == -1) | (counts == 0) | (counts >= FLOOR)).all()
    assert metrics["label.n_suppressed"] == int((counts == -1).sum())
    assert not any(isinstance(v, str) and "/" in v for v in metrics.values())


@pytest.mark.parametrize(
    ("tamper", "rule"),
    [
        (lambda s: s.__class__(**{**s.__dict__, "counts": -s.counts}), "negative"),
        (lambda s: s.__class__(**{**s.__dict__, "sums": s.sums * np.nan}), "non-finite"),
        (lambda s: s.__class__(**{**s.__dict__, "sums": s.sums + 1e6}), "sums exceed"),
        (lambda s: s.__class__(**{**s.__dict__, "prior_dim": 0}), "prior dimension"),
    ],
)
def test_malformed_posteriors_are_refused(site, tamper, rule):
    client, _, _ = site
    post = tamper(local_posterior(client))
    for phase in ("refine", "label"):
        refused(client, phase, rule, spec=post.spec, posterior=post)


def test_too_many_clusters_and_wrong_shapes_are_refused(site, resolved):
    client, X, _ = site
    ask(client, "local")
    post = crafted_one_cluster_per_row(np.vstack([X, X]), resolved)  # 120 > 100 clusters
    refused(client, "refine", "max-components", spec=resolved, posterior=post)
    good = local_posterior(client)
    arrays, config = encode_request(
        "refine", good.spec, FitOptions(), ServerOptions(), 0, posterior=good
    )
    arrays[1] = arrays[1][:, :5]  # sums of the wrong width
    with pytest.raises(SiteError, match="invalid request"):
        client.fit(arrays, config)
    config["fedvi.protocol"] = 99
    with pytest.raises(SiteError, match="protocol version 99"):
        client.fit(arrays, config)


# -- what the site allows -------------------------------------------------------------------
def test_policy_can_refuse_refinement_and_labels(site):
    _, _, path = site
    client = FedviClient(
        {
            "partition-id": 3,
            "data-path": str(path),
            "allow-refine": False,
            "allow-labels": False,
            "dp-epsilon": "none",
        }
    )
    post = local_posterior(client)
    refused(client, "refine", "allow-refine", spec=post.spec, posterior=post)
    refused(client, "label", "allow-labels", spec=post.spec, posterior=post)


def test_secure_aggregation_required_by_the_site(site):
    _, _, path = site
    client = FedviClient(
        {
            "partition-id": 3,
            "data-path": str(path),
            "require-secure-aggregation": True,
            "dp-epsilon": "none",
        }
    )
    post = local_posterior(client)
    refused(client, "refine", "require-secure-aggregation", spec=post.spec, posterior=post)
    # A server cannot claim secure aggregation through the config: the site's own mod, which
    # sees whether the message really runs the SecAgg+ protocol, removes the claim first.
    arrays, config = encode_request(
        "refine", post.spec, FitOptions(), ServerOptions(), 0, posterior=post
    )
    config["fedvi.secagg"] = True
    msg = SimpleNamespace(
        metadata=SimpleNamespace(message_type=MessageType.TRAIN),
        content=SimpleNamespace(config_records={"fitins.config": config}),
    )
    seen = {}
    secagg_mod(msg, None, lambda m, ctxt: seen.update(m.content.config_records["fitins.config"]))
    assert "fedvi.secagg" not in seen
    with pytest.raises(SiteError, match="require-secure-aggregation"):
        client.fit(arrays, seen)


def test_node_config_policy_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"min_cluster_size=0 is not allowed"):
        FedviClient({"partition-id": 0, "min-cluster-size": 0})
    with pytest.raises(ValueError, match=r"unknown node-config key\(s\) \['min-clustr-size'\]"):
        FedviClient({"partition-id": 0, "min-clustr-size": 10})


def test_privacy_budget_cannot_be_stretched_by_the_server(site):
    _, _, path = site
    # A large epsilon: with its default one, a 60-row site declines refinement.
    client = FedviClient(
        {
            "partition-id": 3,
            "data-path": str(path),
            "dp-epsilon": 1000.0,
            "dp-epsilon-period": 1e4,
        },
        state=RecordDict(),
    )
    post = local_posterior(client)
    # The first release fixes the plan: 1 refinement round + labels = 2 releases.
    server = ServerOptions(refine_rounds=1)
    _, _, m1 = ask(client, "refine", spec=post.spec, posterior=post, server=server)
    assert m1["privacy.releases"] == 1
    # A server that now announces no refinement cannot buy a bigger share of the budget.
    _, _, m2 = ask(
        client, "label", spec=post.spec, posterior=post, server=ServerOptions(refine_rounds=0)
    )
    assert m2["privacy.epsilon_spent"] == pytest.approx(1000.0, rel=1e-9)
    refused(client, "label", "privacy budget", spec=post.spec, posterior=post, server=server)


def test_replies_carry_only_summaries(site, resolved):
    """Every phase's reply: arrays without a row dimension, metrics without paths. (The names
    of the agreed variables travel with the local summaries: they label the profiles.)"""
    client, X, path = site
    replies = [ask(client, "preflight"), ask(client, "local")]
    post = decode_summaries(replies[1][0], replies[1][2], "summaries")
    replies += [
        ask(client, "refine", spec=post.spec, posterior=post),
        ask(client, "label", spec=post.spec, posterior=post),
    ]
    for arrays, n, metrics in replies:
        assert n == 60
        assert all(np.asarray(a).ndim == 0 or np.asarray(a).shape[0] != 60 for a in arrays)
        text = json.dumps(metrics)
        no_leak(text, path, path.parent, "codes.csv")


def test_node_config_errors_stay_on_the_site(tmp_path):
    from flwr.app import Context

    from fedvi.flower.client import make_client_fn

    client_fn = make_client_fn()
    bad = {
        "partition-id": 3,
        "data-path": str(tmp_path / "secret_dir" / "x.csv"),
        "min-cluster-size": 0,
    }
    with pytest.raises(SiteError) as err:
        client_fn(Context(run_id=1, node_id=7, node_config=bad, state=RecordDict(), run_config={}))
    text = str(err.value)
    assert parse_site_error(text)[:2] == (3, "setup")
    assert "node config is not valid" in text
    no_leak(text, "secret_dir", "min_cluster_size")


def test_refinement_floors_observed_counts_too(tmp_path):
    """With missing cells, a variable observed in fewer rows than the floor is released as
    not observed in every phase (local and refinement)."""
    sim = simulate(200, 2, 6, seed=1)
    X = sim.X.astype(float)
    X[:, 5] = np.nan
    X[:3, 5] = 1.0  # variable 5 observed in 3 rows only
    path = tmp_path / "codes.npy"
    np.save(path, X)
    client = FedviClient(
        {"partition-id": 3, "data-path": str(path), "min-cluster-size": 10, "dp-epsilon": "none"}
    )
    spec = fedvi.MixtureSpec(n_components=4, missing="ignore")
    arrays, _, metrics = ask(client, "local", spec=spec)
    post = decode_summaries(arrays, metrics, "summaries")
    assert (post.observed[:, 5] == 0).all() and post.column_observed[5] == 0
    arrays, n, _ = ask(client, "refine", spec=post.spec, posterior=post)
    stats = decode_refine(arrays, post, n)
    assert (stats.observed[:, 5] == 0).all() and (stats.sums[:, 5] == 0).all()
    released = stats.counts > 0
    assert (stats.observed[released][:, :5] >= 10).all()
