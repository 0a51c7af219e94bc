"""The adapters' starting frames (row 14): W's singular vectors at the tail, from the
eigenvectors of the smaller Gram matrix. Written once against the array API, so torch, MLX and
JAX compute them on their own arrays (and JAX can compile them); each backend passes only its
symmetric eigensolver and its random draws."""

from __future__ import annotations

import numpy as np

from geometry._xp import device, namespace
from runner.derived.spec import AdapterSpec


def initial_frames(w, spec: AdapterSpec, init: str, normal, tail):
    """U (out x r), V (in x r): W's singular vectors k..k+r-1 (``tail``, row 14), the top r
    (``top``), or a random orthonormal pair (``random``: the Q factors of the standard normal
    draws ``normal(shape)``, U's first, in the draws' namespace and dtype; the caller casts).
    ``tail(w, start, r)``: the backend's :func:`tail_frames`."""
    r = spec.rank
    if init == "random":
        a = normal((w.shape[0], r))
        b = normal((w.shape[1], r))
        xp = namespace(a)
        return xp.linalg.qr(a)[0], xp.linalg.qr(b)[0]
    start = 0 if init == "top" else spec.first_index
    return tail(w, min(start, min(w.shape) - r), r)


def tail_frames(w, start, r, width: int, eigenpairs):
    """Left/right singular vectors start..start+r-1 (descending order) of ``w``, orthonormal,
    in ``width`` >= r columns of which those after the first r are zero.

    From the eigenvectors of the smaller Gram matrix (a q x q symmetric eigenproblem, several
    times cheaper than a full SVD of the m x n matrix): for W^T W = V diag(s^2) V^T the other
    side is W V / s. The frames only initialise the adapter, so float32 suffices: an
    eigenvector's error is about eps * s_1^2 / gap, which mixes it only with its spectral
    neighbours (directions of nearly the same singular value, an equally valid start). The
    division by s loses accuracy near the noise floor (s is clamped at float32's smallest
    normal), and float32 eigenvectors are orthogonal only to about q * eps, so both sides are
    re-orthonormalised by QR (signs kept: R's diagonal made positive), which leaves them
    orthonormal to float32 rounding.

    ``eigenpairs(gram, start, width)``: the ``width`` eigenpairs of the symmetric ``gram`` from
    the ``start``-th largest down (eigenvalues (width,), eigenvectors (q, width)), as the
    backend solves them (:func:`gathered_eigenpairs` from a full ``eigh``, or a solver that
    computes only those). ``start`` and ``r`` may be traced (JAX compiles this once per weight
    shape and width): the columns from r on are masked to zero, which leaves the first r
    columns of each QR factor those of the r-column problem (Householder QR builds column j
    from columns <= j only). Eigenvector signs may differ between solvers; a sign flip of a
    (u_j, v_j) pair changes neither dW nor any later step (the Cayley retraction is
    equivariant under X -> X D, D = diag(+-1)).
    """
    xp = namespace(w)
    tall = w.shape[0] >= w.shape[1]
    wt = xp.matrix_transpose(w)
    gram = xp.matmul(wt, w) if tall else xp.matmul(w, wt)  # (q, q)
    lam, vecs = eigenpairs(gram, start, width)  # (width,), (q, width): descending
    valid = xp.arange(width, device=device(w)) < r
    small_side = xp.where(valid, vecs, xp.zeros_like(vecs))
    s = xp.sqrt(xp.clip(lam, min=0.0))
    tiny = float(np.finfo(np.float32).tiny)
    other = (xp.matmul(w, small_side) if tall else xp.matmul(wt, small_side)) / xp.clip(s, min=tiny)
    small_side, other = _orthonormal(small_side, valid), _orthonormal(other, valid)
    return (other, small_side) if tall else (small_side, other)


def gathered_eigenpairs(eigh):
    """The ``eigenpairs`` of :func:`tail_frames` from a full symmetric solver ``eigh``
    (eigenvalues ascending): every eigenpair is computed and those wanted gathered by index,
    which a traced ``start`` can select (column q-1-start-j holds the j-th from ``start``;
    indices past the spectrum are clipped, and their columns masked by the caller)."""
    def eigenpairs(gram, start, width: int):
        xp = namespace(gram)
        lam, vecs = eigh(gram)  # ascending
        q = gram.shape[0]
        cols = xp.clip(q - 1 - start - xp.arange(width, device=device(gram)), 0, q - 1)
        return xp.take(lam, cols, axis=0), xp.take(vecs, cols, axis=1)

    return eigenpairs


def _orthonormal(x, valid):
    """The Q factor of x = QR with R's diagonal made positive (same column span and signs),
    its columns outside ``valid`` zeroed."""
    xp = namespace(x)
    qq, rr = xp.linalg.qr(x)
    d = xp.sum(rr * xp.eye(rr.shape[0], dtype=rr.dtype, device=device(rr)), axis=0)  # diag(R)
    sign = xp.where(d < 0, -xp.ones_like(d), xp.ones_like(d))
    return xp.where(valid, qq * sign, xp.zeros_like(qq))
