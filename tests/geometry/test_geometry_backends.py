"""Backend parity (numpy, torch, jax, mlx) and an array-api-strict run proving only the standard is
used."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from matrices import orthonormal, planted_weight

import geometry as g

HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None


def to_torch(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def to_jax(a):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp.asarray(a)


def to_mlx(a):
    import mlx.core as mx

    # mx.array(float64 numpy) would give float32; MLX keeps float64 on its CPU stream
    return mx.array(a, dtype=mx.float64 if a.dtype == np.float64 else None)


def to_strict(a):
    import array_api_strict as xps

    return xps.asarray(a)


BACKENDS = [
    pytest.param(lambda a: a, id="numpy"),
    pytest.param(to_torch, id="torch"),
    pytest.param(to_jax, id="jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax not installed")),
    pytest.param(to_strict, id="array_api_strict"),
    pytest.param(to_mlx, id="mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")),
]


def host(a) -> np.ndarray:
    """Back to numpy for comparison (dlpack works for every backend here)."""
    if isinstance(a, float | int):
        return np.asarray(a)
    try:
        return np.from_dlpack(a)
    except (TypeError, AttributeError, RuntimeError, BufferError):
        return np.asarray(a)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    return {
        "w": planted_weight(rng, 40, 24, decay=0.8),
        "x": orthonormal(rng, 30, 4),
        "d": rng.standard_normal((30, 4)),
        "a": rng.standard_normal((25, 6)),
        "b": rng.standard_normal((25, 6)),
        "pts": rng.standard_normal((50, 3)),
    }


@pytest.mark.parametrize("conv", BACKENDS)
def test_spectral_parity(conv, data):
    w = conv(data["w"])
    ref = np.linalg.svd(data["w"], compute_uv=False)
    # tolerance: float64 LAPACK on every backend; Gram route documented at sqrt(eps) * s_1
    np.testing.assert_allclose(host(g.singular_values(w)), ref, atol=1e-12)
    np.testing.assert_allclose(host(g.gram_singular_values(w)), ref, atol=1e-7)
    top = host(g.top_singular_values(w, 3, seed=0))
    # same seed -> same Gaussian test matrix on every backend; vs exact: Halko bound, 1e-4 here
    np.testing.assert_allclose(top, g.top_singular_values(data["w"], 3, seed=0), rtol=1e-10)
    np.testing.assert_allclose(top, ref[:3], rtol=1e-4)
    assert g.top_singular_value_power(w, 200, 0) == pytest.approx(ref[0], rel=1e-8)
    s = g.singular_values(w)
    assert g.effective_rank(s) == pytest.approx(g.effective_rank(ref), rel=1e-12)
    assert g.effective_rank_squared(s) == pytest.approx(g.effective_rank_squared(ref), rel=1e-12)
    assert g.stable_rank(s) == pytest.approx(g.stable_rank(ref), rel=1e-12)
    assert g.structural_rank(s).k == g.structural_rank(ref).k
    assert g.spectral_knee(s) == g.spectral_knee(ref)
    assert g.spectral_decay(s) == pytest.approx(g.spectral_decay(ref), rel=1e-10)
    assert g.noise_floor(s, 1e-7) == pytest.approx(g.noise_floor(ref, 1e-7))


@pytest.mark.parametrize("conv", BACKENDS)
def test_stiefel_parity(conv, data):
    x, d = conv(data["x"]), conv(data["d"])
    ref = g.cayley_retract(data["x"], data["d"], 0.7)
    y = g.cayley_retract(x, d, 0.7)
    np.testing.assert_allclose(host(y), ref, atol=1e-12)  # same float64 algorithm
    assert g.orthogonality_error(y) < 1e-10
    np.testing.assert_allclose(host(g.stiefel_project(x, d)), g.stiefel_project(data["x"], data["d"]), atol=1e-12)


@pytest.mark.parametrize("conv", BACKENDS)
def test_alignment_parity(conv, data):
    a, b = conv(data["a"]), conv(data["b"])
    assert g.cka(a, b) == pytest.approx(g.cka(data["a"], data["b"]), rel=1e-10)
    fit = g.procrustes(a, b)
    np.testing.assert_allclose(host(fit.rotation), g.procrustes(data["a"], data["b"]).rotation, atol=1e-10)
    f = g.procrustes_pinv_map(a, b)
    np.testing.assert_allclose(host(f), np.linalg.pinv(data["a"]) @ data["b"], atol=1e-10)
    assert g.twonn_intrinsic_dimension(conv(data["pts"])) == pytest.approx(
        g.twonn_intrinsic_dimension(data["pts"]), rel=1e-10)


@pytest.mark.parametrize("conv", BACKENDS)
def test_derivation_parity(conv, data):
    ref = g.derive_hyperparameters({"m.w": data["w"]}, n_train=100, batches_per_epoch=10, dtype_eps=2.0**-23)
    hp = g.derive_hyperparameters({"m.w": conv(data["w"])}, n_train=100, batches_per_epoch=10, dtype_eps=2.0**-23)
    assert hp.peft_patterns() == ref.peft_patterns()
    assert hp.records.mass_ceiling.value == pytest.approx(ref.records.mass_ceiling.value, rel=1e-10)
    assert hp.layers[0].erank == pytest.approx(ref.layers[0].erank, rel=1e-10)
    out = g.mass_step_size(conv(np.asarray(0.01)), conv(np.asarray(1.0)), 1.0, 0.1, 0.0)
    assert out.bound == "sps" and float(out.step) == pytest.approx(0.01)


def test_float32_input_is_upcast_on_cpu():
    torch = pytest.importorskip("torch")
    w = torch.randn(20, 10, dtype=torch.float32)
    assert g.singular_values(w).dtype == torch.float64
    # per-step functions keep the input dtype (no upcast, no host round trip)
    x = torch.linalg.qr(torch.randn(20, 3))[0]
    assert g.cayley_retract(x, torch.randn(20, 3), 0.1).dtype == torch.float32
