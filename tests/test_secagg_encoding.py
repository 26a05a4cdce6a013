"""Sums through SecAgg+ with ``fedvi.secagg``'s limbs, against Flower's own arithmetic.

The site side replays ``secaggplus_mod._collect_masked_vectors`` (weight factor, clipping,
stochastic ``quantize``, ``factor_combine``, masks modulo ``modulus_range``) and the server
side ``SecAggPlusWorkflow.unmask_stage`` (sum modulo, ``factor_extract``, ``dequantize``,
offset, division by the summed weight), with Flower's functions imported from ``flwr``. The
pairwise masks cancel in the sum exactly as in the protocol, so no key exchange is needed.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")

from flwr.common.secure_aggregation.ndarrays_arithmetic import (  # noqa: E402
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402

from fedvi import secagg  # noqa: E402
from fedvi.secagg import (  # noqa: E402
    CLIPPING_RANGE,
    LIMB_BITS,
    MAX_WEIGHT,
    MODULUS_RANGE,
    NUM_EXAMPLES,
    QUANTIZATION_RANGE,
    decode_limbs,
    encode_limbs,
    secagg_scale,
    sum_error_bound,
)

EPS = np.finfo(np.float64).eps


def _site_upload(arrays, num_examples, rng):
    """``_collect_masked_vectors`` without the masks: the integer vector a site contributes."""
    ratio = num_examples / MAX_WEIGHT
    q_ratio = round(ratio * QUANTIZATION_RANGE)
    dq_ratio = q_ratio / QUANTIZATION_RANGE
    params = parameters_multiply([np.asarray(a) for a in arrays], dq_ratio)
    quantized = quantize(params, CLIPPING_RANGE, QUANTIZATION_RANGE)
    return factor_combine(q_ratio, quantized)


def flower_secagg_average(site_arrays, rng, num_examples=NUM_EXAMPLES):
    """What ``aggregate_fit`` receives in every ``FitRes.parameters`` of a SecAgg+ round."""
    # Flower's stochastic rounding draws from NumPy's global generator: seed it from ``rng``.
    np.random.seed(int(rng.integers(2**31)))  # noqa: NPY002 - what Flower draws from
    uploads = [_site_upload(arrays, num_examples, rng) for arrays in site_arrays]
    shapes = [u.shape for u in uploads[0]]
    n = len(uploads)
    # Pairwise masks: site i adds m_ij, site j subtracts it (as the protocol, modulo 2**32).
    masked = [list(u) for u in uploads]
    for i in range(n):
        for j in range(i + 1, n):
            mask = [rng.integers(0, MODULUS_RANGE - 1, s, dtype=np.int64) for s in shapes]
            masked[i] = parameters_addition(masked[i], mask)
            masked[j] = parameters_subtraction(masked[j], mask)
    masked = [parameters_mod(m, MODULUS_RANGE) for m in masked]
    # Server: sum modulo, then unmask_stage's arithmetic.
    total = masked[0]
    for m in masked[1:]:
        total = parameters_addition(total, m)
    recon = parameters_mod(total, MODULUS_RANGE)
    q_total_ratio, recon = factor_extract(recon)
    inv_dq_total_ratio = QUANTIZATION_RANGE / q_total_ratio
    aggregated = dequantize(recon, CLIPPING_RANGE, QUANTIZATION_RANGE)
    offset = -(n - 1) * CLIPPING_RANGE
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    return aggregated


def _site_stats(rng, n_rows, G, P):
    """Refinement-like statistics: soft counts, sums in [0, counts], entropies."""
    resp = rng.dirichlet(np.full(G, 0.3), size=1)[0]
    counts = resp * n_rows * rng.uniform(0.5, 1.0)
    sums = counts[:, None] * rng.beta(0.5, 0.5, size=(G, P))
    entropy = counts * rng.uniform(0.0, math.log(G), size=G)
    return [counts, sums, entropy]


def _scales(max_rows, G):
    return [secagg_scale(max_rows), secagg_scale(max_rows), secagg_scale(max_rows * math.log(G))]


def test_ranges_are_flowers_defaults():
    """The ranges the docstring calls Flower's defaults are the ones this Flower declares."""
    params = inspect.signature(SecAggPlusWorkflow.__init__).parameters
    assert QUANTIZATION_RANGE == params["quantization_range"].default
    assert MODULUS_RANGE == params["modulus_range"].default


