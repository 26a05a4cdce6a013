"""Compute backends of the local step.

``"numpy"`` (default) streams the table in blocks (:func:`fedvi.vi.run_pass`). ``"torch"``
runs the same step with PyTorch on ``device`` (``"cpu"`` or ``"cuda"``) for large sites: the
whole design matrix is copied to the device once (so its memory is the device's, not bounded by
a block), each iteration sends ``W (K, P)`` and gets back the responsibilities and their
statistics, in float64 (results equal NumPy's to round-off). Tables with missing cells use the
NumPy backend. torch is optional (``pip install torch``; a CPU build is enough) and imported
only here.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from fedvi.options import BACKENDS


def check_backend(backend: str, device: str = "cpu") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy" and device != "cpu":
        raise ValueError(f"backend='numpy' runs on the CPU only, got device={device!r}")
    if backend == "torch":
        try:
            import torch
        except ImportError as err:
            raise ImportError(
                "backend='torch' needs PyTorch: pip install torch (a CPU build is enough)"
            ) from err
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for, but torch sees no CUDA device")


class TorchLocalStep:
    """The local step on a torch device, for an :class:`fedvi.data.EncodedData` table."""

    def __init__(self, data, device: str = "cpu"):
        import torch

        check_backend("torch", device)
        X, _ = data.design(np.float64)
        self.torch = torch
        self.device = torch.device(device)
        if sp.issparse(X):
            self.X = self._csr(sp.csr_matrix(X))
            self.XT = self._csr(sp.csr_matrix(X.T))
        else:
            self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)).to(self.device)
            self.XT = None

    def _csr(self, M: sp.csr_matrix):
        t = self.torch
        with warnings.catch_warnings():
            # torch calls its CSR support "beta"; the two products used here are stable.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return t.sparse_csr_tensor(
                t.from_numpy(M.indptr.astype(np.int64)),
                t.from_numpy(M.indices.astype(np.int64)),
                t.from_numpy(M.data.astype(np.float64)),
                size=M.shape,
                dtype=t.float64,
                check_invariants=True,  # once per fit; scipy's CSR is valid
            ).to(self.device)

    def __call__(self, W: np.ndarray, bias: np.ndarray):
        """``(resp (N, K), counts (K,), sums (K, P), entropy (K,))`` as NumPy arrays."""
        t = self.torch
        Wt = t.from_numpy(np.ascontiguousarray(W)).to(self.device)
        bt = t.from_numpy(np.ascontiguousarray(bias)).to(self.device)
        logits = self.X @ Wt.T + bt
        log_r = logits - t.logsumexp(logits, dim=1, keepdim=True)
        r = t.exp(log_r)
        entropy = -(r * log_r).sum(dim=0)
        sums = (self.XT @ r).T if self.XT is not None else (self.X.T @ r).T
        out = (r, r.sum(dim=0), sums.contiguous(), entropy)
        return tuple(a.cpu().numpy() for a in out)

    def sums(self, r: np.ndarray) -> np.ndarray:
        """``(K, P)`` ``R.T @ X`` for responsibilities ``r (N, K)``."""
        rt = self.torch.from_numpy(np.ascontiguousarray(r)).to(self.device)
        sums = (self.XT @ rt).T if self.XT is not None else (self.X.T @ rt).T
        return sums.contiguous().cpu().numpy()
