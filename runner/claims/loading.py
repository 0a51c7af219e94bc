"""Loading and validating claims: `conf/claim/<id>.yaml` (or a registered rule record) -> `Claim`.

Invalid files fail at load time with one line naming the file and the key
(`conf/claim/x.yaml: alpha: must be in (0, 0.5), got 0.7`), and so does a rule that could not
be decided: a metric no trial records, or a test that cannot reach alpha at the planned number
of trials (the exact Wilcoxon test with 3 pairs: smallest two-sided p 0.25).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from runner.claims.arms import trainer_name
from runner.claims.checks import CHECKS
from runner.claims.claim import (
    CORRELATION_TESTS,
    PAIRED_TESTS,
    Arm,
    Claim,
    Direction,
    Kind,
    StatTest,
    core_rule,
)
from runner.claims.paths import invariant_clauses, is_metric_path, parse_invariant
from runner.claims.stats import min_reachable_n, smallest_p
from runner.config.paths import CLAIM_DIR
from runner.errors import ConfigError
from runner.trial import RECORDED_METRICS, ROW_SECTIONS

BUDGET_KEYS = ("max_tokens", "max_steps", "eval_every", "eval_examples", "eval_batch_size")


def claim_path(claim_id: str, claim_dir: Path = CLAIM_DIR) -> Path:
    path = claim_dir / f"{claim_id}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in claim_dir.glob("*.yaml"))) or "none"
        raise ConfigError(f"claim={claim_id}: no such claim in {_show(claim_dir)} "
                          f"(known: {known})")
    return path


def load_claim(claim: str | Path, claim_dir: Path = CLAIM_DIR) -> Claim:
    """Load and validate one claim, by id (`conf/claim/<id>.yaml`) or by file path."""
    path = Path(claim) if str(claim).endswith((".yaml", ".yml")) else claim_path(str(claim),
                                                                                 claim_dir)
    where = _show(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        line = str(err).strip().splitlines()[0]
        raise ConfigError(f"{where}: cannot read claim ({line})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a claim must be a mapping of keys to values")
    return _ClaimParser(where, raw, path.stem).parse()


def claim_from_record(record: dict, where: str) -> Claim:
    """A Claim from a pre-registration record (`results/rules/*.json`, `Claim.as_dict()`)."""
    raw = {k: v for k, v in record.items()
           if k not in ("rule_hash", "registered_at", "git_commit")}
    raw = {k: v for k, v in raw.items() if v is not None or k in ("statement", "source")}
    claim = _ClaimParser(where, raw, str(record.get("id"))).parse()
    if record.get("rule_hash") and claim.rule_hash != record["rule_hash"]:
        raise ConfigError(f"{where}: rule_hash: the recorded rule does not hash to "
                          f"{record['rule_hash'][:12]}")
    return with_current_wording(claim)


def with_current_wording(claim: Claim, claim_dir: Path = CLAIM_DIR) -> Claim:
    """A registered rule with the wording of its current claim file: the source and whether
    it is an implementation check always (neither decides anything), the statement and the
    rationale where the file states the same rule (they describe it)."""
    path = claim_dir / f"{claim.id}.yaml"
    if not path.is_file():
        return claim
    current = load_claim(path)
    changes: dict[str, Any] = {"source": current.source,
                               "implementation_check": current.implementation_check}
    if core_rule(current) == core_rule(claim):
        changes.update(statement=current.statement, rationale=current.rationale)
    return replace(claim, **changes)


def load_claims(claim_dir: Path = CLAIM_DIR) -> list[Claim]:
    """Every claim under `claim_dir`, sorted by id."""
    return [load_claim(p) for p in sorted(claim_dir.glob("*.yaml"))]


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class _ClaimParser:
    """Type and range checks, one per key, each raising one line `<file>: <key>: <why>`."""

    def __init__(self, where: str, raw: dict, stem: str) -> None:
        self.where, self.raw, self.stem = where, raw, stem

    def fail(self, key: str, why: str) -> None:
        raise ConfigError(f"{self.where}: {key}: {why}")

    def parse(self) -> Claim:
        known = {f.name for f in fields(Claim)} - {"path"}
        for key in self.raw:
            if key not in known:
                self.fail(str(key), f"unknown key (valid keys: {', '.join(sorted(known))})")
        for key in ("id", "statement", "source", "kind"):
            if self.raw.get(key) in (None, ""):
                self.fail(key, "missing required value")
        claim = Claim(
            id=self.text("id"), statement=self.text("statement"), source=self.text("source"),
            kind=self.enum("kind", Kind), rationale=self.text("rationale", ""),
            arms=self.arms(), metric=self.text("metric", None),
            direction=self.enum("direction", Direction, None), trials=self.integer("trials", 3),
            first_seed=self.integer("first_seed", 0),
            test=self.enum("test", StatTest, StatTest.none), alpha=self.number("alpha", 0.05),
            min_effect=self.number("min_effect", 0.0), margin=self.number("margin", None),
            budget=self.budget(), x=self.text("x", None), y=self.text("y", None),
            invariant=self.text("invariant", None), reference=self.text("reference", None),
            check=self.text("check", None), tolerance=self.number("tolerance", 0.0),
            sides=self.integer("sides", 2), setting=self.mapping("setting"),
            sides_reason=self.text("sides_reason", None),
            implementation_check=self.flag("implementation_check"), path=self.where,
        )
        self.validate(claim)
        return claim

    # -- typed getters --------------------------------------------------------------------

    def text(self, key: str, default: Any = ...) -> Any:
        value = self.raw.get(key, default)
        if value is ...:
            self.fail(key, "missing required value")
        if value is not None and not isinstance(value, str):
            self.fail(key, f"must be a string, got {type(value).__name__} {value!r}")
        return value.strip() if isinstance(value, str) else value

    def number(self, key: str, default: float | None) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            self.fail(key, f"must be finite, got {value}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def mapping(self, key: str) -> dict | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {type(value).__name__} {value!r}")
        return value

    def enum(self, key: str, enum: type[Enum], default: Any = ...) -> Any:
        value = self.raw.get(key, default)
        if value is ... or value is None:
            if default is ...:
                self.fail(key, "missing required value")
            return default
        try:
            return enum(value)
        except ValueError:
            valid = ", ".join(m.value for m in enum)
            self.fail(key, f"'{value}' is not one of: {valid}")

    def arms(self) -> tuple[Arm, ...]:
        raw = self.raw.get("arms") or []
        if not isinstance(raw, list):
            self.fail("arms", "must be a list of {name, trainer, overrides}")
        arms = []
        for i, item in enumerate(raw):
            key = f"arms[{i}]"
            if not isinstance(item, dict):
                self.fail(key, "must be a mapping {name, trainer, overrides}")
            extra = set(item) - {"name", "trainer", "overrides"}
            if extra:
                self.fail(f"{key}.{sorted(extra)[0]}", "unknown key (valid keys: name, "
                          "overrides, trainer)")
            for sub in ("name", "trainer"):
                if not isinstance(item.get(sub), str) or not item[sub]:
                    self.fail(f"{key}.{sub}", "missing required value (a string)")
            overrides = item.get("overrides") or {}
            if not isinstance(overrides, dict):
                self.fail(f"{key}.overrides", "must be a mapping of trainer options")
            arms.append(Arm(item["name"], item["trainer"], dict(overrides)))
        return tuple(arms)

    def budget(self) -> dict[str, int]:
        raw = self.raw.get("budget") or {}
        if not isinstance(raw, dict):
            self.fail("budget", "must be a mapping of budget options")
        for key, value in raw.items():
            if key not in BUDGET_KEYS:
                self.fail(f"budget.{key}", f"unknown key (valid keys: {', '.join(BUDGET_KEYS)})")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self.fail(f"budget.{key}", f"must be a positive integer, got {value!r}")
        return dict(raw)

    # -- rules that span keys -------------------------------------------------------------

    def validate(self, c: Claim) -> None:
        if c.id != self.stem:
            self.fail("id", f"'{c.id}' must match the file name '{self.stem}'")
        if not 0.0 < c.alpha < 0.5:
            self.fail("alpha", f"must be in (0, 0.5), got {c.alpha}")
        if c.trials < 1:
            self.fail("trials", f"must be >= 1, got {c.trials}")
        if c.first_seed < 0:
            self.fail("first_seed", f"must be >= 0, got {c.first_seed}")
        if c.min_effect < 0 or (c.margin is not None and c.margin <= 0) or c.tolerance < 0:
            key = "min_effect" if c.min_effect < 0 else "margin" if c.margin is not None and \
                c.margin <= 0 else "tolerance"
            self.fail(key, f"must be {'> 0' if key == 'margin' else '>= 0'}")
        if c.sides not in (1, 2):
            self.fail("sides", f"must be 1 or 2, got {c.sides}")
        if c.sides == 1 and not c.sides_reason:
            self.fail("sides_reason", "a one-sided test needs its reason stated (or sides: 2)")
        names = [a.name for a in c.arms]
        if len(set(names)) != len(names):
            self.fail("arms", f"arm names must be unique, got {names}")
        {
            Kind.paired_comparison: self.validate_paired,
            Kind.correlation: self.validate_correlation,
            Kind.invariant: self.validate_invariant,
            Kind.counterexample_search: self.validate_counterexample,
            Kind.by_construction: self.validate_by_construction,
        }[c.kind](c)
        for key in ("metric", "x", "y", "reference"):
            value = getattr(c, key)
            if value is not None and not is_metric_path(value):
                self.fail(key, f"'{value}' is not a metric path (a.b[*].c, a.*.c, a[0])")
            if value is not None:
                self.check_recorded(key, value)
        if c.invariant is not None:
            for clause in invariant_clauses(c.invariant):
                lhs, _, rhs = parse_invariant(clause)
                for path in (lhs, rhs):
                    if isinstance(path, str):
                        self.check_recorded("invariant", path)

    def check_recorded(self, key: str, path: str) -> None:
        """A rule must read something trials record: refuse `metrics.nope` before training."""
        head, _, rest = path.partition(".")
        section = head.split("[", 1)[0]
        if section not in ROW_SECTIONS:
            self.fail(key, f"'{path}': trials record no '{section}' (they record: "
                           f"{', '.join(ROW_SECTIONS)})")
        name = rest.split(".", 1)[0].split("[", 1)[0]
        if section == "metrics" and name != "*" and name not in RECORDED_METRICS:
            self.fail(key, f"'{path}': no trial records metrics.{name} (recorded: "
                           f"{', '.join(RECORDED_METRICS)})")

    def need(self, c: Claim, *keys: str) -> None:
        for key in keys:
            if getattr(c, key) in (None, ""):
                self.fail(key, f"missing required value for kind {c.kind.value}")

    def validate_paired(self, c: Claim) -> None:
        self.need(c, "metric", "direction")
        if len(c.arms) != 2:
            self.fail("arms", f"a paired comparison needs exactly 2 arms (subject, baseline), "
                              f"got {len(c.arms)}")
        if c.direction not in (Direction.lower, Direction.higher):
            self.fail("direction", "must be lower or higher for a paired comparison")
        if c.test not in PAIRED_TESTS:
            self.fail("test", "must be paired_t, wilcoxon or bootstrap for a paired comparison")
        if c.trials < 3:
            self.fail("trials", f"must be >= 3 for a paired comparison (got {c.trials}): fewer "
                                "seeds cannot estimate the spread")
        if c.min_effect <= 0:
            self.fail("min_effect", "must be > 0: state the smallest effect that matters")
        floor = smallest_p(c.test, c.trials, c.sides)
        if floor >= c.alpha:
            self.fail("test", f"{c.test.value} with {c.trials} paired trials cannot reach "
                              f"alpha={c.alpha:g} (its smallest {'two' if c.sides == 2 else 'one'}"
                              f"-sided p is {floor:.3g}); plan at least "
                              f"{min_reachable_n(c.test, c.alpha, c.sides)} trials")
        a, b = c.arms
        if trainer_name(a.trainer) == trainer_name(b.trainer) and not any(
                k in b.overrides and a.overrides[k] != b.overrides[k] for k in a.overrides):
            self.fail("arms", f"'{a.name}' and '{b.name}' use the same trainer: give both an "
                              "override of the same key with different values so their "
                              "trials can be told apart")

    def validate_correlation(self, c: Claim) -> None:
        self.need(c, "x", "y", "direction")
        if len(c.arms) != 1:
            self.fail("arms", f"a correlation claim needs exactly 1 arm, got {len(c.arms)}")
        if c.direction not in (Direction.positive, Direction.negative):
            self.fail("direction", "must be positive or negative for a correlation")
        if c.test not in CORRELATION_TESTS:
            self.fail("test", "must be pearson or spearman for a correlation")
        if not 0.0 < c.min_effect < 1.0:
            self.fail("min_effect", f"must be a correlation magnitude in (0, 1), got "
                                    f"{c.min_effect}")

    def validate_invariant(self, c: Claim) -> None:
        self.need(c, "invariant")
        if not c.arms:
            self.fail("arms", "an invariant needs at least 1 arm whose trials it checks")
        self.check_invariant(c.invariant)

    def validate_counterexample(self, c: Claim) -> None:
        if not c.arms:
            self.fail("arms", "a counterexample search needs at least 1 arm")
        if (c.metric is None) != (c.reference is None):
            self.fail("reference" if c.reference is None else "metric",
                      "metric and reference go together (a trial must improve metric over "
                      "reference)")
        if c.metric is not None and c.direction not in (Direction.lower, Direction.higher):
            self.fail("direction", "must be lower or higher when metric is set")
        if c.invariant is not None:
            self.check_invariant(c.invariant)

    def validate_by_construction(self, c: Claim) -> None:
        self.need(c, "check")
        if c.check not in CHECKS:
            self.fail("check", f"'{c.check}' is not a registered check (known: "
                               f"{', '.join(sorted(CHECKS))})")
        if c.arms:
            self.fail("arms", "a by-construction claim computes, it trains nothing: no arms")

    def check_invariant(self, text: str) -> None:
        try:
            for clause in invariant_clauses(text):
                parse_invariant(clause)
        except ValueError as err:
            self.fail("invariant", str(err))
