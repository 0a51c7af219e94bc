"""The MLX / JAX adapters' starting frames (row 14), written against the array API so each
backend computes them on its own arrays (and JAX can compile them)."""

from __future__ import annotations

import numpy as np

from geometry._xp import namespace


def tail_frames(w, start, r, width: int, eigh):
    """Left/right singular vectors start..start+r-1 (descending) of ``w``, orthonormal, in
    ``width`` >= r columns of which those after the first r are zero: the backend version of
    the torch ops' ``singular_frames`` (float32 eigh of the smaller Gram matrix, the
    other side W V / s, both sides re-orthonormalised by QR with R's diagonal made positive).
    ``start`` and ``r`` may be traced (JAX compiles this once per weight shape and width): the
    eigenvectors are gathered by index and the columns from r on masked to zero, which leaves
    the first r columns of each QR factor those of the r-column problem (Householder QR
    builds column j from columns <= j only). Eigenvector signs may differ from torch's; a sign
    flip of a (u_j, v_j) pair changes neither dW nor any later step (the Cayley retraction is
    equivariant under X -> X D, D = diag(+-1))."""
    xp = namespace(w)
    m, n = w.shape
    tall = m >= n
    wt = xp.matrix_transpose(w)
    gram = xp.matmul(wt, w) if tall else xp.matmul(w, wt)
    lam, vecs = eigh(gram)  # ascending
    q = gram.shape[0]
    j = xp.arange(width)
    valid = j < r
    cols = xp.clip(q - 1 - start - j, 0, q - 1)  # column q-1-start-j: descending from start
    zero = xp.zeros((q, width), dtype=w.dtype)
    small_side = xp.where(valid, xp.take(vecs, cols, axis=1), zero)
    s = xp.sqrt(xp.clip(xp.take(lam, cols, axis=0), min=0.0))
    tiny = float(np.finfo(np.float32).tiny)
    other = (xp.matmul(w, small_side) if tall else xp.matmul(wt, small_side)) / xp.clip(s, min=tiny)
    small_side, other = _orthonormal(small_side, valid), _orthonormal(other, valid)
    return (other, small_side) if tall else (small_side, other)


def _orthonormal(x, valid):
    """The Q factor of x = QR with R's diagonal made positive, its columns outside ``valid``
    zeroed (as the torch ops')."""
    xp = namespace(x)
    qq, rr = xp.linalg.qr(x)
    d = xp.sum(rr * xp.eye(rr.shape[0], dtype=rr.dtype), axis=0)  # diag(R)
    sign = xp.where(d < 0, -xp.ones_like(d), xp.ones_like(d))
    return xp.where(valid, qq * sign, xp.zeros_like(qq))



def singular_frames(ops, w, start: int, r: int, width: int | None = None):
    """U (out x r), V (in x r): singular vectors start..start+r-1 of ``w`` (:func:`tail_frames`);
    ``width``: the largest rank among adapters of ``w``'s shape (one JAX compilation for all)."""
    return ops.frames(w, start, r, max(width or r, r))


def initial_frames(ops, w, spec, init: str, seed: int, width: int | None = None):
    """U (out x r), V (in x r) as the torch ops' ``initial_frames``: W's singular vectors
    k..k+r-1 (``tail``), the top r (``top``), or a random orthonormal pair (``random``: drawn by
    numpy from ``seed``, so not the torch generator's draw)."""
    r = spec.rank
    if init == "random":
        rng = np.random.default_rng(seed)
        u = np.linalg.qr(rng.standard_normal((w.shape[0], r)))[0]
        v = np.linalg.qr(rng.standard_normal((w.shape[1], r)))[0]
        return ops.array(u), ops.array(v)
    start = 0 if init == "top" else spec.first_index
    start = min(start, min(w.shape) - r)
    return singular_frames(ops, w, start, r, width)
