"""Measured arms: a claim arm whose `trainer:` names a measurement of the base model instead of
a trainer option (nothing is trained), e.g. `{name: profile, trainer: dimension_profile}`.

task=claims plans one trial per seed for such an arm and runs the measurement's task function
(runner.tasks.measured); its row is a `TrialRow.measured`, recorded under `arm` = the
measurement's name. What a measurement's result depends on besides the model, the data and the
seed are the task options it reads (`task_keys`): they stand where a trained arm's trainer
options stand, in the rule's registered setting and in the one-configuration-per-arm check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Measurement:
    name: str  # the arm's `trainer:` and the rows' `arm`
    task_keys: tuple[str, ...]  # the TaskConfig options the measurement reads


MEASUREMENTS: dict[str, Measurement] = {m.name: m for m in (
    Measurement("dimension_profile", ("points", "pooling", "resamples")),
    Measurement("family_geometry", ("points", "pooling", "neighbours", "other_model")),
)}


def is_measured(trainer: str) -> bool:
    """Whether a claim arm's `trainer:` names a measurement rather than a trainer option."""
    return trainer in MEASUREMENTS


def measured_options(name: str, task: dict[str, Any]) -> dict[str, Any]:
    """The options of measurement `name` read from a plain task config (a row's config.task)."""
    return {"measurement": name, **{k: task.get(k) for k in MEASUREMENTS[name].task_keys}}
