"""The request a SecAgg+ participant received, bound into its pairwise masks (pure: hashlib
and NumPy; the Flower layers on both sides use it, see :mod:`fedvi.flower.secure_round`).

Two SecAgg+ nodes derive a shared secret ``s`` and mask with ``PRG(s)``, one adding and one
subtracting. Keyed instead with :func:`bound_key` ``(s, h)``, where ``h`` is the
:func:`request_hash` of the request each node received, the pair's masks cancel in the sum only
when both nodes received the same request.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedvi.protocol import K_SECAGG

#: Domain separation of the bound pairwise key.
BIND_TAG = b"fedvi/secagg+/request-bound-mask/v1"
#: Config key of the per-site local-to-global map (map labelling): not bound, it is the one
#: part of a request that differs between honest sites.
PER_SITE_MAP = "label.mapping"


def _feed(h, value) -> None:
    """Type-tagged, length-prefixed bytes of a config value (no two values share bytes)."""
    if isinstance(value, bool):
        h.update(b"?" + (b"1" if value else b"0"))
    elif isinstance(value, int):
        data = str(value).encode()
        h.update(b"i" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, float):
        h.update(b"f" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"s" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, bytes):
        h.update(b"y" + struct.pack("<Q", len(value)) + value)
    elif isinstance(value, (list, tuple)):
        h.update(b"l" + struct.pack("<Q", len(value)))
        for v in value:
            _feed(h, v)
    else:
        raise TypeError(f"config value of type {type(value).__name__} cannot be hashed")


def request_hash(arrays: Sequence[np.ndarray], config: Mapping[str, object]) -> bytes:
    """sha256 of a round's request (FitIns arrays and config), 32 bytes.

    Arrays count by dtype, shape and values; config entries by key, type and value (sorted by
    key). Left out: the site's own secure-round mark (``fedvi.secagg``, which the site sets
    itself) and the per-site local-to-global map of map labelling (its array and flag).
    """
    config = {k: v for k, v in config.items() if k != K_SECAGG}
    arrays = list(arrays)
    if config.pop(PER_SITE_MAP, False) and arrays:
        arrays = arrays[:-1]
    h = hashlib.sha256(b"fedvi-request/v1")
    h.update(struct.pack("<Q", len(arrays)))
    for a in arrays:
        a = np.ascontiguousarray(a)
        _feed(h, a.dtype.str)
        _feed(h, list(a.shape))
        data = a.tobytes()
        h.update(struct.pack("<Q", len(data)) + data)
    h.update(struct.pack("<Q", len(config)))
    for key in sorted(config):
        _feed(h, key)
        _feed(h, config[key])
    return h.digest()


def bound_key(shared_key: bytes, req_hash: bytes) -> bytes:
    """The pairwise mask seed of a node that received the request hashed ``req_hash``."""
    return hashlib.sha256(BIND_TAG + shared_key + req_hash).digest()


def rekey_correction(
    prg: Callable[[bytes, int, list], list[np.ndarray]],
    shared_key: bytes,
    req_hash: bytes,
    mod_range: int,
    shapes: list[tuple[int, ...]],
) -> list[np.ndarray]:
    """``prg(bound key) - prg(shared_key)`` per array (int64), ``prg`` being the mask generator
    (Flower's ``pseudo_rand_gen``): added with the pairwise mask's sign, it turns the pairwise
    mask into the request-bound one."""
    new = prg(bound_key(shared_key, req_hash), mod_range, shapes)
    old = prg(shared_key, mod_range, shapes)
    return [a - b for a, b in zip(new, old, strict=True)]
