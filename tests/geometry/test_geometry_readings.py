"""The named readings of the derived trainer (geometry/readings.py), float64, seeded inputs."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from matrices import orthonormal, planted_weight

import geometry as g
from geometry import readings as rd

HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None

seeds = st.integers(0, 10_000)


def spectral_norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a, 2))


# ---------------------------------------------------------------------------------------------
# derived_uniform: project_sign_free
# ---------------------------------------------------------------------------------------------

values = st.tuples(st.integers(1, 30), seeds, st.floats(0.01, 10), st.floats(0, 1), st.floats(0, 1))


def draw_values(t):
    r, seed, bound, eta, decay = t
    rng = np.random.default_rng(seed)
    return 3 * bound * rng.standard_normal(r), bound, eta, decay


@given(values)
def test_sign_free_within_bound(t):
    s, bound, eta, decay = draw_values(t)
    assert np.all(np.abs(rd.project_sign_free(s, bound, eta, decay).s) <= bound)


@given(values)
def test_sign_free_keeps_sign(t):
    s, bound, eta, decay = draw_values(t)
    out = rd.project_sign_free(s, bound, eta, decay).s
    assert np.all(np.sign(out[eta * decay < 1]) == np.sign(s[eta * decay < 1]))
    assert np.any(s < 0) == np.any(out < 0) or eta * decay == 1


@given(values)
def test_sign_free_interior_only_decays(t):
    s, bound, eta, decay = draw_values(t)
    out = rd.project_sign_free(s, bound, eta, decay).s
    inside = np.abs(s) < bound
    # tolerance: one float64 multiplication
    np.testing.assert_allclose(out[inside], s[inside] * (1 - eta * decay), rtol=1e-15)


@given(values)
def test_sign_free_at_bound_fraction(t):
    s, bound, eta, decay = draw_values(t)
    out = rd.project_sign_free(s, bound, eta, decay)
    assert float(out.at_bound) == pytest.approx(np.mean(np.abs(s) >= bound), abs=1e-15)


def test_sign_free_golden_and_guards():
    out = rd.project_sign_free(np.array([-3.0, -0.5, 0.0, 0.5, 2.0]), 1.0, 0.5, 0.2)
    np.testing.assert_allclose(out.s, [-0.9, -0.45, 0.0, 0.45, 0.9])  # clip, then x (1 - 0.1)
    assert float(out.at_bound) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="bound must be finite and > 0"):
        rd.project_sign_free(np.ones(2), 0.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="eta \\* decay <= 1"):
        rd.project_sign_free(np.ones(2), 1.0, 2.0, 1.0)


# ---------------------------------------------------------------------------------------------
# derived_tail_start
# ---------------------------------------------------------------------------------------------

# (m, n, seed, decay): weight shape and spectrum; k and r are drawn inside
weights = st.tuples(st.integers(4, 30), st.integers(4, 30), seeds, st.floats(0.05, 2.0))


def tail_setup(t):
    """W, its singular triplets k+1..k+r (U_t, s_t, V_t), sigma_k, and an rng for the rest."""
    m, n, seed, decay = t
    rng = np.random.default_rng(seed)
    w = planted_weight(rng, m, n, decay=decay)
    u_w, s_w, vt_w = np.linalg.svd(w, full_matrices=False)
    q = min(m, n)
    k = int(rng.integers(1, q))  # 1-based structural rank: sigma_k = s_w[k - 1]
    r = int(rng.integers(1, q - k + 1))
    return w, u_w[:, k:k + r], s_w[k:k + r], vt_w[k:k + r].T, float(s_w[k - 1]), rng


@given(weights)
def test_tail_start_in_box(t):
    _, _, s_t, _, sigma_k, _ = tail_setup(t)
    ts = rd.tail_start(s_t, sigma_k)
    assert np.all(ts.start >= 0) and np.all(ts.start <= ts.bound / 2 * (1 + 1e-15))
    assert ts.bound + ts.start.max() == pytest.approx(sigma_k, rel=1e-15)
    assert ts.bound >= 2 * sigma_k / 3 * (1 - 1e-15)


@pytest.mark.parametrize("frames", ["start", "random", "mixed"])
@given(t=weights)
def test_tail_start_weyl_bound_on_real_change(frames, t):
    _, u_t, s_t, v_t, sigma_k, rng = tail_setup(t)
    ts = rd.tail_start(s_t, sigma_k)
    m, r = u_t.shape
    n = v_t.shape[0]
    if frames == "start":
        u, v = u_t, v_t
    elif frames == "random":
        u, v = orthonormal(rng, m, r), orthonormal(rng, n, r)
    else:  # a frame that moved part of the way: the Cayley retraction of a random step
        u = g.cayley_retract(u_t, rng.standard_normal((m, r)), float(rng.uniform(0, 2)))
        v = g.cayley_retract(v_t, rng.standard_normal((n, r)), float(rng.uniform(0, 2)))
    # S~ anywhere in the box, half the draws on its vertices (where the norm is largest)
    s = ts.bound * (rng.choice([-1.0, 1.0], r) if rng.random() < 0.5 else rng.uniform(-1, 1, r))
    change = (u * s) @ v.T - (u_t * ts.start) @ v_t.T
    # tolerance: the float64 SVD of an m x n matrix of norm <= sigma_k, a few eps relative
    assert spectral_norm(change) <= sigma_k * (1 + 1e-12)


@given(weights)
def test_tail_start_bound_is_tight(t):
    _, u_t, s_t, v_t, sigma_k, _ = tail_setup(t)
    ts = rd.tail_start(s_t, sigma_k)
    s = np.full(s_t.shape, -ts.bound)
    change = (u_t * s) @ v_t.T - (u_t * ts.start) @ v_t.T
    # tolerance: as test_tail_start_weyl_bound_on_real_change
    assert spectral_norm(change) == pytest.approx(sigma_k, rel=1e-12)


@given(weights)
def test_tail_start_model_unchanged(t):
    w, u_t, s_t, v_t, sigma_k, _ = tail_setup(t)
    ts = rd.tail_start(s_t, sigma_k)
    w_res = rd.residual_weight(w, u_t, ts.start, v_t)
    # tolerance: one rank-r product subtracted and added back, entries of size <= s_1 = 1
    np.testing.assert_allclose(w_res + (u_t * ts.start) @ v_t.T, w, atol=1e-14)
    # a is W's own tail below sigma_k/3 and sigma_k/3 above it
    np.testing.assert_allclose(ts.start, np.minimum(s_t, sigma_k / 3))


@given(weights)
def test_tail_start_peft_factors_reproduce_change(t):
    w, u_t, s_t, v_t, sigma_k, rng = tail_setup(t)
    ts = rd.tail_start(s_t, sigma_k)
    m, r = u_t.shape
    u, v = orthonormal(rng, m, r), orthonormal(rng, v_t.shape[0], r)
    s = rng.uniform(-ts.bound, ts.bound, r)
    b, a = rd.tail_start_peft_factors(u, s, v, u_t, ts.start, v_t)
    assert b.shape == (m, 2 * r) and a.shape == (2 * r, v_t.shape[0])
    # the adapted model W_res + U diag(S~) V^T equals W + B A (PEFT at scaling 1)
    w_res = rd.residual_weight(w, u_t, ts.start, v_t)
    # tolerance: products of orthonormal frames with values <= 1, a few float64 ulps
    np.testing.assert_allclose(w + b @ a, w_res + (u * s) @ v.T, atol=1e-13)


def test_tail_start_golden_and_guards():
    ts = rd.tail_start(np.array([0.9, 0.5, 0.1]), 1.2)
    np.testing.assert_allclose(ts.start, [0.4, 0.4, 0.1])  # capped at 1.2 / 3
    assert ts.bound == pytest.approx(0.8)
    deep = rd.tail_start(np.array([0.2, 0.1]), 1.2)  # the whole tail below sigma_k / 3
    assert deep.bound == pytest.approx(1.0)
    with pytest.raises(ValueError, match="s_tail must be >= 0"):
        rd.tail_start(np.array([0.5, -0.1]), 1.0)
    with pytest.raises(ValueError, match="sigma_k must be finite and > 0"):
        rd.tail_start(np.array([0.5]), 0.0)


# ---------------------------------------------------------------------------------------------
# derived_seed_code: NB-LoRA
# ---------------------------------------------------------------------------------------------

# (n_in, n_out, r, seed, scale): r <= n_in + n_out; scale spans the seed's 0.01 init to large
nb_shapes = st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 8), seeds,
                      st.sampled_from([0.01, 0.3, 1.0, 10.0])).filter(lambda t: t[2] <= t[0] + t[1])


def nb_setup(t):
    n_in, n_out, r, seed, scale = t
    rng = np.random.default_rng(seed)
    bound = float(rng.uniform(0.1, 5))
    s_raw = rng.uniform(-0.5 * bound, 1.5 * bound, r)  # some below 0, some above the bound
    return scale * rng.standard_normal((r, n_in)), scale * rng.standard_normal((r, n_out)), s_raw, bound


@given(nb_shapes)
def test_nb_lora_orthonormal_columns(t):
    f = rd.nb_lora_factors(*nb_setup(t))
    q = np.concatenate([f.a.T, f.b.T], axis=0)
    # tolerance: one r x r inverse of I + Z (symmetric part >= I); free parameters of size 10
    # make ||Z|| ~ 1e3, so the rounding error grows to ~1e3 eps
    assert g.orthogonality_error(q) < 1e-10


@given(nb_shapes)
def test_nb_lora_norm_bound(t):
    a_free, b_free, s_raw, bound = nb_setup(t)
    f = rd.nb_lora_factors(a_free, b_free, s_raw, bound)
    assert np.all((f.s >= 0) & (f.s <= bound))
    # tolerance: float64 SVD and products of orthonormal factors
    assert spectral_norm(rd.nb_lora_delta(f)) <= f.s.max() * (1 + 1e-10) + 1e-15


@pytest.mark.parametrize("r", [1, 3])
def test_nb_lora_norm_bound_is_tight(r):
    # n_in = n_out = r with X = 0, Y = tan(pi/8) I: Z = tan^2(pi/8) I, so A = cos(pi/4) I and
    # B = -sin(pi/4) I; dW = 2 B^T diag(S) A = -diag(S): the norm is max S, not 2 max S
    y = math.tan(math.pi / 8) * np.eye(r)
    s = np.linspace(0.5, 1.0, r)
    f = rd.nb_lora_factors(np.zeros((r, r)), y, s, 2.0)
    # tolerance: a 1/(1 + tan^2) and its products, a few float64 ulps
    np.testing.assert_allclose(rd.nb_lora_delta(f), -np.diag(s), atol=1e-15)
    assert spectral_norm(rd.nb_lora_delta(f)) == pytest.approx(s.max(), rel=1e-14)


def test_nb_lora_gradient_matches_finite_differences():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    n_in, n_out, r, bound = 6, 5, 3, 2.0
    a_free = torch.tensor(0.3 * rng.standard_normal((r, n_in)), requires_grad=True)
    b_free = torch.tensor(0.3 * rng.standard_normal((r, n_out)), requires_grad=True)
    s_raw = torch.tensor(rng.uniform(0.2, 1.8, r), requires_grad=True)  # inside (0, bound): no kink

    def delta(a, b, s):
        return rd.nb_lora_delta(rd.nb_lora_factors(a, b, s, bound))

    # tolerance: gradcheck's defaults for float64 (central differences, eps 1e-6)
    assert torch.autograd.gradcheck(delta, (a_free, b_free, s_raw))


@given(st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 8), seeds).filter(
    lambda t: t[2] <= t[0]))
def test_nb_lora_init_halfway(t):
    n_in, n_out, r, seed = t
    rng = np.random.default_rng(seed)
    bound = float(rng.uniform(0.1, 5))
    a_free, b_free, s_raw = rd.nb_lora_init(rng.standard_normal((r, n_in)),
                                            rng.standard_normal((r, n_out)), bound)
    np.testing.assert_array_equal(s_raw, np.full(r, bound / 2))
    assert np.std(np.concatenate([a_free.ravel(), b_free.ravel()])) < 0.05  # N(0, 0.01^2) draws
    delta = rd.nb_lora_delta(rd.nb_lora_factors(a_free, b_free, s_raw, bound))
    assert spectral_norm(delta) <= bound / 2 * (1 + 1e-10)  # tolerance: as test_nb_lora_norm_bound
    assert spectral_norm(delta) > 0  # the seed's code changes the model at step 0


def test_nb_lora_guards():
    with pytest.raises(ValueError, match="must share r"):
        rd.nb_lora_factors(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="r <= n_in \\+ n_out"):
        rd.nb_lora_factors(np.zeros((5, 2)), np.zeros((5, 2)), np.zeros(5), 1.0)
    with pytest.raises(ValueError, match="bound must be finite and > 0"):
        rd.nb_lora_init(np.zeros((1, 2)), np.zeros((1, 2)), 0.0)


# ---------------------------------------------------------------------------------------------
# derived_matched_mass
# ---------------------------------------------------------------------------------------------


@given(st.integers(1, 10**7), st.floats(1.0, 1e5))
def test_matched_steps_cover_budget(budget, per_step):
    n = rd.matched_steps(budget, per_step)
    assert n >= 1 and n * per_step >= budget and (n - 1) * per_step < budget


def spectra_setup(t):
    """Per-matrix sigma_k <= sigma_max, gradient norms and floors for M matrices."""
    m_count, seed = t
    rng = np.random.default_rng(seed)
    sigma_max = rng.uniform(0.5, 100, m_count)
    sigma_k = sigma_max * rng.uniform(0.001, 1, m_count)
    grads = 10 ** rng.uniform(-4, 2, m_count)
    floors = np.maximum(sigma_k**2, 2**-11.5 * sigma_max**2)  # row 2 per layer (sqrt(eps32))
    return sigma_k, sigma_max, grads, floors


matrices_set = st.tuples(st.integers(1, 40), seeds)


@given(matrices_set, st.integers(1, 10_000), st.floats(1e-3, 1e3))
def test_per_matrix_ceiling_scale_invariant_and_bounded(t, n, c):
    sigma_k, sigma_max, _, _ = spectra_setup(t)
    ceil = rd.per_matrix_mass_ceiling(sigma_k, sigma_max, n)
    assert np.all((ceil > 0) & (ceil <= 1))
    # tolerance: one rounding per product
    np.testing.assert_allclose(rd.per_matrix_mass_ceiling(c * sigma_k, c * sigma_max, n), ceil, rtol=1e-14)


def mass(t, loss, n=50):
    sigma_k, sigma_max, grads, floors = spectra_setup(t)
    ceil = rd.per_matrix_mass_ceiling(sigma_k, sigma_max, n)
    out = rd.per_matrix_mass_step(loss, grads, sigma_k, ceil, floors, float(floors.max()))
    return out, sigma_k, grads


@given(matrices_set, st.floats(0, 20))
def test_per_matrix_step_never_exceeds_ceiling(t, loss):
    out, _, _ = mass(t, loss)
    assert np.all(out.step <= out.ceiling)


@given(matrices_set, st.floats(0, 1e6), st.sampled_from([1, 50]))
def test_per_matrix_step_weyl_bound(t, loss, n):
    sigma_k, sigma_max, _, _ = spectra_setup(t)
    grads = 10 ** np.random.default_rng(t[1]).uniform(-4, 4, len(sigma_k))  # up to past sigma_max
    ceil = rd.per_matrix_mass_ceiling(sigma_k, sigma_max, n)
    out = rd.per_matrix_mass_step(loss, grads, sigma_k, ceil, np.zeros(len(grads)), 0.0)
    assert np.all(out.step * grads <= sigma_k * (1 + 1e-12))  # tolerance: one division


@given(matrices_set, st.floats(0, 20))
def test_per_matrix_step_polyak_decrease(t, loss):
    out, _, grads = mass(t, loss)
    # the linear model's predicted decrease never exceeds f - f* = f
    assert float(np.sum(out.step * grads**2)) <= loss * (1 + 1e-12)  # tolerance: a sum of M terms


@given(st.floats(0, 20), st.floats(1e-8, 1e4), st.floats(1e-6, 1e3), st.floats(1e-6, 1e3),
       st.floats(0, 1e-2), st.integers(1, 1000))
def test_per_matrix_reduces_to_global_rule(loss, gn, a, b, floor, n):
    sigma_k, sigma_max = min(a, b), max(a, b)
    ceil = g.mass_ceiling(sigma_k, sigma_max, n).value
    # all matrices equal: each ceiling is the global one
    np.testing.assert_allclose(rd.per_matrix_mass_ceiling([sigma_k] * 4, [sigma_max] * 4, n), ceil, rtol=1e-15)
    # one matrix: exactly the global step and the same binding term
    out = rd.per_matrix_mass_step(loss, [gn], [sigma_k], [ceil], [floor], floor)
    ref = g.mass_step_size(loss, gn, sigma_k, ceil, floor)
    assert float(out.step[0]) == pytest.approx(ref.step, rel=1e-15)
    assert rd.BINDING_TERMS[int(out.binding[0])] == ref.bound
    assert out.counts[ref.bound] == 1


@pytest.mark.parametrize(("loss", "grads"), [
    (1.0, [0.0, 0.0]), (1.0, [1.0, math.inf]), (1.0, [math.nan, 1.0]), (math.nan, [1.0, 1.0]),
])
def test_per_matrix_step_fallback(loss, grads):
    out = rd.per_matrix_mass_step(loss, grads, [0.5, 0.5], [0.01, 0.02], [0.0, 0.0], 0.0)
    np.testing.assert_array_equal(out.step, [0.01, 0.02])
    assert out.counts == {"ceiling": 2, "sps": 0, "weyl": 0}


def test_per_matrix_step_goldens():
    # ||g||^2 = 1 + 4 = 5, sps = 0.5 / 5 = 0.1; weyl = [2 / 1, 0.1 / 2] = [2, 0.05]
    out = rd.per_matrix_mass_step(0.5, [1.0, 2.0], [2.0, 0.1], [0.3, 0.3], [0.0, 0.0], 0.0)
    np.testing.assert_allclose(out.step, [0.1, 0.05])
    assert [rd.BINDING_TERMS[int(i)] for i in out.binding] == ["sps", "weyl"]
    assert out.counts == {"ceiling": 0, "sps": 1, "weyl": 1}
    with pytest.raises(ValueError, match="0 < sigma_k <= sigma_max"):
        rd.per_matrix_mass_ceiling([2.0], [1.0], 10)
    with pytest.raises(ValueError, match="token_budget >= 1"):
        rd.matched_steps(0, 10.0)


# ---------------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------------


@given(st.tuples(st.integers(2, 20), st.integers(2, 20), st.integers(1, 5), seeds, st.floats(0, 2)))
def test_telemetry_frame_motion(t):
    m, n, r, seed, step = t
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    u, v = orthonormal(rng, m, r), orthonormal(rng, n, r)
    still = rd.adapter_step_telemetry(u, u, v, v, np.zeros(r), -1.0, 1.0, 0.1)
    assert float(still.frame_motion_u) == 0 and float(still.frame_motion_v) == 0
    u2 = g.cayley_retract(u, rng.standard_normal((m, r)), step)
    moved = rd.adapter_step_telemetry(u, u2, v, v, np.zeros(r), -1.0, 1.0, 0.1)
    # tolerance: one Frobenius norm in float64
    assert float(moved.frame_motion_u) == pytest.approx(np.linalg.norm(u2 - u), rel=1e-14, abs=1e-300)


def test_telemetry_at_bound_fraction():
    u, v = np.eye(4, 2), np.eye(3, 2)
    s = np.array([0.0, 0.3, 0.7, 1.0, 0.0, 0.5, 1.0, 0.2])
    # derived's box [0, 1]: 0, 1, 0, 1 are on a bound
    assert float(rd.adapter_step_telemetry(u, u, v, v, s, 0.0, 1.0, 0.1).at_bound) == 0.5
    # the sign-free box [-1, 1]: only the two 1s
    assert float(rd.adapter_step_telemetry(u, u, v, v, s, -1.0, 1.0, 0.1).at_bound) == 0.25


def test_effective_step_uniform():
    # derived: eta c^2 spreads over c^2; the S~ readings (c = 1) step by eta in every block
    scales = np.array([0.04, 1.0, 237.0])
    derived = rd.effective_delta_steps(1e-3, scales)
    np.testing.assert_allclose(derived, 1e-3 * scales**2)
    assert derived.max() / derived.min() == pytest.approx((237 / 0.04) ** 2)
    np.testing.assert_array_equal(rd.effective_delta_steps(np.full(3, 1e-3), 1.0), np.full(3, 1e-3))


# ---------------------------------------------------------------------------------------------
# Backends: the per-step functions run in every namespace (array-api-strict proves the standard)
# ---------------------------------------------------------------------------------------------


def to_torch(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def to_jax(a):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp.asarray(a)


def to_strict(a):
    import array_api_strict as xps

    return xps.asarray(a)


def to_mlx(a):
    import mlx.core as mx

    return mx.array(a, dtype=mx.float64)


BACKENDS = [
    pytest.param(to_torch, id="torch"),
    pytest.param(to_jax, id="jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax not installed")),
    pytest.param(to_strict, id="array_api_strict"),
    pytest.param(to_mlx, id="mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")),
]


def host(a) -> np.ndarray:
    try:
        return np.from_dlpack(a)
    except (TypeError, AttributeError, RuntimeError, BufferError):
        return np.asarray(a)


@pytest.mark.parametrize("conv", BACKENDS)
def test_readings_backend_parity(conv):
    rng = np.random.default_rng(5)
    s = 2 * rng.standard_normal(7)
    a_free, b_free, s_raw = rng.standard_normal((3, 6)), rng.standard_normal((3, 5)), rng.uniform(-1, 3, 3)
    u, v = orthonormal(rng, 6, 3), orthonormal(rng, 5, 3)
    grads, sigma_k = rng.uniform(0.1, 3, 4), rng.uniform(0.1, 1, 4)
    ceil = rd.per_matrix_mass_ceiling(sigma_k, 2 * sigma_k, 20)
    # tolerance: the same float64 operations in another library; the r x r inverse may take a
    # different LAPACK path
    close = {"rtol": 1e-12, "atol": 1e-14}

    ref = rd.project_sign_free(s, 1.0, 0.1, 0.3)
    out = rd.project_sign_free(conv(s), 1.0, 0.1, 0.3)
    np.testing.assert_allclose(host(out.s), ref.s, **close)
    assert float(out.at_bound) == pytest.approx(float(ref.at_bound))

    ref_f = rd.nb_lora_factors(a_free, b_free, s_raw, 2.0)
    out_f = rd.nb_lora_factors(conv(a_free), conv(b_free), conv(s_raw), 2.0)
    np.testing.assert_allclose(host(rd.nb_lora_delta(out_f)), rd.nb_lora_delta(ref_f), **close)

    ref_m = rd.per_matrix_mass_step(0.7, grads, sigma_k, ceil, np.zeros(4), 0.0)
    out_m = rd.per_matrix_mass_step(conv(np.asarray(0.7)), conv(grads), sigma_k, ceil, np.zeros(4), 0.0)
    np.testing.assert_allclose(host(out_m.step), ref_m.step, **close)
    assert out_m.counts == ref_m.counts

    ref_t = rd.tail_start_peft_factors(u, s[:3], v, u, np.abs(s[3:6]), v)
    out_t = rd.tail_start_peft_factors(*(conv(x) for x in (u, s[:3], v, u, np.abs(s[3:6]), v)))
    for o, r_ in zip(out_t, ref_t, strict=True):
        np.testing.assert_allclose(host(o), r_, **close)

    tel = rd.adapter_step_telemetry(conv(u), conv(u + 0.1), conv(v), conv(v), conv(s), -1.0, 1.0, 0.1)
    assert float(tel.frame_motion_u) == pytest.approx(0.1 * math.sqrt(18), rel=1e-12)


@pytest.mark.parametrize("backend", [
    pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax not installed")),
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")),
])
def test_nb_lora_gradient_matches_torch(backend):
    """The map differentiates in jax and mlx autodiff too, to the torch gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    a0, b0, s0 = 0.3 * rng.standard_normal((3, 6)), 0.3 * rng.standard_normal((3, 5)), rng.uniform(0.2, 1.8, 3)
    weight = rng.standard_normal((5, 6))  # a fixed linear read-out of dW: loss = <weight, dW>

    def loss_of(a, b, s, w):
        return (w * rd.nb_lora_delta(rd.nb_lora_factors(a, b, s, 2.0))).sum()

    ref = [torch.tensor(x, requires_grad=True) for x in (a0, b0, s0)]
    loss_of(*ref, torch.tensor(weight)).backward()
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        grads = jax.grad(lambda a, b, s: loss_of(a, b, s, jnp.asarray(weight)), argnums=(0, 1, 2))(
            *(jnp.asarray(x) for x in (a0, b0, s0)))
    else:
        import mlx.core as mx

        with mx.stream(mx.cpu):  # float64 runs on MLX's CPU stream only
            grads = mx.grad(lambda a, b, s: loss_of(a, b, s, mx.array(weight, dtype=mx.float64)),
                            argnums=(0, 1, 2))(*(mx.array(x, dtype=mx.float64) for x in (a0, b0, s0)))
    for got, want in zip(grads, ref, strict=True):
        # tolerance: the same float64 chain rule in another library
        np.testing.assert_allclose(np.asarray(got), want.grad.numpy(), rtol=1e-10, atol=1e-12)
