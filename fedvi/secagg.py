"""Exact sums through Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

Pure NumPy: nothing here imports Flower. The constants are the parameters the server passes
to ``SecAggPlusWorkflow`` (``clipping_range``, ``quantization_range``, ``modulus_range``,
``max_weight``) and what every site reports as ``num_examples`` in a SecAgg+ round.

What Flower 1.42 does with a site's arrays (``secaggplus_mod._collect_masked_vectors`` and
``SecAggPlusWorkflow.unmask_stage``):

1. the site multiplies them by ``round(num_examples / max_weight * q) / q``,
   clips them to ``[-c, c]`` and rounds ``(v + c) * q / (2c)`` *stochastically* to an integer
   in ``[0, q]`` (``q = quantization_range``, ``c = clipping_range``), masks it modulo
   ``modulus_range`` and sends it with the integer weight ``round(num_examples/max_weight*q)``;
2. the server sums the integers of the ``n`` sites that sent masked vectors, modulo
   ``modulus_range``, removes the masks, dequantises (``x * 2c / q - c`` then ``- (n-1) c``),
   divides by the summed weight over ``q`` and writes that *weighted average* into every
   ``FitRes.parameters`` before ``Strategy.aggregate_fit`` sees the ``n`` results.

How this module turns that into sums that are exact up to ~2**-42 of ``scale`` per site:

- *Weights*: every site reports ``num_examples = NUM_EXAMPLES == MAX_WEIGHT`` so its factor
  is exactly ``q / q = 1.0``; the average times ``n = len(results)`` is the sum. (It also
  stops ``num_examples``, which SecAgg+ does not mask, from revealing a site's size.)
- *Range*: the server sends a power-of-two ``scale`` per array, at least the largest
  possible absolute value on any site (:func:`secagg_scale`); sites divide by it (exact in
  binary floating point), so every value lies in ``[-1, 1] = [-c, c]`` with ``c = 1``.
- *Grid*: with ``c = 1`` and ``q = 2**22`` the quantisation grid is ``2c/q = 2**-21``: a value
  that is a multiple of ``2**-21`` maps to an integer and is sent *without* rounding error
  (``_stochastic_round`` of an integer is that integer).
- *Limbs*: each array ``v`` goes as ``hi = floor(v * 2**b) / 2**b`` (on the grid whenever
  ``2**b`` divides ``q / (2c) = 2**21``, i.e. ``b <= 21``: exact) and
  ``lo = (v - hi) * 2**b`` in ``[0, 1)`` (stochastically rounded: error below one grid step,
  ``2**-21``, per site, unbiased). The server reassembles ``(sum_hi + sum_lo / 2**b) * scale``,
  so the error is ``< n * 2**-21 * 2**-b * scale``; the largest admissible ``b`` is
  :data:`LIMB_BITS` ``= log2(q / 2c) = 21``, giving **|error| < n * 2**-42 * scale**
  (``2.3e-13 * n * scale``; RMS about ``sqrt(n/6) * 2**-42 * scale``). With ``n_limbs = 3``
  the middle limb is exact too and the bound drops to ``n * 2**-63 * scale``, below float64
  rounding of the result.
- *Snapping*: every limb's sum over sites is an exact multiple of ``2**-21`` with magnitude
  ``<= n``; the server's ``/ n`` and our ``* n`` perturb it by ~``n * 2**-52``, so
  :func:`decode_limbs` rounds it back to the grid and recovers it exactly.
- *Modulus*: the summed integers (each site's values in ``[0, q]``, and its weight ``q``) must
  stay below ``modulus_range`` or they wrap: ``n * q < 2**32`` (Flower requires
  ``modulus_range <= 2**32``), so at most :data:`MAX_SITES` ``= 1023`` sites per round. ``b``
  does not enter this constraint; ``q`` does (``q = 2**24`` would allow ``b = 23``, error
  ``n * 2**-46``, but only 255 sites).

Only arrays of the same shape on every site can be summed this way (the SecAgg+ rounds);
values must be finite and within ``[-scale, scale]`` (negative values are fine, e.g. after
noise is added) or :func:`encode_limbs` raises rather than let Flower clip them silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: ``SecAggPlusWorkflow(clipping_range=...)``: values are pre-scaled into ``[-1, 1]``.
CLIPPING_RANGE = 1.0
#: ``SecAggPlusWorkflow(quantization_range=...)`` (Flower's default, ``2**22``).
QUANTIZATION_RANGE = 2**22
#: ``SecAggPlusWorkflow(modulus_range=...)`` (Flower's default and maximum, ``2**32``).
MODULUS_RANGE = 2**32
#: ``SecAggPlusWorkflow(max_weight=...)``; every site reports ``num_examples = NUM_EXAMPLES``.
MAX_WEIGHT = 1.0
#: ``num_examples`` of a site's ``FitRes`` in a SecAgg+ round (weight ratio exactly 1).
NUM_EXAMPLES = 1
#: Step of Flower's quantisation grid in units of ``scale``: ``2c / q = 2**-21``.
GRID = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
#: Bits per limb: the largest ``b`` with ``2**b`` dividing ``q / (2c)``, i.e. 21.
LIMB_BITS = int(round(math.log2(QUANTIZATION_RANGE / (2 * CLIPPING_RANGE))))
#: Limbs per array: with 3 the sum's error (``n * 2**-63 * scale``) is below float64 rounding,
#: so small counts next to large ones stay exact too (2 limbs: ``n * 2**-42 * scale``).
N_LIMBS = 3
#: Most sites one SecAgg+ round can sum without the integers wrapping modulo 2**32.
MAX_SITES = MODULUS_RANGE // QUANTIZATION_RANGE - 1

assert 2.0**-LIMB_BITS == GRID


def secagg_scale(max_value: float) -> float:
    """The smallest power of two ``>= max_value`` (``max_value > 0``, finite)."""
    max_value = float(max_value)
    if not (math.isfinite(max_value) and max_value > 0):
        raise ValueError(f"max_value must be positive and finite, got {max_value}")
    mantissa, exponent = math.frexp(max_value)  # max_value = mantissa * 2**exponent
    return math.ldexp(1.0, exponent - 1) if mantissa == 0.5 else math.ldexp(1.0, exponent)


def _scales(scale: float | Sequence[float], n_arrays: int) -> list[float]:
    scales = [scale] * n_arrays if np.ndim(scale) == 0 else list(scale)
    if len(scales) != n_arrays:
        raise ValueError(f"{len(scales)} scales for {n_arrays} arrays")
    out = []
    for s in scales:
        s = float(s)
        if not (s > 0 and math.isfinite(s) and math.frexp(s)[0] == 0.5):
            raise ValueError(f"scale must be a positive power of two, got {s}")
        out.append(s)
    return out


def _check_bits(bits: int, n_limbs: int) -> None:
    if not 1 <= int(bits) <= LIMB_BITS:
        raise ValueError(f"bits must be in 1..{LIMB_BITS} (so hi is on Flower's grid), got {bits}")
    if int(n_limbs) < 2:
        raise ValueError(f"n_limbs must be >= 2, got {n_limbs}")


def encode_limbs(
    arrays: Sequence[np.ndarray],
    scale: float | Sequence[float],
    bits: int = LIMB_BITS,
    n_limbs: int = N_LIMBS,
) -> list[np.ndarray]:
    """A site's arrays as ``n_limbs`` float64 arrays each, for a SecAgg+ round.

    ``scale``: one power of two for all arrays or one per array (sent by the server, the same
    on every site; see :func:`secagg_scale`). Output order is array-major:
    ``[a0_hi, a0_lo, a1_hi, a1_lo, ...]`` (shapes preserved). Raises ``ValueError`` on
    non-finite values or ``|value| > scale``.
    """
    _check_bits(bits, n_limbs)
    scales = _scales(scale, len(arrays))
    step = 2.0**bits
    out: list[np.ndarray] = []
    for i, (arr, s) in enumerate(zip(arrays, scales, strict=True)):
        v = np.asarray(arr, dtype=np.float64) / s  # exact: s is a power of two
        if not np.all(np.isfinite(v)):
            raise ValueError(f"array {i} has non-finite values")
        if v.size and np.max(np.abs(v)) > 1.0:
            raise ValueError(
                f"array {i}: max |value| {np.max(np.abs(v)) * s} exceeds its scale {s}"
            )
        for _ in range(n_limbs - 1):
            hi = np.floor(v * step) / step  # a multiple of 2**-bits in [-1, 1]: on the grid
            out.append(hi)
            v = (v - hi) * step  # in [0, 1]
        out.append(v)
    return out


def _snap(x: np.ndarray) -> np.ndarray:
    """Round to the nearest multiple of :data:`GRID` (where every summed limb lies)."""
    return np.round(x / GRID) * GRID


def decode_limbs(
    averaged_arrays: Sequence[np.ndarray],
    n_sites: int,
    scale: float | Sequence[float],
    bits: int = LIMB_BITS,
    n_limbs: int = N_LIMBS,
) -> list[np.ndarray]:
    """The sums over sites from what ``Strategy.aggregate_fit`` sees in a SecAgg+ round.

    ``averaged_arrays``: ``parameters_to_ndarrays(results[0][1].parameters)`` (Flower writes
    the same per-site average into every result); ``n_sites``: ``len(results)``, the sites
    whose masked vectors were summed. ``scale``, ``bits``, ``n_limbs`` as in
    :func:`encode_limbs`. Returns one float64 array per original array.
    """
    _check_bits(bits, n_limbs)
    if len(averaged_arrays) % n_limbs:
        raise ValueError(f"{len(averaged_arrays)} arrays is not a multiple of {n_limbs} limbs")
    n_sites = int(n_sites)
    if not 1 <= n_sites <= MAX_SITES:
        raise ValueError(f"n_sites must be in 1..{MAX_SITES}, got {n_sites}")
    n_arrays = len(averaged_arrays) // n_limbs
    scales = _scales(scale, n_arrays)
    inv_step = 2.0**-bits
    out = []
    for i, s in enumerate(scales):
        limbs = [
            _snap(np.asarray(a, dtype=np.float64) * n_sites)
            for a in averaged_arrays[i * n_limbs : (i + 1) * n_limbs]
        ]
        total = limbs[-1]
        for limb in reversed(limbs[:-1]):
            total = limb + total * inv_step
        out.append(total * s)
    return out


def sum_error_bound(
    n_sites: int, scale: float, bits: int = LIMB_BITS, n_limbs: int = N_LIMBS
) -> float:
    """Worst-case absolute error of a sum from :func:`decode_limbs`, stochastic rounding only.

    ``n_sites * GRID * 2**(-bits * (n_limbs - 1)) * scale``; float64 rounding of the result
    (a few ulps of it) comes on top.
    """
    return n_sites * GRID * 2.0 ** (-bits * (n_limbs - 1)) * scale
