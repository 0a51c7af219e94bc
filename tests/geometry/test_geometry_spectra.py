"""Spectral primitives: goldens, one property test per docstring invariant, scipy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from matrices import planted_weight

import geometry as g

# Spectra: non-negative, finite, not all zero, moderate dynamic range.
spectra = arrays(
    np.float64, st.integers(2, 40), elements=st.floats(0.0, 1e3, allow_nan=False)
).filter(lambda s: s.max() > 1e-6)
scales = st.floats(1e-3, 1e3)
matrices = st.tuples(st.integers(2, 30), st.integers(2, 30), st.integers(0, 10_000)).map(
    lambda t: np.random.default_rng(t[2]).standard_normal((t[0], t[1]))
)


def desc(s: np.ndarray) -> np.ndarray:
    return np.sort(s)[::-1].copy()


# --- goldens ---------------------------------------------------------------------------------


def test_goldens_effective_rank():
    assert g.effective_rank([1, 1, 1]) == 3
    assert g.effective_rank([1, 0, 0]) == 1
    assert g.effective_rank_squared([1, 1, 1]) == 3
    # p = (2/3, 1/3): H = log 3 - (2/3) log 2
    assert g.effective_rank([2, 1]) == pytest.approx(math.exp(math.log(3) - 2 / 3 * math.log(2)), rel=1e-14)


def test_goldens_stable_rank_and_structure():
    assert g.stable_rank([2, 1]) == pytest.approx(1.25)  # (4 + 1) / 4
    sr = g.structural_rank([4.0, 4.0, 1.0, 0.5])
    assert sr.k == math.floor(g.effective_rank([4, 4, 1, 0.5]))
    assert sr.tail_dims == 4 - sr.k
    assert sr.sigma_k == [4.0, 4.0, 1.0, 0.5][sr.k - 1]
    assert g.spectral_knee([10.0, 9.0, 1.0, 0.9]) == 2  # largest ratio 9/1 after the 2nd value
    assert g.noise_floor([2.0, 1.0], 2.0**-23, dims=10) == 2.0**-23 * 2.0 * 10


@pytest.mark.parametrize("bad", [[], [-1.0, 1.0], [0.0, 0.0], [np.nan, 1.0], [[1.0, 2.0]]])
def test_effective_rank_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        g.effective_rank(bad)


def test_structural_rank_rejects_ascending_and_short():
    with pytest.raises(ValueError, match="descending"):
        g.structural_rank([1.0, 2.0])
    with pytest.raises(ValueError, match="q >= 2"):
        g.structural_rank([1.0])


# --- invariants ------------------------------------------------------------------------------


@given(spectra)
def test_erank_bounds(s):
    nnz = int(np.count_nonzero(s))
    assert 1.0 <= g.effective_rank(s) <= nnz <= len(s)


@given(spectra, scales)
def test_erank_scale_invariant(s, c):
    # tolerance: log/exp of rescaled sums, a few ulps per term
    assert g.effective_rank(c * s) == pytest.approx(g.effective_rank(s), rel=1e-10)


@given(spectra, st.randoms(use_true_random=False))
def test_erank_permutation_invariant(s, r):
    p = s.copy()
    r.shuffle(p)
    assert g.effective_rank(p) == pytest.approx(g.effective_rank(s), rel=1e-10)  # summation order


@given(spectra)
def test_erank_dominates_squared(s):
    # Renyi-type ordering: squaring concentrates the distribution; 1e-12 for rounding
    assert g.effective_rank(s) >= g.effective_rank_squared(s) * (1 - 1e-12)


@given(spectra)
def test_erank_squared_bounds(s):
    assert 1.0 <= g.effective_rank_squared(s) <= len(s)


@given(spectra, scales)
def test_erank_squared_scale_invariant(s, c):
    assert g.effective_rank_squared(c * s) == pytest.approx(g.effective_rank_squared(s), rel=1e-10)


@given(spectra)
def test_stable_rank_bounds(s):
    assert 1.0 <= g.stable_rank(s) <= np.count_nonzero(s)


@given(spectra, scales)
def test_stable_rank_scale_invariant(s, c):
    assert g.stable_rank(c * s) == pytest.approx(g.stable_rank(s), rel=1e-10)


@given(spectra)
def test_structural_rank_bounds(s):
    sr = g.structural_rank(desc(s))
    assert 1 <= sr.k <= sr.q - 1 and sr.tail_dims == sr.q - sr.k >= 1
    assert g.tail_dims(desc(s)) == sr.tail_dims


@given(spectra, st.sampled_from([0.5, 2.0, 8.0]))
def test_structural_rank_scale_invariant(s, c):
    # powers of two (and 0.5) rescale exactly, so floor(erank) cannot flip at an integer edge
    assert g.structural_rank(c * desc(s)).k == g.structural_rank(desc(s)).k


@given(spectra)
def test_knee_bounds(s):
    assert 1 <= g.spectral_knee(desc(s)) <= len(s) - 1


@given(spectra, st.sampled_from([0.5, 2.0, 8.0]))
def test_knee_scale_invariant(s, c):
    # powers of two rescale exactly unless a value underflows into the subnormals (or to 0)
    assume(np.all((s == 0) | (c * s >= np.finfo(np.float64).tiny)))
    assert g.spectral_knee(c * desc(s)) == g.spectral_knee(desc(s))


@given(st.integers(1, 20), st.integers(1, 20))
def test_knee_finds_planted_drop(head, tail):
    s = np.concatenate([np.linspace(10, 9, head), np.linspace(1, 0.9, tail)])
    assert g.spectral_knee(s) == head


def test_knee_ignores_values_below_floor():
    s = np.array([3.0, 2.0, 1.0, 1e-12])
    assert g.spectral_knee(s) == 3
    assert g.spectral_knee(s, floor=g.noise_floor(s, 2.0**-23)) == 2  # 2/1 beats 3/2


@given(spectra, scales)
def test_decay_scale_invariant(s, c):
    s = desc(s)
    if np.count_nonzero(s) < 2:
        return
    assert g.spectral_decay(c * s) == pytest.approx(g.spectral_decay(s), rel=1e-8, abs=1e-10)


@given(st.floats(0.1, 3.0), st.integers(3, 50))
def test_decay_recovers_power_law(alpha, q):
    s = np.arange(1, q + 1, dtype=np.float64) ** -alpha
    assert g.spectral_decay(s) == pytest.approx(alpha, rel=1e-10)  # exact line in log-log


@given(spectra, scales)
def test_noise_floor_scale_equivariant(s, c):
    assert g.noise_floor(c * s, 1e-7) == pytest.approx(c * g.noise_floor(s, 1e-7), rel=1e-12)


# --- singular values: oracles and invariants -------------------------------------------------


@given(matrices)
def test_singular_values_descending(w):
    s = g.singular_values(w)
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)


@given(matrices)
def test_singular_values_match_scipy(w):
    # tolerance: both are LAPACK SVDs in float64; 1e-12 relative to s_1
    np.testing.assert_allclose(g.singular_values(w), scipy.linalg.svdvals(w), atol=1e-12 * np.linalg.norm(w, 2))


@given(matrices)
def test_gram_singular_values_match_svd(w):
    s = scipy.linalg.svdvals(w)
    # documented accuracy: absolute error <= ~sqrt(eps64) * s_1
    np.testing.assert_allclose(g.gram_singular_values(w), s, atol=4 * math.sqrt(2.0**-52) * s[0])


@given(matrices)
def test_gram_singular_values_float32_gram(w):
    s = scipy.linalg.svdvals(w.astype(np.float32).astype(np.float64))
    got = g.gram_singular_values(w.astype(np.float32), gram_in_input_dtype=True)
    # documented accuracy: ~sqrt(c * eps32) * s_1, c <= 16 for these small sizes
    np.testing.assert_allclose(got, s, atol=4 * math.sqrt(2.0**-23) * s[0])


def test_gram_singular_values_float32_input_upcasts():
    w = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    assert g.gram_singular_values(w).dtype == np.float64


@given(matrices, st.integers(1, 5))
def test_top_singular_values_lower_bound(w, k):
    k = min(k, min(w.shape))
    top = g.top_singular_values(w, k, oversample=3, n_iter=1, seed=0)
    exact = scipy.linalg.svdvals(w)[:k]
    assert np.all(top <= exact * (1 + 1e-10))  # interlacing: s_j(Q^T W) <= s_j(W)


def test_top_singular_values_exact_low_rank(rng):
    w = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 150))
    top = g.top_singular_values(w, 4, oversample=4, n_iter=0, seed=1)
    np.testing.assert_allclose(top, scipy.linalg.svdvals(w)[:4], rtol=1e-10)  # range captured exactly


def test_top_singular_values_planted_spectrum(rng):
    w = planted_weight(rng, 300, 200, decay=1.0)
    top = g.top_singular_values(w, 5, oversample=10, n_iter=2, seed=0)
    # bound: error <= ||(I - QQ^T) W|| ~ s_{k+p+1} ((k+p+1)^-1) raised to 1/(2q+1); here < 5%
    np.testing.assert_allclose(top, scipy.linalg.svdvals(w)[:5], rtol=5e-2)


@given(matrices)
def test_power_iteration_lower_bound(w):
    assert g.top_singular_value_power(w, 10, seed=0) <= scipy.linalg.svdvals(w)[0] * (1 + 1e-12)


@given(matrices, scales)
def test_power_iteration_scale_equivariant(w, c):
    assert g.top_singular_value_power(c * w, 10, 0) == pytest.approx(c * g.top_singular_value_power(w, 10, 0), rel=1e-10)


def test_power_iteration_converges(rng):
    w = planted_weight(rng, 80, 60, decay=1.0)  # s_2/s_1 = 1/2: 50 iterations converge fully
    assert g.top_singular_value_power(w, 50, 0) == pytest.approx(1.0, rel=1e-12)


def test_singular_values_reject_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        g.singular_values(np.ones(3))
    with pytest.raises(ValueError, match="k must satisfy"):
        g.top_singular_values(np.ones((3, 3)), 4)
