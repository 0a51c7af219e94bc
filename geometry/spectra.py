"""Spectral primitives: singular values (exact, Gram, randomized, power), effective and stable
rank, structural rank and tail, spectral knee and decay, numerical noise floor.

Notation for one matrix W (m x n): singular values s_1 >= ... >= s_q >= 0, q = min(m, n).
Functions that take ``s`` accept any array-API vector or a plain sequence of numbers; they sort
nothing, except where stated, and return Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from geometry._xp import (
    Array,
    as_array,
    device,
    eigvalsh,
    namespace,
    require_matrix,
    require_vector,
    to_float,
    to_work,
)

# ---------------------------------------------------------------------------------------------
# singular values
# ---------------------------------------------------------------------------------------------


def singular_values(w: Array) -> Array:
    """All singular values of ``w``, descending, by a full SVD in the working dtype.

    **Source**: Golub & Van Loan, *Matrix Computations* (4th ed.), section 8.6 (Golub-Kahan SVD).

    s = svdvals(W), computed in float64 where the device supports it (CPU, CUDA).

    **Invariants**: descending and non-negative (``test_singular_values_descending``);
    equal to ``scipy.linalg.svdvals`` (``test_singular_values_match_scipy``).
    """
    require_matrix(w)
    xp = namespace(w)
    return xp.linalg.svdvals(to_work(w))


def gram_singular_values(w: Array, *, gram_in_input_dtype: bool = False) -> Array:
    """All singular values of ``w``, descending, from the eigenvalues of its smaller Gram matrix.

    **Source**: Golub & Van Loan (4th ed.), section 8.6.1 (singular values as square roots of the
    eigenvalues of W^T W) and Theorem 8.1.5 (Weyl) for the error.

    s_i = sqrt(max(lambda_i(G), 0)),  G = W^T W if m >= n else W W^T  (q x q), in float64.

    About 2x faster than a full SVD because ``eigvalsh`` of a q x q symmetric matrix is cheaper
    than a Golub-Kahan bidiagonalisation of the m x n matrix. Accuracy trade-off: the eigenvalues
    of G carry an absolute error of order eps64 * s_1^2, so a singular value has absolute error
    about eps64 * s_1^2 / s_i, i.e. values below sqrt(eps64) * s_1 (1.5e-8 * s_1) lose all
    relative accuracy. That is harmless for the effective rank (their weight in the entropy is
    below 1e-8 each) and below the float32 noise floor of the weights anyway.

    With ``gram_in_input_dtype=True`` the Gram product is formed in the input's dtype (e.g. a
    float32 GEMM, half the cost of the float64 one) and only the eigenvalue solve runs in float64.
    The Gram then carries an absolute error of order c * eps_in * s_1^2 (c a small multiple of
    the blocked-summation depth), so values below about sqrt(eps_in) * s_1 (3.5e-4 * s_1 for
    float32) lose relative accuracy: the same order as the numerical noise floor
    eps_in * s_1 * max(m, n) of a matrix stored in that dtype, so nothing resolvable is lost.

    **Invariants**: agrees with the exact SVD to sqrt(eps64) * s_1
    (``test_gram_singular_values_match_svd``); with a float32 Gram, to sqrt(eps32) * s_1
    (``test_gram_singular_values_float32_gram``).
    """
    require_matrix(w)
    xp = namespace(w)
    m, n = w.shape
    if not gram_in_input_dtype:
        w = to_work(w)
    g = xp.matmul(xp.matrix_transpose(w), w) if m >= n else xp.matmul(w, xp.matrix_transpose(w))
    lam = eigvalsh(to_work(g))  # ascending
    lam = xp.clip(lam, min=0.0)
    return xp.flip(xp.sqrt(lam))


def _gaussian(shape: tuple[int, int], seed: int, like: Array) -> Array:
    """A seeded standard-normal matrix in ``like``'s namespace, dtype and device.

    The array API has no random module, so the draw comes from numpy (host) and is moved once.
    """
    xp = namespace(like)
    rng = np.random.default_rng(seed)
    host = rng.standard_normal(shape)
    return xp.asarray(host, dtype=like.dtype, device=device(like))


def top_singular_values(
    w: Array, k: int, *, oversample: int = 10, n_iter: int = 2, seed: int = 0
) -> Array:
    """The k largest singular values of ``w`` by a randomized range finder.

    **Source**: Halko, Martinsson & Tropp (2011), "Finding structure with randomness",
    Algorithm 4.4 (randomized subspace iteration) and Corollary 10.10.

    Y = (W W^T)^n_iter W Omega (Omega: n x (k+p) Gaussian, p = oversample), re-orthonormalised
    by QR after each product; Q = qr(Y); B = Q^T W; return the top k of svdvals(B).

    Error bound: B's singular values satisfy 0 <= s_j(W) - s_j(B) <= ||(I - Q Q^T) W||_2
    (interlacing plus Weyl), and by Corollary 10.10, with e = exp(1), p >= 2,
    E ||(I - QQ^T)W||_2 <= [ (1 + sqrt(k/(p-1))) s_{k+1}^{2n_iter+1}
                              + (e sqrt(k+p)/p) (sum_{j>k} s_j^{2(2n_iter+1)})^{1/2} ]^{1/(2n_iter+1)}.
    So the error is of the order of s_{k+1} when the spectrum decays, shrinking with n_iter.

    **Invariants**: never exceeds the exact values (``test_top_singular_values_lower_bound``);
    exact for a matrix of rank <= k + oversample (``test_top_singular_values_exact_low_rank``).
    """
    require_matrix(w)
    m, n = w.shape
    q = min(m, n)
    if not 1 <= k <= q:
        raise ValueError(f"k must satisfy 1 <= k <= min(m, n) = {q} (got k={k})")
    if oversample < 0 or n_iter < 0:
        raise ValueError("oversample and n_iter must be >= 0")
    xp = namespace(w)
    w = to_work(w)
    wt = xp.matrix_transpose(w)
    ell = min(k + oversample, q)
    y = xp.matmul(w, _gaussian((n, ell), seed, w))  # (m, ell)
    for _ in range(n_iter):
        qy, _r = xp.linalg.qr(y)
        z, _r = xp.linalg.qr(xp.matmul(wt, qy))  # (n, ell)
        y = xp.matmul(w, z)
    qy, _r = xp.linalg.qr(y)
    b = xp.matmul(xp.matrix_transpose(qy), w)  # (ell, n)
    return xp.linalg.svdvals(b)[:k]


def top_singular_value_power(w: Array, n_iter: int = 50, seed: int = 0) -> float:
    """The largest singular value of ``w`` by power iteration on W^T W.

    **Source**: Golub & Van Loan (4th ed.), section 8.2.1 (power method); the start vector is
    Gaussian, so it has a non-zero component along v_1 with probability 1.

    v <- W^T W v / ||W^T W v||, return ||W v||. Converges like (s_2/s_1)^(2 n_iter).

    **Invariants**: never exceeds s_1 (``test_power_iteration_lower_bound``); scales with |c|
    under W -> cW (``test_power_iteration_scale_equivariant``).
    """
    require_matrix(w)
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1 (got {n_iter})")
    xp = namespace(w)
    w = to_work(w)
    v = _gaussian((w.shape[1], 1), seed, w)
    v = v / xp.linalg.vector_norm(v)
    for _ in range(n_iter):
        u = xp.matmul(xp.matrix_transpose(w), xp.matmul(w, v))
        norm = xp.linalg.vector_norm(u)
        if to_float(norm) == 0.0:
            return 0.0
        v = u / norm
    return to_float(xp.linalg.vector_norm(xp.matmul(w, v)))


# ---------------------------------------------------------------------------------------------
# scalar summaries of a spectrum
# ---------------------------------------------------------------------------------------------


def _spectrum(s) -> Array:
    s = as_array(s)
    require_vector(s)
    xp = namespace(s)
    s = to_work(s)
    if not bool(xp.all(xp.isfinite(s))):
        raise ValueError("s must be finite")
    if bool(xp.any(s < 0)):
        raise ValueError("s must be non-negative")
    if not to_float(xp.sum(s)) > 0:
        raise ValueError("s must have a positive sum (at least one non-zero singular value)")
    return s


def _entropy_rank(weights: Array) -> float:
    xp = namespace(weights)
    p = weights / xp.sum(weights)
    safe = xp.where(p > 0, p, xp.ones_like(p))
    h = -to_float(xp.sum(p * xp.log(safe)))  # 0 log 0 = 0
    nnz = int(to_float(xp.sum(xp.astype(p > 0, p.dtype))))
    # exp(H) lies in [1, nnz] exactly. Clamp to that range, and snap values within 8 ulps of
    # nnz (the uniform case, where log/exp rounding leaves 2.9999999999999996 for [1, 1, 1]).
    val = min(max(math.exp(h), 1.0), float(nnz))
    return float(nnz) if val >= nnz * (1.0 - 8 * 2.0**-52) else val


def effective_rank(s) -> float:
    """Effective rank of a spectrum: the exponential of the Shannon entropy of s / sum(s).

    **Source**: Roy & Vetterli (2007), "The effective rank: a measure of effective
    dimensionality", EUSIPCO, Definition 1.

    p_i = s_i / sum_j s_j,  erank = exp(-sum_i p_i log p_i)   (0 log 0 = 0).

    **Invariants**: 1 <= erank <= number of non-zero s_i <= q (``test_erank_bounds``);
    invariant under s -> c s, c > 0 (``test_erank_scale_invariant``) and under permutations
    (``test_erank_permutation_invariant``); erank >= effective_rank_squared
    (``test_erank_dominates_squared``).
    """
    return _entropy_rank(_spectrum(s))


def effective_rank_squared(s) -> float:
    """Effective rank from the energy distribution s_i^2 / sum(s^2) (the seed's code variant).

    **Source**: Roy & Vetterli (2007) definition applied to the eigenvalues of W^T W (s_i^2);
    this is the variant the seed's implementation used.

    p_i = s_i^2 / sum_j s_j^2,  erank_2 = exp(-sum_i p_i log p_i).

    **Invariants**: 1 <= erank_2 <= q (``test_erank_squared_bounds``); scale invariant
    (``test_erank_squared_scale_invariant``).
    """
    s = _spectrum(s)
    return _entropy_rank(s * s)


def stable_rank(s) -> float:
    """Stable (numerical) rank: squared Frobenius norm over squared spectral norm.

    **Source**: Rudelson & Vershynin (2007), "Sampling from large matrices", section 1.

    srank = sum_i s_i^2 / s_1^2,  s_1 = max_i s_i.

    **Invariants**: 1 <= srank <= number of non-zero s_i (``test_stable_rank_bounds``);
    scale invariant (``test_stable_rank_scale_invariant``).
    """
    s = _spectrum(s)
    xp = namespace(s)
    s1 = xp.max(s)
    val = to_float(xp.sum((s / s1) ** 2))
    nnz = to_float(xp.sum(xp.astype(s > 0, s.dtype)))
    return min(max(val, 1.0), nnz)


@dataclass(frozen=True)
class StructuralRank:
    """Split of a spectrum into a structural head of k values and a tail of q - k values.

    k = clamp(floor(erank), 1, q - 1); sigma_k = s_k (1-based); tail_dims = q - k;
    gap = s_{k-1} - s_k (0 when k = 1).
    """

    k: int
    q: int
    tail_dims: int
    sigma_k: float
    sigma_max: float
    gap: float
    erank: float


def structural_rank(s) -> StructuralRank:
    """Structural rank k and the tail ("null-space capacity") of a descending spectrum.

    **Source**: the seed's rule (SEED-SPEC, per-matrix geometry) on top of Roy & Vetterli (2007).

    k = clamp(floor(erank(s)), 1, q - 1); sigma_k = s_k; tail_dims = q - k.

    **Invariants**: 1 <= k <= q - 1 and tail_dims = q - k >= 1 (``test_structural_rank_bounds``);
    scale invariant in k (``test_structural_rank_scale_invariant``).
    """
    s = _descending(s)
    xp = namespace(s)
    q = s.shape[0]
    if q < 2:
        raise ValueError(f"structural rank needs q >= 2 singular values (got q={q})")
    erank = effective_rank(s)
    k = min(max(int(math.floor(erank)), 1), q - 1)
    sigma_k = to_float(s[k - 1])
    gap = to_float(s[k - 2] - s[k - 1]) if k >= 2 else 0.0
    return StructuralRank(
        k=k, q=q, tail_dims=q - k, sigma_k=sigma_k, sigma_max=to_float(xp.max(s)), gap=gap,
        erank=erank,
    )


def tail_dims(s) -> int:
    """Null-space capacity q - k of a spectrum (see :func:`structural_rank`).

    **Source**: the seed's rule (SEED-SPEC).

    tail_dims = q - clamp(floor(erank), 1, q - 1).

    **Invariants**: 1 <= tail_dims <= q - 1 (``test_structural_rank_bounds``).
    """
    return structural_rank(s).tail_dims


def _descending(s) -> Array:
    s = _spectrum(s)
    if s.shape[0] > 1 and bool(namespace(s).any(s[1:] > s[:-1])):
        raise ValueError("s must be sorted in descending order")
    return s


def noise_floor(s, eps: float, *, dims: int | None = None) -> float:
    """Numerical-rank threshold: singular values below it are indistinguishable from zero.

    **Source**: Golub & Van Loan (4th ed.), section 5.4.1 (numerical rank); the same default
    tolerance as ``numpy.linalg.matrix_rank`` and LAPACK's rank-revealing drivers.

    floor = eps * s_1 * max(m, n)   (``dims`` = max(m, n); defaults to q = len(s)).

    ``eps`` is the machine epsilon of the dtype the matrix was stored in (2^-23 for float32).
    It is a rounding constant, not a statistical threshold.

    **Invariants**: proportional to s_1 (``test_noise_floor_scale_equivariant``).
    """
    s = _spectrum(s)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (got {eps})")
    d = s.shape[0] if dims is None else dims
    if d < s.shape[0]:
        raise ValueError(f"dims = max(m, n) must be >= len(s) (got {d} < {s.shape[0]})")
    return eps * to_float(namespace(s).max(s)) * d


def spectral_knee(s, *, floor: float = 0.0) -> int:
    """Position of the largest relative drop in a descending spectrum (1-based count above it).

    **Source**: the seed's rule ("spectral decay analysis"), SEED-SPEC: knee = argmax_i
    s_i / s_{i+1}.

    knee = argmax_{1 <= i <= q-1, s_{i+1} > floor} s_i / s_{i+1}  (1-based: the knee value is the
    number of singular values before the largest drop). Ratios into values at or below ``floor``
    (the numerical noise floor) are excluded, since they are rounding, not structure; if every
    s_{i+1} is at or below the floor, knee = 1.

    **Invariants**: 1 <= knee <= q - 1 (``test_knee_bounds``); scale invariant
    (``test_knee_scale_invariant``); finds a planted drop (``test_knee_finds_planted_drop``).
    """
    s = _descending(s)
    xp = namespace(s)
    q = s.shape[0]
    if q < 2:
        raise ValueError(f"spectral knee needs q >= 2 (got q={q})")
    head, nxt = s[:-1], s[1:]
    valid = nxt > floor
    if not bool(xp.any(valid)):
        return 1
    ratio = xp.where(valid, head / xp.where(valid, nxt, xp.ones_like(nxt)), xp.zeros_like(nxt))
    return int(to_float(xp.argmax(ratio))) + 1


def spectral_decay(s) -> float:
    """Power-law decay exponent of a spectrum: the least-squares slope of -log s_i vs log i.

    **Source**: a standard log-log fit (e.g. Martin & Mahoney 2021, heavy-tailed self-
    regularisation, use the same fit on eigenvalue densities); here on the rank-ordered values.

    s_i ~ C i^(-alpha);  alpha = -cov(log i, log s_i) / var(log i) over the non-zero s_i.

    **Invariants**: scale invariant (``test_decay_scale_invariant``); recovers a planted
    exponent exactly (``test_decay_recovers_power_law``).
    """
    s = _descending(s)
    xp = namespace(s)
    nz = s[s > 0] if bool(xp.any(s == 0)) else s
    if nz.shape[0] < 2:
        raise ValueError("spectral decay needs >= 2 non-zero singular values")
    i = xp.arange(1, nz.shape[0] + 1, dtype=nz.dtype, device=device(nz))
    x = xp.log(i)
    y = xp.log(nz)
    xc = x - xp.mean(x)
    yc = y - xp.mean(y)
    return -to_float(xp.sum(xc * yc) / xp.sum(xc * xc))
