"""Stiefel projection and the Cayley retraction (float64, seeded inputs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from matrices import orthonormal

import geometry as g

# (n, r, seed, step): r <= n, steps up to 10 (large steps still land on the manifold)
frames = st.tuples(st.integers(2, 40), st.integers(1, 6), st.integers(0, 10_000), st.floats(-10, 10)).filter(
    lambda t: t[1] <= t[0]
)


def setup(t):
    n, r, seed, step = t
    rng = np.random.default_rng(seed)
    return orthonormal(rng, n, r), rng.standard_normal((n, r)), step


def dense_cayley(x, d, step):
    """Oracle: the n x n Cayley transform of A = P X^T - X P^T (the form Woodbury avoids)."""
    n = x.shape[0]
    p = d - 0.5 * x @ (x.T @ d)
    a = p @ x.T - x @ p.T
    return np.linalg.solve(np.eye(n) - step / 2 * a, (np.eye(n) + step / 2 * a) @ x)


@given(frames)
def test_retraction_keeps_orthonormality(t):
    x, d, step = setup(t)
    # tolerance: float64 inverse of an r x r matrix with ||K^-1|| <= 1; 1e-10 leaves ~1e5 ulps
    assert g.orthogonality_error(g.cayley_retract(x, d, step)) < 1e-10


@given(frames)
def test_zero_step_identity(t):
    x, d, _ = setup(t)
    assert np.array_equal(g.cayley_retract(x, d, 0.0), x)


@pytest.mark.parametrize("series", [False, True])
@given(t=frames)
def test_retraction_matches_dense_cayley(series, t):
    x, d, step = setup(t)
    # tolerance: two float64 solves of a well-conditioned system (|eigenvalues| >= 1); with
    # series=True, small steps take K^-1 from its Neumann series (exact to eps64)
    step = step if not series else step * 1e-3
    np.testing.assert_allclose(g.cayley_retract(x, d, step, series=series),
                               dense_cayley(x, d, step), atol=1e-9)


@given(frames)
def test_displacement_is_retraction(t):
    x, d, step = setup(t)
    # tolerance: as test_retraction_matches_dense_cayley, against the oracle's Y - X
    np.testing.assert_allclose(g.cayley_displacement(x, d, step), dense_cayley(x, d, step) - x, atol=1e-9)


@pytest.mark.parametrize(("dtype", "norm", "series"), [
    (np.float64, 0.0, True), (np.float64, 1e-9, True), (np.float64, 1e-5, True),
    (np.float64, 1e-2, False),  # 7 terms to reach eps64: more than SERIES_MAX_TERMS
    (np.float32, 1e-2, True), (np.float32, 0.3, False),
])
def test_near_identity_inverse_matches_lu(dtype, norm, series):
    from geometry.stiefel import _near_identity_inverse

    rng = np.random.default_rng(0)
    f = rng.standard_normal((40, 40))
    f = (f * norm / np.linalg.norm(f)).astype(dtype)
    k, eye = np.eye(40, dtype=dtype) - f, np.eye(40, dtype=dtype)
    inv = _near_identity_inverse(np, k, eye)
    assert (inv is not None) == series
    if series:
        # tolerance: the series' remainder is below eps; both inverses round at ~40 eps
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(inv, np.linalg.inv(k.astype(np.float64)), rtol=0,
                                   atol=100 * eps)


def test_near_identity_inverse_declines_large_or_nan_norms():
    from geometry.stiefel import _near_identity_inverse

    eye = np.eye(3)
    assert _near_identity_inverse(np, eye - 0.3 * np.ones((3, 3)), eye) is None  # ||F|| = 0.9
    assert _near_identity_inverse(np, eye * np.nan, eye) is None


@given(frames)
def test_retraction_first_order(t):
    x, d, _ = setup(t)
    h = 1e-6
    fd = (g.cayley_retract(x, d, h) - x) / h
    # tolerance: O(h ||A||^2) truncation error plus O(eps/h) rounding
    np.testing.assert_allclose(fd, g.stiefel_project(x, d), atol=1e-4 * (1 + np.abs(d).sum()))


@given(frames)
def test_retraction_ignores_normal_component(t):
    x, d, step = setup(t)
    r = x.shape[1]
    s = np.random.default_rng(0).standard_normal((r, r))
    normal = x @ (s + s.T)  # X S, S symmetric: the normal space under the Euclidean metric
    np.testing.assert_allclose(g.cayley_retract(x, d + normal, step), g.cayley_retract(x, d, step), atol=1e-9)


@given(frames)
def test_projection_is_tangent(t):
    x, d, _ = setup(t)
    p = g.stiefel_project(x, d)
    np.testing.assert_allclose(x.T @ p + p.T @ x, 0.0, atol=1e-12 * (1 + np.abs(d).max()))


@given(frames)
def test_projection_idempotent(t):
    x, d, _ = setup(t)
    p = g.stiefel_project(x, d)
    np.testing.assert_allclose(g.stiefel_project(x, p), p, atol=1e-12 * (1 + np.abs(d).max()))


@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 1000))
def test_orthogonality_error_zero_on_manifold(n, r, seed):
    if r > n:
        return
    assert g.orthogonality_error(orthonormal(np.random.default_rng(seed), n, r)) < 1e-13


def test_retraction_is_a_descent_step_on_a_quadratic():
    # minimise f(X) = -tr(X^T M X): the top-r eigenspace; Riemannian gradient steps with the
    # Cayley retraction reach it (a Stiefel sanity check, not a trainer test).
    rng = np.random.default_rng(0)
    n, r = 20, 3
    m = rng.standard_normal((n, n))
    m = m @ m.T
    x = orthonormal(rng, n, r)
    for _ in range(300):
        x = g.cayley_retract(x, 2 * m @ x, 0.5 / np.linalg.norm(m, 2))
    top = np.linalg.eigvalsh(m)[-r:].sum()
    assert np.trace(x.T @ m @ x) == pytest.approx(top, rel=1e-6)


def test_cayley_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        g.cayley_retract(np.eye(4, 2), np.ones((4, 3)), 0.1)
    with pytest.raises(ValueError, match="r <= n"):
        g.cayley_retract(np.ones((2, 3)), np.ones((2, 3)), 0.1)
