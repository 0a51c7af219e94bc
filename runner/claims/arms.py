"""Which arm a ledger row belongs to (by the trainer name its trials record), the
one-configuration-per-arm rule, and the labels of a verdict (its deciding test, the effect's
unit, smoke run or not)."""

from __future__ import annotations

from typing import Any

import yaml

from runner.claims.claim import Arm, Claim, Direction, Kind, StatTest
from runner.claims.measurements import is_measured, measured_options
from runner.claims.stats import TEST_NAMES, sidedness
from runner.config.paths import TRAINER_DIR
from runner.errors import ConfigError
from runner.ledger import stable_hash
from runner.trial import comparable_data, random_init


class MixedConfiguration(ConfigError):
    """Rows of one arm ran under different configurations: a verdict would pool them."""


def trainer_name(option: str) -> str:
    """The `name:` inside conf/trainer/<option>.yaml (what trial rows record as `arm`)."""
    path = TRAINER_DIR / f"{option}.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return str(raw.get("name", option))
    except (OSError, yaml.YAMLError):
        return option


def arm_of(row: dict, claim: Claim) -> Arm | None:
    """The claim arm a row belongs to.

    Rows record the claim arm in `claim_arm` when the runner could pass it; otherwise the arm
    is recognised by the trial's trainer: its name, and every override of the arm.
    """
    if row.get("claim_arm") is not None:
        return next((a for a in claim.arms if a.name == row["claim_arm"]), None)
    trainer = ((row.get("config") or {}).get("trainer")) or {}
    for arm in claim.arms:
        if row.get("arm") == trainer_name(arm.trainer) and all(
                trainer.get(k) == v for k, v in arm.overrides.items()):
            return arm
    return None


def arm_options(row: dict) -> Any:
    """The options that make a row's arm what it is: the trainer's, or for a measured arm
    (runner.claims.measurements) the task options the measurement reads."""
    config = row.get("config") or {}
    if is_measured(str(row.get("arm"))):
        return measured_options(row["arm"], config.get("task") or {})
    return config.get("trainer")


def arm_configuration(row: dict) -> dict[str, Any]:
    """What must be equal for a row to be pooled with another row of its arm: the trainer's
    options, the model and data (their config and the sha256 of their bytes), the budget and
    the hardware (thread count aside, which does not change results)."""
    config = row.get("config") or {}
    hardware = {k: v for k, v in (config.get("hardware") or {}).items() if k != "threads"}
    return {"trainer": arm_options(row), "model": config.get("model"),
            "model_sha256": row.get("model_sha256"), "data": comparable_data(config.get("data")),
            "data_sha256": row.get("data_sha256"), "budget": config.get("budget"),
            "hardware": hardware}


def _setting_of(claim: Claim, arm: Arm) -> dict[str, Any] | None:
    """The part of a row's config the rule's registered setting fixes for `arm`."""
    if claim.setting is None:
        return None
    s = claim.setting
    return {"trainer": s["arms"][arm.name], "model": s["model"], "data": s["data"],
            "budget": s["budget"]}


def check_one_configuration(claim: Claim, rows: list[dict]) -> None:
    """Raise MixedConfiguration (one line) if the ran rows of an arm differ in configuration,
    or differ from the setting the rule was registered with."""
    groups: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        arm = arm_of(row, claim)
        if arm is None:
            continue
        key = stable_hash(arm_configuration(row))
        groups.setdefault(arm.name, {}).setdefault(key, []).append(row["run_id"])
        want = _setting_of(claim, arm)
        config = row.get("config") or {}
        got = {**{k: config.get(k) for k in want}, "trainer": arm_options(row),
               "data": comparable_data(config.get("data"))} if want is not None else None
        if want is not None and (stable_hash(want) != stable_hash(got)
                or row.get("data_sha256") != claim.setting.get("data_sha256")):
            raise MixedConfiguration(
                f"claim {claim.id} (rule {claim.rule_hash[:12]}): arm '{arm.name}': trial "
                f"{row['run_id']} (config {str(row.get('config_hash'))[:12]}) did not run the "
                "setting the rule was registered with; refusing to decide from it")
    for arm, by_key in groups.items():
        if len(by_key) > 1:
            hashes = ", ".join(f"{k[:12]} ({len(ids)} trials, e.g. {ids[0]})"
                               for k, ids in sorted(by_key.items()))
            raise MixedConfiguration(
                f"claim {claim.id} (rule {claim.rule_hash[:12]}): arm '{arm}' mixes "
                f"{len(by_key)} configurations: {hashes}; a verdict pools one configuration "
                "per arm (move the stray trials out of the ledger or register a new rule)")


def is_smoke(claim: Claim, rows: list[dict]) -> bool:
    """A verdict from trials on a random-init model (or a rule registered for one)."""
    ran = [r for r in rows if (r.get("config") or {}).get("model") is not None]
    if ran:
        return any(random_init(r["config"]["model"]) for r in ran)
    return bool(claim.setting) and random_init(claim.setting.get("model"))


def effect_unit(claim: Claim) -> str | None:
    """The unit of `Verdict.effect`: nats for losses, r or rho for correlations."""
    if claim.kind is Kind.correlation:
        return "Spearman ρ" if claim.test is StatTest.spearman else "Pearson r"
    if claim.kind is Kind.by_construction:
        return "absolute error"
    if claim.kind is Kind.paired_comparison and claim.metric:
        name = claim.metric.rsplit(".", 1)[-1]
        return "nats" if "loss" in name else name
    return None


def deciding_test(claim: Claim) -> str:
    """A short name of the test that decides the verdict, with its sidedness."""
    sides = sidedness(claim.sides)
    if claim.kind is Kind.paired_comparison:
        b = -claim.margin if claim.margin is not None else claim.min_effect
        centre = "median" if claim.test is StatTest.wilcoxon else "mean"
        return f"{TEST_NAMES[claim.test]} vs {centre} difference {b:+g}, {sides}"
    if claim.kind is Kind.correlation:
        sign = 1 if claim.direction is Direction.positive else -1
        return f"{TEST_NAMES[claim.test]} vs ρ = {sign * claim.min_effect:+g}, {sides}"
    return {Kind.invariant: "every logged point checked",
            Kind.counterexample_search: "counterexample search (one suffices)",
            Kind.by_construction: "identity to float tolerance"}[claim.kind]
