"""The measured arms task=claims can run (runner.claims.measurements names them): for each, the
config hash of one trial and the function that measures it and writes its ledger row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from runner.config.schema import RunConfig
from runner.tasks.dimension_profile import profile_hash, profile_trial
from runner.tasks.family_geometry import family_geometry_hash, family_geometry_trial
from runner.trial import ClaimTag, Provenance


@dataclass(frozen=True)
class MeasuredArm:
    trial_hash: Callable[[RunConfig], str]
    run: Callable[[RunConfig, ClaimTag, Provenance], None]  # writes the trial's row


MEASURED: dict[str, MeasuredArm] = {
    "dimension_profile": MeasuredArm(profile_hash, profile_trial),
    "family_geometry": MeasuredArm(family_geometry_hash, family_geometry_trial),
}
