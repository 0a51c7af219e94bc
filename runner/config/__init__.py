"""Configuration: the typed schema every YAML group is checked against (`schema`), the one
conversion from Hydra's config to it (`load`), and where the project's files live (`paths`)."""

from runner.config.load import (
    config_error_line,
    load_trainer_option,
    to_run_config,
    trainer_options,
)

__all__ = ["config_error_line", "load_trainer_option", "to_run_config", "trainer_options"]
