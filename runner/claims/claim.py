"""A claim as a typed, pre-registered decision rule, and the hash that pins the rule.

A claim names what is compared (arms), what is measured (a metric path into the trial row),
which way is better, how many seeds, which test, alpha and the smallest effect that matters.
Everything that decides the verdict is the *rule*; its hash (`rule_hash`) is computed before
any trial runs, stored on every trial the claim asks for, and verdicts count only trials that
carry the same hash: changing the rule after seeing data starts a new claim.

`implementation_check: true` marks a statement that holds by construction (an identity, a bound
enforced by a clamp): its verdicts are reported as implementation checks, apart from the claims.
A claim tested in an experiment is registered with its `setting` (each arm's resolved trainer
options, the model, the data and the budget), so the rule hash covers all of them; rules
registered without one keep their hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from runner.ledger import stable_hash


class Kind(StrEnum):
    paired_comparison = "paired_comparison"  # arm A vs arm B, paired by seed
    correlation = "correlation"  # x vs y over the entries of a per-layer table
    invariant = "invariant"  # a per-step inequality that must never break
    counterexample_search = "counterexample_search"  # any bad trial disproves
    by_construction = "by_construction"  # an identity checked to float tolerance


class Direction(StrEnum):
    lower = "lower"  # paired comparison: lower metric is better (losses)
    higher = "higher"  # paired comparison: higher metric is better
    positive = "positive"  # correlation: the claimed sign of r
    negative = "negative"


class StatTest(StrEnum):
    paired_t = "paired_t"  # scipy.stats.ttest_rel
    wilcoxon = "wilcoxon"  # scipy.stats.wilcoxon (signed-rank)
    bootstrap = "bootstrap"  # scipy.stats.bootstrap (percentile CI of the mean difference)
    pearson = "pearson"  # scipy.stats.pearsonr
    spearman = "spearman"  # scipy.stats.spearmanr
    none = "none"  # invariant, counterexample search, by construction: no test


PAIRED_TESTS = (StatTest.paired_t, StatTest.wilcoxon, StatTest.bootstrap)
CORRELATION_TESTS = (StatTest.pearson, StatTest.spearman)


@dataclass(frozen=True)
class Arm:
    """One trainer configuration: `trainer` names `conf/trainer/<trainer>.yaml`."""

    name: str
    trainer: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """A pre-registered claim. Fields after `rationale` are the decision rule."""

    id: str
    statement: str
    source: str
    kind: Kind
    rationale: str = ""  # why min_effect / margin / tolerance have the values they have
    arms: tuple[Arm, ...] = ()
    metric: str | None = None  # dotted path into the trial row, e.g. metrics.val_loss_final
    direction: Direction | None = None
    trials: int = 3  # seeds first_seed..first_seed+trials-1
    first_seed: int = 0  # a confirmatory experiment runs on seeds its choice was not made on
    test: StatTest = StatTest.none
    alpha: float = 0.05
    min_effect: float = 0.0  # smallest effect that matters, in metric units (|r| for correlation)
    margin: float | None = None  # "matches or beats": non-inferiority margin, metric units
    budget: dict[str, int] = field(default_factory=dict)  # BudgetConfig overrides, equal for arms
    x: str | None = None  # correlation: path to the x values (e.g. derived.layers[*].stable_rank)
    y: str | None = None
    invariant: str | None = None  # "PATH OP PATH|NUMBER", checked elementwise
    reference: str | None = None  # counterexample: metric must beat this path (e.g. initial loss)
    check: str | None = None  # by_construction: name of a registered check
    tolerance: float = 0.0  # by_construction / invariant: float slack, with its reason in rationale
    sides: int = 2  # 1: one-sided tests, only with `sides_reason` saying why
    setting: dict[str, Any] | None = None  # arms' trainer options, model, data, budget
    sides_reason: str | None = None  # not part of the rule: its justification
    implementation_check: bool = False  # holds by construction: reported apart from claims
    path: str = ""  # the file it was loaded from (not part of the rule)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.trials))

    def rule(self) -> dict[str, Any]:
        """Everything that decides the verdict (not the wording, source or file)."""
        return {
            "kind": self.kind.value,
            "arms": [{"name": a.name, "trainer": a.trainer, "overrides": a.overrides}
                     for a in self.arms],
            "metric": self.metric, "direction": self.direction.value if self.direction else None,
            "trials": self.trials, "test": self.test.value, "alpha": self.alpha,
            "min_effect": self.min_effect, "margin": self.margin, "budget": self.budget,
            "x": self.x, "y": self.y, "invariant": self.invariant, "reference": self.reference,
            "check": self.check, "tolerance": self.tolerance,
            # Added after the first rules were registered: present only when set, so those
            # rules keep their hashes and stay decidable from their trials.
            **({"sides": self.sides} if self.sides != 2 else {}),
            **({"first_seed": self.first_seed} if self.first_seed else {}),
            **({"setting": self.setting} if self.setting is not None else {}),
        }

    @property
    def rule_hash(self) -> str:
        return stable_hash(self.rule())

    @property
    def is_check(self) -> bool:
        return self.implementation_check or self.kind is Kind.by_construction

    def as_dict(self) -> dict[str, Any]:
        extra = {"sides_reason": self.sides_reason} if self.sides_reason else {}
        if self.implementation_check:
            extra["implementation_check"] = True
        return {"id": self.id, "statement": self.statement, "source": self.source,
                "rationale": self.rationale, **self.rule(), **extra,
                "rule_hash": self.rule_hash}


def core_rule(claim: Claim) -> dict:
    """The rule less what an experiment sets (trials, first_seed, budget, setting): a claim run
    on other seeds by a confirmatory experiment is the same claim, not a superseded one."""
    return {k: v for k, v in claim.rule().items()
            if k not in ("trials", "first_seed", "budget", "setting")}

