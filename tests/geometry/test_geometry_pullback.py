"""The pullback metric P = (I + Z)(I + Z)^T of the NB-LoRA map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import geometry.readings as rd
from geometry.pullback import pullback_metric, pullback_metric_deviation

shapes = st.tuples(st.integers(1, 6), st.integers(6, 20), st.integers(1, 20),
                   st.floats(1e-3, 2.0), st.integers(0, 10_000))


def free(t):
    r, n_in, n_out, scale, seed = t
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((r, n_in)), scale * rng.standard_normal((r, n_out))


@given(shapes)
def test_pullback_positive_definite(t):
    p = pullback_metric(*free(t))
    np.testing.assert_allclose(p, p.T, rtol=0, atol=1e-12 * max(1.0, np.abs(p).max()))
    assert np.linalg.eigvalsh(p).min() > 0  # I + Z is invertible (its symmetric part is >= I)


@given(shapes)
def test_pullback_skew_part_cancels(t):
    a, b = free(t)
    y, z = rd.nb_lora_generator(a, b)
    expected = 2.0 * y.T @ y + z @ z.T
    p = pullback_metric(a, b)
    # float64 rounding of the products, relative to the largest entry
    np.testing.assert_allclose(p - np.eye(len(p)), expected, rtol=0,
                               atol=1e-12 * max(1.0, np.abs(p).max()))


def test_pullback_identity_when_z_vanishes():
    r, n_in, n_out = 3, 5, 4
    a = np.zeros((r, n_in))
    s = np.random.default_rng(0).standard_normal((r, r))
    a[:, :r] = s + s.T  # X symmetric (X - X^T = 0), Y = 0: Z = 0
    b = np.zeros((r, n_out))
    np.testing.assert_array_equal(pullback_metric(a, b), np.eye(r))
    assert pullback_metric_deviation(a, b) == 0.0
    b[0, 0] = 1e-3
    assert pullback_metric_deviation(a, b) > 0


def test_pullback_deviation_at_seed_start():
    """A~, B~ ~ N(0, 0.01^2) at LFM2-350M's hidden size: Y^T Y ~ c I, c = s0^2 (n_in + n_out - r),
    deviation ~ 2c + c^2 (about 0.45 here, not the 1.4e-3 the seed measured)."""
    r, n, s0 = 8, 1024, 0.01
    rng = np.random.default_rng(3)
    a, b = s0 * rng.standard_normal((r, n)), s0 * rng.standard_normal((r, n))
    c = s0**2 * (2 * n - r)
    # 5%: Y^T Y's diagonal has relative sd sqrt(2 / (2n - r)) ~ 3% per entry, averaged over r
    assert pullback_metric_deviation(a, b) == pytest.approx(2 * c + c**2, rel=0.05)


def test_nb_lora_factors_unchanged_by_generator():
    """nb_lora_factors built from nb_lora_generator still has orthonormal columns."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 9)), rng.standard_normal((4, 7))
    f = rd.nb_lora_factors(a, b, np.ones(4), 1.0)
    q = np.concatenate([f.a.T, f.b.T])
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)


def test_domain_edges():
    with pytest.raises(ValueError, match="share r"):
        pullback_metric(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="r <= n_in"):
        pullback_metric(np.zeros((5, 2)), np.zeros((5, 2)))


def test_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 6)), rng.standard_normal((3, 5))
    assert pullback_metric_deviation(xps.asarray(a), xps.asarray(b)) == pytest.approx(
        pullback_metric_deviation(a, b), rel=1e-12)
