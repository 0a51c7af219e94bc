"""The Stiefel manifold St(n, r) = {X in R^{n x r}: X^T X = I}: tangent projection and the
Cayley retraction in its low-rank (Woodbury) form, reduced to one r x r matrix.

All functions stay in the input's namespace, dtype and device: they run every training step.
"""

from __future__ import annotations

import math

from geometry._xp import Array, device, namespace, require_matrix, to_float


def _sym(xp, a: Array) -> Array:
    return 0.5 * (a + xp.matrix_transpose(a))


def stiefel_project(x: Array, g: Array) -> Array:
    """Project an ambient direction onto the tangent space of St(n, r) at x (Euclidean metric).

    **Source**: Edelman, Arias & Smith (1998), "The geometry of algorithms with orthogonality
    constraints", eq. (2.4); Absil, Mahony & Sepulchre (2008), Example 3.6.2.

    P_x(G) = G - X sym(X^T G),  sym(A) = (A + A^T) / 2.

    **Invariants**: the result is tangent, X^T P + P^T X = 0 (``test_projection_is_tangent``);
    projecting twice changes nothing (``test_projection_idempotent``).
    """
    _check_pair(x, g)
    xp = namespace(x, g)
    return g - xp.matmul(x, _sym(xp, xp.matmul(xp.matrix_transpose(x), g)))


def cayley_retract(x: Array, direction: Array, step, *, series: bool = False) -> Array:
    """Move x along the projected direction and retract onto St(n, r) with the Cayley transform.

    **Source**: Wen & Yin (2013), "A feasible method for optimization with orthogonality
    constraints", Math. Program. 142, eq. (7) and Lemma 4(1) (Sherman-Morrison-Woodbury form);
    Li, Li & Todorovic (2020), "Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform", ICLR, eq. (4).

    With D the ambient direction, P = D - X (X^T D) / 2 and the skew matrix A = P X^T - X P^T
    (so A X = P_x(D), the tangent projection), the Cayley curve is
        Y(t) = (I - t/2 A)^{-1} (I + t/2 A) X.
    Woodbury with A = U V^T, U = [P, X], V = [X, -P] turns the n x n solve into a 2r x 2r one,
        Y(t) = X + t U (I_2r - t/2 V^T U)^{-1} V^T X,
    and on the manifold (X^T X = I, so that system's top-right block is -t/2 I) eliminating
    its second block row leaves one r x r matrix. With B = X^T D and
    N = D^T D - B^T B = D^T (I - X X^T) D (the normal part's Gram matrix, PSD):
        Y(t) = X + t (D - X Sigma) K^{-1},
        Sigma = sym(B) + (t/2) N,   K = I - (t/2) skew(B) + (t^2/4) N,
    sym(B) = (B + B^T)/2, skew(B) = (B - B^T)/2. K is never singular and ||K^{-1}||_2 <= 1:
    v^T K v = |v|^2 + (t^2/4) v^T N v >= |v|^2. Cost: four n-length products (8 n r^2 flops)
    and O(r^3) for K^{-1}; no n x n matrix is formed. Zero columns of x and direction (padding
    to a common rank) stay zero and leave the other columns unchanged.

    The formula uses X^T X = I: an x off the manifold by E = X^T X - I is carried to a Y with
    Y^T Y - I = E + O(||E|| t ||P||), so rounding drift is not amplified, only not repaired.

    ``series=True`` computes K^{-1} by its Neumann series when that is exact to the dtype's
    epsilon in a few terms (see :func:`_near_identity_inverse`; eager arrays only, since it
    reads ||I - K|| on the host), and by LU otherwise.

    **Invariants**: the result has orthonormal columns (``test_retraction_keeps_orthonormality``);
    step 0 returns x (``test_zero_step_identity``); it equals the dense n x n Cayley transform
    (``test_retraction_matches_dense_cayley``); (Y(t) - X)/t -> P_x(D) as t -> 0
    (``test_retraction_first_order``); the normal component X S (S symmetric) of D is ignored
    (``test_retraction_ignores_normal_component``).
    """
    return x + cayley_displacement(x, direction, step, series=series)


def cayley_displacement(x: Array, direction: Array, step, *, series: bool = False) -> Array:
    """Y(t) - X of :func:`cayley_retract`, (D - X Sigma) (t K^{-1}), without adding X back.

    A trainer that updates its frames in place (X += this) and keeps the step for later (a
    curvature probe along it) saves the passes over n x r arrays that forming Y, then Y - X,
    then copying Y into X would take; t rides on the r x r inverse.

    **Invariants**: it equals the dense Cayley transform minus X
    (``test_displacement_is_retraction``).
    """
    _check_pair(x, direction)
    xp = namespace(x, direction)
    r = x.shape[1]
    # (The standard's operators, @ and .mT, not xp.matmul: this runs for every adapter every
    # step, and a namespace's wrappers cost more than the small products themselves.)
    b = x.mT @ direction  # (r, r)
    bt = b.mT
    normal = direction.mT @ direction - bt @ b
    eye = xp.eye(r, dtype=x.dtype, device=device(x))
    k = eye - (0.25 * step) * (b - bt) + (0.25 * step * step) * normal
    sigma = 0.5 * (b + bt) + (0.5 * step) * normal
    k_inv = _near_identity_inverse(xp, k, eye) if series else None
    if k_inv is None:
        k_inv = xp.linalg.inv(k)
    return (direction - x @ sigma) @ (step * k_inv)


SERIES_MAX_TERMS = 4  # beyond this many products an LU inverse is cheaper (r ~ 100-300 here)


def _near_identity_inverse(xp, k: Array, eye: Array) -> Array | None:
    """K^{-1} = sum_j F^j with F = I - K, truncated after the m-th power where the remainder
    bound f^(m+1) / (1 - f) (f = ||F||_F, at least the spectral norm) is below the dtype's
    epsilon; None when that takes more than ``SERIES_MAX_TERMS`` products. A Cayley step of
    size t moves K from I by O(t ||D||), so for the small steps of training one or two r x r
    products replace an LU inverse, which runs 5-8x slower than a product of the same size on
    this CPU."""
    f = eye - k
    norm = to_float(xp.linalg.matrix_norm(f))
    eps = float(xp.finfo(k.dtype).eps)
    if norm == 0.0:
        return eye
    if not norm < 0.5:  # (NaN too: the LU inverse then carries it into the result)
        return None
    terms = max(math.ceil(math.log(eps * (1.0 - norm)) / math.log(norm)) - 1, 1)
    if terms > SERIES_MAX_TERMS:
        return None
    out = eye + f  # Horner: I + F (I + F (... (I + F)))
    for _ in range(terms - 1):
        out = eye + f @ out
    return out


def orthogonality_error(x: Array) -> float:
    """Distance of x from the Stiefel manifold.

    **Source**: the defining constraint of St(n, r) (Edelman, Arias & Smith 1998, section 2).

    err = || X^T X - I_r ||_F.

    **Invariants**: zero for any orthonormal frame, e.g. a QR factor
    (``test_orthogonality_error_zero_on_manifold``).
    """
    require_matrix(x, "x")
    xp = namespace(x)
    r = x.shape[1]
    return to_float(xp.linalg.matrix_norm(x.mT @ x - xp.eye(r, dtype=x.dtype, device=device(x))))


def _check_pair(x: Array, g: Array) -> None:
    require_matrix(x, "x")
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"direction must have x's shape {tuple(x.shape)} (got {tuple(g.shape)})")
    if x.shape[1] > x.shape[0]:
        raise ValueError(f"x must be n x r with r <= n (got shape={tuple(x.shape)})")
