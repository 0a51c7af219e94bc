"""CKA, Procrustes (scipy oracle), the seed's pinv map, TwoNN."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from matrices import orthonormal

import geometry as g

pairs = st.tuples(st.integers(4, 40), st.integers(1, 8), st.integers(1, 8), st.integers(0, 10_000)).map(
    lambda t: (np.random.default_rng(t[3]).standard_normal((t[0], t[1])),
               np.random.default_rng(t[3] + 1).standard_normal((t[0], t[2])))
)


@given(pairs)
def test_cka_bounds(xy):
    x, y = xy
    assert 0.0 <= g.cka(x, y) <= 1.0
    assert g.cka(x, x) == pytest.approx(1.0, rel=1e-12)


@given(pairs)
def test_cka_symmetric(xy):
    x, y = xy
    assert g.cka(x, y) == pytest.approx(g.cka(y, x), rel=1e-12)


@given(pairs, st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_cka_scale_invariant(xy, a, b):
    x, y = xy
    assert g.cka(a * x, b * y) == pytest.approx(g.cka(x, y), rel=1e-9)


@given(pairs)
def test_cka_orthogonal_invariant(xy):
    x, y = xy
    q = orthonormal(np.random.default_rng(7), x.shape[1], x.shape[1])
    assert g.cka(x @ q, y) == pytest.approx(g.cka(x, y), rel=1e-9, abs=1e-12)


@given(st.integers(2, 20), st.integers(0, 10_000))
def test_cka_one_for_fit_on_own_probes(n, seed):
    rng = np.random.default_rng(seed)
    x_src = rng.standard_normal((n, n + 5))  # rank n: at most as many probes as features
    x_tgt = rng.standard_normal((n, 7))
    f = g.procrustes_pinv_map(x_src, x_tgt)
    assert g.cka(x_src @ f, x_tgt) == pytest.approx(1.0, abs=1e-8)  # PROVEN in-sample


def test_cka_held_out_is_not_one(rng):
    x_src, x_tgt = rng.standard_normal((40, 50)), rng.standard_normal((40, 7))
    f = g.procrustes_pinv_map(x_src[:20], x_tgt[:20])
    assert g.cka(x_src[20:] @ f, x_tgt[20:]) < 0.9  # unrelated data: no out-of-sample alignment


def test_cka_golden():
    x = np.array([[1.0], [2.0], [3.0]])
    assert g.cka(x, -x) == pytest.approx(1.0)
    assert g.cka(np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1]]), np.array([[1.0], [0], [-1], [0]])) == pytest.approx(
        1 / np.sqrt(2)
    )


def test_cka_rejects_constant():
    with pytest.raises(ValueError, match="non-constant"):
        g.cka(np.ones((4, 2)), np.arange(8.0).reshape(4, 2))


@given(st.integers(2, 8), st.integers(3, 30), st.integers(0, 1000))
def test_procrustes_orthogonal(p, n, seed):
    rng = np.random.default_rng(seed)
    r = g.procrustes(rng.standard_normal((n, p)), rng.standard_normal((n, p))).rotation
    np.testing.assert_allclose(r.T @ r, np.eye(p), atol=1e-12)


@given(st.integers(2, 8), st.integers(10, 30), st.integers(0, 1000))
def test_procrustes_recovers_rotation(p, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    q = orthonormal(rng, p, p)
    fit = g.procrustes(x, x @ q)
    np.testing.assert_allclose(fit.rotation, q, atol=1e-10)
    assert fit.residual < 1e-10


@given(st.integers(2, 8), st.integers(3, 30), st.integers(0, 1000))
def test_procrustes_matches_scipy(p, n, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, p)), rng.standard_normal((n, p))
    r, scale = scipy.linalg.orthogonal_procrustes(x, y)
    fit = g.procrustes(x, y)
    np.testing.assert_allclose(fit.rotation, r, atol=1e-10)
    assert fit.scale == pytest.approx(scale, rel=1e-12)


@given(st.floats(0.01, 100), st.integers(0, 100))
def test_twonn_similarity_invariant(c, seed):
    rng = np.random.default_rng(seed)
    pts = rng.standard_normal((60, 3))
    q = orthonormal(rng, 3, 3)
    moved = c * pts @ q + 5.0
    assert g.twonn_intrinsic_dimension(moved) == pytest.approx(g.twonn_intrinsic_dimension(pts), rel=1e-6)


def test_twonn_plane():
    rng = np.random.default_rng(0)
    basis = orthonormal(rng, 10, 2)
    pts = rng.uniform(size=(800, 2)) @ basis.T
    # TwoNN's statistical error at N = 800 is about d / sqrt(N) ~ 0.07; 0.3 is a 4-sigma band
    assert g.twonn_intrinsic_dimension(pts) == pytest.approx(2.0, abs=0.3)


def test_twonn_rejects_duplicates():
    with pytest.raises(ValueError, match="distinct"):
        g.twonn_intrinsic_dimension(np.zeros((5, 2)))
