"""Seeded test matrices for the geometry suite."""

from __future__ import annotations

import numpy as np


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
