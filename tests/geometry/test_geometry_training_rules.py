"""MASS step size, gradient noise scale, stopping criteria."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import geometry as g

pos = st.floats(1e-6, 1e3)


@given(pos, pos, st.integers(1, 10_000), st.floats(1e-3, 1e3))
def test_mass_ceiling_scale_invariant(a, b, n, c):
    lo, hi = min(a, b), max(a, b)
    assert g.mass_ceiling(c * lo, c * hi, n).value == pytest.approx(g.mass_ceiling(lo, hi, n).value, rel=1e-12)


@given(pos, pos, st.integers(1, 10_000))
def test_mass_ceiling_bounds(a, b, n):
    v = g.mass_ceiling(min(a, b), max(a, b), n).value
    assert 0 < v <= 1


def test_mass_ceiling_golden_and_guards():
    assert g.mass_ceiling(1.0, 4.0, 16).value == pytest.approx(1.0 / 16)  # 1 / (4 * sqrt(16))
    with pytest.raises(ValueError, match="sigma_k_min <= sigma_max"):
        g.mass_ceiling(2.0, 1.0, 4)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        g.mass_ceiling(1.0, 2.0, 0)


@given(st.floats(0, 20), st.floats(1e-8, 1e4), pos, pos, st.floats(0, 1e-2))
def test_mass_step_never_exceeds_ceiling(loss, gn, sk, ceil, floor):
    assert g.mass_step_size(loss, gn, sk, ceil, floor).step <= ceil


@given(st.floats(0, 20), st.floats(1e-8, 1e4), pos, pos, st.floats(0, 1e-2))
def test_mass_step_weyl_bound(loss, gn, sk, ceil, floor):
    step = g.mass_step_size(loss, gn, sk, ceil, floor).step
    assert step * gn <= sk * (1 + 1e-12)  # Weyl: the step moves no singular value by more than sk


@pytest.mark.parametrize("gn", [0.0, math.inf, math.nan])
def test_mass_step_fallback(gn):
    out = g.mass_step_size(1.0, gn, 0.5, 0.01, 1e-8)
    assert out.step == 0.01 and out.bound == "ceiling"


def test_mass_step_goldens_and_binding_term():
    # sps = 2 / 4 = 0.5, weyl = 1 / 2 = 0.5 vs ceiling 0.1 -> ceiling binds
    assert g.mass_step_size(2.0, 2.0, 1.0, 0.1, 0.0).bound == "ceiling"
    # sps = 0.01 / 1 = 0.01 < weyl = 1, ceiling 0.1 -> sps binds
    out = g.mass_step_size(0.01, 1.0, 1.0, 0.1, 0.0)
    assert out.bound == "sps" and out.step == pytest.approx(0.01)
    # weyl = 0.001 / 1 binds
    assert g.mass_step_size(5.0, 1.0, 0.001, 0.1, 0.0).bound == "weyl"
    # the floor guards the denominator: ||g||^2 = 1e-10 < floor 1e-4
    assert g.mass_step_size(1e-6, 1e-5, 1.0, 1.0, 1e-4).sps == pytest.approx(1e-2)


def test_mass_step_stays_on_device_namespace():
    torch = pytest.importorskip("torch")
    out = g.mass_step_size(torch.tensor(0.01, dtype=torch.float32), torch.tensor(1.0), 1.0, 0.1, 0.0)
    assert isinstance(out.step, torch.Tensor) and out.step.dtype == torch.float32
    assert out.bound == "sps"


@given(st.floats(1e-4, 1e2), st.floats(1e-4, 1e4), st.integers(1, 64), st.integers(2, 512))
def test_noise_scale_recovers_planted(g2, tr, bs, extra):
    bb = bs + extra
    ns = g.gradient_noise_scale(g2 + tr / bs, g2 + tr / bb, bs, bb, n_train=10**9)
    assert ns.g2 == pytest.approx(g2, rel=1e-6) and ns.trace_sigma == pytest.approx(tr, rel=1e-6)
    assert ns.b_simple == pytest.approx(tr / g2, rel=1e-5)  # cancellation in the differences


@given(st.floats(0, 1e3), st.floats(0, 1e3), st.integers(1, 64), st.integers(1, 64), st.integers(1, 10_000))
def test_noise_scale_clamped(a, b, bs, extra, n):
    ns = g.gradient_noise_scale(a, b, bs, bs + extra, n_train=n)
    assert 1 <= ns.b_crit <= n


@given(st.floats(0, 1e3), st.floats(0, 1e3), st.integers(2, 64), st.integers(1, 10_000))
def test_noise_scale_clamped_to_resolution(a, b, bb, n):
    ns = g.gradient_noise_scale(a, b, 1, bb, n_train=n, b_max=bb)
    assert 1 <= ns.b_crit <= min(n, bb)


@given(st.floats(1e-3, 1e2), st.floats(1e-3, 1e3), st.floats(1e-2, 1e2))
def test_noise_scale_scale_invariant(g2, tr, c):
    a = g.gradient_noise_scale(g2 + tr / 4, g2 + tr / 64, 4, 64, n_train=10**6)
    b = g.gradient_noise_scale(c * (g2 + tr / 4), c * (g2 + tr / 64), 4, 64, n_train=10**6)
    assert b.b_simple == pytest.approx(a.b_simple, rel=1e-9)


def test_noise_scale_edge_cases():
    assert g.gradient_noise_scale(1.0, 1.0, 4, 8, n_train=100).b_crit == 1  # no noise
    assert g.gradient_noise_scale(2.0, 0.1, 4, 8, n_train=100).b_crit == 100  # g2 estimate < 0
    assert g.gradient_noise_scale(2.0, 0.1, 4, 8, n_train=100, b_max=8).b_crit == 8  # unresolved
    with pytest.raises(ValueError, match="b_small < b_big"):
        g.gradient_noise_scale(1.0, 1.0, 8, 8, n_train=10)


@given(st.floats(1.1, 1e3), st.floats(1e-3, 1.0), st.floats(1e-2, 1e2))
def test_per_sample_noise_scale_scale_invariant(ratio, gbar, c):
    a = g.per_sample_noise_scale(ratio * gbar, gbar, 20)
    assert g.per_sample_noise_scale(c * ratio * gbar, c * gbar, 20) == pytest.approx(a, rel=1e-9)


series = st.lists(st.floats(-100, 100), min_size=10, max_size=40)


@given(series, st.floats(-1e3, 1e3))
def test_two_window_shift_invariant(xs, c):
    v1, t1 = g.two_window_test(xs, 5)
    v2, t2 = g.two_window_test([x + c for x in xs], 5)
    assert v2 == pytest.approx(v1, abs=1e-8 * (1 + abs(c))) and t2 == pytest.approx(t1, abs=1e-6 * (1 + abs(c)))


@given(st.floats(-10, 10), st.integers(4, 30))
def test_two_window_constant_passes(c, n):
    assert g.gradient_stationarity([c] * n, 2).passed
    assert g.validation_stability([c] * n, 2).passed


def test_two_window_needs_two_windows_and_detects_trend():
    assert not g.gradient_stationarity([1.0, 2.0, 3.0], 2).passed
    assert not g.validation_stability(list(np.linspace(3.0, 1.0, 20)), 5).passed


@given(st.lists(st.floats(0, 10), min_size=4, max_size=50))
def test_ci_half_width_shrinks(xs):
    # tolerance: the plain sum of <= 200 values <= 10 rounds the mean by <= 200 * 10 * eps, so
    # equal values can show a spread of that size (1e-12 above it)
    assert g.validation_ci_half_width(xs * 4) <= g.validation_ci_half_width(xs) * (1 + 1e-9) + 1e-12


@given(st.floats(-10, 10), st.floats(1e-3, 10), st.floats(1e-2, 1e2))
def test_predicted_improvement_direction_scale_invariant(a, b, c):
    assert g.predicted_improvement(c * a, c * c * b, 1.0).value == pytest.approx(
        g.predicted_improvement(a, b, 1.0).value, rel=1e-9, abs=1e-300)


def test_predicted_improvement_golden_and_nonconvex():
    crit = g.predicted_improvement(0.1, 2.0, 0.01)  # 0.01 / 4 = 0.0025 < 0.01
    assert crit.value == pytest.approx(0.0025) and crit.passed
    assert not g.predicted_improvement(0.1, -1.0, 0.01).passed


@given(st.floats(0.1, 10), st.floats(0, 1))
def test_generation_drift_identity_passes(h, rep):
    assert g.generation_drift(h, h, rep, rep).passed


def test_generation_drift_detects_collapse():
    assert not g.generation_drift(1.0, 3.0, 0.1, 0.1).passed  # entropy collapsed by 2/3
    assert not g.generation_drift(3.0, 3.0, 0.5, 0.1).passed  # repetition up 0.4


@given(st.lists(st.booleans(), min_size=1, max_size=6), st.booleans())
def test_certificate_all_passed(flags, fell):
    crits = [g.Criterion(f"c{i}", 0.0, 1.0, f) for i, f in enumerate(flags)]
    cert = g.stopping_certificate(*crits, validation_fell=fell)
    assert cert.satisfied == (all(flags) and not fell)
    assert len(cert.criteria) == len(flags) + int(fell)
