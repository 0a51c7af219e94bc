"""Factored SVD of B A, principal angles and subspace overlap (geometry.subspaces)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from matrices import orthonormal

from geometry.subspaces import (
    factored_svd,
    principal_angle_cosines,
    random_subspace_overlap,
    subspace_overlap,
)

# (m, n, r, seed): LoRA-like factors B (m x r), A (r x n) with r <= min(m, n).
factors = st.tuples(st.integers(2, 30), st.integers(2, 30), st.integers(1, 6), st.integers(0, 10_000)).map(
    lambda t: (np.random.default_rng(t[3]).standard_normal((t[0], min(t[2], t[0], t[1]))),
               np.random.default_rng(t[3] + 1).standard_normal((min(t[2], t[0], t[1]), t[1])))
)
# (n, d1, d2, seed): two orthonormal frames in R^n.
frames = st.tuples(st.integers(2, 30), st.integers(1, 8), st.integers(1, 8), st.integers(0, 10_000)).map(
    lambda t: (orthonormal(np.random.default_rng(t[3]), t[0], min(t[1], t[0])),
               orthonormal(np.random.default_rng(t[3] + 1), t[0], min(t[2], t[0])))
)


@given(factors)
def test_factored_svd_reconstructs(ba):
    b, a = ba
    f = factored_svd(b, a)
    scale = max(np.linalg.norm(b, 2) * np.linalg.norm(a, 2), 1.0)
    # float64 QR + SVD: backward error a small multiple of eps64 * ||B|| ||A||
    np.testing.assert_allclose((f.u * f.s) @ f.vt, b @ a, atol=1e-12 * scale)
    np.testing.assert_allclose(f.u.T @ f.u, np.eye(f.u.shape[1]), atol=1e-12)  # orthonormal, float64
    np.testing.assert_allclose(f.vt @ f.vt.T, np.eye(f.vt.shape[0]), atol=1e-12)


@given(factors)
def test_factored_svd_matches_scipy(ba):
    b, a = ba
    s = factored_svd(b, a).s
    oracle = scipy.linalg.svdvals(b @ a)[: s.shape[0]]
    # both float64 SVDs of the same operator: agree to eps64 * s_1 times a small factor
    np.testing.assert_allclose(s, oracle, atol=1e-12 * max(oracle[0], 1.0))
    assert np.all(np.diff(s) <= 0)


@given(factors, st.integers(0, 10_000))
def test_factored_svd_gauge_invariant(ba, seed):
    b, a = ba
    r = b.shape[1]
    g = np.random.default_rng(seed).standard_normal((r, r)) + 3 * np.eye(r)  # well conditioned
    s1 = factored_svd(b, a).s
    s2 = factored_svd(b @ g, np.linalg.solve(g, a)).s
    # G G^-1 is formed in float64; cond(G) is small, so the product is exact to ~1e-12 relative
    np.testing.assert_allclose(s2, s1, atol=1e-9 * max(s1[0], 1.0))


def test_factored_svd_rejects_mismatched_factors():
    with pytest.raises(ValueError, match=r"b.shape\[1\] == a.shape\[0\]"):
        factored_svd(np.ones((4, 2)), np.ones((3, 5)))


@given(frames)
def test_principal_cosines_bounds(qq):
    cos = principal_angle_cosines(*qq)
    assert cos.shape[0] == min(qq[0].shape[1], qq[1].shape[1])
    assert np.all((cos >= 0) & (cos <= 1))


@given(frames)
def test_principal_cosines_symmetric(qq):
    q1, q2 = qq
    # singular values of M and M^T agree to eps64 rounding
    np.testing.assert_allclose(principal_angle_cosines(q1, q2), principal_angle_cosines(q2, q1), atol=1e-12)


@given(frames, st.integers(0, 10_000))
def test_principal_cosines_basis_invariant(qq, seed):
    q1, q2 = qq
    r = orthonormal(np.random.default_rng(seed), q1.shape[1], q1.shape[1])
    np.testing.assert_allclose(principal_angle_cosines(q1 @ r, q2), principal_angle_cosines(q1, q2),
                               atol=1e-12)  # float64 rounding of one extra orthogonal product


def test_principal_cosines_match_scipy(rng):
    q1, q2 = orthonormal(rng, 12, 3), orthonormal(rng, 12, 5)
    angles = scipy.linalg.subspace_angles(q1, q2)  # oracle: scipy's Bjorck-Golub implementation
    np.testing.assert_allclose(np.sort(principal_angle_cosines(q1, q2)), np.sort(np.cos(angles)), atol=1e-12)


@given(frames)
def test_subspace_overlap_bounds(qq):
    assert 0.0 <= subspace_overlap(*qq) <= 1.0


@given(frames)
def test_subspace_overlap_self_is_one(qq):
    q1, _ = qq
    assert subspace_overlap(q1, q1) == pytest.approx(1.0, abs=1e-12)  # cosines are 1 to eps64
    # and a subspace inside a larger one is fully overlapped
    if q1.shape[1] >= 2:
        assert subspace_overlap(q1[:, :1], q1) == pytest.approx(1.0, abs=1e-12)


@given(frames, st.integers(0, 10_000))
def test_subspace_overlap_rotation_invariant(qq, seed):
    q1, q2 = qq
    rot = orthonormal(np.random.default_rng(seed), q1.shape[0], q1.shape[0])
    assert subspace_overlap(rot @ q1, rot @ q2) == pytest.approx(subspace_overlap(q1, q2), abs=1e-12)


def test_subspace_overlap_orthogonal_is_zero():
    e = np.eye(6)
    assert subspace_overlap(e[:, :2], e[:, 2:5]) == 0.0


def test_subspace_overlap_rejects_non_orthonormal():
    with pytest.raises(ValueError, match="orthonormal"):
        subspace_overlap(2 * np.eye(5)[:, :2], np.eye(5)[:, :2])


@pytest.mark.parametrize(("n", "d1", "d2"), [(20, 2, 5), (16, 4, 4), (30, 6, 1)])
def test_random_subspace_overlap_matches_simulation(n, d1, d2):
    rng = np.random.default_rng(0)
    fixed = np.eye(n)[:, :d2]
    sims = [subspace_overlap(orthonormal(rng, n, d1), fixed) for _ in range(4000)]
    chance = random_subspace_overlap(d1, d2, n)
    assert chance == random_subspace_overlap(d2, d1, n)
    # 4000 draws of a quantity in [0, 1]: the standard error of the mean is < 0.5/sqrt(4000) = 0.008
    assert np.mean(sims) == pytest.approx(chance, abs=0.025)
