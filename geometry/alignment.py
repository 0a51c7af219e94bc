"""Representation comparison: linear CKA, orthogonal Procrustes, the seed's pinv map F, and
TwoNN intrinsic dimension."""

from __future__ import annotations

from dataclasses import dataclass

from geometry._xp import Array, device, namespace, require_matrix, to_float, to_work


def _center(xp, x: Array) -> Array:
    return x - xp.mean(x, axis=0, keepdims=True)


def cka(x: Array, y: Array) -> float:
    """Linear centered kernel alignment between two representations of the same n probes.

    **Source**: Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of neural network
    representations revisited", ICML, eq. (5) (linear kernel form).

    With column-centred X (n x p1) and Y (n x p2):
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).

    **Invariants**: 0 <= CKA <= 1 and CKA(X, X) = 1 (``test_cka_bounds``); symmetric
    (``test_cka_symmetric``); invariant under isotropic scaling (``test_cka_scale_invariant``) and
    orthogonal transforms of either side (``test_cka_orthogonal_invariant``); equals 1 for the
    Procrustes/pinv fit scored on its own probes (``test_cka_one_for_fit_on_own_probes``).
    """
    require_matrix(x, "x")
    require_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows (got {x.shape[0]}, {y.shape[0]})")
    if x.shape[0] < 2:
        raise ValueError("cka needs at least 2 probes (rows)")
    xp = namespace(x, y)
    x = _center(xp, to_work(x))
    y = _center(xp, to_work(y))
    xt_x = xp.linalg.matrix_norm(xp.matmul(xp.matrix_transpose(x), x))
    yt_y = xp.linalg.matrix_norm(xp.matmul(xp.matrix_transpose(y), y))
    if to_float(xt_x) == 0.0 or to_float(yt_y) == 0.0:
        raise ValueError("cka needs non-constant representations (a centred input is zero)")
    cross = xp.linalg.matrix_norm(xp.matmul(xp.matrix_transpose(y), x)) ** 2
    return min(max(to_float(cross / (xt_x * yt_y)), 0.0), 1.0)


@dataclass(frozen=True)
class ProcrustesFit:
    """Orthogonal map R (p x p) minimising ||X R - Y||_F, the nuclear norm of X^T Y and the
    residual ||X R - Y||_F."""

    rotation: Array
    scale: float
    residual: float


def procrustes(x: Array, y: Array) -> ProcrustesFit:
    """Orthogonal Procrustes: the orthogonal R minimising ||X R - Y||_F.

    **Source**: Schonemann (1966), "A generalized solution of the orthogonal Procrustes problem",
    Psychometrika 31; same convention as ``scipy.linalg.orthogonal_procrustes``.

    X^T Y = U S V^T (SVD),  R = U V^T,  scale = sum(S).

    **Invariants**: R is orthogonal (``test_procrustes_orthogonal``); recovers a planted rotation
    exactly (``test_procrustes_recovers_rotation``); matches scipy (``test_procrustes_matches_scipy``).
    """
    require_matrix(x, "x")
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"x and y must have the same shape (got {tuple(x.shape)}, {tuple(y.shape)})")
    xp = namespace(x, y)
    x = to_work(x)
    y = to_work(y)
    u, s, vt = xp.linalg.svd(xp.matmul(xp.matrix_transpose(x), y), full_matrices=False)
    r = xp.matmul(u, vt)
    residual = xp.linalg.matrix_norm(xp.matmul(x, r) - y)
    return ProcrustesFit(rotation=r, scale=to_float(xp.sum(s)), residual=to_float(residual))


def procrustes_pinv_map(x_src: Array, x_tgt: Array) -> Array:
    """The seed's least-squares map F from source to target representations.

    **Source**: the seed's CKA claim ("F = pinv(source) @ target"); Penrose (1956) for the
    minimum-norm least-squares solution.

    F = pinv(X_src) X_tgt,  the minimum-norm argmin_F ||X_src F - X_tgt||_F.

    When X_src (n x p) has rank n (no more probes than features) X_src F = X_tgt exactly, so
    CKA(X_src F, X_tgt) = 1 by construction on the probes F was fitted on.

    **Invariants**: ``test_cka_one_for_fit_on_own_probes``.
    """
    require_matrix(x_src, "x_src")
    require_matrix(x_tgt, "x_tgt")
    if x_src.shape[0] != x_tgt.shape[0]:
        raise ValueError("x_src and x_tgt must have the same number of rows (probes)")
    xp = namespace(x_src, x_tgt)
    return xp.matmul(xp.linalg.pinv(to_work(x_src)), to_work(x_tgt))


def twonn_intrinsic_dimension(points: Array, *, discard_fraction: float = 0.1) -> float:
    """Intrinsic dimension of a point cloud from ratios of second to first neighbour distances.

    **Source**: Facco, d'Errico, Rodriguez & Laio (2017), "Estimating the intrinsic dimension of
    datasets by a minimal neighborhood information", Sci. Rep. 7, 12140, eq. (4) and the
    linear fit of section "The TWO-NN estimator".

    mu_i = r2_i / r1_i ~ Pareto(d): F(mu) = 1 - mu^(-d). Sort mu, F_i = i/N, keep the lowest
    (1 - discard_fraction) N points (the paper discards the largest 10%, a convention), and fit
    -log(1 - F_i) = d log(mu_i) through the origin by least squares.

    **Invariants**: invariant under scaling, translation and rotation of the cloud
    (``test_twonn_similarity_invariant``); about 2 for points on a 2-D plane embedded in R^10
    (``test_twonn_plane``).
    """
    require_matrix(points, "points")
    n = points.shape[0]
    if n < 3:
        raise ValueError(f"twonn needs at least 3 points (got {n})")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError("discard_fraction must be in [0, 1)")
    xp = namespace(points)
    x = to_work(points)
    sq = xp.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * xp.matmul(x, xp.matrix_transpose(x))
    d2 = xp.clip(d2, min=0.0)
    eye = xp.eye(n, dtype=x.dtype, device=device(x))
    d2 = xp.where(eye > 0, xp.full_like(d2, float("inf")), d2)
    two = xp.sort(d2, axis=1)[:, :2]
    r1 = xp.sqrt(two[:, 0])
    r2 = xp.sqrt(two[:, 1])
    if bool(xp.any(r1 <= 0)):
        raise ValueError("twonn needs distinct points (a first-neighbour distance is zero)")
    mu = xp.sort(r2 / r1)
    keep = min(max(int((1.0 - discard_fraction) * n), 2), n - 1)  # F = 1 at i = N: log(0)
    i = xp.arange(1, keep + 1, dtype=x.dtype, device=device(x))
    f = i / n
    xs = xp.log(mu[:keep])
    ys = -xp.log(1.0 - f)
    return to_float(xp.sum(xs * ys) / xp.sum(xs * xs))