def test_limb_bits_is_the_finest_grid_flower_sends_exactly():
    """A value on the ``2**-LIMB_BITS`` grid survives Flower's quantisation unchanged; one on
    the next finer grid does not (it is rounded stochastically to a neighbour)."""
    step = 2.0**-LIMB_BITS
    on_grid = np.array([-1.0, -1.0 + step, -step, 0.0, 3 * step, 0.5 + 7 * step, 1.0])
    np.random.seed(0)  # noqa: NPY002 - Flower's stochastic rounding draws from it
    q = quantize([on_grid], CLIPPING_RANGE, QUANTIZATION_RANGE)
    np.testing.assert_array_equal(dequantize(q, CLIPPING_RANGE, QUANTIZATION_RANGE)[0], on_grid)
    finer = np.full(64, 0.5 + step / 2)
    q = quantize([finer], CLIPPING_RANGE, QUANTIZATION_RANGE)
    back = dequantize(q, CLIPPING_RANGE, QUANTIZATION_RANGE)[0]
    assert set(back.tolist()) == {0.5, 0.5 + step}


def test_every_sites_weight_factor_is_exactly_one():
    """With ``num_examples = NUM_EXAMPLES`` Flower's integer weight is ``q`` itself, so the
    weighted average times the number of sites is the sum."""
    upload = _site_upload([np.zeros(3)], NUM_EXAMPLES, None)
    weight, _ = factor_extract(upload)
    assert weight == QUANTIZATION_RANGE


@pytest.mark.parametrize("extra", [0, 1])
def test_max_sites_is_the_most_a_round_sums_without_wrapping(extra):
    """MAX_SITES uploads of the largest value sum below ``modulus_range``; one more wraps."""
    n = secagg.MAX_SITES + extra
    # Every integer at its maximum (int64, as once the masks are added).
    upload = [a.astype(np.int64) for a in _site_upload([np.ones(2)], NUM_EXAMPLES, None)]
    total = [np.zeros_like(a) for a in upload]
    for _ in range(n):
        total = parameters_mod(parameters_addition(total, upload), MODULUS_RANGE)
    weight, recon = factor_extract(total)
    fits = weight == n * QUANTIZATION_RANGE and np.all(recon[0] == n * QUANTIZATION_RANGE)
    assert fits == (extra == 0)


def test_secagg_scale():
    assert secagg_scale(1.0) == 1.0
    assert secagg_scale(1e6) == 2.0**20
    assert secagg_scale(2.0**20) == 2.0**20
    assert secagg_scale(2.0**20 + 1) == 2.0**21
    assert secagg_scale(0.3) == 0.5
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            secagg_scale(bad)


def test_hi_limb_is_on_flowers_grid_and_sent_exactly():
    rng = np.random.default_rng(0)
    v = rng.uniform(-1, 1, 10_000)
    hi, lo = encode_limbs([v], 1.0, n_limbs=2)
    assert np.all((lo >= 0) & (lo <= 1))
    np.testing.assert_array_equal(hi + lo * 2.0**-LIMB_BITS, v)
    q = quantize([hi], CLIPPING_RANGE, QUANTIZATION_RANGE)
    np.testing.assert_array_equal(dequantize(q, CLIPPING_RANGE, QUANTIZATION_RANGE)[0], hi)


@pytest.mark.parametrize("n_sites", [2, 3, 5, 10, 20])
@pytest.mark.parametrize("n_limbs", [2, 3])
def test_sums_through_flower_arithmetic(n_sites, n_limbs):
    rng = np.random.default_rng(100 * n_sites + n_limbs)
    G, P, max_rows = 12, 40, 1_000_000
    scales = _scales(max_rows, G)
    sites = [_site_stats(rng, rng.integers(1_000, max_rows), G, P) for _ in range(n_sites)]
    uploads = [encode_limbs(s, scales, n_limbs=n_limbs) for s in sites]
    assert all(len(u) == 3 * n_limbs for u in uploads)
    average = flower_secagg_average(uploads, rng)
    got = decode_limbs(average, n_sites, scales, n_limbs=n_limbs)
    for k, (g, s) in enumerate(zip(got, scales, strict=True)):
        exact = np.sum([site[k] for site in sites], axis=0)
        assert g.shape == exact.shape
        bound = sum_error_bound(n_sites, s, n_limbs=n_limbs) + 4 * n_sites * EPS * np.abs(exact)
        assert np.all(np.abs(g - exact) <= bound)
        # Relative to the largest possible sum, n * scale: below 2**-42 (2 limbs).
        rel = np.max(np.abs(g - exact)) / (n_sites * s)
        assert rel < (2.0**-42 if n_limbs == 2 else 8 * EPS)


