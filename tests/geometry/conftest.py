"""Hypothesis profiles for the geometry suite: ``ci`` (default, derandomized) and ``dev``.

Choose with HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    """A random n x r matrix with orthonormal columns (QR of a Gaussian)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def planted_weight(rng: np.random.Generator, m: int, n: int, decay: float = 0.5) -> np.ndarray:
    """A weight-like matrix: random singular vectors, power-law spectrum s_i = i^-decay."""
    q = min(m, n)
    u = orthonormal(rng, m, q)
    v = orthonormal(rng, n, q)
    s = np.arange(1, q + 1, dtype=np.float64) ** -decay
    return (u * s) @ v.T
