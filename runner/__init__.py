"""ModelCypher runner: the Hydra app that loads, derives, trains, evaluates and records trials."""

__version__ = "0.1.0"
