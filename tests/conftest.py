"""Shared fixtures: compose the real configs under conf/ exactly as the command line does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.app import CONF_DIR  # noqa: E402
from runner.schema import register_configs  # noqa: E402

register_configs()


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def ledger_overrides(tmp_path: Path) -> list[str]:
    """Point the ledger and run outputs at a temporary directory."""
    return [f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}"]
