"""Low-rank products and subspace comparison: the SVD of a LoRA update B A without forming it,
principal angles between two subspaces, and their overlap against the chance level.

Used to read a trained adapter against its base matrix (``task=lora_svd``): where does the
update point, how large is it next to sigma_k, and how much of it lies in W's structural head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from geometry._xp import Array, device, namespace, require_matrix, to_float, to_work


@dataclass(frozen=True)
class FactoredSVD:
    """Thin SVD of a product B A of rank <= r: B A = U diag(s) Vt.

    u: m x r orthonormal columns; s: r singular values, descending; vt: r x n orthonormal rows.
    """

    u: Array
    s: Array
    vt: Array


def factored_svd(b: Array, a: Array) -> FactoredSVD:
    """Thin SVD of the product B A (m x r times r x n) from the factors alone.

    **Source**: Golub & Van Loan (4th ed.), section 5.4 (QR) and 8.6 (SVD); the standard
    reduction for a product of thin factors, as in Halko, Martinsson & Tropp (2011), section 5.1.

    B = Q_B R_B,  A^T = Q_A R_A  (thin QR),  R_B R_A^T = U_M diag(s) V_M^T  (r x r SVD),
    B A = (Q_B U_M) diag(s) (Q_A V_M)^T.
    Cost O((m + n) r^2); no m x n matrix is formed. Computed in float64 where the device has it.

    **Invariants**: U diag(s) Vt reconstructs B A (``test_factored_svd_reconstructs``); s equals
    ``scipy.linalg.svdvals(B A)`` (``test_factored_svd_matches_scipy``); unchanged under the
    gauge B -> B G, A -> G^-1 A for any invertible G (``test_factored_svd_gauge_invariant``).
    """
    require_matrix(b, "b")
    require_matrix(a, "a")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"need b.shape[1] == a.shape[0] (got {tuple(b.shape)}, {tuple(a.shape)})")
    xp = namespace(b, a)
    b, a = to_work(b), to_work(a)
    qb, rb = xp.linalg.qr(b)  # (m, r'), (r', r) with r' = min(m, r)
    qa, ra = xp.linalg.qr(xp.matrix_transpose(a))  # (n, r''), (r'', r)
    um, s, vmt = xp.linalg.svd(xp.matmul(rb, xp.matrix_transpose(ra)), full_matrices=False)
    return FactoredSVD(u=xp.matmul(qb, um), s=s, vt=xp.matrix_transpose(xp.matmul(qa, xp.matrix_transpose(vmt))))


def principal_angle_cosines(q1: Array, q2: Array) -> Array:
    """Cosines of the principal angles between span(Q1) and span(Q2), descending.

    **Source**: Bjorck & Golub (1973), "Numerical methods for computing angles between linear
    subspaces", Math. Comp. 27(123), section 3 (the SVD of Q1^T Q2).

    cos theta_i = s_i(Q1^T Q2),  i = 1 .. min(d1, d2);  Q1 (n x d1), Q2 (n x d2) orthonormal.

    Columns must be orthonormal: ``||Q^T Q - I||_F <= sqrt(eps) * sqrt(d)`` in the working dtype
    (a frame from QR or SVD in that dtype is orthonormal to O(eps n), far below this; an
    unnormalised matrix is far above it), else ValueError.

    **Invariants**: every cosine lies in [0, 1] (``test_principal_cosines_bounds``); symmetric in
    Q1, Q2 (``test_principal_cosines_symmetric``); unchanged by a change of basis Q -> Q R, R
    orthogonal (``test_principal_cosines_basis_invariant``).
    """
    _check_frames(q1, q2)
    xp = namespace(q1, q2)
    cos = xp.linalg.svdvals(xp.matmul(xp.matrix_transpose(to_work(q1)), to_work(q2)))
    return xp.clip(cos, min=0.0, max=1.0)  # rounding can leave 1 + O(eps)


def subspace_overlap(q1: Array, q2: Array) -> float:
    """Fraction of the smaller subspace that lies inside the larger: mean squared cosine.

    **Source**: the projection (chordal) similarity of two subspaces, Edelman, Arias & Smith
    (1998), section 4.3; principal angles by Bjorck & Golub (1973).

    overlap = ||Q1^T Q2||_F^2 / min(d1, d2) = mean_i cos^2 theta_i.
    1 iff the smaller subspace lies inside the larger; 0 iff they are orthogonal. For a uniformly
    random subspace the expected value is :func:`random_subspace_overlap`.

    **Invariants**: 0 <= overlap <= 1 (``test_subspace_overlap_bounds``); a subspace overlaps
    itself fully (``test_subspace_overlap_self_is_one``); invariant under a common rotation of
    the ambient space (``test_subspace_overlap_rotation_invariant``).
    """
    cos = principal_angle_cosines(q1, q2)
    xp = namespace(cos)
    return to_float(xp.mean(cos * cos))


def random_subspace_overlap(d1: int, d2: int, n: int) -> float:
    """Expected :func:`subspace_overlap` of a fixed d2-dimensional subspace of R^n and a
    uniformly random d1-dimensional one (the chance level an adapter's overlap is read against).

    **Source**: for P the orthogonal projector onto the fixed subspace and Q1 Haar-distributed,
    E Q1 Q1^T = (d1/n) I, so E ||Q1^T Q2||_F^2 = tr(P E Q1 Q1^T) = d1 d2 / n (Chikuse 2003,
    Statistics on Special Manifolds, section 2.2).

    chance = d1 d2 / (n min(d1, d2)) = max(d1, d2) / n.

    **Invariants**: 0 < chance <= 1 and symmetric in d1, d2
    (``test_random_subspace_overlap_matches_simulation`` checks it against sampled subspaces).
    """
    if not (1 <= d1 <= n and 1 <= d2 <= n):
        raise ValueError(f"need 1 <= d1, d2 <= n (got d1={d1}, d2={d2}, n={n})")
    return max(d1, d2) / n


def _check_frames(q1: Array, q2: Array) -> None:
    require_matrix(q1, "q1")
    require_matrix(q2, "q2")
    if q1.shape[0] != q2.shape[0]:
        raise ValueError(f"q1 and q2 must share the ambient dimension (got {q1.shape[0]}, {q2.shape[0]})")
    for name, q in (("q1", q1), ("q2", q2)):
        xp = namespace(q)
        w = to_work(q)
        d = w.shape[1]
        if d > w.shape[0]:
            raise ValueError(f"{name}: more columns than rows cannot be orthonormal (got {tuple(q.shape)})")
        err = to_float(xp.linalg.matrix_norm(xp.matmul(xp.matrix_transpose(w), w) - xp.eye(d, dtype=w.dtype, device=device(w))))
        tol = math.sqrt(xp.finfo(w.dtype).eps) * math.sqrt(d)
        if not err <= tol:
            raise ValueError(f"{name}: columns must be orthonormal (||Q^T Q - I||_F = {err:.3g} > {tol:.3g})")
