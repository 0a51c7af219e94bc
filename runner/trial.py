"""A trial: what training one arm produces (the outcome) and the hash that identifies its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from runner.ledger import stable_hash
from runner.schema import RunConfig
from runner.training import TrainResult

BENCH_OPTIONS = ("quick", "repeats", "steps", "quality_tokens")
PROFILE_OPTIONS = ("points", "pooling", "resamples")  # task=dimension_profile hashes them itself


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that determines a trial's outcome (not where it is written)."""
    c = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    for key in ("results_dir", "runs_dir", "tracking", "verify_adapter"):
        c.pop(key, None)
    c["hardware"].pop("threads", None)
    for key in BENCH_OPTIONS + PROFILE_OPTIONS:  # left out, so existing trials keep their hash
        c["task"].pop(key, None)
    return stable_hash(c)


@dataclass
class TrainOutcome:
    model: Any  # the trained model with its adapters attached, in evaluation mode
    result: TrainResult
    hyperparameters: dict
    extra_metrics: dict = field(default_factory=dict)
    derived: dict | None = None
    certificate: dict | None = None
    step_table: list[dict] | None = None
