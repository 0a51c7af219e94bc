"""The torch adapters' starting frames: W's singular vectors at the tail (row 14), from the
eigenvectors of the smaller Gram matrix."""

from __future__ import annotations

import torch

from geometry._xp import host_eigh
from runner.derived.spec import AdapterSpec


def initial_frames(w: torch.Tensor, spec: AdapterSpec, init: str, gen: torch.Generator):
    """Orthonormal U (out x r), V (in x r): W's singular vectors k..k+r-1 (row 14), or ablations."""
    r = spec.rank
    if init == "random":
        u = torch.linalg.qr(torch.randn(w.shape[0], r, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(w.shape[1], r, generator=gen, dtype=torch.float64))[0]
        return u.to(w.dtype), v.to(w.dtype)
    start = 0 if init == "top" else spec.first_index
    start = min(start, min(w.shape) - r)
    u, v = singular_frames(w.float(), start, r)
    return u.contiguous().to(w.dtype), v.contiguous().to(w.dtype)


def singular_frames(w: torch.Tensor, start: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right singular vectors start..start+r-1 (descending order) of w, orthonormal.

    From the eigenvectors of the smaller Gram matrix (a q x q symmetric eigenproblem, several
    times cheaper than a full SVD of the m x n matrix): for W^T W = V diag(s^2) V^T the left
    vectors are W V / s. The frames only initialise the adapter, so float32 suffices: an
    eigenvector's error is about eps * s_1^2 / gap, which mixes it only with its spectral
    neighbours (directions of nearly the same singular value, an equally valid start). The
    division by s loses accuracy near the noise floor, and float32 eigenvectors are orthogonal
    only to about q * eps, so both sides are re-orthonormalised by QR (signs kept: R's diagonal
    made positive), which leaves them orthonormal to float32 rounding.
    """
    m, n = w.shape
    tall = m >= n
    gram = w.T @ w if tall else w @ w.T  # (q, q)
    lam, small_side = _gram_eigenpairs(gram, start, r)  # (r,), (q, r): descending
    s = lam.clamp(min=0).sqrt()
    other = (w @ small_side if tall else w.T @ small_side) / s.clamp(min=torch.finfo(w.dtype).tiny)
    small_side, other = _orthonormal(small_side), _orthonormal(other)
    return (other, small_side) if tall else (small_side, other)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """The Q factor of x = QR with R's diagonal made positive (same column span and signs)."""
    q, rr = torch.linalg.qr(x)
    d = torch.diagonal(rr)
    return q * torch.sign(d).where(d != 0, torch.ones_like(d))


def _gram_eigenpairs(gram: torch.Tensor, start: int, r: int):
    """Eigenvalues start..start+r-1 of the symmetric ``gram`` counted from the largest, and
    their eigenvectors, in descending order. On the CPU only those r eigenvectors are computed
    (LAPACK's ``ssyevr``, MRRR, through SciPy: cheaper than a full ``eigh``); on other devices
    it is torch's full ``eigh``, sliced.
    """
    q = gram.shape[0]
    if gram.device.type == "cpu":
        lam, vecs = host_eigh(gram.detach().numpy(), subset=(q - start - r, q - 1 - start))
        return (torch.from_numpy(lam[::-1].copy()).to(gram.dtype),
                torch.from_numpy(vecs[:, ::-1].copy()).to(gram.dtype))
    lam, vecs = torch.linalg.eigh(gram)  # ascending
    idx = torch.arange(q - 1 - start, q - 1 - start - r, -1)
    return lam[idx], vecs[:, idx]
