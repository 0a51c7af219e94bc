"""The adapters' starting frames (runner/derived/frames.py), one implementation for every
backend: checked on numpy against numpy's SVD, and torch's subset solver against the gathered
full ``eigh``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runner.derived.frames import gathered_eigenpairs, tail_frames
from runner.derived.torch_ops import _gram_eigenpairs

SHAPES = [((48, 20), 3, 4), ((20, 48), 3, 4), ((30, 30), 5, 0), ((40, 25), 4, 21)]


def _matrix(shape, seed: int) -> np.ndarray:
    """A float32 matrix with well-separated singular values 1, 0.9, 0.81, ... (gaps >> eps)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    q = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, q)))[0]
    v = np.linalg.qr(rng.standard_normal((n, q)))[0]
    return ((u * 0.9 ** np.arange(q)) @ v.T).astype(np.float32)


@pytest.mark.parametrize(("shape", "r", "start"), SHAPES)
def test_tail_frames_are_the_singular_vectors(shape, r, start) -> None:
    w = _matrix(shape, 0)
    u, v = tail_frames(w, start, r, r, gathered_eigenpairs(np.linalg.eigh))
    uu, _, vt = np.linalg.svd(w.astype(np.float64))
    # orthonormal to float32 rounding after the QR (q * eps32 with margin)
    assert np.abs(u.T @ u - np.eye(r)).max() < 1e-5
    assert np.abs(v.T @ v - np.eye(r)).max() < 1e-5
    # the same directions as the SVD's start..start+r-1 (gaps 10%: float32 error ~1e-5)
    assert np.abs(np.abs(np.sum(u * uu[:, start:start + r], axis=0)) - 1).max() < 1e-4
    assert np.abs(np.abs(np.sum(v * vt[start:start + r].T, axis=0)) - 1).max() < 1e-4
    # a pair (u_j, v_j) carries W's singular value with a positive sign: u_j^T W v_j = s_j > 0
    assert (np.sum(u * (w @ v), axis=0) > 0).all()


@pytest.mark.parametrize(("shape", "r", "start"), SHAPES)
def test_wider_frames_keep_the_first_r_columns(shape, r, start) -> None:
    w = _matrix(shape, 1)
    narrow = tail_frames(w, start, r, r, gathered_eigenpairs(np.linalg.eigh))
    wide = tail_frames(w, start, r, r + 3, gathered_eigenpairs(np.linalg.eigh))
    for a, b in zip(narrow, wide, strict=True):
        # Householder QR builds column j from columns <= j: the first r columns agree to rounding
        np.testing.assert_allclose(b[:, :r], a, atol=1e-6)
        assert not b[:, r:].any()


@pytest.mark.parametrize(("shape", "r", "start"), SHAPES)
def test_torch_subset_solver_matches_the_full_eigh(shape, r, start) -> None:
    w = torch.from_numpy(_matrix(shape, 2))
    subset = tail_frames(w, start, r, r, _gram_eigenpairs)
    full = tail_frames(w, start, r, r, gathered_eigenpairs(torch.linalg.eigh))
    for a, b in zip(subset, full, strict=True):
        # two float32 solvers of the same well-separated problem, up to each vector's sign
        assert (torch.abs(torch.sum(a * b, dim=0)) - 1).abs().max() < 1e-4
