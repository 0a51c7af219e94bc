"""Shared fixtures (helpers that tests import live in tests/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def ledger_overrides(tmp_path: Path) -> list[str]:
    """Point the ledger and run outputs at a temporary directory."""
    return [f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}"]
