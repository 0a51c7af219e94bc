"""The Stiefel manifold St(n, r) = {X in R^{n x r}: X^T X = I}: tangent projection and the
Cayley retraction in its low-rank (Woodbury) form.

All functions stay in the input's namespace, dtype and device: they run every training step.
"""

from __future__ import annotations

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


def cayley_retract(x: Array, direction: Array, step) -> Array:
    """Move x along the projected direction and retract onto St(n, r) with the Cayley transform.

    **Source**: Wen & Yin (2013), "A feasible method for optimization with orthogonality
    constraints", Math. Program. 142, eq. (7) and Lemma 4(1) (Sherman-Morrison-Woodbury form);
    Li, Li & Todorovic (2020), "Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform", ICLR, eq. (4).

    With D the ambient direction, P = D - X (X^T D) / 2 and the skew matrix A = P X^T - X P^T
    (so A X = P_x(D), the tangent projection), the Cayley curve is
        Y(t) = (I - t/2 A)^{-1} (I + t/2 A) X,
    and with A = U V^T, U = [P, X], V = [X, -P] (n x 2r), Woodbury gives
        Y(t) = X + t U (I_2r - t/2 V^T U)^{-1} V^T X.
    Only a 2r x 2r system is solved: cost O(n r^2); no n x n matrix is formed. No damping is
    needed: A is skew, so I - t/2 A has eigenvalues 1 - i t theta/2 (modulus >= 1) and the small
    system shares its non-unit eigenvalues, hence it is never singular.

    **Invariants**: the result has orthonormal columns (``test_retraction_keeps_orthonormality``);
    step 0 returns x (``test_zero_step_identity``); (Y(t) - X)/t -> P_x(D) as t -> 0
    (``test_retraction_first_order``); the normal component X S (S symmetric) of D is ignored
    (``test_retraction_ignores_normal_component``).
    """
    _check_pair(x, direction)
    xp = namespace(x, direction)
    n, r = x.shape
    xt = xp.matrix_transpose(x)
    # Four n-length products (8 n r^2 flops) give every r x r block: X^T D, X^T X, P^T P, and
    # X^T P = X^T D - (X^T X)(X^T D) / 2 without a fifth; V^T U = [[X^T P, X^T X],
    # [-P^T P, -P^T X]] and V^T X = [X^T X; -P^T X].
    xtd = xp.matmul(xt, direction)
    xtx = xp.matmul(xt, x)
    p = direction - 0.5 * xp.matmul(x, xtd)  # (n, r)
    xtp = xtd - 0.5 * xp.matmul(xtx, xtd)
    ptp = xp.matmul(xp.matrix_transpose(p), p)
    ptx = xp.matrix_transpose(xtp)
    vtu = xp.concat([xp.concat([xtp, xtx], axis=1), xp.concat([-ptp, -ptx], axis=1)], axis=0)
    vtx = xp.concat([xtx, -ptx], axis=0)  # (2r, r)
    small = xp.eye(2 * r, dtype=x.dtype, device=device(x)) - (0.5 * step) * vtu
    z = xp.linalg.solve(small, vtx)  # (2r, r)
    # U z = P z_top + X z_bottom, without forming U = [P, X] (4 n r^2 flops)
    return x + step * (xp.matmul(p, z[:r, :]) + xp.matmul(x, z[r:, :]))


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
    gram = xp.matmul(xp.matrix_transpose(x), x)
    return to_float(xp.linalg.matrix_norm(gram - xp.eye(r, dtype=x.dtype, device=device(x))))


def _check_pair(x: Array, g: Array) -> None:
    require_matrix(x, "x")
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"direction must have x's shape {tuple(x.shape)} (got {tuple(g.shape)})")
    if x.shape[1] > x.shape[0]:
        raise ValueError(f"x must be n x r with r <= n (got shape={tuple(x.shape)})")
