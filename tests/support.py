"""Helpers shared by the tests: compose the real configs under conf/ as the command line does."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from runner.config.paths import CONF_DIR
from runner.config.schema import register_configs

ROOT = Path(__file__).resolve().parent.parent

register_configs()


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=overrides)
