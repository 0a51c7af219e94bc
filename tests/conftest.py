"""Shared fixtures (helpers that tests import live in tests/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.models.backends.mlx_blas import use_torch_blas

# Tests import mlx.core directly; before the first does, let MLX's CPU BLAS/LAPACK calls run
# torch's kernels (runner/models/backends/mlx_blas.py: the mlx[cpu] wheel's own BLAS is the slow
# reference one).
use_torch_blas()


@pytest.fixture
def ledger_overrides(tmp_path: Path) -> list[str]:
    """Point the ledger and run outputs at a temporary directory."""
    return [f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}"]