def test_error_is_unbiased_and_at_the_predicted_size():
    """RMS of the stochastic rounding: about sqrt(n / 6) grid steps of the lo limb."""
    rng = np.random.default_rng(7)
    n_sites, scale = 8, 1.0
    sites = [[rng.uniform(-1, 1, 50_000)] for _ in range(n_sites)]
    got = decode_limbs(
        flower_secagg_average([encode_limbs(s, scale, n_limbs=2) for s in sites], rng),
        n_sites,
        scale,
        n_limbs=2,
    )[0]
    err = (got - np.sum([s[0] for s in sites], axis=0)) / 2.0**-42
    assert abs(err.mean()) < 0.05
    assert 0.8 < err.std() / math.sqrt(n_sites / 6) < 1.2
    assert np.max(np.abs(err)) < n_sites


def test_negative_values_and_the_ends_of_the_range():
    rng = np.random.default_rng(3)
    n_sites, scale = 4, secagg_scale(1e6)
    sites = []
    for _ in range(n_sites):
        noisy = rng.normal(0, 3e5, 200).clip(-scale, scale)  # e.g. after adding DP noise
        sites.append([noisy, np.array([-scale, scale, 0.0, -1e-300, 1e-300, -0.5])])
    got = decode_limbs(
        flower_secagg_average([encode_limbs(s, scale, n_limbs=2) for s in sites], rng),
        n_sites,
        scale,
        n_limbs=2,
    )
    for k in range(2):
        exact = np.sum([s[k] for s in sites], axis=0)
        np.testing.assert_allclose(
            got[k], exact, rtol=0, atol=sum_error_bound(n_sites, scale, n_limbs=2)
        )
    np.testing.assert_array_equal(got[1][:3], [-n_sites * scale, n_sites * scale, 0.0])


def _bernoulli_mixture_elbo(counts, sums, entropy, alpha0=0.01, beta=0.5):
    """A Bernoulli mixture's ELBO from summed statistics (the shape of ``fedvi.elbo``)."""
    from scipy.special import betaln, gammaln

    G = len(counts)
    phi = np.sum(betaln(beta + sums, beta + counts[:, None] - sums) - betaln(beta, beta))
    weights = (
        gammaln(G * alpha0)
        - gammaln(G * alpha0 + counts.sum())
        + np.sum(gammaln(alpha0 + counts) - gammaln(alpha0))
    )
    return float(phi + weights + entropy.sum())


def test_elbo_from_recovered_sums_agrees():
    """The smooth ELBO of summed refinement statistics agrees far below 1e-9 relative."""
    rng = np.random.default_rng(11)
    G, P, n_sites, max_rows = 20, 60, 10, 1_000_000
    sites = [_site_stats(rng, rng.integers(100_000, max_rows), G, P) for _ in range(n_sites)]
    scales = _scales(max_rows, G)
    exact = [np.sum([s[k] for s in sites], axis=0) for k in range(3)]
    ref = _bernoulli_mixture_elbo(*exact)
    assert 1e5 < abs(ref) < 1e9
    for n_limbs in (2, 3):
        uploads = [encode_limbs(s, scales, n_limbs=n_limbs) for s in sites]
        got = decode_limbs(flower_secagg_average(uploads, rng), n_sites, scales, n_limbs=n_limbs)
        value = _bernoulli_mixture_elbo(*got)
        assert abs(value - ref) <= 1e-12 * abs(ref)


def test_plain_flower_settings_would_lose_precision():
    """Flower's defaults (clip 8, raw values): the reason for the scale and the limbs."""
    rng = np.random.default_rng(5)
    sites = [[rng.uniform(0, 1, 1000)] for _ in range(3)]
    avg = flower_secagg_average(sites, rng)[0]  # clip 1, one limb, weight 1: grid 2**-21
    err = np.max(np.abs(avg * 3 - np.sum([s[0] for s in sites], axis=0)))
    assert err > 1e-8  # vs < 3 * 2**-42 with two limbs


def test_rejects_out_of_range_and_bad_arguments():
    with pytest.raises(ValueError, match="exceeds"):
        encode_limbs([np.array([2.0])], 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        encode_limbs([np.array([np.nan])], 1.0)
    with pytest.raises(ValueError, match="power of two"):
        encode_limbs([np.array([0.5])], 3.0)
    with pytest.raises(ValueError, match="scales"):
        encode_limbs([np.zeros(2), np.zeros(2)], [1.0])
    with pytest.raises(ValueError, match="bits"):
        encode_limbs([np.zeros(2)], 1.0, bits=22)
    with pytest.raises(ValueError, match="multiple"):
        decode_limbs([np.zeros(2)] * 3, 2, 1.0, n_limbs=2)
    with pytest.raises(ValueError, match="n_sites"):
        decode_limbs([np.zeros(2)] * 3, 0, 1.0)
