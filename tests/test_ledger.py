"""The site's release ledger and gate (issue 15): caps and budget read from the ledger, so they
hold across runs and restarts; noise only from the site's entropy; the agreed model; counts
that cannot be completed from the site's row count."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fedvi
from fedvi.__main__ import main
from fedvi.gate import SiteGate
from fedvi.ledger import Ledger, format_table, request_sha256
from fedvi.options import ServerOptions
from fedvi.policy import PolicyRefusal, SitePolicy
from fedvi.privacy import (
    epsilon_for,
    noisy_counts,
    rho_for,
    run_budget,
    site_entropy,
    suppress_counts,
)
from fedvi.summaries import Summaries

N_ROWS, D = 20000, 4


def spec():
    return fedvi.MixtureSpec(n_components=3).resolve((2,) * D, None)


def posterior(s=None) -> Summaries:
    s = s or spec()
    return Summaries(
        counts=np.array([100.0, 50.0]),
        sums=np.full((2, D), 20.0),
        entropy=np.zeros(2),
        column_totals=np.full(D, 40.0),
        n_rows=150,
        prior_dim=3,
        spec=s,
    )


def gate(tmp_path, run="r1", **policy) -> SiteGate:
    return SiteGate(SitePolicy(**policy), Ledger(str(tmp_path)), run, np.random.default_rng(0))


def local(g: SiteGate):
    g.start_local(spec())
    g.local_released(spec(), 2, N_ROWS, 5)


def release(g: SiteGate, phase="refine", server=None):
    server = server or ServerOptions(refine_rounds=3, dp_delta=0.5)  # clamped to the site's
    rho = g.aggregate(phase, posterior(), N_ROWS, D, server)
    return rho, g.released(phase, 2, N_ROWS, "x", rho, 5, server)


def refused(rule, fn, *args, **kw):
    with pytest.raises(PolicyRefusal) as err:
        fn(*args, **kw)
    assert err.value.rule == rule
    return err.value


def test_caps_hold_across_runs_and_restarts(tmp_path):
    for run in ("r1", "r2"):
        local(gate(tmp_path, run, max_runs=2, max_local_fits=3))
    # A restart (a new gate, a new run, the same state folder) reads the same ledger.
    refused("max-runs", gate(tmp_path, "r3", max_runs=2, max_local_fits=3).start_local, spec())
    local(gate(tmp_path, "r2", max_runs=2, max_local_fits=3))  # a run it joined: allowed
    refused("max-local-fits", gate(tmp_path, "r2", max_local_fits=3).start_local, spec())
    lines = Ledger(str(tmp_path)).entries()
    assert [e["decision"] for e in lines].count("refused") == 2
    assert {e["rule"] for e in lines if e["decision"] == "refused"} == {
        "max-runs",
        "max-local-fits",
    }
    # The period: an old line does not count.
    later = Ledger(str(tmp_path), clock=lambda: 1e12)
    g = SiteGate(SitePolicy(max_runs=2, max_local_fits=3), later, "r9")
    g.start_local(spec())


def test_aggregate_releases_are_capped_per_run_and_the_last_kept_for_labels(tmp_path):
    g = gate(tmp_path, max_aggregate_releases=3, dp_epsilon=None)
    local(g)
    big = ServerOptions(refine_rounds=2000)
    release(g, server=big)
    release(g, server=big)
    refused("max-aggregate-releases", release, g, server=big)  # the third is the labels'
    release(g, "label", server=big)
    refused("max-aggregate-releases", release, g, "label", server=big)


def test_budget_is_the_sites_and_accounted_across_runs(tmp_path):
    # The server may lower epsilon and delta, never raise them.
    pol = SitePolicy(dp_epsilon=1.0)
    assert run_budget(pol, ServerOptions(dp_delta=0.999999), N_ROWS) == (1.0, 1.0 / N_ROWS)
    assert run_budget(pol, ServerOptions(dp_epsilon=8.0, dp_delta=1e-9), N_ROWS) == (1.0, 1e-9)
    assert run_budget(pol, ServerOptions(dp_epsilon=0.5), N_ROWS)[0] == 0.5
    assert run_budget(SitePolicy(dp_epsilon=None), ServerOptions(dp_epsilon=0.5), 10) is None
    # Each run spends its epsilon in equal shares; the period's epsilon caps all runs.
    spent = 0.0
    refusals = []
    for run in "abcdef":
        g = gate(tmp_path, run, dp_epsilon=2.0, dp_epsilon_period=4.0)
        local(g)
        try:
            for phase in ("refine", "refine", "refine", "label"):
                rho, said = release(g, phase)
                spent += rho
        except PolicyRefusal as exc:
            refusals.append((run, exc.rule))
    # zCDP composes: three runs at epsilon 2 fit in 4, the fourth gets what is left.
    assert refusals == [("e", "dp-epsilon-period"), ("f", "dp-epsilon-period")]
    delta = 1.0 / N_ROWS
    assert epsilon_for(spent, delta) == pytest.approx(4.0, rel=1e-6)
    assert spent <= rho_for(4.0, delta) * (1 + 1e-9)
    # Within a run, a release beyond the plan is refused (the plan is fixed at the first).
    g = gate(tmp_path / "x", "r", dp_epsilon=1.0)
    local(g)
    release(g, "refine", ServerOptions(refine_rounds=1, dp_delta=0.5))
    _, said = release(g, "label", ServerOptions(refine_rounds=0, dp_delta=0.5))
    assert said["privacy.epsilon_spent"] == pytest.approx(1.0, rel=1e-9)
    refused("dp-epsilon", release, g, "label")


def test_a_site_too_small_for_its_budget_declines_refinement(tmp_path):
    g = gate(tmp_path)  # default budget
    local(g)
    assert not g.refinement_useful(500, 100, ServerOptions())
    assert g.refinement_useful(100000, 100, ServerOptions())
    with pytest.raises(PolicyRefusal) as err:
        g.aggregate("refine", posterior(), 500, 100, ServerOptions())
    assert err.value.rule == "dp-useful-release" and "one-shot statistics stand" in str(err.value)
    assert SitePolicy().summary(refine_declined=True)["allow_refine"] is False


def test_the_agreed_model_is_fixed(tmp_path):
    g = gate(tmp_path)
    refused("agreed-model", g.aggregate, "refine", posterior(), N_ROWS, D, ServerOptions())
    local(g)
    crafted = posterior(dataclasses.replace(spec(), beta=1e-9))
    exc = refused("agreed-model", g.aggregate, "label", crafted, N_ROWS, D, ServerOptions())
    assert "beta" in str(exc)
    other = posterior(dataclasses.replace(spec(), alpha0=5.0, n_components=2))
    exc = refused("agreed-model", g.aggregate, "label", other, N_ROWS, D, ServerOptions())
    assert "alpha0" in str(exc) and "n_components" in str(exc)
    odd = dataclasses.replace(posterior(), prior_dim=4)
    refused("agreed-model", g.aggregate, "label", odd, N_ROWS, D, ServerOptions())
    # A local fit under another model than the one announced at pre-flight.
    g2 = gate(tmp_path, "r2")
    g2.preflight(spec(), N_ROWS, D, ServerOptions())
    refused("agreed-model", g2.start_local, dataclasses.replace(spec(), beta=1e-9))


def test_noise_comes_only_from_the_sites_entropy():
    with pytest.raises(TypeError, match="own entropy"):
        site_entropy(42)
    with pytest.raises(TypeError, match="own entropy"):
        noisy_counts(np.array([10, 20]), 0.1, 30, rng=7)
    a = noisy_counts(np.full(50, 100), 0.01, 10000)
    b = noisy_counts(np.full(50, 100), 0.01, 10000)
    assert not np.array_equal(a, b)  # OS entropy: two releases never share their noise


def test_suppressed_counts_cannot_be_completed_from_the_row_count():
    floor = 5
    for counts in ([196, 4, 0], [150, 46, 4], [100, 97, 2, 1], [190, 3, 3, 4]):
        c = np.array(counts)
        shown = suppress_counts(c, floor, secondary=True)
        hidden = shown == -1
        assert not hidden.any() or (hidden.sum() >= 2 and c[hidden].sum() >= floor)
        assert (shown[~hidden] == c[~hidden]).all()
    # Primary suppression alone gives the single hidden count as N minus the others.
    c = np.array([196, 4, 0])
    assert c.sum() - suppress_counts(c, floor)[[0, 2]].sum() == 4


def test_ledger_lines_and_the_command(tmp_path, capsys):
    g = gate(tmp_path)
    local(g)
    rho, _ = release(g, "label")
    with pytest.raises(PolicyRefusal):
        g.aggregate("refine", posterior(dataclasses.replace(spec(), beta=1e-9)), N_ROWS, D, None)
    lines = Ledger(str(tmp_path)).entries()
    assert [(e["phase"], e["decision"]) for e in lines] == [
        ("local", "released"),
        ("label", "released"),
        ("refine", "refused"),
    ]
    lab = lines[1]
    assert lab["rho"] == rho and lab["delta"] == 1.0 / N_ROWS and lab["floor"] == 5
    assert lab["epsilon"] == pytest.approx(epsilon_for(rho, 1.0 / N_ROWS))
    assert lines[2]["rule"] == "agreed-model"
    assert "agreed-model" in format_table(lines)
    assert main(["ledger", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "refused" in out and "agreed-model" in out and "2 releases, 1 refusals, 1 runs" in out
    assert main(["ledger", "--state-dir", str(tmp_path / "none")]) == 2
    h = request_sha256([np.arange(3)], {"a": 1})
    assert h != request_sha256([np.arange(3)], {"a": 2}) and len(h) == 64
